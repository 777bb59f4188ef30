// Host launchers of the FP8 GEMM kernels: argument checks, TMA descriptors, one launch.
// NOTE: the driver's cuTensorMapEncodeTiled is reached through cudaGetDriverEntryPointByVersion, so the
// module links only cudart_static (no -lcuda).
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

#include "common.h"
#include "gemm.h"
#include "dsmoe/gemm/fp8_gemm.cuh"
#include "dsmoe/gemm/transpose_quant.cuh"

namespace dsmoe {
namespace {
using gemm::GemmParams;
using gemm::Kind;

// The compiled (kind, block_m, block_n). NOTE: the one list of instantiations; mirrored by
// dsmoe.gemm_config.INSTANTIATIONS (tests/test_gemm_config.py checks they agree).
#define DSMOE_GEMM_INSTANTIATIONS(X) \
  X(kDense, 64, 128)                 \
  X(kDense, 128, 128)                \
  X(kDenseF32, 64, 128)              \
  X(kDenseF32, 128, 128)             \
  X(kContiguous, 128, 128)           \
  X(kMasked, 64, 128)                \
  X(kMasked, 128, 128)               \
  X(kKGrouped, 128, 128)

constexpr int kMaxStages = 8;
constexpr int kMinStages = 2;

// ------------------------------------------------------------------ driver entry point
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    if (err == cudaSuccess && q == cudaDriverEntryPointSuccess) fn = reinterpret_cast<EncodeTiledFn>(p);
  });
  if (fn == nullptr) throw std::runtime_error("dsmoe: the CUDA driver has no cuTensorMapEncodeTiled (needs driver >= 12.0)");
  return fn;
}

// 2D e4m3 operand [rows, cols] with row stride ld bytes; box {128 columns, box_rows}, 128B swizzle.
CUtensorMap tmap_fp8_2d(const char* op, const char* arg, uintptr_t ptr, int64_t cols, int64_t rows, int64_t ld,
                        int box_rows) {
  DSMOE_CHECK_ARG(is_aligned(ptr, 16), op, arg, "data pointer must be 16-byte aligned for TMA, offset ", ptr % 16);
  DSMOE_CHECK_ARG(ld % 16 == 0 && ld > 0 && ld < (int64_t(1) << 40), op, arg, "row stride must be a positive multiple of 16 bytes, got ", ld);
  DSMOE_CHECK_ARG(rows > 0 && rows <= (int64_t(1) << 31) - 1, op, arg, "rows must be in [1, 2^31), got ", rows);
  DSMOE_CHECK_ARG(cols > 0 && cols % 128 == 0 && cols < (int64_t(1) << 31), op, arg, "K must be a positive multiple of 128, got ", cols);
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld)};
  const cuuint32_t box[2] = {128u, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estr[2] = {1u, 1u};
  CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, reinterpret_cast<void*>(ptr), dims, strides, box, estr,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DSMOE_CHECK_ARG(r == CUDA_SUCCESS, op, arg, "cuTensorMapEncodeTiled failed with CUresult ", static_cast<int>(r));
  return m;
}

// 3D fp32 scales {M, KB, G}: (m, kb, g) at ptr[g * ld_g + kb * ld_k + m]; box {box_m, 1, 1}.
CUtensorMap tmap_scales(const char* op, const char* arg, uintptr_t ptr, int64_t M, int64_t KB, int64_t G, int64_t ld_k,
                        int64_t ld_g, int box_m) {
  DSMOE_CHECK_ARG(is_aligned(ptr, 16), op, arg, "data pointer must be 16-byte aligned for TMA, offset ", ptr % 16);
  DSMOE_CHECK_ARG(ld_k % 4 == 0 && ld_k >= M, op, arg, "scales must be MN-major with the K-block stride a multiple of 4 and >= ",
                  M, ", got ", ld_k);
  if (G > 1) {
    DSMOE_CHECK_ARG(ld_g % 4 == 0 && ld_g >= KB * ld_k, op, arg, "group stride must be a multiple of 4 and >= ", KB * ld_k,
                    ", got ", ld_g);
  } else {
    ld_g = KB * ld_k;  // unused dim of extent 1: any valid stride
  }
  CUtensorMap m;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(M), static_cast<cuuint64_t>(KB), static_cast<cuuint64_t>(G)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(ld_k * 4), static_cast<cuuint64_t>(ld_g * 4)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_m), 1u, 1u};
  const cuuint32_t estr[3] = {1u, 1u, 1u};
  CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, reinterpret_cast<void*>(ptr), dims, strides, box, estr,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                              CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DSMOE_CHECK_ARG(r == CUDA_SUCCESS, op, arg, "cuTensorMapEncodeTiled failed with CUresult ", static_cast<int>(r));
  return m;
}

