// Launchers of the MLA decode family (include/dsmoe/mla/): split-KV schedule, decode (+ combine) over a
// paged bf16 or FP8 latent cache, and the cache append. Pointers are device addresses as integers.
#pragma once
#include <cstdint>

namespace dsmoe {
// Schedule for one decode step: metadata int32 [num_parts, 8], num_splits int32 [B + 1].
void launch_mla_get_metadata(uintptr_t seqlens, int64_t B, int64_t num_parts, uintptr_t metadata,
                             uintptr_t num_splits, uintptr_t stream);

// Decode: q [B, s_q, H, 576] bf16 (strides in elements), kv [num_blocks, 64, 1, 576|656], out
// [B, s_q, H, 512] bf16, lse [B, H, s_q] fp32, o_accum [B + num_parts, s_q*H, 512] fp32, lse_accum
// [B + num_parts, s_q*H] fp32. Launches the split kernel and the combine kernel on `stream`.
void launch_mla_decode(uintptr_t q, uintptr_t kv, uintptr_t block_table, uintptr_t seqlens, uintptr_t metadata,
                       uintptr_t num_splits, uintptr_t out, uintptr_t lse, uintptr_t o_accum, uintptr_t lse_accum,
                       int64_t B, int64_t s_q, int64_t H, int64_t num_blocks, int64_t max_blocks, int64_t num_parts,
                       int64_t q_batch, int64_t q_token, int64_t q_head, int64_t bt_stride, int64_t kv_block_bytes,
                       bool kv_fp8, double softmax_scale, bool causal, uintptr_t stream);

// Append T tokens: see dsmoe.ref.mla.mla_kvcache_append. norm_weight / cos / sin may be 0 (not fused).
void launch_mla_kvcache_append(uintptr_t kv, uintptr_t block_table, uintptr_t batch_ids, uintptr_t positions,
                               uintptr_t latent, uintptr_t k_rope, uintptr_t norm_weight, uintptr_t cos, uintptr_t sin,
                               int64_t T, int64_t num_blocks, int64_t B, int64_t max_blocks, int64_t bt_stride,
                               int64_t latent_stride, int64_t rope_stride, int64_t cos_stride, int64_t sin_stride,
                               int64_t kv_block_bytes, bool kv_fp8, double eps, bool rope_interleaved, bool ue8m0,
                               uintptr_t stream);
}  // namespace dsmoe
