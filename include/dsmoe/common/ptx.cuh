// Thin wrappers over Hopper (sm_90a) instructions shared by the kernel families: shared-memory
// addresses, mbarrier, TMA (cp.async.bulk.tensor), cp.async, proxy fences, setmaxnreg, the wgmma
// synchronization instructions and the 128B-swizzle shared-memory matrix descriptor. The MMA shapes
// themselves (one wrapper per wgmma shape and type) live in the family headers.
//
// Semantics as in the PTX ISA. Every wrapper that orders memory is `asm volatile` with a "memory"
// clobber, so the compiler keeps them in program order. Instructions that need sm_90a have an empty
// body when compiled for another architecture (the kernels that use them guard their own bodies with
// DSMOE_SM90A and trap otherwise, and the launchers refuse such builds and other devices).
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSMOE_SM90A 1
#else
#define DSMOE_SM90A 0
#endif

// The #else body of a kernel guarded by DSMOE_SM90A (a build with e.g. DSMOE_CUDA_ARCHS=90): trap, so
// that a launch that got past the launcher's refusal (csrc require_sm90a) fails loudly instead of
// "succeeding" with its outputs unwritten.
#if defined(__CUDA_ARCH__)
#define DSMOE_TRAP_NOT_SM90A() asm volatile("trap;")
#else
#define DSMOE_TRAP_NOT_SM90A() \
  do {                         \
  } while (0)
#endif

namespace dsmoe::ptx {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarrier
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if DSMOE_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes the initializations visible to the async proxy (TMA) and to the other threads (with the
// __syncthreads that follows).
__device__ __forceinline__ void fence_barrier_init() {
#if DSMOE_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if DSMOE_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if DSMOE_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
// Returns once the phase of parity `parity` has completed (a fresh barrier counts the phase before its
// first one, of parity 1, as completed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if DSMOE_SM90A
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// ---------------------------------------------------------------- TMA
__device__ __forceinline__ void prefetch_tmap(const void* tmap) {
#if DSMOE_SM90A
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
#endif
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, uint32_t bar, int32_t c0, int32_t c1) {
#if DSMOE_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, uint32_t bar, int32_t c0, int32_t c1,
                                            int32_t c2) {
#if DSMOE_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#endif
}

// ---------------------------------------------------------------- math
// 2^x with MUFU.EX2 alone. exp2f without --use_fast_math wraps MUFU.EX2 in denormal scaling code on
// every call; ex2.approx.ftz flushes denormal inputs and results to zero instead. The softmax only
// evaluates 2^(s - rowmax) <= 1 into sums that hold the row max's 1, so a term below 2^-126 is lost to
// rounding either way. ex2(-inf) = +0, NaN stays NaN; error about 2 ulp (PTX ISA), far below the
// fp32 accumulation error.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------- cp.async (sm_80+)
// 16-byte async copy global -> shared; src_bytes = 0 writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Generic-proxy writes to shared memory (st.shared, cp.async) must be made visible to the async proxy
// (wgmma operand reads, TMA stores) before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() {
#if DSMOE_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------- register reconfiguration
// kRegs: a multiple of 8 in [24, 256], the same for every warp of the warpgroup.
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
#if DSMOE_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
#if DSMOE_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}

// ---------------------------------------------------------------- wgmma synchronization
// Shared-memory matrix descriptor (sm_90 wgmma), 128-byte swizzle (layout type 1 in bits 62-63):
// rows of 128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8), atoms of 8 rows (1024 bytes,
// 1024-aligned, so the base offset, bits 49-51, is 0). Start address >> 4 in bits 0-13, leading byte
// offset >> 4 in bits 16-29, stride byte offset >> 4 in bits 32-45.
//  - K-major operand: SBO = 1024 (next 8 rows along M/N); LBO unused (one swizzle atom spans the K of
//    one instruction); a K step inside the 128-byte row advances the start address by its byte width
//    (the hardware applies the swizzle XOR to the computed address, hence the 1024-byte alignment).
//  - MN-major operand: rows are K, 128 bytes of M/N per row; SBO = 1024 (next 8 K), LBO = distance
//    between consecutive 128-byte-wide M/N column tiles.
__device__ __forceinline__ uint64_t make_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // SWIZZLE_128B
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
#if DSMOE_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if DSMOE_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if DSMOE_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Accumulator operand lists of the wgmma wrappers: "+f" constraints of d[i .. i+7] / d[i .. i+63].
#define DSMOE_PTX_ACC8(d, i)                                                                            \
  "+f"(d[(i) + 0]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), \
      "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define DSMOE_PTX_ACC64(d, i)                                                                           \
  DSMOE_PTX_ACC8(d, (i) + 0), DSMOE_PTX_ACC8(d, (i) + 8), DSMOE_PTX_ACC8(d, (i) + 16), DSMOE_PTX_ACC8(d, (i) + 24), \
      DSMOE_PTX_ACC8(d, (i) + 32), DSMOE_PTX_ACC8(d, (i) + 40), DSMOE_PTX_ACC8(d, (i) + 48),              \
      DSMOE_PTX_ACC8(d, (i) + 56)

// Keeps the compiler from moving reads or writes of the accumulators across this point (the asm claims
// to modify them): used around wgmma_fence / wgmma_wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace dsmoe::ptx
