// MLA decode over a paged latent cache (absorbed form: MQA, d_qk 576, d_v 512, V = K[:, :512]).
// Device code only. Design (docs/mla.md):
//  - one CTA = 64 query rows (row = i_q * H + h; heads and s_q folded into the M tile) x one split part;
//    grid (ceil(s_q * H / 64), num_sm_parts): a fixed shape, so the launch is CUDA-graph capturable.
//  - 2 warpgroups (256 threads). Per 64-token page: WG w computes S[:, 32w .. 32w+32) = Q K^T with
//    wgmma m64n32k16 (36 k-steps over 576), the row max is exchanged through smem, WG w writes its half
//    of P (bf16) to smem, then WG w computes O[:, 256w .. 256w+256) += P V with wgmma m64n256k16
//    (V read MN-major from the same page tile). Online softmax in fp32 with exp2 (ex2.approx.ftz); the
//    row sum adds the fp32 probabilities, P is rounded to bf16 only as the PV MMA operand.
//  - pages stream through a 2-stage cp.async pipeline (page i+1 loads while page i computes); tokens
//    past the sequence are zero-filled by cp.async (src-size 0), never read.
//  - FP8 cache: e4m3 latent bytes are staged (2 stages) and dequantized to bf16 into the K tile in smem
//    before the MMAs; the bf16 rope part is copied straight into its own double-buffered tile.
//  - a sequence with one split writes out/lse directly; otherwise fp32 partials go to o_accum/lse_accum
//    and mla_combine_kernel merges them (LSE-weighted, fp32).
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "dsmoe/common/utils.cuh"
#include "dsmoe/mla/ptx.cuh"

