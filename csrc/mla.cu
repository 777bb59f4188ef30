// Host launchers of the MLA decode family: argument checks, then launches. Explicit instantiations:
// mla_decode_kernel<false> (bf16 cache) and mla_decode_kernel<true> (FP8 656-byte cache), in run_decode.
#include <atomic>

#include "common.h"
#include "mla.h"
#include "dsmoe/mla/append.cuh"
#include "dsmoe/mla/decode.cuh"

namespace dsmoe {
namespace {
constexpr const char* kMD = "get_mla_metadata";
constexpr const char* kDec = "mla_decode_with_kvcache";
constexpr const char* kApp = "mla_kvcache_append";

// The combine kernel keeps one weight per split (a sequence has at most num_parts splits) in dynamic
// shared memory; stay within the 48 KB that needs no opt-in.
constexpr int64_t kMaxParts = 8192;

template <bool kFP8>
void run_decode(const mla::DecodeParams& p, int m_blocks, cudaStream_t stream) {
  using Smem = typename std::conditional<kFP8, mla::SmemFP8, mla::SmemBF16>::type;
  constexpr int smem = Smem::kTotal + mla::kSmemAlignSlack;
  // The smem opt-in is a per-device function attribute: set it once per device (a bit per device id),
  // not on every call, so that captured launches make no attribute calls.
  static std::atomic<uint64_t> attr_set{0};
  int dev = 0;
  DSMOE_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit == 0 || (attr_set.load(std::memory_order_acquire) & bit) == 0) {
    DSMOE_CUDA_CHECK(cudaFuncSetAttribute(mla::mla_decode_kernel<kFP8>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set.fetch_or(bit, std::memory_order_acq_rel);
  }
  dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.num_parts));
  mla::mla_decode_kernel<kFP8><<<grid, mla::kThreads, smem, stream>>>(p);
  check_launch(kFP8 ? "dsmoe::mla_decode_kernel<fp8>" : "dsmoe::mla_decode_kernel<bf16>", stream);
}
}  // namespace

void launch_mla_get_metadata(uintptr_t seqlens, int64_t B, int64_t num_parts, uintptr_t metadata,
                             uintptr_t num_splits, uintptr_t stream) {
  DSMOE_CHECK_ARG(B >= 0 && B <= (1 << 24), kMD, "cache_seqlens", "batch size must be in [0, 2^24], got ", B);
  DSMOE_CHECK_ARG(num_parts >= 1 && num_parts <= kMaxParts, kMD, "num_sm_parts", "must be in [1, ", kMaxParts, "], got ", num_parts);
  mla::MetadataParams p{reinterpret_cast<const int32_t*>(seqlens), reinterpret_cast<int32_t*>(metadata),
                        reinterpret_cast<int32_t*>(num_splits), static_cast<int>(B), static_cast<int>(num_parts)};
  cudaStream_t s = as_stream(stream);
  mla::mla_metadata_kernel<<<1, 1024, 0, s>>>(p);
  check_launch("dsmoe::mla_metadata_kernel", s);
}

void launch_mla_decode(uintptr_t q, uintptr_t kv, uintptr_t block_table, uintptr_t seqlens, uintptr_t metadata,
                       uintptr_t num_splits, uintptr_t out, uintptr_t lse, uintptr_t o_accum, uintptr_t lse_accum,
                       int64_t B, int64_t s_q, int64_t H, int64_t num_blocks, int64_t max_blocks, int64_t num_parts,
                       int64_t q_batch, int64_t q_token, int64_t q_head, int64_t bt_stride, int64_t kv_block_bytes,
                       bool kv_fp8, double softmax_scale, bool causal, uintptr_t stream) {
  DSMOE_CHECK_ARG(B >= 0 && s_q >= 1 && H >= 1, kDec, "q", "bad shape B=", B, " s_q=", s_q, " H=", H);
  if (B == 0) return;
  const int64_t rows = s_q * H;
  DSMOE_CHECK_ARG(rows <= (1 << 20), kDec, "q", "s_q * H = ", rows, " is too large");
  const int64_t m_blocks = (rows + mla::kBlockM - 1) / mla::kBlockM;
  DSMOE_CHECK_ARG(m_blocks <= 65535 * 1024, kDec, "q", "too many query rows: ", rows);
  DSMOE_CHECK_ARG(num_parts >= 1 && num_parts <= kMaxParts, kDec, "tile_scheduler_metadata", "num_sm_parts (rows) must be in [1, ",
                  kMaxParts, "], got ", num_parts);
  // NOTE: checked before any launch (the combine grid's y dimension is B).
  DSMOE_CHECK_ARG(B <= 65535, kDec, "q", "batch size must be <= 65535 for the combine grid, got ", B);
  DSMOE_CHECK_ARG(max_blocks >= 1, kDec, "block_table", "needs at least one column, got ", max_blocks);
  DSMOE_CHECK_ARG(num_blocks >= 1, kDec, "kv_cache", "needs at least one block, got ", num_blocks);
  DSMOE_CHECK_ARG(is_aligned(q, 16) && q_batch % 8 == 0 && q_token % 8 == 0 && q_head % 8 == 0, kDec, "q",
                  "pointer and strides must be 16-byte aligned (strides ", q_batch, ", ", q_token, ", ", q_head, ")");
  DSMOE_CHECK_ARG(is_aligned(kv, 16) && kv_block_bytes % 16 == 0, kDec, "kv_cache",
                  "pointer and page stride must be 16-byte aligned (page stride ", kv_block_bytes, " bytes)");
  DSMOE_CHECK_ARG(max_blocks * 64 <= INT32_MAX / 2, kDec, "block_table", "too many columns: ", max_blocks);
  require_sm90a(kDec);  // the decode kernel is sm_90a code (wgmma): refuse other builds and devices
  mla::DecodeParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q);
  p.kv = reinterpret_cast<const uint8_t*>(kv);
  p.block_table = reinterpret_cast<const int32_t*>(block_table);
  p.seqlens = reinterpret_cast<const int32_t*>(seqlens);
  p.metadata = reinterpret_cast<const int32_t*>(metadata);
  p.num_splits = reinterpret_cast<const int32_t*>(num_splits);
  p.out = reinterpret_cast<__nv_bfloat16*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.o_accum = reinterpret_cast<float*>(o_accum);
  p.lse_accum = reinterpret_cast<float*>(lse_accum);
  p.B = static_cast<int>(B);
  p.s_q = static_cast<int>(s_q);
  p.H = static_cast<int>(H);
  p.max_blocks = static_cast<int>(max_blocks);
  p.num_parts = static_cast<int>(num_parts);
  p.q_batch = q_batch;
  p.q_token = q_token;
  p.q_head = q_head;
  p.bt_stride = bt_stride;
  p.kv_block_bytes = kv_block_bytes;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  cudaStream_t s = as_stream(stream);
  if (kv_fp8) run_decode<true>(p, static_cast<int>(m_blocks), s);
  else run_decode<false>(p, static_cast<int>(m_blocks), s);

  // Combine: fixed grid (rows, B); sequences with a single split return at once.
  mla::CombineParams c{p.o_accum, p.lse_accum, p.num_splits, p.out, p.lse, p.s_q, p.H, static_cast<int>(num_parts)};
  dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(B));
  // NOTE: a sequence has at most num_parts splits (one per part).
  mla::mla_combine_kernel<<<grid, 128, static_cast<size_t>(num_parts) * sizeof(float), s>>>(c);
  check_launch("dsmoe::mla_combine_kernel", s);
}

