// Launchers of the FP8 block-scaled GEMM kernels (include/dsmoe/gemm/fp8_gemm.cuh).
// The tile configuration (block_m, block_n, num_stages, num_ctas, raster_group_n) is chosen by
// dsmoe.gemm_config.choose_config (Python, pure function of the shape) and passed in; the launchers
// refuse configurations that are not compiled or do not fit, and check every layout they rely on.
#pragma once
#include <cstdint>
#include <tuple>
#include <vector>

namespace dsmoe {

// (kind code, block_m, block_n) of every compiled GEMM kernel; kind codes as dsmoe.gemm_config.KINDS.
std::vector<std::tuple<int, int, int>> gemm_instantiations();
// Dynamic shared memory of one CTA for a configuration (what the launcher requests).
int gemm_smem_bytes(int kind, int block_m, int block_n, int num_stages);

// a [M, K] e4m3, a_scales MN-major (element (m, kb) at a_scales[kb * sa_ld + m]), b [N, K] e4m3,
// b_scales [ceil(N/128), K/128] (row stride sb_ld), out [M, N] bf16 or fp32 (out_f32), contiguous.
void launch_fp8_gemm_nt(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales, uintptr_t out, int64_t M,
                        int64_t N, int64_t K, int64_t sa_ld, int64_t sb_ld, bool out_f32, int block_m, int block_n,
                        int num_stages, int num_ctas, int raster_group_n, uintptr_t stream);

// a [M, K] e4m3 (M a multiple of 128), m_indices int32 [M], b [G, N, K], b_scales [G, ceil(N/128), K/128]
// (strides sb_ld_g, sb_ld_n, 1), out [M, N] bf16.
void launch_m_grouped_fp8_gemm_nt_contiguous(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                             uintptr_t m_indices, uintptr_t out, int64_t M, int64_t N, int64_t K,
                                             int64_t G, int64_t sa_ld, int64_t sb_ld_n, int64_t sb_ld_g, int block_m,
                                             int block_n, int num_stages, int num_ctas, int raster_group_n,
                                             uintptr_t stream);

// a [G, M_max, K] e4m3, a_scales (g, m, kb) at g * sa_ld_g + kb * sa_ld_k + m, masked_m int32 [G],
// b [G, N, K], b_scales as above, out [G, M_max, N] bf16.
void launch_m_grouped_fp8_gemm_nt_masked(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                         uintptr_t masked_m, uintptr_t out, int64_t G, int64_t M_max, int64_t N,
                                         int64_t K, int64_t sa_ld_k, int64_t sa_ld_g, int64_t sb_ld_n,
                                         int64_t sb_ld_g, int block_m, int block_n, int num_stages, int num_ctas,
                                         int raster_group_n, uintptr_t stream);

// TN (weight gradient): a [M, T] e4m3, b [N, T] e4m3, scales MN-major (element (m, tb) at
// a_scales[tb * sa_ld + m]; same for b), group_sizes int32 [G] or 0 (one group of T, G must be 1),
// out [G, M, N] fp32 (+= with accumulate).
void launch_k_grouped_fp8_gemm_tn(uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales,
                                  uintptr_t group_sizes, uintptr_t out, int64_t M, int64_t N, int64_t T, int64_t G,
                                  int64_t sa_ld, int64_t sb_ld, bool accumulate, int block_m, int block_n,
                                  int num_stages, int num_ctas, int raster_group_n, uintptr_t stream);

// x [T, K] (dtype code 0 fp32, 1 fp16, 2 bf16; row stride x_ld) -> q [K, T_pad] e4m3 (row stride q_ld),
// scales fp32 (k, tb) at scales[tb * s_ld + k]; T_pad = T rounded up to 128, padding tokens zero.
void launch_transpose_quant_fp8(uintptr_t x, int dtype, uintptr_t q, uintptr_t scales, int64_t T, int64_t K,
                                int64_t x_ld, int64_t q_ld, int64_t s_ld, bool ue8m0, uintptr_t stream);

}  // namespace dsmoe