// ------------------------------------------------------------------ launch
// NOTE: host cost per call. What never changes for a device is cached here: the shared-memory opt-in
// limit (per device) and the kernels' dynamic-smem attribute (per device and instantiation, raised
// only when a config needs more than was set). The tensor maps are encoded on every call: they hold
// the operands' addresses (new for most activations), and cuTensorMapEncodeTiled only packs its
// arguments into a 128-byte descriptor on the host (no GPU work, no synchronization). A cache would
// have to key on every argument to stay correct; not worth it before a GPU profile says otherwise.
constexpr int kMaxCachedDevices = 64;

int smem_optin(int dev) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};  // 0: not queried yet
  if (dev < kMaxCachedDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  DSMOE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (dev < kMaxCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

template <Kind kKind, int BM, int BN>
void run(const GemmParams& p, int num_ctas, int dev, cudaStream_t stream) {
  const int smem = gemm::gemm_smem_bytes(kKind, BM, BN, p.num_stages);
  auto kernel = gemm::fp8_gemm_kernel<kKind, BM, BN>;
  static std::atomic<int> smem_set[kMaxCachedDevices] = {};  // largest opt-in set so far, per device
  if (dev >= kMaxCachedDevices || smem_set[dev].load(std::memory_order_acquire) < smem) {
    // NOTE: serialized so that concurrent callers can only raise the attribute (a smaller value set
    // last would make the other caller's launch fail).
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    if (dev >= kMaxCachedDevices || smem_set[dev].load(std::memory_order_relaxed) < smem) {
      DSMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      if (dev < kMaxCachedDevices) smem_set[dev].store(smem, std::memory_order_release);
    }
  }
  kernel<<<num_ctas, 128 * (1 + BM / 64), smem, stream>>>(p);
  check_launch("dsmoe::fp8_gemm_kernel", stream);
}

bool compiled(Kind kind, int bm, int bn) {
#define X(k, m, n) if (kind == Kind::k && bm == m && bn == n) return true;
  DSMOE_GEMM_INSTANTIATIONS(X)
#undef X
  return false;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kDense: return "dense";
    case Kind::kDenseF32: return "dense_f32";
    case Kind::kContiguous: return "contiguous";
    case Kind::kMasked: return "masked";
    default: return "kgrouped";
  }
}

// Checks the build, the device and the configuration; fills the config fields of p. Returns the
// (current) device the launch goes to.
int check_config(const char* op, Kind kind, int bm, int bn, int stages, int num_ctas, int raster, GemmParams& p) {
  require_sm90a(op);  // a build with sm_90a code, and an sm_90 device
  int dev = 0;
  DSMOE_CUDA_CHECK(cudaGetDevice(&dev));
  const int optin = smem_optin(dev);
  DSMOE_CHECK_ARG(compiled(kind, bm, bn), op, "config", "(kind=", kind_name(kind), ", block_m=", bm, ", block_n=", bn,
                  ") is not compiled; see dsmoe.gemm_config.INSTANTIATIONS");
  DSMOE_CHECK_ARG(stages >= kMinStages && stages <= kMaxStages, op, "config", "num_stages must be in [", kMinStages, ", ",
                  kMaxStages, "], got ", stages);
  const int smem = gemm::gemm_smem_bytes(kind, bm, bn, stages);
  DSMOE_CHECK_ARG(smem <= optin, op, "config", "num_stages=", stages, " needs ", smem,
                  " bytes of shared memory, the device allows ", optin);
  DSMOE_CHECK_ARG(num_ctas >= 1 && num_ctas <= 65535, op, "config", "num_ctas must be in [1, 65535], got ", num_ctas);
  DSMOE_CHECK_ARG(raster >= 1 && raster <= 65535, op, "config", "raster_group_n must be >= 1, got ", raster);
  p.num_stages = stages;
  p.raster_group_n = raster;
  return dev;
}

void dispatch(Kind kind, int bm, int bn, const GemmParams& p, int num_ctas, int dev, cudaStream_t stream) {
#define X(k, m, n)                                  \
  if (kind == Kind::k && bm == m && bn == n) {      \
    run<Kind::k, m, n>(p, num_ctas, dev, stream);   \
    return;                                         \
  }
  DSMOE_GEMM_INSTANTIATIONS(X)
#undef X
}

void check_dims(const char* op, int64_t M, int64_t N, int64_t K) {
  DSMOE_CHECK_ARG(M >= 0 && M < (int64_t(1) << 31), op, "a", "M must be in [0, 2^31), got ", M);
  DSMOE_CHECK_ARG(N >= 0 && N % 64 == 0 && N < (int64_t(1) << 31), op, "b", "N must be a non-negative multiple of 64, got ", N);
  DSMOE_CHECK_ARG(K >= 0 && K % 128 == 0 && K < (int64_t(1) << 31), op, "a", "K must be a non-negative multiple of 128, got ", K);
}

void check_out(const char* op, uintptr_t out) {
  DSMOE_CHECK_ARG(out != 0 && is_aligned(out, 16), op, "out", "must be a 16-byte aligned device pointer");
}

void check_nt_b_scales(const char* op, uintptr_t sb, int64_t N, int64_t K, int64_t ld_n, int64_t ld_g, int64_t G) {
  DSMOE_CHECK_ARG(sb != 0 && is_aligned(sb, 4), op, "b_scales", "must be a 4-byte aligned device pointer");
  const int64_t nb = (N + 127) / 128, kb = K / 128;
  DSMOE_CHECK_ARG(ld_n >= kb, op, "b_scales", "row stride must be >= K/128 = ", kb, " (last dim contiguous), got ", ld_n);
  if (G > 1) DSMOE_CHECK_ARG(ld_g >= nb * ld_n, op, "b_scales", "group stride must be >= ", nb * ld_n, ", got ", ld_g);
}

int check_block(const char* op, int block_m, int block_n) {
  DSMOE_CHECK_ARG(block_m == 64 || block_m == 128, op, "config", "block_m must be 64 or 128, got ", block_m);
  DSMOE_CHECK_ARG(block_n == 128, op, "config", "block_n must be 128, got ", block_n);
  return block_m;
}
}  // namespace