namespace dsmoe {
namespace mla {

constexpr int kPage = 64;         // tokens per cache block
constexpr int kBlockM = 64;       // query rows per CTA (wgmma M)
constexpr int kDQK = 576;
constexpr int kDV = 512;
constexpr int kThreads = 256;     // 2 warpgroups
constexpr int kTileBytes = 64 * 128;  // one 64-row x 64-col bf16 tile, 128B-swizzled (8 KB)
constexpr int kQKTiles = kDQK / 64;   // 9
constexpr int kFP8TokenBytes = 656;
constexpr int kMetaFields = 8;
constexpr int kFixedOverheadBlocks = 5;

// Shared memory plan (bytes, from a 1024-aligned base).
struct SmemBF16 {
  static constexpr int kQ = 0;                                      // [9 tiles] Q
  static constexpr int kK = kQ + kQKTiles * kTileBytes;              // [2 stages][9 tiles] K (= V for tiles 0..7)
  static constexpr int kP = kK + 2 * kQKTiles * kTileBytes;          // [1 tile] P (bf16, K-major)
  static constexpr int kStats = kP + kTileBytes;                     // float [2][64] row max, [2][64] row sum
  static constexpr int kTotal = kStats + 4 * kBlockM * 4;
};
struct SmemFP8 {
  static constexpr int kQ = 0;                                      // [9 tiles] Q
  static constexpr int kLat = kQ + kQKTiles * kTileBytes;            // [8 tiles] dequantized latent (single)
  static constexpr int kRope = kLat + 8 * kTileBytes;                // [2 stages][1 tile] rope (bf16)
  static constexpr int kRaw = kRope + 2 * kTileBytes;                // [2 stages][64 tokens x 512] e4m3
  static constexpr int kP = kRaw + 2 * kPage * 512;
  static constexpr int kStats = kP + kTileBytes;
  static constexpr int kTotal = kStats + 4 * kBlockM * 4;
};
constexpr int kSmemAlignSlack = 1024;
static_assert(SmemBF16::kTotal + kSmemAlignSlack <= 232448, "bf16 MLA decode smem exceeds 227 KB");
static_assert(SmemFP8::kTotal + kSmemAlignSlack <= 232448, "fp8 MLA decode smem exceeds 227 KB");

struct DecodeParams {
  const __nv_bfloat16* q;       // [B, s_q, H, 576] (strides q_batch/q_token/q_head, last dim contiguous)
  const uint8_t* kv;            // [num_blocks, 64, 1, 576] bf16 or [num_blocks, 64, 1, 656] FP8 bytes
  const int32_t* block_table;   // [B, max_blocks] (row stride bt_stride)
  const int32_t* seqlens;       // [B]
  const int32_t* metadata;      // [num_parts, 8]
  const int32_t* num_splits;    // [B + 1]
  __nv_bfloat16* out;           // [B, s_q, H, 512]
  float* lse;                   // [B, H, s_q]
  float* o_accum;               // [num_splits[B], s_q * H, 512]
  float* lse_accum;             // [num_splits[B], s_q * H]
  int B, s_q, H, max_blocks, num_parts;
  int64_t q_batch, q_token, q_head, bt_stride, kv_block_bytes;
  float scale_log2;             // softmax_scale * log2(e)
  bool causal;
};

// Byte offset of 16-byte chunk c (0..7) of row r inside a 128B-swizzled tile.
__device__ __forceinline__ uint32_t sw128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

template <bool kFP8>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ DecodeParams p) {
#if DSMOE_MLA_SM90
  using Smem = typename std::conditional<kFP8, SmemFP8, SmemBF16>::type;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t pad = (1024 - (raw_base & 1023)) & 1023;
  uint8_t* smem = smem_raw + pad;
  const uint32_t sbase = raw_base + pad;
  float* s_rowmax = reinterpret_cast<float*>(smem + Smem::kStats);     // [2][64]
  float* s_rowsum = s_rowmax + 2 * kBlockM;                             // [2][64]

  const int tid = threadIdx.x;
  const int wg = tid / 128;                 // warpgroup: S tokens [32wg, 32wg+32), O cols [256wg, +256)
  const int t_wg = tid % 128;
  const int warp = t_wg / 32, lane = t_wg % 32;
  const int r0 = warp * 16 + lane / 4;      // this thread's accumulator rows: r0 and r0 + 8
  const int qc = lane % 4;
  const int m_block = blockIdx.x;
  const int part = blockIdx.y;
  const int rows_total = p.s_q * p.H;

  const int32_t* md = p.metadata + part * kMetaFields;
  const int begin_b = md[0], begin_blk = md[1], end_b = md[2], end_blk = md[3], begin_split = md[4];

  for (int b = begin_b; b <= end_b; ++b) {
    // NOTE: the sequence length is clamped to the block table, so a bad cache_seqlens can never make the
    // kernel read past block_table[b, :max_blocks] (DSMOE_CHECK_BLOCK_TABLE=1 reports it on the host).
    int seqlen = p.seqlens[b];
    seqlen = max(0, min(seqlen, p.max_blocks * kPage));
    const int n_blk = (seqlen + kPage - 1) / kPage;
    const int lo = (b == begin_b) ? begin_blk : 0;
    const int hi = (b == end_b) ? min(end_blk, n_blk) : n_blk;
    const int local_split = (b == begin_b) ? begin_split : 0;
    const int split_base = p.num_splits[b];
    const int n_split = p.num_splits[b + 1] - split_base;
    const int32_t* bt = p.block_table + b * p.bt_stride;

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};

    // Query i sees keys < limit(i); rows of this thread: r0, r0 + 8 (inside the M tile).
    int limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m_block * kBlockM + r0 + 8 * h;
      const int iq = min(row, rows_total - 1) / p.H;
      limit[h] = p.causal ? min(seqlen, seqlen - p.s_q + iq + 1) : seqlen;
      if (row >= rows_total) limit[h] = 0;
    }

    auto load_page = [&](int blk, int stage) {
      const int64_t page = bt[blk];
      const uint8_t* src_page = p.kv + page * p.kv_block_bytes;
      const int valid = seqlen - blk * kPage;  // tokens of this page inside the sequence (>= 1)
      if constexpr (!kFP8) {
        const uint32_t dst = sbase + Smem::kK + stage * kQKTiles * kTileBytes;
#pragma unroll 2
        for (int c = tid; c < kPage * 72; c += kThreads) {
          const int tok = c / 72, cc = c % 72;
          const uint8_t* src = src_page + tok * (kDQK * 2) + cc * 16;
          cp_async_16(dst + (cc / 8) * kTileBytes + sw128(tok, cc % 8), tok < valid ? src : p.kv, tok < valid ? 16 : 0);
        }
      } else {
        const uint32_t raw = sbase + Smem::kRaw + stage * kPage * 512;
        for (int c = tid; c < kPage * 32; c += kThreads) {  // latent e4m3: 32 chunks per token, plain layout
          const int tok = c / 32, cc = c % 32;
          cp_async_16(raw + tok * 512 + cc * 16, tok < valid ? src_page + tok * kFP8TokenBytes + cc * 16 : p.kv,
                      tok < valid ? 16 : 0);
        }
        const uint32_t rope = sbase + Smem::kRope + stage * kTileBytes;
        for (int c = tid; c < kPage * 8; c += kThreads) {   // rope bf16: 8 chunks per token, swizzled tile
          const int tok = c / 8, cc = c % 8;
          cp_async_16(rope + sw128(tok, cc), tok < valid ? src_page + tok * kFP8TokenBytes + 528 + cc * 16 : p.kv,
                      tok < valid ? 16 : 0);
        }
      }
    };

