// Host launchers of the MoE routing / permutation kernels: checks, then launches.
// Explicit instantiations: route 3 dtypes x kRouteExpertsPerLane; scatter / scatter_fp8 / unpermute x 3 dtypes.
#include <algorithm>
#include "common.h"
#include "moe.h"
#include "dsmoe/moe/moe.cuh"

namespace dsmoe {
namespace {
constexpr const char* kRoute = "moe_route";
constexpr const char* kPermute = "moe_permute";
constexpr const char* kUnpermute = "moe_unpermute";

template <typename T>
void route_for_dtype(const moe::RouteParams& p, int per_lane, unsigned blocks, cudaStream_t s) {
  switch (per_lane) {
    case 4: moe::route_kernel<T, 4><<<blocks, 256, 0, s>>>(p); break;
    case 8: moe::route_kernel<T, 8><<<blocks, 256, 0, s>>>(p); break;
    case 16: moe::route_kernel<T, 16><<<blocks, 256, 0, s>>>(p); break;
    default: fail_arg(kRoute, "router_logits", "internal: no kernel for ", per_lane, " experts per lane");
  }
  check_launch("dsmoe::moe::route_kernel", s);
}

template <template <typename> class F, typename... Args>
void by_dtype(const char* op, const char* arg, int dtype, Args&&... args) {
  switch (dtype) {
    case 0: return F<float>::run(args...);
    case 1: return F<__half>::run(args...);
    case 2: return F<__nv_bfloat16>::run(args...);
    default: fail_arg(op, arg, "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  }
}

template <typename T> struct ScatterRun {
  static void run(const moe::ScatterParams& p, unsigned blocks, cudaStream_t s) {
    moe::scatter_rows_kernel<T><<<blocks, 256, 0, s>>>(p);
    check_launch("dsmoe::moe::scatter_rows_kernel", s);
  }
};
template <typename T> struct ScatterFP8Run {
  static void run(const moe::ScatterFP8Params& p, unsigned blocks, cudaStream_t s) {
    moe::scatter_rows_fp8_kernel<T><<<blocks, 256, 0, s>>>(p);
    check_launch("dsmoe::moe::scatter_rows_fp8_kernel", s);
  }
};
template <typename T> struct UnpermuteRun {
  static void run(const moe::UnpermuteParams& p, unsigned blocks, cudaStream_t s) {
    moe::unpermute_kernel<T><<<blocks, 256, 0, s>>>(p);
    check_launch("dsmoe::moe::unpermute_kernel", s);
  }
};

int64_t dtype_size(int dtype) { return dtype == 0 ? 4 : 2; }
}  // namespace

void launch_moe_route(uintptr_t logits, int dtype, uintptr_t bias, uintptr_t topk_idx, uintptr_t topk_weights, int64_t T,
                      int64_t E, int64_t row_stride, int64_t top_k, int64_t n_group, int64_t topk_group,
                      double routed_scaling_factor, bool norm_topk_prob, int score_func, uintptr_t stream) {
  DSMOE_CHECK_ARG(T >= 0, kRoute, "router_logits", "negative token count ", T);
  DSMOE_CHECK_ARG(E >= 1 && E <= 32 * 16, kRoute, "router_logits", "the CUDA kernel supports 1..512 experts, got ", E);
  DSMOE_CHECK_ARG(n_group >= 1 && n_group <= 32 && E % n_group == 0, kRoute, "n_group",
                  "must divide E=", E, " and be <= 32 (one group per lane), got ", n_group);
  DSMOE_CHECK_ARG(topk_group >= 1 && topk_group <= n_group, kRoute, "topk_group", "must be in [1, n_group=", n_group, "], got ", topk_group);
  DSMOE_CHECK_ARG(top_k >= 1 && top_k <= 32 && top_k <= topk_group * (E / n_group), kRoute, "top_k",
                  "must be in [1, min(32, topk_group * E / n_group = ", topk_group * (E / n_group), ")], got ", top_k);
  DSMOE_CHECK_ARG(score_func == 0 || score_func == 1, kRoute, "score_func", "code must be 0 (sigmoid) or 1 (softmax), got ", score_func);
  if (T == 0) return;
  const int per_lane = E <= 128 ? 4 : (E <= 256 ? 8 : 16);
  moe::RouteParams p{reinterpret_cast<const void*>(logits), reinterpret_cast<const float*>(bias), reinterpret_cast<int*>(topk_idx),
                     reinterpret_cast<float*>(topk_weights), T, row_stride, static_cast<int>(E), static_cast<int>(top_k),
                     static_cast<int>(n_group), static_cast<int>(topk_group), static_cast<float>(routed_scaling_factor),
                     norm_topk_prob, score_func == 1};
  const int64_t blocks = (T + 7) / 8;  // 8 warps (tokens) per block
  DSMOE_CHECK_ARG(blocks <= INT32_MAX, kRoute, "router_logits", "too many tokens ", T);
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: return route_for_dtype<float>(p, per_lane, static_cast<unsigned>(blocks), s);
    case 1: return route_for_dtype<__half>(p, per_lane, static_cast<unsigned>(blocks), s);
    case 2: return route_for_dtype<__nv_bfloat16>(p, per_lane, static_cast<unsigned>(blocks), s);
    default: fail_arg(kRoute, "router_logits", "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  }
}

int64_t moe_layout_workspace_ints(int64_t T, int64_t k, int64_t E) {
  (void)k;
  const int64_t chunks = (T + moe::kLayoutChunkTokens - 1) / moe::kLayoutChunkTokens;
  return chunks * E + E + 1;
}

void launch_moe_permute_layout(uintptr_t topk_idx, bool idx64, int64_t T, int64_t k, int64_t E, int64_t alignment,
                               int64_t num_rows, uintptr_t m_indices, uintptr_t tokens_per_expert, uintptr_t row_map,
                               uintptr_t workspace, int64_t workspace_ints, uintptr_t stream) {
  DSMOE_CHECK_ARG(T >= 0 && k >= 1, kPermute, "topk_idx", "bad shape [", T, ", ", k, "]");
  DSMOE_CHECK_ARG(E >= 1 && E <= 12288, kPermute, "num_experts", "must be in [1, 12288] (shared-memory histogram), got ", E);
  DSMOE_CHECK_ARG(alignment >= 1, kPermute, "alignment", "must be >= 1, got ", alignment);
  DSMOE_CHECK_ARG(num_rows >= 0 && num_rows < INT32_MAX, kPermute, "max_rows", "must fit int32, got ", num_rows);
  DSMOE_CHECK_ARG(T * k < INT32_MAX, kPermute, "topk_idx", "T*k must fit int32, got ", T * k);
  DSMOE_CHECK_ARG(workspace_ints >= moe_layout_workspace_ints(T, k, E), kPermute, "workspace",
                  "needs ", moe_layout_workspace_ints(T, k, E), " ints, got ", workspace_ints);
  const int chunks = static_cast<int>((T + moe::kLayoutChunkTokens - 1) / moe::kLayoutChunkTokens);
  int* ws = reinterpret_cast<int*>(workspace);
  moe::LayoutParams p{reinterpret_cast<const void*>(topk_idx), reinterpret_cast<int*>(m_indices),
                      reinterpret_cast<int*>(tokens_per_expert), reinterpret_cast<int*>(row_map), ws,
                      ws + static_cast<int64_t>(chunks) * E, T, num_rows, static_cast<int>(k), static_cast<int>(E),
                      static_cast<int>(alignment), chunks, idx64};
  cudaStream_t s = as_stream(stream);
  const size_t smem = static_cast<size_t>(E) * sizeof(int);
  if (chunks > 0) {
    moe::layout_count_kernel<<<chunks, 256, smem, s>>>(p);
    check_launch("dsmoe::moe::layout_count_kernel", s);
  } else {
    DSMOE_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(int), s));  // unused: no chunk
  }
  moe::layout_scan_kernel<<<1, 1024, smem, s>>>(p);
  check_launch("dsmoe::moe::layout_scan_kernel", s);
  const int64_t fill_blocks = std::max<int64_t>(1, std::min<int64_t>((num_rows + 255) / 256, 1024));
  moe::layout_assign_kernel<<<static_cast<unsigned>(chunks + fill_blocks), 256, smem, s>>>(p);
  check_launch("dsmoe::moe::layout_assign_kernel", s);
}

void launch_moe_scatter_rows(uintptr_t x, int dtype, uintptr_t row_map, uintptr_t weights, uintptr_t out,
                             uintptr_t m_indices, int64_t T, int64_t k, int64_t H, int64_t x_row_stride,
                             int64_t num_rows, uintptr_t stream) {
  DSMOE_CHECK_ARG(T >= 0 && k >= 1 && H >= 0 && num_rows >= 0, kPermute, "x", "bad sizes T=", T, " k=", k, " H=", H);
  const int64_t esz = dtype_size(dtype);
  const bool vec = is_aligned(x, 16) && is_aligned(out, 16) && (x_row_stride * esz) % 16 == 0 && (H * esz) % 16 == 0;
  moe::ScatterParams p{reinterpret_cast<const void*>(x), reinterpret_cast<const int*>(row_map), reinterpret_cast<const float*>(weights),
                       reinterpret_cast<const int*>(m_indices), reinterpret_cast<void*>(out), T, H, x_row_stride, num_rows,
                       static_cast<int>(k), vec};
  const int64_t zero_blocks = m_indices ? (num_rows + moe::kZeroRowsPerBlock - 1) / moe::kZeroRowsPerBlock : 0;
  const int64_t blocks = T + zero_blocks;
  if (blocks == 0) return;
  DSMOE_CHECK_ARG(blocks <= INT32_MAX, kPermute, "x", "too many rows: ", blocks);
  by_dtype<ScatterRun>(kPermute, "x", dtype, p, static_cast<unsigned>(blocks), as_stream(stream));
}

void launch_moe_scatter_rows_fp8(uintptr_t x, int dtype, uintptr_t row_map, uintptr_t m_indices, uintptr_t q,
                                 uintptr_t scales, int64_t T, int64_t k, int64_t H, int64_t x_row_stride,
                                 int64_t num_rows, uintptr_t stream) {
  DSMOE_CHECK_ARG(H % 128 == 0, kPermute, "x", "hidden size must be a multiple of 128 for FP8, got ", H);
  const int64_t esz = dtype_size(dtype);
  DSMOE_CHECK_ARG(is_aligned(x, 16) && (x_row_stride * esz) % 16 == 0, kPermute, "x",
                  "data pointer and row stride must be 16-byte aligned (row stride ", x_row_stride, " elements)");
  DSMOE_CHECK_ARG(is_aligned(q, 16), kPermute, "out", "fp8 output must be 16-byte aligned");
  moe::ScatterFP8Params p{reinterpret_cast<const void*>(x), reinterpret_cast<const int*>(row_map), reinterpret_cast<const int*>(m_indices),
                          reinterpret_cast<uint8_t*>(q), reinterpret_cast<float*>(scales), T, H, x_row_stride, num_rows,
                          static_cast<int>(k)};
  const int64_t blocks = T + (num_rows + moe::kZeroRowsPerBlock - 1) / moe::kZeroRowsPerBlock;
  if (blocks == 0) return;
  DSMOE_CHECK_ARG(blocks <= INT32_MAX, kPermute, "x", "too many rows: ", blocks);
  by_dtype<ScatterFP8Run>(kPermute, "x", dtype, p, static_cast<unsigned>(blocks), as_stream(stream));
}

void launch_moe_unpermute(uintptr_t y, int dtype, uintptr_t row_map, uintptr_t weights, uintptr_t out, int64_t T,
                          int64_t k, int64_t H, int64_t y_row_stride, int64_t num_rows_y, uintptr_t stream) {
  DSMOE_CHECK_ARG(T >= 0 && k >= 1 && H >= 0 && num_rows_y >= 0, kUnpermute, "y_perm", "bad sizes T=", T, " k=", k, " H=", H);
  if (T == 0 || H == 0) return;
  DSMOE_CHECK_ARG(T <= INT32_MAX, kUnpermute, "row_map", "too many tokens: ", T);
  const int64_t esz = dtype_size(dtype);
  const bool vec = is_aligned(y, 16) && is_aligned(out, 16) && (y_row_stride * esz) % 16 == 0 && (H * esz) % 16 == 0 && H % 8 == 0;
  moe::UnpermuteParams p{reinterpret_cast<const void*>(y), reinterpret_cast<const int*>(row_map), reinterpret_cast<const float*>(weights),
                         reinterpret_cast<void*>(out), T, H, y_row_stride, static_cast<int>(k), vec};
  by_dtype<UnpermuteRun>(kUnpermute, "y_perm", dtype, p, static_cast<unsigned>(T), as_stream(stream));
}
}  // namespace dsmoe
