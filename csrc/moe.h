// Launchers of the MoE routing / permutation kernels (include/dsmoe/moe/moe.cuh).
#pragma once
#include <cstdint>

namespace dsmoe {
// Experts-per-lane variants of the routing kernel: E <= 32 * kRouteExpertsPerLane[i].
// NOTE: the one list; moe.cu instantiates these (x 3 logit dtypes).
constexpr int kRouteExpertsPerLane[] = {4, 8, 16};

void launch_moe_route(uintptr_t logits, int dtype, uintptr_t bias, uintptr_t topk_idx, uintptr_t topk_weights, int64_t T,
                      int64_t E, int64_t row_stride, int64_t top_k, int64_t n_group, int64_t topk_group,
                      double routed_scaling_factor, bool norm_topk_prob, int score_func, uintptr_t stream);
int64_t moe_layout_workspace_ints(int64_t T, int64_t k, int64_t E);
void launch_moe_permute_layout(uintptr_t topk_idx, bool idx64, int64_t T, int64_t k, int64_t E, int64_t alignment,
                               int64_t num_rows, uintptr_t m_indices, uintptr_t tokens_per_expert, uintptr_t row_map,
                               uintptr_t workspace, int64_t workspace_ints, uintptr_t stream);
void launch_moe_scatter_rows(uintptr_t x, int dtype, uintptr_t row_map, uintptr_t weights, uintptr_t out,
                             uintptr_t m_indices, int64_t T, int64_t k, int64_t H, int64_t x_row_stride,
                             int64_t num_rows, uintptr_t stream);
void launch_moe_scatter_rows_fp8(uintptr_t x, int dtype, uintptr_t row_map, uintptr_t m_indices, uintptr_t q,
                                 uintptr_t scales, int64_t T, int64_t k, int64_t H, int64_t x_row_stride,
                                 int64_t num_rows, uintptr_t stream);
void launch_moe_unpermute(uintptr_t y, int dtype, uintptr_t row_map, uintptr_t weights, uintptr_t out, int64_t T,
                          int64_t k, int64_t H, int64_t y_row_stride, int64_t num_rows_y, uintptr_t stream);
}  // namespace dsmoe