    // FP8: scale of (token tid / 4, group tid % 4) of a page, fetched one page ahead.
    auto load_scale = [&](int blk) -> float {
      if constexpr (kFP8) {
        const int tok = tid / 4, g = tid % 4;
        if (blk * kPage + tok >= seqlen) return 0.f;
        const int64_t page = bt[blk];
        return __ldg(reinterpret_cast<const float*>(p.kv + page * p.kv_block_bytes + tok * kFP8TokenBytes + 512) + g);
      }
      return 0.f;
    };

    if (hi > lo) {
      // Q tile (rows past s_q * H are zero).
      const uint32_t dq = sbase + Smem::kQ;
      for (int c = tid; c < kBlockM * 72; c += kThreads) {
        const int r = c / 72, cc = c % 72;
        const int row = m_block * kBlockM + r;
        const bool ok = row < rows_total;
        const int rr = ok ? row : 0;
        const __nv_bfloat16* src = p.q + b * p.q_batch + (rr / p.H) * p.q_token + (rr % p.H) * p.q_head + cc * 8;
        cp_async_16(dq + (cc / 8) * kTileBytes + sw128(r, cc % 8), src, ok ? 16 : 0);
      }
      load_page(lo, 0);
      cp_async_commit();
    }
    float scale_next = (hi > lo) ? load_scale(lo) : 0.f;

