// Writes new tokens into the paged MLA cache (bf16 or the 656-byte FP8 layout), optionally fused with
// the latent RMSNorm and the RoPE of k_rope. Device code only. One warp per token: lane l owns latent
// values [16 l, 16 l + 16) (so 8 lanes = one 128-value FP8 scale group) and rope pair l.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>

#include "dsmoe/common/utils.cuh"

namespace dsmoe {
namespace mla {

struct AppendParams {
  uint8_t* kv;                    // [num_blocks, 64, 1, 576] bf16 or [num_blocks, 64, 1, 656] bytes
  const int32_t* block_table;     // [B, max_blocks] (row stride bt_stride)
  const int32_t* batch_ids;       // [T]
  const int32_t* positions;       // [T]; negative: skip the token
  const __nv_bfloat16* latent;    // [T, 512] (row stride latent_stride)
  const __nv_bfloat16* k_rope;    // [T, 64] (row stride rope_stride)
  const __nv_bfloat16* norm_weight;  // [512] or null (no RMSNorm)
  const float* cos;               // [T, 32] or null (no RoPE)
  const float* sin;               // [T, 32]
  int T, B, max_blocks;
  int64_t bt_stride, latent_stride, rope_stride, cos_stride, sin_stride, kv_block_bytes;
  float eps;
  bool fp8, rope_interleaved, ue8m0;
};

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__global__ void __launch_bounds__(128) mla_append_kernel(const __grid_constant__ AppendParams p) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= p.T) return;
  const int pos = p.positions[warp];
  if (pos < 0) return;
  const int b = p.batch_ids[warp];
  // NOTE: ids are trusted here (a sync would be needed to check them); DSMOE_CHECK_BLOCK_TABLE=1
  // checks them on the host. Out-of-table positions are dropped rather than written anywhere.
  if (b < 0 || b >= p.B || pos >= p.max_blocks * 64) return;
  const int64_t page = p.block_table[b * p.bt_stride + pos / 64];
  const int slot = pos % 64;

  // latent: 16 values per lane, fp32
  float x[16];
  load_vec<__nv_bfloat16, 16>(p.latent + warp * p.latent_stride + lane * 16, x);
  if (p.norm_weight != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) ss += x[i] * x[i];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float r = rsqrtf(ss / 512.f + p.eps);
    float w[16];
    load_vec<__nv_bfloat16, 16>(p.norm_weight + lane * 16, w);
    // V3/HF order: normalize in fp32, round to bf16, multiply by the bf16 weight, round again.
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = bf16_round(w[i] * bf16_round(x[i] * r));
  }
  // rope pair of this lane
  const __nv_bfloat16* kr = p.k_rope + warp * p.rope_stride;
  const int i0 = p.rope_interleaved ? 2 * lane : lane;
  const int i1 = p.rope_interleaved ? 2 * lane + 1 : lane + 32;
  float a = __bfloat162float(kr[i0]), c = __bfloat162float(kr[i1]);
  if (p.cos != nullptr) {
    const float co = p.cos[warp * p.cos_stride + lane], si = p.sin[warp * p.sin_stride + lane];
    const float ra = a * co - c * si, rc = a * si + c * co;
    a = ra;
    c = rc;
  }
  // NOTE: without RoPE the input bits are stored as they are (a NaN keeps its payload, as in the
  // reference's tensor copy; a float round trip would canonicalize it).
  const __nv_bfloat16 ba = p.cos != nullptr ? __float2bfloat16_rn(a) : kr[i0];
  const __nv_bfloat16 bc = p.cos != nullptr ? __float2bfloat16_rn(c) : kr[i1];

  uint8_t* tok = p.kv + page * p.kv_block_bytes + slot * (p.fp8 ? 656 : 1152);
  if (!p.fp8) {
    uint4* dst = reinterpret_cast<uint4*>(tok + lane * 32);
    if (p.norm_weight == nullptr) {  // unfused: a bit copy (NaN payloads included), like the reference
      const uint4* src = reinterpret_cast<const uint4*>(p.latent + warp * p.latent_stride + lane * 16);
      dst[0] = src[0];
      dst[1] = src[1];
    } else {
      uint32_t packed[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * k], x[2 * k + 1]);
        packed[k] = *reinterpret_cast<uint32_t*>(&h);
      }
      dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
    __nv_bfloat16* rope = reinterpret_cast<__nv_bfloat16*>(tok + 1024);
    rope[i0] = ba;
    rope[i1] = bc;
  } else {
    // quantize the bf16 value the bf16 cache would hold
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      x[i] = bf16_round(x[i]);
      amax = nan_max(amax, fabsf(x[i]));
    }
    amax = group_reduce_max<8>(amax);
    float scale = fmaxf(amax, kAmaxFloor) / kFP8Max;
    if (amax != amax) scale = amax;  // NaN group -> NaN scale (as the reference)
    if (p.ue8m0) scale = ue8m0_round_up(scale);
    uint32_t q[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = pack_fp8x2(x[4 * k] / scale, x[4 * k + 1] / scale);
      const uint32_t hi = pack_fp8x2(x[4 * k + 2] / scale, x[4 * k + 3] / scale);
      q[k] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(tok + lane * 16) = make_uint4(q[0], q[1], q[2], q[3]);
    if (lane % 8 == 0) reinterpret_cast<float*>(tok + 512)[lane / 8] = scale;
    __nv_bfloat16* rope = reinterpret_cast<__nv_bfloat16*>(tok + 528);
    rope[i0] = ba;
    rope[i1] = bc;
  }
}

}  // namespace mla
}  // namespace dsmoe