std::vector<std::tuple<int, int, int>> gemm_instantiations() {
  std::vector<std::tuple<int, int, int>> v;
#define X(k, m, n) v.emplace_back(static_cast<int>(Kind::k), m, n);
  DSMOE_GEMM_INSTANTIATIONS(X)
#undef X
  return v;
}

int gemm_smem_bytes(int kind, int block_m, int block_n, int num_stages) {
  return gemm::gemm_smem_bytes(static_cast<Kind>(kind), block_m, block_n, num_stages);
}

void launch_fp8_gemm_nt(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales, uintptr_t out, int64_t M,
                        int64_t N, int64_t K, int64_t sa_ld, int64_t sb_ld, bool out_f32, int block_m, int block_n,
                        int num_stages, int num_ctas, int raster_group_n, uintptr_t stream) {
  const char* op = "fp8_gemm_nt";
  check_dims(op, M, N, K);
  if (M == 0 || N == 0 || K == 0) return;  // K == 0 is handled (zero fill) by the caller
  check_block(op, block_m, block_n);
  const Kind kind = out_f32 ? Kind::kDenseF32 : Kind::kDense;
  GemmParams p{};
  const int dev = check_config(op, kind, block_m, block_n, num_stages, num_ctas, raster_group_n, p);
  check_out(op, out);
  check_nt_b_scales(op, b_scales, N, K, sb_ld, 0, 1);
  p.tmap_a = tmap_fp8_2d(op, "a", a, K, M, K, block_m);
  p.tmap_b = tmap_fp8_2d(op, "b", b, K, N, K, block_n);
  p.tmap_sa = tmap_scales(op, "a_scales", a_scales, M, K / 128, 1, sa_ld, 0, block_m);
  p.sb = reinterpret_cast<const float*>(b_scales);
  p.sb_ld_n = sb_ld;
  p.sb_ld_g = 0;
  p.out = reinterpret_cast<void*>(out);
  p.ld_out = N;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.num_groups = 1;
  dispatch(kind, block_m, block_n, p, num_ctas, dev, as_stream(stream));
}