    for (int blk = lo; blk < hi; ++blk) {
      const int stage = (blk - lo) & 1;
      const float scale_cur = scale_next;
      if (blk + 1 < hi) {
        load_page(blk + 1, stage ^ 1);
        cp_async_commit();
        scale_next = load_scale(blk + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      uint32_t k_base;  // smem address of the 9 K tiles of this page (tiles 0..7 are also V)
      uint32_t rope_tile;
      if constexpr (!kFP8) {
        k_base = sbase + Smem::kK + stage * kQKTiles * kTileBytes;
        rope_tile = k_base + 8 * kTileBytes;
        fence_proxy_async();
        __syncthreads();
      } else {
        __syncthreads();  // raw bytes of this page visible to all threads
        // Dequantize token tid/4, values [128 g, 128 g + 128) with g = tid % 4: 8 chunks of 16 e4m3.
        const int tok = tid / 4, g = tid % 4;
        const uint8_t* raw = smem + Smem::kRaw + stage * kPage * 512 + tok * 512 + g * 128;
        const bool ok = blk * kPage + tok < seqlen;
#pragma unroll 1
        for (int j0 = 0; j0 < 8; ++j0) {  // NOTE: not unrolled: the 128 O accumulators leave few registers
          // NOTE: chunk order rotated by g and token parity so that the 8 threads of each 128-bit shared
          // access phase hit 8 different 16-byte bank groups (in order: 8-way read, 4-way write conflicts).
          const int j = (j0 + g + 4 * (tok & 1)) & 7;
          uint4 v = *reinterpret_cast<const uint4*>(raw + j * 16);
          const uint8_t* e = reinterpret_cast<const uint8_t*>(&v);
          uint32_t packed[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            // NOTE: fp32 product then RNE to bf16: the reference dequantizes exactly so.
            const float a = ok ? fp8_to_float(e[2 * k]) * scale_cur : 0.f;
            const float c2 = ok ? fp8_to_float(e[2 * k + 1]) * scale_cur : 0.f;
            __nv_bfloat162 h2 = __floats2bfloat162_rn(a, c2);
            packed[k] = *reinterpret_cast<uint32_t*>(&h2);
          }
          // values [128 g + 16 j, +16) = columns of tile (2g + j / 4), chunks 2 (j % 4), 2 (j % 4) + 1
          const int col = g * 128 + j * 16;
          const int tile = col / 64, c0 = (col % 64) / 8;
          uint8_t* dst = smem + Smem::kLat + tile * kTileBytes;
          *reinterpret_cast<uint4*>(dst + sw128(tok, c0)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
          *reinterpret_cast<uint4*>(dst + sw128(tok, c0 + 1)) = make_uint4(packed[4], packed[5], packed[6], packed[7]);
        }
        k_base = sbase + Smem::kLat;
        rope_tile = sbase + Smem::kRope + stage * kTileBytes;
        fence_proxy_async();
        __syncthreads();
      }

      // ---- S = Q K^T for tokens [32 wg, 32 wg + 32) of this page.
      float s[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) s[i] = 0.f;
      // NOTE: fence_regs pins the register writes (this zero-init, the alpha rescale of O below) before
      // wgmma.fence; otherwise the compiler sinks them past it and ptxas must inject an extra
      // warpgroup.arrive (C7519) to keep the wgmma register accesses ordered.
      fence_regs(s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kQKTiles * 4; ++kk) {
        const int t = kk / 4;
        const uint32_t a_addr = sbase + Smem::kQ + t * kTileBytes + (kk % 4) * 32;
        const uint32_t b_addr = (t < 8 ? k_base + t * kTileBytes : rope_tile) + wg * 32 * 128 + (kk % 4) * 32;
        wgmma_m64n32k16_ss(s, make_desc_sw128(a_addr, 16, 1024), make_desc_sw128(b_addr, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);

      // ---- mask, scale, row max (log2 domain). s[4j + 0/1]: row r0, s[4j + 2/3]: row r0 + 8;
      // token (in page) = 32 wg + 8 j + 2 qc + {0, 1}.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          const int tok = blk * kPage + wg * 32 + 8 * j + 2 * qc + (e % 2);
          float v = s[4 * j + e] * p.scale_log2;
          v = tok < limit[h] ? v : -INFINITY;
          s[4 * j + e] = v;
          mx[h] = fmaxf(mx[h], v);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
      if (qc == 0) {
        s_rowmax[wg * kBlockM + r0] = mx[0];
        s_rowmax[wg * kBlockM + r0 + 8] = mx[1];
      }
      __syncthreads();
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
        const float m_new = fmaxf(m_run[h], fmaxf(s_rowmax[r], s_rowmax[kBlockM + r]));
        // NOTE: a row that has seen nothing yet keeps m = -inf; use 0 as the exponent base so that
        // exp2(-inf - base) = 0 and no inf - inf NaN appears.
        const float base = (m_new == -INFINITY) ? 0.f : m_new;
        alpha[h] = (m_run[h] == -INFINITY) ? 0.f : ex2_approx_ftz(m_run[h] - base);
        m_run[h] = m_new;
        mx[h] = base;
      }
      float rs[2] = {0.f, 0.f};
      uint8_t* sp = smem + Smem::kP;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = ex2_approx_ftz(s[4 * j + 2 * h] - mx[h]);
          const float p1 = ex2_approx_ftz(s[4 * j + 2 * h + 1] - mx[h]);
          // NOTE: the row sum adds the fp32 probabilities, before P is rounded to bf16 for the PV MMA:
          // summing the rounded values biases l (and the lse) by up to ~1e-3 at short lengths, since
          // the rounding errors of the few large P do not average out. The output then carries only
          // P's own bf16 rounding (O / l is off by that relative amount), as in FlashMLA.
          rs[h] += p0 + p1;
          const __nv_bfloat162 pb = __floats2bfloat162_rn(p0, p1);
          const int r = r0 + 8 * h;
          const int tok = wg * 32 + 8 * j + 2 * qc;
          *reinterpret_cast<__nv_bfloat162*>(sp + sw128(r, tok / 8) + (tok % 8) * 2) = pb;
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + rs[h];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[4 * j + 0] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
      fence_proxy_async();
      __syncthreads();  // P complete (both halves)

      // ---- O[:, 256 wg .. +256) += P V; V = K tiles 4 wg .. 4 wg + 3 (tokens are the K dim).
      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t a_addr = sbase + Smem::kP + kk * 32;
        const uint32_t b_addr = k_base + 4 * wg * kTileBytes + kk * 16 * 128;
        wgmma_m64n256k16_ss_tb(o, make_desc_sw128(a_addr, 16, 1024), make_desc_sw128(b_addr, kTileBytes, 1024));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      __syncthreads();  // K stage, P and the row-max slots may be overwritten now
    }

    // ---- finalize: l over the whole row = quad sum, then the two warpgroups' halves.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    if (qc == 0) {
      s_rowsum[wg * kBlockM + r0] = l_run[0];
      s_rowsum[wg * kBlockM + r0 + 8] = l_run[1];
    }
    __syncthreads();
    float inv[2], lse_v[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 8 * h;
      const float l = s_rowsum[r] + s_rowsum[kBlockM + r];
      const bool empty = !(l > 0.f);
      inv[h] = empty ? 0.f : 1.f / l;
      // natural-log lse of the scaled scores: (m + log2 l) * ln 2; +inf when nothing was seen
      lse_v[h] = empty ? INFINITY : (m_run[h] + log2f(l)) * 0.69314718055994531f;
    }
    __syncthreads();  // s_rowsum may be reused by the next sequence
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m_block * kBlockM + r0 + 8 * h;
      if (row >= rows_total) continue;
      const int iq = row / p.H, hh = row % p.H;
      if (n_split == 1) {
        __nv_bfloat16* dst = p.out + ((static_cast<int64_t>(b) * p.s_q + iq) * p.H + hh) * kDV + wg * 256 + 2 * qc;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          *reinterpret_cast<__nv_bfloat162*>(dst + 8 * j) =
              __floats2bfloat162_rn(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        }
        if (wg == 0 && qc == 0) p.lse[(static_cast<int64_t>(b) * p.H + hh) * p.s_q + iq] = lse_v[h];
      } else {
        const int64_t split = split_base + local_split;
        float* dst = p.o_accum + (split * rows_total + row) * kDV + wg * 256 + 2 * qc;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        }
        if (wg == 0 && qc == 0) p.lse_accum[split * rows_total + row] = lse_v[h];
      }
    }
  }
#else
  // Built without sm_90a: the launcher refuses such a build (require_sm90a); trap if launched anyway.
  (void)p;
  DSMOE_TRAP_NOT_SM90A();
#endif
}

