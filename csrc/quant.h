// Launchers of the FP8 quantization kernels (include/dsmoe/quant/quant.cuh).
#pragma once
#include <cstdint>

namespace dsmoe {
// Group sizes with a compiled token-group kernel. NOTE: the one list; quant.cu instantiates these.
constexpr int kTokenGroupSizes[] = {32, 64, 128};

// dtype: 0 fp32, 1 fp16, 2 bf16 (dsmoe::DType).
void launch_token_group_quant(uintptr_t x, int dtype, uintptr_t q, uintptr_t scales, int64_t rows, int64_t K,
                              int64_t x_row_stride, int64_t q_row_stride, int64_t rows_inner, int64_t s_batch,
                              int64_t s_row, int64_t s_col, int group_size, bool ue8m0, uintptr_t stream);
void launch_block_quant(uintptr_t w, int dtype, uintptr_t q, uintptr_t scale_inv, int64_t N, int64_t K,
                        int64_t w_row_stride, int64_t q_row_stride, int block_n, int block_k, bool ue8m0,
                        uintptr_t stream);
}  // namespace dsmoe