void launch_m_grouped_fp8_gemm_nt_contiguous(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                             uintptr_t m_indices, uintptr_t out, int64_t M, int64_t N, int64_t K,
                                             int64_t G, int64_t sa_ld, int64_t sb_ld_n, int64_t sb_ld_g, int block_m,
                                             int block_n, int num_stages, int num_ctas, int raster_group_n,
                                             uintptr_t stream) {
  const char* op = "m_grouped_fp8_gemm_nt_contiguous";
  check_dims(op, M, N, K);
  DSMOE_CHECK_ARG(M % 128 == 0, op, "a", "M_sum must be a multiple of 128 (the group alignment), got ", M);
  DSMOE_CHECK_ARG(G >= 1 && G < (int64_t(1) << 31), op, "b", "number of groups must be >= 1, got ", G);
  DSMOE_CHECK_ARG(G * N < (int64_t(1) << 31), op, "b", "G * N must be < 2^31, got ", G * N);
  if (M == 0 || N == 0 || K == 0) return;
  check_block(op, block_m, block_n);
  GemmParams p{};
  const int dev = check_config(op, Kind::kContiguous, block_m, block_n, num_stages, num_ctas, raster_group_n, p);
  check_out(op, out);
  DSMOE_CHECK_ARG(m_indices != 0 && is_aligned(m_indices, 4), op, "m_indices", "must be a 4-byte aligned device pointer");
  check_nt_b_scales(op, b_scales, N, K, sb_ld_n, sb_ld_g, G);
  p.tmap_a = tmap_fp8_2d(op, "a", a, K, M, K, block_m);
  p.tmap_b = tmap_fp8_2d(op, "b", b, K, G * N, K, block_n);
  p.tmap_sa = tmap_scales(op, "a_scales", a_scales, M, K / 128, 1, sa_ld, 0, block_m);
  p.sb = reinterpret_cast<const float*>(b_scales);
  p.sb_ld_n = sb_ld_n;
  p.sb_ld_g = sb_ld_g;
  p.m_indices = reinterpret_cast<const int*>(m_indices);
  p.out = reinterpret_cast<void*>(out);
  p.ld_out = N;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.num_groups = static_cast<int>(G);
  dispatch(Kind::kContiguous, block_m, block_n, p, num_ctas, dev, as_stream(stream));
}

void launch_m_grouped_fp8_gemm_nt_masked(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                         uintptr_t masked_m, uintptr_t out, int64_t G, int64_t M_max, int64_t N,
                                         int64_t K, int64_t sa_ld_k, int64_t sa_ld_g, int64_t sb_ld_n,
                                         int64_t sb_ld_g, int block_m, int block_n, int num_stages, int num_ctas,
                                         int raster_group_n, uintptr_t stream) {
  const char* op = "m_grouped_fp8_gemm_nt_masked";
  check_dims(op, M_max, N, K);
  DSMOE_CHECK_ARG(G >= 0 && G * M_max < (int64_t(1) << 31) && G * N < (int64_t(1) << 31), op, "a",
                  "G * M_max and G * N must be < 2^31, got G=", G);
  if (G == 0 || M_max == 0 || N == 0 || K == 0) return;
  check_block(op, block_m, block_n);
  GemmParams p{};
  const int dev = check_config(op, Kind::kMasked, block_m, block_n, num_stages, num_ctas, raster_group_n, p);
  check_out(op, out);
  DSMOE_CHECK_ARG(masked_m != 0 && is_aligned(masked_m, 4), op, "masked_m", "must be a 4-byte aligned device pointer");
  check_nt_b_scales(op, b_scales, N, K, sb_ld_n, sb_ld_g, G);
  p.tmap_a = tmap_fp8_2d(op, "a", a, K, G * M_max, K, block_m);
  p.tmap_b = tmap_fp8_2d(op, "b", b, K, G * N, K, block_n);
  p.tmap_sa = tmap_scales(op, "a_scales", a_scales, M_max, K / 128, G, sa_ld_k, sa_ld_g, block_m);
  p.sb = reinterpret_cast<const float*>(b_scales);
  p.sb_ld_n = sb_ld_n;
  p.sb_ld_g = sb_ld_g;
  p.masked_m = reinterpret_cast<const int*>(masked_m);
  p.out = reinterpret_cast<void*>(out);
  p.ld_out = N;
  p.M = static_cast<int>(M_max);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.num_groups = static_cast<int>(G);
  dispatch(Kind::kMasked, block_m, block_n, p, num_ctas, dev, as_stream(stream));
}

