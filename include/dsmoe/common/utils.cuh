// Device helpers shared by every kernel family. No torch, no host code.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace dsmoe {

// Largest finite float8_e4m3fn value.
constexpr float kFP8Max = 448.0f;
// Lower clamp of a group's amax (V3: 1e-4), so all-zero groups get a finite scale.
constexpr float kAmaxFloor = 1e-4f;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// NOTE: fmaxf drops NaN; the references (torch.amax) propagate it, so a NaN in a group must
// give a NaN scale here too.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Round-to-nearest-even, saturating to +-448. NaN becomes the positive NaN byte 0x7f: the references
// canonicalize NaN the same way, because the sign of a NaN produced by arithmetic differs between
// CPU and GPU.
__device__ __forceinline__ uint16_t pack_fp8x2(float a, float b) {
  a = (a != a) ? __int_as_float(0x7fffffff) : a;
  b = (b != b) ? __int_as_float(0x7fffffff) : b;
  __nv_fp8x2_storage_t r = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  uint16_t v = static_cast<uint16_t>(r);
  // cvt may emit 0xff for NaN; force 0x7f in each byte.
  if ((v & 0x7f) == 0x7f) v = (v & 0xff00) | 0x7f;
  if (((v >> 8) & 0x7f) == 0x7f) v = (v & 0x00ff) | 0x7f00;
  return v;
}

__device__ __forceinline__ float fp8_to_float(uint8_t v) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(__half(h));
}

// 2^ceil(log2(s)) computed exactly from the bits (log2f could round s = 2^k(1+eps) down to k).
__device__ __forceinline__ float ue8m0_round_up(float s) {
  uint32_t bits = __float_as_uint(s);
  if ((bits & 0x7fffffffu) >= 0x7f800000u) return s;  // inf / NaN unchanged
  if ((bits & 0x007fffffu) == 0u) return s;           // already a power of two
  uint32_t exp = (bits >> 23) & 0xffu;
  return __uint_as_float((exp + 1u) << 23);            // s > 0 and normal (s >= 1e-4/448)
}

template <int kWidth>
__device__ __forceinline__ float group_reduce_max(float v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "width must be a power of two <= 32");
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off, kWidth));
  return v;
}

// Loads kN contiguous elements (kN * sizeof(T) a multiple of 16 bytes, 16-byte aligned) as floats.
template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[kN]) {
  static_assert((kN * sizeof(T)) % 16 == 0, "vector loads are 16 bytes wide");
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kN / kPer; ++i) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + i);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[i * kPer + j] = to_float<T>(e[j]);
  }
}

}  // namespace dsmoe
