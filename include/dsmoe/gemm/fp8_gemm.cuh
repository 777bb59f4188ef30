// FP8 block-scaled GEMM for sm_90a: D = A @ B^T with per-128-K-block FP32 promotion (the reference and
// specification is python/dsmoe/ref/gemm.py).
//
// One kernel template serves every variant (Kind below); they differ only in how tiles are enumerated,
// where operands and scales come from, and which output rows are written.
//
// Structure (per CTA, persistent over tiles):
//   warpgroup 0            producer: one thread issues TMA loads of A [BM x 128], B [BN x 128] (both
//                          K-major, 128-byte swizzle) and the A scales [BM] (+ B scales [BN] for the
//                          1x128-scaled TN kinds) into a ring of `num_stages` shared-memory stages;
//                          mbarriers full[s] (TMA transaction count) / empty[s] (consumer releases).
//   warpgroups 1..BM/64    consumers: 64 rows each; per stage 4 x wgmma m64n128k32 e4m3 into fp32
//                          registers, then promotion `fin += acc * (a_scale[row] * b_scale)`; after
//                          the K loop, predicated stores straight from registers (rows past the valid
//                          range, padding rows and masked rows are never written).
// Tile order: a static persistent schedule, tile t = blockIdx.x + i * gridDim.x, rasterized in groups
// of `raster_group_n` n-blocks: inside a group consecutive tiles step through its n-blocks, then move
// to the next m-block, so the CTAs running at the same time share a few A row-blocks and at most
// `raster_group_n` B column-blocks in L2.
// Producer and consumers walk the same schedule independently (it is a pure function of the params and
// of the device-side index arrays, which nothing writes during the kernel).
#pragma once
#include <cuda.h>  // CUtensorMap (a type only: nothing here calls the driver)
#include <cuda_bf16.h>
#include <cstdint>

#include "dsmoe/gemm/ptx.cuh"

namespace dsmoe::gemm {

enum class Kind : int { kDense = 0, kDenseF32 = 1, kContiguous = 2, kMasked = 3, kKGrouped = 4 };

constexpr int kBlockK = 128;     // K per stage = the promotion interval = the scale group
constexpr int kWgmmaK = 32;      // K of one e4m3 wgmma
constexpr int kWgmmaN = 128;     // N of one wgmma (= BN: one instruction per consumer per k32)
constexpr int kProducerRegs = 40;
// 2 consumers: the CTA launches with 168 registers per thread (65536 / 384, rounded down to 8); the
// producer's release (128 x (168 - 40)) is exactly the consumers' increase (256 x (232 - 168)), and
// 128 * 40 + 256 * 232 = 64512 <= 65536. 1 consumer: ptxas launches the 256-thread CTA with 240, so
// the increase to 240 requests no register (GPU-unverified: equal to the launch count) and the release is
// unused.
template <int kConsumers>
constexpr int kConsumerRegs = kConsumers == 2 ? 232 : 240;

__host__ __device__ constexpr bool scale_b_per_row(Kind k) { return k == Kind::kKGrouped; }
__host__ __device__ constexpr bool out_is_f32(Kind k) { return k == Kind::kDenseF32 || k == Kind::kKGrouped; }

// NOTE: mirrored by dsmoe.gemm_config.smem_bytes (the Python heuristic picks num_stages with it; the
// launcher recomputes it here and checks it against the device limit).
__host__ __device__ constexpr int gemm_smem_bytes(Kind kind, int bm, int bn, int stages) {
  return 1024 + stages * (bm * kBlockK + bn * kBlockK + bm * 4 + (scale_b_per_row(kind) ? bn * 4 : 0)) +
         stages * 2 * 8;
}

struct GemmParams {
  // A [rows_a, K] e4m3 K-major; box {128, BM}; 128B swizzle. rows_a = M (dense, contiguous, TN) or
  // G * M (masked: a [G, M, K] flattened).
  CUtensorMap tmap_a;
  // B [rows_b, K] e4m3 K-major; box {128, BN}; 128B swizzle. rows_b = N (dense, TN) or G * N (grouped).
  CUtensorMap tmap_b;
  // A scales, fp32, 3D {M, K/128, G or 1} with M contiguous (MN-major); box {BM, 1, 1}.
  CUtensorMap tmap_sa;
  // TN kinds only: B scales fp32 {N, K/128, 1} MN-major; box {BN, 1, 1}.
  CUtensorMap tmap_sb;
  const float* sb;          // NT kinds: [G, ceil(N/128), K/128]; (g, nb, kb) at g*sb_ld_g + nb*sb_ld_n + kb
  const int* m_indices;     // contiguous: [M] group of each row, -1 (or anything outside [0, G)) = padding
  const int* masked_m;      // masked: [G] valid rows per group (clamped to [0, M])
  const int* group_sizes;   // TN: [G] tokens per group (multiples of 128), or null = one group of K
  void* out;                // [rows_out, N] bf16 or fp32 (out_is_f32), row stride ld_out elements;
                            // rows_out = M, or G * M for masked and k-grouped
  int64_t sb_ld_g, sb_ld_n, ld_out;
  int M;                    // rows of one problem: dense/contiguous M, masked M_max, TN M
  int N, K;                 // K: reduction length (T, the tokens, for the TN kinds)
  int num_groups;
  int num_stages;
  int raster_group_n;
  int accumulate;           // TN: out += result
};

struct Tile {
  int m_block, n_block, group;
  int k_block_begin, num_k_blocks;
};

// The persistent tile schedule. Each thread that runs it keeps its own cursor.
template <Kind kKind, int BM, int BN>
struct Scheduler {
  const GemmParams& p;
  int64_t next;
  int num_n_blocks;
  // grouped walks (masked, k-grouped): the group the cursor is in and where its tiles start
  int group = 0;
  int64_t group_tile_base = 0;
  int group_m_blocks = -1;
  int group_k_base = 0;