void launch_k_grouped_fp8_gemm_tn(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                  uintptr_t group_sizes, uintptr_t out, int64_t M, int64_t N, int64_t T, int64_t G,
                                  int64_t sa_ld, int64_t sb_ld, bool accumulate, int block_m, int block_n,
                                  int num_stages, int num_ctas, int raster_group_n, uintptr_t stream) {
  const char* op = "k_grouped_fp8_gemm_tn";
  check_dims(op, M, N, T);
  DSMOE_CHECK_ARG(G >= 0 && G * M < (int64_t(1) << 31), op, "group_sizes", "G * M must be < 2^31, got G=", G);
  DSMOE_CHECK_ARG(group_sizes != 0 || G == 1, op, "group_sizes", "without group sizes there is one group, got G=", G);
  if (M == 0 || N == 0 || G == 0) return;
  check_block(op, block_m, block_n);
  GemmParams p{};
  const int dev = check_config(op, Kind::kKGrouped, block_m, block_n, num_stages, num_ctas, raster_group_n, p);
  check_out(op, out);
  if (group_sizes != 0) DSMOE_CHECK_ARG(is_aligned(group_sizes, 4), op, "group_sizes", "must be 4-byte aligned");
  if (T == 0) {  // no K blocks: the product is zero
    if (!accumulate) DSMOE_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(out), 0, static_cast<size_t>(G * M * N) * 4, as_stream(stream)));
    return;
  }
  {
    p.tmap_a = tmap_fp8_2d(op, "a", a, T, M, T, block_m);
    p.tmap_b = tmap_fp8_2d(op, "b", b, T, N, T, block_n);
    p.tmap_sa = tmap_scales(op, "a_scales", a_scales, M, T / 128, 1, sa_ld, 0, block_m);
    p.tmap_sb = tmap_scales(op, "b_scales", b_scales, N, T / 128, 1, sb_ld, 0, block_n);
  }
  p.group_sizes = reinterpret_cast<const int*>(group_sizes);
  p.out = reinterpret_cast<void*>(out);
  p.ld_out = N;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(T);
  p.num_groups = static_cast<int>(G);
  p.accumulate = accumulate ? 1 : 0;
  dispatch(Kind::kKGrouped, block_m, block_n, p, num_ctas, dev, as_stream(stream));
}

void launch_transpose_quant_fp8(uintptr_t x, int dtype, uintptr_t q, uintptr_t scales, int64_t T, int64_t K,
                                int64_t x_ld, int64_t q_ld, int64_t s_ld, bool ue8m0, uintptr_t stream) {
  const char* op = "per_token_group_quant_fp8_transposed";
  DSMOE_CHECK_ARG(T >= 0 && K >= 0, op, "x", "negative size T=", T, " K=", K);
  if (T == 0 || K == 0) return;
  const int64_t t_pad = (T + 127) / 128 * 128;
  DSMOE_CHECK_ARG(x_ld >= K, op, "x", "row stride must be >= K=", K, ", got ", x_ld);
  DSMOE_CHECK_ARG(is_aligned(q, 16) && q_ld % 16 == 0 && q_ld >= t_pad, op, "out", "fp8 output must be 16-byte aligned with row stride >= ",
                  t_pad);
  DSMOE_CHECK_ARG(s_ld >= K, op, "scales", "K-block stride must be >= K=", K, ", got ", s_ld);
  DSMOE_CHECK_ARG(t_pad / 128 <= 65535, op, "x", "too many tokens for one launch: ", T);
  gemm::TransposeQuantParams p{reinterpret_cast<const void*>(x), reinterpret_cast<uint8_t*>(q),
                               reinterpret_cast<float*>(scales), T, K, x_ld, q_ld, s_ld, ue8m0};
  dim3 grid(static_cast<unsigned>((K + gemm::kTqCols - 1) / gemm::kTqCols), static_cast<unsigned>(t_pad / 128));
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: gemm::transpose_quant_kernel<float><<<grid, gemm::kTqThreads, 0, s>>>(p); break;
    case 1: gemm::transpose_quant_kernel<__half><<<grid, gemm::kTqThreads, 0, s>>>(p); break;
    case 2: gemm::transpose_quant_kernel<__nv_bfloat16><<<grid, gemm::kTqThreads, 0, s>>>(p); break;
    default: fail_arg(op, "x", "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  }
  check_launch("dsmoe::transpose_quant_kernel", s);
}

}  // namespace dsmoe
