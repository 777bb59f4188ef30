// The FP8 GEMM's own PTX wrappers: the e4m3 wgmma shape and its K-major operand descriptor. The
// generic wrappers (mbarrier, TMA, setmaxnreg, wgmma fence/commit/wait) are in dsmoe/common/ptx.cuh
// and reachable here as dsmoe::gemm::ptx::<name>.
#pragma once
#include <cstdint>

#include "dsmoe/common/ptx.cuh"

namespace dsmoe::gemm::ptx {

using namespace ::dsmoe::ptx;

// Descriptor of a K-major operand tile as TMA writes it with CU_TENSOR_MAP_SWIZZLE_128B and a 128-byte
// inner box: rows of 128 bytes (one 128-K block of e4m3), 8-row atoms of 1024 bytes, the tile
// 1024-aligned. SBO = 1024 (next 8 rows), LBO unused. The k32 steps inside the row advance the start
// address by 32 bytes.
__device__ __forceinline__ uint64_t sw128_kmajor_desc(uint32_t saddr) { return make_desc_sw128(saddr, 0, 1024); }

#if DSMOE_SM90A
// D[64 x 128] (+)= A[64 x 32] * B[128 x 32]^T, e4m3 inputs from shared memory, fp32 accumulators in
// registers (the m64nNk32 fragment: d[4i + {0,1}] = row lane/4 + 16*warp, cols 8i + 2*(lane%4) + {0,1};
// d[4i + {2,3}] = the same 8 rows below). scale_d = 0 overwrites D, 1 accumulates.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : DSMOE_PTX_ACC64(d, 0)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)
      : "memory");
}
#endif  // DSMOE_SM90A

}  // namespace dsmoe::gemm::ptx