  __device__ explicit Scheduler(const GemmParams& params)
      : p(params), next(blockIdx.x), num_n_blocks((params.N + BN - 1) / BN) {}

  __device__ void raster(int64_t local, int num_m_blocks, Tile& t) const {
    const int gn_full = p.raster_group_n;
    const int64_t per_group = static_cast<int64_t>(num_m_blocks) * gn_full;
    const int gidx = static_cast<int>(local / per_group);
    const int first_n = gidx * gn_full;
    const int gn = min(gn_full, num_n_blocks - first_n);
    const int r = static_cast<int>(local - gidx * per_group);
    t.m_block = r / gn;
    t.n_block = first_n + r % gn;
  }

  __device__ int masked_rows(int g) const {
    const int m = __ldg(p.masked_m + g);
    return m < 0 ? 0 : (m > p.M ? p.M : m);
  }

  __device__ bool get_next(Tile& t) {
    const int k_blocks_total = p.K / kBlockK;
    if constexpr (kKind == Kind::kDense || kKind == Kind::kDenseF32) {
      const int num_m = (p.M + BM - 1) / BM;
      if (next >= static_cast<int64_t>(num_m) * num_n_blocks) return false;
      raster(next, num_m, t);
      next += gridDim.x;
      t.group = 0;
      t.k_block_begin = 0;
      t.num_k_blocks = k_blocks_total;
      return true;
    } else if constexpr (kKind == Kind::kContiguous) {
      const int num_m = p.M / BM;  // M is a multiple of the 128-row alignment
      const int64_t total = static_cast<int64_t>(num_m) * num_n_blocks;
      while (next < total) {
        raster(next, num_m, t);
        next += gridDim.x;
        // NOTE: rows of a BM-block belong to one group followed by padding (host-validated layout), so
        // the first row names the block's group; a padding first row means the block is all padding.
        const int g = __ldg(p.m_indices + static_cast<int64_t>(t.m_block) * BM);
        if (g >= 0 && g < p.num_groups) {
          t.group = g;
          t.k_block_begin = 0;
          t.num_k_blocks = k_blocks_total;
          return true;
        }
      }
      return false;
    } else if constexpr (kKind == Kind::kMasked) {
      while (group < p.num_groups) {
        if (group_m_blocks < 0) group_m_blocks = (masked_rows(group) + BM - 1) / BM;
        const int64_t n_tiles = static_cast<int64_t>(group_m_blocks) * num_n_blocks;
        if (next < group_tile_base + n_tiles) {
          raster(next - group_tile_base, group_m_blocks, t);
          next += gridDim.x;
          t.group = group;
          t.k_block_begin = 0;
          t.num_k_blocks = k_blocks_total;
          return true;
        }
        group_tile_base += n_tiles;
        ++group;
        group_m_blocks = -1;
      }
      return false;
    } else {  // kKGrouped: every group has all (m, n) tiles; its K range is its run of tokens
      const int num_m = (p.M + BM - 1) / BM;
      const int64_t n_tiles = static_cast<int64_t>(num_m) * num_n_blocks;
      while (group < p.num_groups) {
        int kb = k_blocks_total;
        if (p.group_sizes != nullptr) {
          const int sz = __ldg(p.group_sizes + group);
          kb = sz > 0 ? sz / kBlockK : 0;
        }
        // NOTE: never read past T even if the sizes overrun it
        kb = max(0, min(kb, k_blocks_total - group_k_base));
        if (next < group_tile_base + n_tiles) {
          raster(next - group_tile_base, num_m, t);
          next += gridDim.x;
          t.group = group;
          t.k_block_begin = group_k_base;
          t.num_k_blocks = kb;
          return true;
        }
        group_tile_base += n_tiles;
        group_k_base += kb;
        ++group;
      }
      return false;
    }
  }
};

template <Kind kKind, int BM, int BN>
__global__ void __launch_bounds__(128 * (1 + BM / 64), 1) fp8_gemm_kernel(const __grid_constant__ GemmParams p) {
#if DSMOE_SM90A
  static_assert(BM == 64 || BM == 128, "a consumer warpgroup owns 64 rows; 1 or 2 consumers");
  static_assert(BN == kWgmmaN, "one wgmma n128 per consumer per k32; b scales are per 128 columns");
  static_assert(kBlockK == 128, "the promotion interval and the scale group are 128 of K");
  constexpr int kConsumers = BM / 64;
  constexpr bool kSbRow = scale_b_per_row(kKind);
  constexpr uint32_t kABytes = BM * kBlockK, kBBytes = BN * kBlockK;
  constexpr uint32_t kStageBytes = kABytes + kBBytes + BM * 4 + (kSbRow ? BN * 4 : 0);
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "tiles must keep the 1024-byte swizzle alignment");