void launch_mla_kvcache_append(uintptr_t kv, uintptr_t block_table, uintptr_t batch_ids, uintptr_t positions,
                               uintptr_t latent, uintptr_t k_rope, uintptr_t norm_weight, uintptr_t cos, uintptr_t sin,
                               int64_t T, int64_t num_blocks, int64_t B, int64_t max_blocks, int64_t bt_stride,
                               int64_t latent_stride, int64_t rope_stride, int64_t cos_stride, int64_t sin_stride,
                               int64_t kv_block_bytes, bool kv_fp8, double eps, bool rope_interleaved, bool ue8m0,
                               uintptr_t stream) {
  DSMOE_CHECK_ARG(T >= 0 && T <= INT32_MAX / 32, kApp, "latent", "bad number of tokens ", T);
  if (T == 0) return;
  DSMOE_CHECK_ARG(num_blocks >= 1, kApp, "kv_cache", "needs at least one block, got ", num_blocks);
  DSMOE_CHECK_ARG(is_aligned(latent, 16) && latent_stride % 8 == 0, kApp, "latent",
                  "pointer and row stride must be 16-byte aligned (row stride ", latent_stride, ")");
  DSMOE_CHECK_ARG(norm_weight == 0 || is_aligned(norm_weight, 16), kApp, "norm_weight", "must be 16-byte aligned");
  DSMOE_CHECK_ARG(is_aligned(kv, 16) && kv_block_bytes % 16 == 0, kApp, "kv_cache", "must be 16-byte aligned");
  DSMOE_CHECK_ARG((cos == 0) == (sin == 0), kApp, "cos", "cos and sin must be given together");
  mla::AppendParams p{};
  p.kv = reinterpret_cast<uint8_t*>(kv);
  p.block_table = reinterpret_cast<const int32_t*>(block_table);
  p.batch_ids = reinterpret_cast<const int32_t*>(batch_ids);
  p.positions = reinterpret_cast<const int32_t*>(positions);
  p.latent = reinterpret_cast<const __nv_bfloat16*>(latent);
  p.k_rope = reinterpret_cast<const __nv_bfloat16*>(k_rope);
  p.norm_weight = reinterpret_cast<const __nv_bfloat16*>(norm_weight);
  p.cos = reinterpret_cast<const float*>(cos);
  p.sin = reinterpret_cast<const float*>(sin);
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(B);
  p.max_blocks = static_cast<int>(max_blocks);
  p.bt_stride = bt_stride;
  p.latent_stride = latent_stride;
  p.rope_stride = rope_stride;
  p.cos_stride = cos_stride;
  p.sin_stride = sin_stride;
  p.kv_block_bytes = kv_block_bytes;
  p.eps = static_cast<float>(eps);
  p.fp8 = kv_fp8;
  p.rope_interleaved = rope_interleaved;
  p.ue8m0 = ue8m0;
  cudaStream_t s = as_stream(stream);
  const int64_t blocks = (T + 3) / 4;  // 4 warps (tokens) per CTA
  mla::mla_append_kernel<<<static_cast<unsigned>(blocks), 128, 0, s>>>(p);
  check_launch("dsmoe::mla_append_kernel", s);
}
}  // namespace dsmoe
