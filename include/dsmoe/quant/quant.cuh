// FP8 (e4m3) quantization kernels: 1xG token groups (activations) and BNxBK blocks (weights).
// Semantics (the reference is dsmoe.ref.quant): amax = max|x| in fp32, clamped to >= 1e-4;
// scale = amax / 448 (optionally rounded up to a power of two, UE8M0); q = e4m3_rne_sat(x / scale).
// The stored scale is the dequantization multiplier: x ~= q * scale.
#pragma once
#include "dsmoe/common/utils.cuh"

namespace dsmoe::quant {

struct TokenGroupParams {
  const void* __restrict__ x;  // [rows, K], element (r, k) at x[r * x_row_stride + k]
  uint8_t* __restrict__ q;     // [rows, K] e4m3, element (r, k) at q[r * q_row_stride + k]
  float* __restrict__ scales;  // [rows, K / G]; (r, j) at scales[(r / rows_inner) * s_batch + (r % rows_inner) * s_row + j * s_col]
  int64_t rows, K, x_row_stride, q_row_stride;
  int64_t rows_inner, s_batch, s_row, s_col;
  bool ue8m0;
};

// One thread quantizes kVec consecutive elements of one group; kGroup / kVec threads share a group
// and reduce the amax with shuffles. Each thread issues its 16-byte loads before any use.
template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(256) token_group_quant_kernel(const __grid_constant__ TokenGroupParams p) {
  constexpr int kThreadsPerGroup = kGroup / kVec;
  static_assert(kGroup % kVec == 0 && kThreadsPerGroup <= 32, "a group must fit in one warp");
  const int64_t groups_per_row = p.K / kGroup;
  const int64_t total_threads = p.rows * groups_per_row * kThreadsPerGroup;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // NOTE: no early return: every lane must take part in the shuffle reduction.
  const bool active = tid < total_threads;
  const int64_t t = active ? tid : 0;
  const int64_t group = t / kThreadsPerGroup;
  const int lane_in_group = static_cast<int>(t % kThreadsPerGroup);
  const int64_t r = group / groups_per_row;
  const int64_t j = group % groups_per_row;
  const int64_t k0 = j * kGroup + static_cast<int64_t>(lane_in_group) * kVec;

  float v[kVec];
  load_vec<T, kVec>(static_cast<const T*>(p.x) + r * p.x_row_stride + k0, v);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(v[i]));
  amax = group_reduce_max<kThreadsPerGroup>(amax);
  // clamp(min=1e-4) that keeps NaN, as torch.clamp does
  amax = (amax < kAmaxFloor) ? kAmaxFloor : amax;
  float s = amax / kFP8Max;
  if (p.ue8m0) s = ue8m0_round_up(s);
  if (!active) return;

  uint16_t packed[kVec / 2];
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) packed[i] = pack_fp8x2(v[2 * i] / s, v[2 * i + 1] / s);
  uint8_t* dst = p.q + r * p.q_row_stride + k0;
  static_assert(kVec % 8 == 0, "kVec fp8 bytes are stored 8 at a time");
#pragma unroll
  for (int i = 0; i < kVec / 8; ++i) {
    uint2 w;
    w.x = uint32_t(packed[4 * i]) | (uint32_t(packed[4 * i + 1]) << 16);
    w.y = uint32_t(packed[4 * i + 2]) | (uint32_t(packed[4 * i + 3]) << 16);
    reinterpret_cast<uint2*>(dst)[i] = w;
  }
  if (lane_in_group == 0) {
    const int64_t b = r / p.rows_inner, ri = r % p.rows_inner;
    p.scales[b * p.s_batch + ri * p.s_row + j * p.s_col] = s;
  }
}

struct BlockParams {
  const void* __restrict__ w;  // [N, K], element (n, k) at w[n * w_row_stride + k]
  uint8_t* __restrict__ q;     // [N, K] e4m3, contiguous rows of q_row_stride
  float* __restrict__ scale_inv;  // [ceil(N / BN), ceil(K / BK)], row-major
  int64_t N, K, w_row_stride, q_row_stride;
  int BN, BK;
  bool ue8m0;
};

// One CTA per (BN x BK) block: pass 1 reduces the amax, pass 2 re-reads (L1/L2-resident) and quantizes.
// Elements outside [N, K] count as zero in the amax (the zero-padded edge block of the V3 format).
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(256) block_quant_kernel(const __grid_constant__ BlockParams p) {
  constexpr int kVec = 8;
  const int64_t bn = blockIdx.y, bk = blockIdx.x;
  const int64_t n0 = bn * p.BN, k0 = bk * p.BK;
  const int64_t n_end = min(n0 + p.BN, p.N), k_end = min(k0 + p.BK, p.K);
  const T* w = static_cast<const T*>(p.w);
  const int cols_threads = (p.BK + kVec - 1) / kVec;

  float amax = 0.0f;
  for (int idx = threadIdx.x; idx < p.BN * cols_threads; idx += blockDim.x) {
    const int64_t n = n0 + idx / cols_threads, k = k0 + static_cast<int64_t>(idx % cols_threads) * kVec;
    if (n >= n_end || k >= k_end) continue;
    const T* src = w + n * p.w_row_stride + k;
    if (kVectorized && k + kVec <= k_end) {
      float v[kVec];
      load_vec<T, kVec>(src, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(v[i]));
    } else {
      for (int i = 0; i < kVec && k + i < k_end; ++i) amax = nan_max(amax, fabsf(to_float<T>(src[i])));
    }
  }
  amax = group_reduce_max<32>(amax);
  __shared__ float warp_max[8];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i) amax = nan_max(amax, warp_max[i]);
  amax = (amax < kAmaxFloor) ? kAmaxFloor : amax;
  float s = amax / kFP8Max;
  if (p.ue8m0) s = ue8m0_round_up(s);
  if (threadIdx.x == 0) p.scale_inv[bn * ((p.K + p.BK - 1) / p.BK) + bk] = s;

  for (int idx = threadIdx.x; idx < p.BN * cols_threads; idx += blockDim.x) {
    const int64_t n = n0 + idx / cols_threads, k = k0 + static_cast<int64_t>(idx % cols_threads) * kVec;
    if (n >= n_end || k >= k_end) continue;
    const T* src = w + n * p.w_row_stride + k;
    uint8_t* dst = p.q + n * p.q_row_stride + k;
    if (kVectorized && k + kVec <= k_end) {
      float v[kVec];
      load_vec<T, kVec>(src, v);
      uint2 out;
      out.x = uint32_t(pack_fp8x2(v[0] / s, v[1] / s)) | (uint32_t(pack_fp8x2(v[2] / s, v[3] / s)) << 16);
      out.y = uint32_t(pack_fp8x2(v[4] / s, v[5] / s)) | (uint32_t(pack_fp8x2(v[6] / s, v[7] / s)) << 16);
      *reinterpret_cast<uint2*>(dst) = out;
    } else {
      for (int i = 0; i < kVec && k + i < k_end; ++i) {
        dst[i] = static_cast<uint8_t>(pack_fp8x2(to_float<T>(src[i]) / s, 0.0f) & 0xff);
      }
    }
  }
}

}  // namespace dsmoe::quant
