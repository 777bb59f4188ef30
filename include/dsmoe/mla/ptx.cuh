// PTX wrappers used by the MLA kernels: the bf16 wgmma shapes (fp32 accumulators). The generic
// wrappers (cp.async, proxy fences, wgmma fence/commit/wait, smem descriptors) are in
// dsmoe/common/ptx.cuh. Device code only. Everything that needs sm_90a is guarded by DSMOE_MLA_SM90.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>

#include "dsmoe/common/ptx.cuh"

// Kept as the family's own name of the common guard (the MLA kernels test it).
#define DSMOE_MLA_SM90 DSMOE_SM90A

namespace dsmoe {
namespace mla {

// The generic wrappers live in dsmoe::ptx; these names stay reachable as dsmoe::mla::<name>.
using ::dsmoe::ptx::cp_async_16;
using ::dsmoe::ptx::cp_async_commit;
using ::dsmoe::ptx::cp_async_wait;
using ::dsmoe::ptx::ex2_approx_ftz;
using ::dsmoe::ptx::fence_proxy_async;
using ::dsmoe::ptx::fence_regs;
using ::dsmoe::ptx::make_desc_sw128;
using ::dsmoe::ptx::smem_u32;
using ::dsmoe::ptx::wgmma_commit;
using ::dsmoe::ptx::wgmma_fence;
using ::dsmoe::ptx::wgmma_wait;

// D[64 x 32] (+)= A[64 x 16] * B[32 x 16]^T; A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t da, uint64_t db, int scale_d) {
#if DSMOE_MLA_SM90
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : DSMOE_PTX_ACC8(d, 0), DSMOE_PTX_ACC8(d, 8)
      : "l"(da), "l"(db), "r"(scale_d));
#endif
}

// D[64 x 256] += A[64 x 16] * B[16 x 256]; A K-major, B MN-major (N contiguous; imm-trans-b = 1).
__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t da, uint64_t db) {
#if DSMOE_MLA_SM90
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 1;\n"
      "}\n"
      : DSMOE_PTX_ACC64(d, 0), DSMOE_PTX_ACC64(d, 64)
      : "l"(da), "l"(db));
#endif
}

}  // namespace mla
}  // namespace dsmoe