struct CombineParams {
  const float* o_accum;       // [num_splits[B], s_q * H, 512]
  const float* lse_accum;     // [num_splits[B], s_q * H]
  const int32_t* num_splits;  // [B + 1]
  __nv_bfloat16* out;         // [B, s_q, H, 512]
  float* lse;                 // [B, H, s_q]
  int s_q, H, max_splits;
};

// One CTA (128 threads, 4 values each) per (row, sequence); sequences with one split exit at once.
// Splits whose lse is +inf saw no token and get weight 0.
__global__ void __launch_bounds__(128) mla_combine_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ float s_w[];  // [max_splits]
  const int row = blockIdx.x, b = blockIdx.y;
  const int base = p.num_splits[b];
  const int n = p.num_splits[b + 1] - base;
  if (n <= 1) return;
  const int rows_total = p.s_q * p.H;
  __shared__ float s_lse;
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += 32) {
      const float l = p.lse_accum[static_cast<int64_t>(base + i) * rows_total + row];
      mx = fmaxf(mx, l == INFINITY ? -INFINITY : l);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += 32) {
      const float l = p.lse_accum[static_cast<int64_t>(base + i) * rows_total + row];
      const float w = (l == INFINITY || mx == -INFINITY) ? 0.f : expf(l - mx);
      s_w[i] = w;
      sum += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int i = threadIdx.x; i < n; i += 32) s_w[i] *= inv;
    if (threadIdx.x == 0) s_lse = sum > 0.f ? mx + logf(sum) : INFINITY;
  }
  __syncthreads();
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i = 0; i < n; ++i) {
    const float w = s_w[i];
    if (w == 0.f) continue;  // NOTE: also skips partials of empty splits (never NaN-multiplied)
    const float4 v = *reinterpret_cast<const float4*>(p.o_accum + (static_cast<int64_t>(base + i) * rows_total + row) * kDV +
                                                      threadIdx.x * 4);
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  const int iq = row / p.H, h = row % p.H;
  __nv_bfloat16* dst = p.out + ((static_cast<int64_t>(b) * p.s_q + iq) * p.H + h) * kDV + threadIdx.x * 4;
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(acc.x, acc.y);
  *reinterpret_cast<__nv_bfloat162*>(dst + 2) = __floats2bfloat162_rn(acc.z, acc.w);
  if (threadIdx.x == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * p.s_q + iq] = s_lse;
}

