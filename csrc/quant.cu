// Host launchers of the FP8 quantization kernels: checks, then one launch. Explicit instantiations
// are the switch cases below (3 dtypes x 3 group sizes, and 3 dtypes x {vectorized, scalar}).
#include "common.h"
#include "quant.h"
#include "dsmoe/quant/quant.cuh"

namespace dsmoe {
namespace {
constexpr const char* kTG = "per_token_group_quant_fp8";
constexpr const char* kBQ = "per_block_quant_fp8";

template <typename T, int G>
void run_tg(const quant::TokenGroupParams& p, cudaStream_t stream) {
  constexpr int kVec = 16;
  constexpr int kThreads = 256;
  const int64_t threads = p.rows * (p.K / G) * (G / kVec);
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  DSMOE_CHECK_ARG(blocks <= INT32_MAX, kTG, "x", "too many elements for one launch: ", p.rows * p.K);
  quant::token_group_quant_kernel<T, G, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  check_launch("dsmoe::token_group_quant_kernel", stream);
}

template <typename T>
void dispatch_group(const quant::TokenGroupParams& p, int group_size, cudaStream_t stream) {
  switch (group_size) {
    case 32: return run_tg<T, 32>(p, stream);
    case 64: return run_tg<T, 64>(p, stream);
    case 128: return run_tg<T, 128>(p, stream);
    default:
      fail_arg(kTG, "group_size", "the CUDA kernel supports 32, 64 or 128, got ", group_size,
               " (the CPU reference supports any size)");
  }
}

template <typename T>
void run_block(const quant::BlockParams& p, bool vectorized, cudaStream_t stream) {
  const int64_t gx = (p.K + p.BK - 1) / p.BK, gy = (p.N + p.BN - 1) / p.BN;
  if (gx == 0 || gy == 0) return;
  DSMOE_CHECK_ARG(gy <= 65535, kBQ, "w", "too many row blocks: ", gy);
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (vectorized) quant::block_quant_kernel<T, true><<<grid, 256, 0, stream>>>(p);
  else quant::block_quant_kernel<T, false><<<grid, 256, 0, stream>>>(p);
  check_launch("dsmoe::block_quant_kernel", stream);
}
}  // namespace

void launch_token_group_quant(uintptr_t x, int dtype, uintptr_t q, uintptr_t scales, int64_t rows, int64_t K,
                              int64_t x_row_stride, int64_t q_row_stride, int64_t rows_inner, int64_t s_batch,
                              int64_t s_row, int64_t s_col, int group_size, bool ue8m0, uintptr_t stream) {
  DSMOE_CHECK_ARG(rows >= 0 && K >= 0, kTG, "x", "negative size rows=", rows, " K=", K);
  DSMOE_CHECK_ARG(group_size > 0 && K % group_size == 0, kTG, "group_size", "K=", K, " must be a multiple of group_size=", group_size);
  if (rows == 0 || K == 0) return;
  const int64_t esz = dtype == 0 ? 4 : 2;
  DSMOE_CHECK_ARG(is_aligned(x, 16) && (x_row_stride * esz) % 16 == 0, kTG, "x",
                  "data pointer and row stride must be 16-byte aligned (row stride ", x_row_stride, " elements)");
  DSMOE_CHECK_ARG(is_aligned(q, 8) && q_row_stride % 8 == 0, kTG, "out", "fp8 output must be 8-byte aligned");
  DSMOE_CHECK_ARG(rows_inner > 0, kTG, "rows_inner", "must be > 0, got ", rows_inner);
  quant::TokenGroupParams p{reinterpret_cast<const void*>(x), reinterpret_cast<uint8_t*>(q), reinterpret_cast<float*>(scales),
                            rows, K, x_row_stride, q_row_stride, rows_inner, s_batch, s_row, s_col, ue8m0};
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: return dispatch_group<float>(p, group_size, s);
    case 1: return dispatch_group<__half>(p, group_size, s);
    case 2: return dispatch_group<__nv_bfloat16>(p, group_size, s);
    default: fail_arg(kTG, "x", "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  }
}

void launch_block_quant(uintptr_t w, int dtype, uintptr_t q, uintptr_t scale_inv, int64_t N, int64_t K,
                        int64_t w_row_stride, int64_t q_row_stride, int block_n, int block_k, bool ue8m0,
                        uintptr_t stream) {
  DSMOE_CHECK_ARG(N >= 0 && K >= 0, kBQ, "w", "negative size N=", N, " K=", K);
  DSMOE_CHECK_ARG(block_n > 0 && block_k > 0, kBQ, "block_size", "must be positive, got (", block_n, ", ", block_k, ")");
  if (N == 0 || K == 0) return;
  const int64_t esz = dtype == 0 ? 4 : 2;
  // NOTE: the vectorized path needs 16-byte aligned rows and block starts; anything else takes the
  // scalar path (same results, slower), so any [N, K] works.
  const bool vec = is_aligned(w, 16) && (w_row_stride * esz) % 16 == 0 && (block_k * esz) % 16 == 0 &&
                   is_aligned(q, 8) && q_row_stride % 8 == 0;
  quant::BlockParams p{reinterpret_cast<const void*>(w), reinterpret_cast<uint8_t*>(q), reinterpret_cast<float*>(scale_inv),
                       N, K, w_row_stride, q_row_stride, block_n, block_k, ue8m0};
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: return run_block<float>(p, vec, s);
    case 1: return run_block<__half>(p, vec, s);
    case 2: return run_block<__nv_bfloat16>(p, vec, s);
    default: fail_arg(kBQ, "w", "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  }
}
}  // namespace dsmoe