  extern __shared__ uint8_t smem_raw[];
  // NOTE: the dynamic shared window is only guaranteed 16-byte aligned; the 128B-swizzle atoms need
  // 1024 (the launcher allocates 1024 extra bytes for this).
  const uint32_t raw = ptx::smem_u32(smem_raw);
  uint8_t* smem = smem_raw + ((1024u - (raw & 1023u)) & 1023u);
  const int S = p.num_stages;
  // layout: [A tiles x S][B tiles x S][A scales x S][B scales x S (TN)][full x S][empty x S]
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem_a + static_cast<size_t>(S) * kABytes;
  float* smem_sa = reinterpret_cast<float*>(smem_b + static_cast<size_t>(S) * kBBytes);
  float* smem_sb = smem_sa + S * BM;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_sb + (kSbRow ? S * BN : 0));
  uint64_t* empty = full + S;

  const int warpgroup = threadIdx.x / 128;
  const int tid_wg = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      ptx::mbar_init(ptx::smem_u32(full + s), 1);
      ptx::mbar_init(ptx::smem_u32(empty + s), kConsumers * 4);  // lane 0 of each consumer warp
    }
    ptx::fence_barrier_init();
    ptx::prefetch_tmap(&p.tmap_a);
    ptx::prefetch_tmap(&p.tmap_b);
    ptx::prefetch_tmap(&p.tmap_sa);
    if constexpr (kSbRow) ptx::prefetch_tmap(&p.tmap_sb);
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ------------------------------------------------------------------ producer
    ptx::setmaxnreg_dec<kProducerRegs>();
    if (tid_wg != 0) return;
    Scheduler<kKind, BM, BN> sched(p);
    Tile t;
    int stage = 0;
    uint32_t phase = 0;
    while (sched.get_next(t)) {
      int a_row = t.m_block * BM, b_row = t.n_block * BN, sa_batch = 0;
      if constexpr (kKind == Kind::kMasked) {
        a_row += t.group * p.M;
        sa_batch = t.group;
      }
      if constexpr (kKind == Kind::kContiguous || kKind == Kind::kMasked) b_row += t.group * p.N;
      for (int kb = 0; kb < t.num_k_blocks; ++kb) {
        const int k = t.k_block_begin + kb;
        ptx::mbar_wait(ptx::smem_u32(empty + stage), phase ^ 1u);
        const uint32_t bar = ptx::smem_u32(full + stage);
        // NOTE: the transaction count is the full box size even where TMA zero-fills out of bounds.
        ptx::mbar_arrive_expect_tx(bar, kStageBytes);
        ptx::tma_load_2d(ptx::smem_u32(smem_a + static_cast<size_t>(stage) * kABytes), &p.tmap_a, bar, k * kBlockK, a_row);
        ptx::tma_load_2d(ptx::smem_u32(smem_b + static_cast<size_t>(stage) * kBBytes), &p.tmap_b, bar, k * kBlockK, b_row);
        ptx::tma_load_3d(ptx::smem_u32(smem_sa + stage * BM), &p.tmap_sa, bar, t.m_block * BM, k, sa_batch);
        if constexpr (kSbRow) ptx::tma_load_3d(ptx::smem_u32(smem_sb + stage * BN), &p.tmap_sb, bar, t.n_block * BN, k, 0);
        if (++stage == S) {
          stage = 0;
          phase ^= 1u;
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  ptx::setmaxnreg_inc<static_cast<uint32_t>(kConsumerRegs<kConsumers>)>();
  const int consumer = warpgroup - 1;
  const int warp = tid_wg / 32, lane = tid_wg % 32;
  const int row0 = consumer * 64 + warp * 16 + lane / 4;  // this thread's rows in the tile: row0, row0 + 8
  const int col0 = 2 * (lane % 4);                        // and columns 8i + col0 + {0, 1}, i < 16
  Scheduler<kKind, BM, BN> sched(p);
  Tile t;
  int stage = 0;
  uint32_t phase = 0;
  float acc[64];
  float fin[64];
  while (sched.get_next(t)) {
#pragma unroll
    for (int i = 0; i < 64; ++i) fin[i] = 0.0f;
    const float* sb_row = nullptr;
    if constexpr (!kSbRow) {
      sb_row = p.sb + static_cast<int64_t>(t.group) * p.sb_ld_g +
               static_cast<int64_t>(t.n_block * BN / kBlockK) * p.sb_ld_n;
    }
    for (int kb = 0; kb < t.num_k_blocks; ++kb) {
      float sb = 0.0f;
      if constexpr (!kSbRow) sb = __ldg(sb_row + t.k_block_begin + kb);  // issued before the wait
      ptx::mbar_wait(ptx::smem_u32(full + stage), phase);
      const uint32_t a_base = ptx::smem_u32(smem_a + static_cast<size_t>(stage) * kABytes) + consumer * 64 * kBlockK;
      const uint32_t b_base = ptx::smem_u32(smem_b + static_cast<size_t>(stage) * kBBytes);
      ptx::fence_regs(acc);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk) {
        ptx::wgmma_m64n128k32_e4m3(acc, ptx::sw128_kmajor_desc(a_base + kk * kWgmmaK), ptx::sw128_kmajor_desc(b_base + kk * kWgmmaK),
                                   kk > 0 ? 1u : 0u);
      }
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
      ptx::fence_regs(acc);

      // promotion: fp32 accumulation across K blocks with both dequantization scales
      const float sa0 = smem_sa[stage * BM + row0], sa1 = smem_sa[stage * BM + row0 + 8];
      if constexpr (kSbRow) {
        const float* sbs = smem_sb + stage * BN;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const float2 b2 = *reinterpret_cast<const float2*>(sbs + 8 * i + col0);
          fin[4 * i + 0] = fmaf(acc[4 * i + 0], sa0 * b2.x, fin[4 * i + 0]);
          fin[4 * i + 1] = fmaf(acc[4 * i + 1], sa0 * b2.y, fin[4 * i + 1]);
          fin[4 * i + 2] = fmaf(acc[4 * i + 2], sa1 * b2.x, fin[4 * i + 2]);
          fin[4 * i + 3] = fmaf(acc[4 * i + 3], sa1 * b2.y, fin[4 * i + 3]);
        }
      } else {
        const float s0 = sa0 * sb, s1 = sa1 * sb;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          fin[4 * i + 0] = fmaf(acc[4 * i + 0], s0, fin[4 * i + 0]);
          fin[4 * i + 1] = fmaf(acc[4 * i + 1], s0, fin[4 * i + 1]);
          fin[4 * i + 2] = fmaf(acc[4 * i + 2], s1, fin[4 * i + 2]);
          fin[4 * i + 3] = fmaf(acc[4 * i + 3], s1, fin[4 * i + 3]);
        }
      }
      // NOTE: release the stage only after every lane's shared-memory reads (wgmma operands: done at
      // wait_group 0; the scales: consumed above); __syncwarp orders the lanes' reads before lane 0's
      // arrive, whose release semantics order them before the producer's next TMA write.
      __syncwarp();
      if (lane == 0) ptx::mbar_arrive(ptx::smem_u32(empty + stage));
      if (++stage == S) {
        stage = 0;
        phase ^= 1u;
      }
    }

    // epilogue: predicated stores from registers
    const int m_base = t.m_block * BM;
    int valid_rows = p.M;  // rows [0, valid_rows) of this problem exist
    int64_t out_row_base = 0;
    if constexpr (kKind == Kind::kMasked) {
      valid_rows = sched.masked_rows(t.group);
      out_row_base = static_cast<int64_t>(t.group) * p.M;
    } else if constexpr (kKind == Kind::kKGrouped) {
      out_row_base = static_cast<int64_t>(t.group) * p.M;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m_base + row0 + 8 * h;
      bool ok = r < valid_rows;
      if constexpr (kKind == Kind::kContiguous) ok = ok && __ldg(p.m_indices + r) == t.group;
      if (!ok) continue;
      const int64_t row_off = (out_row_base + r) * p.ld_out;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int c = t.n_block * BN + 8 * i + col0;
        if (c >= p.N) continue;  // N is even, so c < N implies c + 1 < N
        const float v0 = fin[4 * i + 2 * h], v1 = fin[4 * i + 2 * h + 1];
        if constexpr (out_is_f32(kKind)) {
          float2* dst = reinterpret_cast<float2*>(static_cast<float*>(p.out) + row_off + c);
          float2 v = make_float2(v0, v1);
          if (kKind == Kind::kKGrouped && p.accumulate) {
            const float2 o = *dst;
            v.x += o.x;
            v.y += o.y;
          }
          *dst = v;
        } else {
          *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + row_off + c) =
              __floats2bfloat162_rn(v0, v1);
        }
      }
    }
  }
#else
  // Built without sm_90a: the launcher refuses such a build (require_sm90a); trap if launched anyway.
  (void)p;
  DSMOE_TRAP_NOT_SM90A();
#endif
}

}  // namespace dsmoe::gemm
