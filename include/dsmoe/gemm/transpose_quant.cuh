// One-pass "quantize transposed": x [T, K] -> x^T quantized 1x128 along T (the operands of the TN
// weight-gradient GEMMs). Same formulas as dsmoe.ref.quant (amax clamped to 1e-4, scale = amax / 448,
// optional UE8M0, RNE + saturation, NaN -> 0x7f); padding tokens (T..T_pad) are zero.
#pragma once
#include "dsmoe/common/utils.cuh"

namespace dsmoe::gemm {

struct TransposeQuantParams {
  const void* __restrict__ x;  // [T, K], (t, k) at x[t * x_ld + k]
  uint8_t* __restrict__ q;     // [K, T_pad] e4m3, (k, t) at q[k * q_ld + t]
  float* __restrict__ scales;  // [K, T_pad / 128] MN-major, (k, tb) at scales[tb * s_ld + k]
  int64_t T, K, x_ld, q_ld, s_ld;
  bool ue8m0;
};

constexpr int kTqTokens = 128;  // one scale group along T
constexpr int kTqCols = 64;     // K columns per CTA
constexpr int kTqThreads = 256; // 4 threads per column, 32 tokens each

// grid: (ceil(K / 64), T_pad / 128)
template <typename T>
__global__ void __launch_bounds__(kTqThreads) transpose_quant_kernel(const __grid_constant__ TransposeQuantParams p) {
  __shared__ float tile[kTqTokens][kTqCols + 1];  // +1: conflict-free column reads
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTqTokens;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTqCols;
  const T* x = static_cast<const T*>(p.x);
  // coalesced loads: consecutive threads read consecutive k of one token row
  for (int idx = threadIdx.x; idx < kTqTokens * kTqCols; idx += kTqThreads) {
    const int r = idx / kTqCols, c = idx % kTqCols;
    const int64_t t = t0 + r, k = k0 + c;
    tile[r][c] = (t < p.T && k < p.K) ? to_float<T>(x[t * p.x_ld + k]) : 0.0f;
  }
  __syncthreads();
  const int c = threadIdx.x / 4, part = threadIdx.x % 4;  // column, quarter of the 128 tokens
  float v[32];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    v[j] = tile[part * 32 + j][c];
    amax = nan_max(amax, fabsf(v[j]));
  }
  // the 4 threads of a column are consecutive lanes
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = (amax < kAmaxFloor) ? kAmaxFloor : amax;  // keeps NaN, like torch.clamp
  float s = amax / kFP8Max;
  if (p.ue8m0) s = ue8m0_round_up(s);
  const int64_t k = k0 + c;
  if (k >= p.K) return;
  if (part == 0) p.scales[static_cast<int64_t>(blockIdx.y) * p.s_ld + k] = s;
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    w[j] = uint32_t(pack_fp8x2(v[4 * j] / s, v[4 * j + 1] / s)) |
           (uint32_t(pack_fp8x2(v[4 * j + 2] / s, v[4 * j + 3] / s)) << 16);
  }
  uint4* dst = reinterpret_cast<uint4*>(p.q + k * p.q_ld + t0 + part * 32);  // 16-byte aligned (launcher)
  dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
  dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

}  // namespace dsmoe::gemm