// ----------------------------------------------------------------------------- schedule
struct MetadataParams {
  const int32_t* seqlens;  // [B]
  int32_t* metadata;       // [num_parts, 8]
  int32_t* num_splits;     // [B + 1]; num_splits[b + 1] is scratch for S_b until step 3 overwrites it
  int B, num_parts;
};

__device__ __forceinline__ int units_of(int seqlen) { return max(1, (max(seqlen, 0) + kPage - 1) / kPage); }

// Block-wide exclusive scan of one int per thread (blockDim.x = 1024); returns the prefix, *total = sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* s_warp, int* total) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) s_warp[w] = x;
  __syncthreads();
  if (w == 0) {
    int t = s_warp[lane];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, t, off);
      if (lane >= off) t += y;
    }
    s_warp[lane] = t;  // inclusive prefix of warp sums
  }
  __syncthreads();
  const int warp_prefix = w > 0 ? s_warp[w - 1] : 0;
  *total = s_warp[31];
  __syncthreads();
  return warp_prefix + x - v;
}

// One CTA of 1024 threads. Same integer arithmetic as dsmoe.ref.mla.get_mla_metadata (the spec).
__global__ void __launch_bounds__(1024) mla_metadata_kernel(const __grid_constant__ MetadataParams p) {
  __shared__ int s_warp[32];
  const int F = kFixedOverheadBlocks;
  // 1) S_b = exclusive prefix of (u_b + F), stored in num_splits[b + 1] as scratch (each thread of step 3
  //    then reads and writes only its own slot).
  int carry = 0;
  for (int start = 0; start < p.B; start += 1024) {
    const int b = start + threadIdx.x;
    const int cost = b < p.B ? units_of(p.seqlens[b]) + F : 0;
    int tot;
    const int pre = block_exclusive_scan(cost, s_warp, &tot);
    if (b < p.B) p.num_splits[b + 1] = carry + pre;
    carry += tot;
  }
  const int T = carry;
  const int L = max(1, (T + p.num_parts - 1) / p.num_parts);
  __syncthreads();
  // 2) per part: binary searches over the monotone first_b = (S_b + F) / L and last_b = (S_b + F + u_b - 1) / L.
  for (int i = threadIdx.x; i < p.num_parts; i += 1024) {
    int lo = 0, hi = p.B;  // begin_b: first b with last_b >= i
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      const int last = (p.num_splits[mid + 1] + F + units_of(p.seqlens[mid]) - 1) / L;
      if (last >= i) hi = mid; else lo = mid + 1;
    }
    const int begin_b = lo;
    lo = 0, hi = p.B;      // end_b + 1: first b with first_b > i
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      const int first = (p.num_splits[mid + 1] + F) / L;
      if (first > i) hi = mid; else lo = mid + 1;
    }
    const int end_b = lo - 1;
    int32_t* row = p.metadata + i * kMetaFields;
    if (begin_b > end_b || begin_b >= p.B || end_b < 0) {
      row[0] = 0; row[1] = 0; row[2] = -1; row[3] = 0; row[4] = 0;
    } else {
      const int Sb = p.num_splits[begin_b + 1], Se = p.num_splits[end_b + 1];
      const int n_end = (max(p.seqlens[end_b], 0) + kPage - 1) / kPage;
      row[0] = begin_b;
      row[1] = max(0, i * L - (Sb + F));
      row[2] = end_b;
      row[3] = max(0, min((i + 1) * L - (Se + F), n_end));
      row[4] = i - (Sb + F) / L;
    }
    row[5] = 0; row[6] = 0; row[7] = 0;
  }
  __syncthreads();
  // 3) num_splits[b + 1] = inclusive prefix of (last_b - first_b + 1).
  carry = 0;
  for (int start = 0; start < p.B; start += 1024) {
    const int b = start + threadIdx.x;
    int n = 0;
    if (b < p.B) {
      const int S = p.num_splits[b + 1];
      n = (S + F + units_of(p.seqlens[b]) - 1) / L - (S + F) / L + 1;
    }
    int tot;
    const int pre = block_exclusive_scan(n, s_warp, &tot);
    if (b < p.B) p.num_splits[b + 1] = carry + pre + n;
    carry += tot;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.num_splits[0] = 0;
}

}  // namespace mla
}  // namespace dsmoe
