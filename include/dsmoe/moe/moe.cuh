// MoE routing and token permutation kernels. The specification is dsmoe.ref.moe (docs/moe.md).
#pragma once
#include "dsmoe/common/utils.cuh"

namespace dsmoe::moe {

constexpr int kWarp = 32;
constexpr int kLayoutChunkTokens = 256;  // tokens per block of the layout kernels

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// (value, index) order of the routing: larger value first, then the lower index.
__device__ __forceinline__ bool better(float v1, int i1, float v2, int i2) { return v1 > v2 || (v1 == v2 && i1 < i2); }

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

// ----------------------------------------------------------------------------------------- routing
struct RouteParams {
  const void* __restrict__ logits;  // [T, E] fp32/fp16/bf16, row (t) at logits + t * row_stride
  const float* __restrict__ bias;   // [E] or nullptr
  int* __restrict__ topk_idx;       // [T, top_k]
  float* __restrict__ topk_weights; // [T, top_k]
  int64_t T, row_stride;
  int E, top_k, n_group, topk_group;
  float routed_scaling_factor;
  bool norm_topk_prob, softmax;
};

// One warp per token; expert e = i * 32 + lane sits in register i of its lane (kPer = ceil(E / 32)).
// NOTE: every step is a warp-uniform loop; the per-token sums run left to right (the reference's order).
template <typename T, int kPer>
__global__ void __launch_bounds__(256) route_kernel(const __grid_constant__ RouteParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (t >= p.T) return;  // uniform per warp
  const T* row = static_cast<const T*>(p.logits) + t * p.row_stride;
  const float kNegInf = -__int_as_float(0x7f800000);
  float s[kPer], c[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = i * kWarp + lane;
    s[i] = e < p.E ? to_float<T>(row[e]) : kNegInf;
  }
  if (p.softmax) {
    float m = kNegInf;
#pragma unroll
    for (int i = 0; i < kPer; ++i) m = fmaxf(m, s[i]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      s[i] = (i * kWarp + lane < p.E) ? expf(s[i] - m) : 0.f;
      sum += s[i];
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
    for (int i = 0; i < kPer; ++i) s[i] = s[i] / sum;
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) s[i] = (i * kWarp + lane < p.E) ? 1.f / (1.f + expf(-s[i])) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = i * kWarp + lane;
    float v = e < p.E ? (p.bias != nullptr ? s[i] + p.bias[e] : s[i]) : kNegInf;
    c[i] = (v != v) ? kNegInf : v;  // NaN selects as -inf
  }

  if (p.topk_group < p.n_group) {
    const int G = p.E / p.n_group;
    float my_group = kNegInf;  // lane g holds the score of group g
    for (int g = 0; g < p.n_group; ++g) {
      float a = kNegInf, b = kNegInf;  // top-2 of this lane's experts in group g
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = i * kWarp + lane;
        if (e < p.E && e / G == g) {
          if (c[i] > a) { b = a; a = c[i]; } else if (c[i] > b) { b = c[i]; }
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const float oa = __shfl_xor_sync(0xffffffffu, a, off), ob = __shfl_xor_sync(0xffffffffu, b, off);
        const float hi = fmaxf(a, oa), lo = fmaxf(fminf(a, oa), fmaxf(b, ob));
        a = hi; b = lo;
      }
      // DeepSeek's reference gate: top-2 sum with a correction bias (V3), the group max without (V2).
      float score = (G >= 2 && p.bias != nullptr) ? a + b : a;
      score = (score != score) ? kNegInf : score;  // inf + -inf ranks as -inf (the reference does the same)
      if (lane == g) my_group = score;
    }
    uint32_t keep = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      const bool cand = lane < p.n_group && !((keep >> lane) & 1u);
      float v = cand ? my_group : kNegInf;
      int i = cand ? lane : 0x7fffffff;
      warp_argmax(v, i);
      keep |= 1u << i;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = i * kWarp + lane;
      if (e < p.E && !((keep >> (e / G)) & 1u)) c[i] = kNegInf;
    }
  }

  uint32_t taken = 0;
  int my_idx = -1;
  float my_w = 0.f;
  for (int j = 0; j < p.top_k; ++j) {
    float bv = kNegInf;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = i * kWarp + lane;
      if (e < p.E && !((taken >> i) & 1u) && better(c[i], e, bv, bi)) { bv = c[i]; bi = e; }
    }
    warp_argmax(bv, bi);
    const int owner = bi % kWarp, reg = bi / kWarp;
    float sv = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) if (i == reg) sv = s[i];
    sv = __shfl_sync(0xffffffffu, sv, owner);
    if (lane == owner) taken |= 1u << reg;
    if (lane == j) { my_idx = bi; my_w = sv; }
  }
  if (p.norm_topk_prob) {
    float denom = 0.f;
    for (int j = 0; j < p.top_k; ++j) {
      const float v = __shfl_sync(0xffffffffu, my_w, j);
      denom = j == 0 ? v : __fadd_rn(denom, v);
    }
    my_w = __fdiv_rn(my_w, __fadd_rn(denom, 1e-20f));
  }
  my_w = __fmul_rn(my_w, p.routed_scaling_factor);
  if (lane < p.top_k) {
    p.topk_idx[t * p.top_k + lane] = my_idx;
    p.topk_weights[t * p.top_k + lane] = my_w;
  }
}

// ------------------------------------------------------------------------------ permutation layout
struct LayoutParams {
  const void* __restrict__ topk_idx;  // [T, k] int32 or int64 (idx64)
  int* __restrict__ m_indices;        // [num_rows]
  int* __restrict__ tokens_per_expert;// [E]
  int* __restrict__ row_map;          // [T, k]
  int* __restrict__ chunk_counts;     // workspace [num_chunks, E]: counts, then row offsets
  int* __restrict__ seg_start;        // workspace [E + 1]: padded segment starts, [E] = rows used
  int64_t T, num_rows;
  int k, E, alignment, num_chunks;
  bool idx64;
};

__device__ __forceinline__ int load_expert(const LayoutParams& p, int64_t i) {
  const int64_t v = p.idx64 ? static_cast<const int64_t*>(p.topk_idx)[i] : static_cast<const int*>(p.topk_idx)[i];
  // NOTE: out-of-range ids are skipped like -1 (the Python layer rejects them before launch when eager).
  return (v >= 0 && v < p.E) ? static_cast<int>(v) : -1;
}

// Phase 1: per-chunk expert histogram (shared-memory atomics; counts do not depend on their order).
__global__ void __launch_bounds__(256) layout_count_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kLayoutChunkTokens * p.k;
  const int64_t end = min(begin + static_cast<int64_t>(kLayoutChunkTokens) * p.k, p.T * p.k);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int e = load_expert(p, i);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) p.chunk_counts[static_cast<int64_t>(blockIdx.x) * p.E + e] = hist[e];
}

// Phase 2 (one block): totals, padded segment starts (serial scan: E is small), per-chunk row offsets.
__global__ void __launch_bounds__(1024) layout_scan_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int padded[];
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
    int total = 0;
    for (int c = 0; c < p.num_chunks; ++c) total += p.chunk_counts[static_cast<int64_t>(c) * p.E + e];
    p.tokens_per_expert[e] = total;
    padded[e] = (total + p.alignment - 1) / p.alignment * p.alignment;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int e = 0; e < p.E; ++e) { const int v = padded[e]; padded[e] = run; p.seg_start[e] = run; run += v; }
    p.seg_start[p.E] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
    int run = padded[e];
    for (int c = 0; c < p.num_chunks; ++c) {
      int* cc = p.chunk_counts + static_cast<int64_t>(c) * p.E + e;
      const int v = *cc;
      *cc = run;
      run += v;
    }
  }
}

// Phase 3: warp 0 walks its chunk in (token, slot) order and hands out rows; __match_any_sync ranks
// equal experts inside each group of 32 pairs, so the order within an expert is the input order.
// Blocks past num_chunks fill m_indices.
__global__ void __launch_bounds__(256) layout_assign_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int next_row[];
  if (blockIdx.x < p.num_chunks) {
    for (int e = threadIdx.x; e < p.E; e += blockDim.x) next_row[e] = p.chunk_counts[static_cast<int64_t>(blockIdx.x) * p.E + e];
    __syncthreads();
    if (threadIdx.x >= kWarp) return;
    const int lane = threadIdx.x;
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * kLayoutChunkTokens * p.k;
    const int64_t end = min(begin + static_cast<int64_t>(kLayoutChunkTokens) * p.k, p.T * p.k);
    for (int64_t base = begin; base < end; base += kWarp) {
      const int64_t i = base + lane;
      const int e = i < end ? load_expert(p, i) : -1;
      const uint32_t peers = __match_any_sync(0xffffffffu, e);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      const int row = e >= 0 ? next_row[e] + rank : -1;
      __syncwarp();
      if (e >= 0 && rank == __popc(peers) - 1) next_row[e] += __popc(peers);
      __syncwarp();
      if (i < end) p.row_map[i] = (row >= 0 && row < p.num_rows) ? row : -1;
    }
    return;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.x - p.num_chunks) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x - p.num_chunks) * blockDim.x;
  const int used = p.seg_start[p.E];
  for (int64_t r = r0; r < p.num_rows; r += stride) {
    int m = -1;
    if (r < used) {
      int lo = 0, hi = p.E;  // last e with seg_start[e] <= r
      while (hi - lo > 1) { const int mid = (lo + hi) / 2; if (p.seg_start[mid] <= r) lo = mid; else hi = mid; }
      if (r - p.seg_start[lo] < p.tokens_per_expert[lo]) m = lo;
    }
    p.m_indices[r] = m;
  }
}

// ---------------------------------------------------------------------------- scatter / gather rows
struct ScatterParams {
  const void* __restrict__ x;        // [T, H], row t at x + t * x_row_stride
  const int* __restrict__ row_map;   // [T, k]
  const float* __restrict__ weights; // [T, k] or nullptr
  const int* __restrict__ m_indices; // [num_rows] or nullptr (then the caller zeroed `out`)
  void* __restrict__ out;            // [num_rows, H] contiguous
  int64_t T, H, x_row_stride, num_rows;
  int k;
  bool vec;                          // 16-byte vectors are legal (alignment checked on the host)
};

constexpr int kZeroRowsPerBlock = 8;

// Blocks [0, T): token t is read once and written to its k rows. Blocks [T, ...): zero padding rows.
template <typename T>
__global__ void __launch_bounds__(256) scatter_rows_kernel(const __grid_constant__ ScatterParams p) {
  constexpr int kPer = 16 / sizeof(T);
  T* out = static_cast<T*>(p.out);
  if (blockIdx.x < p.T) {
    const int64_t t = blockIdx.x;
    const T* src = static_cast<const T*>(p.x) + t * p.x_row_stride;
    const int64_t nvec = p.vec ? p.H / kPer : 0;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + v);
      for (int j = 0; j < p.k; ++j) {
        const int r = p.row_map[t * p.k + j];
        if (r < 0) continue;
        uint4 o = raw;
        if (p.weights != nullptr) {
          const float w = p.weights[t * p.k + j];
          const T* e = reinterpret_cast<const T*>(&raw);
          T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
          for (int q = 0; q < kPer; ++q) oe[q] = from_float<T>(__fmul_rn(to_float<T>(e[q]), w));
        }
        reinterpret_cast<uint4*>(out + r * p.H)[v] = o;
      }
    }
    for (int64_t h = nvec * kPer + threadIdx.x; h < p.H; h += blockDim.x) {
      const T val = src[h];
      for (int j = 0; j < p.k; ++j) {
        const int r = p.row_map[t * p.k + j];
        if (r < 0) continue;
        out[r * p.H + h] = p.weights != nullptr ? from_float<T>(__fmul_rn(to_float<T>(val), p.weights[t * p.k + j])) : val;
      }
    }
    return;
  }
  if (p.m_indices == nullptr) return;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) - p.T) * kZeroRowsPerBlock;
  for (int64_t r = r0; r < min(r0 + kZeroRowsPerBlock, p.num_rows); ++r) {
    if (p.m_indices[r] >= 0) continue;
    for (int64_t h = threadIdx.x; h < p.H; h += blockDim.x) out[r * p.H + h] = from_float<T>(0.f);
  }
}

struct ScatterFP8Params {
  const void* __restrict__ x;        // [T, H], H % 128 == 0
  const int* __restrict__ row_map;   // [T, k]
  const int* __restrict__ m_indices; // [num_rows]
  uint8_t* __restrict__ q;           // [num_rows, H] e4m3
  float* __restrict__ scales;        // [num_rows, H / 128]
  int64_t T, H, x_row_stride, num_rows;
  int k;
};

// Fused permute + 1x128 quantization: a token is quantized once (its copies are identical) and the
// bytes + scales are stored to each of its rows. 16 threads x 8 elements per 128-group.
template <typename T>
__global__ void __launch_bounds__(256) scatter_rows_fp8_kernel(const __grid_constant__ ScatterFP8Params p) {
  const int64_t G = p.H / 128;
  if (blockIdx.x < p.T) {
    const int64_t t = blockIdx.x;
    const T* src = static_cast<const T*>(p.x) + t * p.x_row_stride;
    const int sub = threadIdx.x & 15;
    // NOTE: the loop bound is uniform over each 16-lane group, so the shuffles see all their lanes.
    for (int64_t g0 = 0; g0 < G; g0 += blockDim.x / 16) {
      const int64_t g = g0 + threadIdx.x / 16;
      const bool active = g < G;
      float v[8];
      if (active) load_vec<T, 8>(src + g * 128 + sub * 8, v);
      else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = nan_max(amax, fabsf(v[i]));
      amax = group_reduce_max<16>(amax);
      amax = (amax < kAmaxFloor) ? kAmaxFloor : amax;
      const float s = amax / kFP8Max;
      if (!active) continue;
      uint2 w;
      w.x = uint32_t(pack_fp8x2(v[0] / s, v[1] / s)) | (uint32_t(pack_fp8x2(v[2] / s, v[3] / s)) << 16);
      w.y = uint32_t(pack_fp8x2(v[4] / s, v[5] / s)) | (uint32_t(pack_fp8x2(v[6] / s, v[7] / s)) << 16);
      for (int j = 0; j < p.k; ++j) {
        const int r = p.row_map[t * p.k + j];
        if (r < 0) continue;
        reinterpret_cast<uint2*>(p.q + r * p.H + g * 128)[sub] = w;
        if (sub == 0) p.scales[r * G + g] = s;
      }
    }
    return;
  }
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) - p.T) * kZeroRowsPerBlock;
  for (int64_t r = r0; r < min(r0 + kZeroRowsPerBlock, p.num_rows); ++r) {
    if (p.m_indices[r] >= 0) continue;
    for (int64_t h = threadIdx.x; h < p.H / 16; h += blockDim.x) reinterpret_cast<uint4*>(p.q + r * p.H)[h] = make_uint4(0, 0, 0, 0);
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) p.scales[r * G + g] = kAmaxFloor / kFP8Max;
  }
}

struct UnpermuteParams {
  const void* __restrict__ y;        // [num_rows_y, H], row r at y + r * y_row_stride
  const int* __restrict__ row_map;   // [T, k]
  const float* __restrict__ weights; // [T, k] or nullptr (sum unweighted)
  void* __restrict__ out;            // [T, H] contiguous
  int64_t T, H, y_row_stride;
  int k;
  bool vec;                          // 8-element vectors (16-byte aligned loads) are legal
};

// One block per token: out[t] = sum_j w_j * y[row_map[t, j]], fp32, slots in order, no FMA contraction
// (the reference rounds the product before the sum).
template <typename T>
__global__ void __launch_bounds__(256) unpermute_kernel(const __grid_constant__ UnpermuteParams p) {
  const int64_t t = blockIdx.x;
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out) + t * p.H;
  const int64_t nvec = p.vec ? p.H / 8 : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int j = 0; j < p.k; ++j) {
      const int r = p.row_map[t * p.k + j];
      if (r < 0) continue;
      float val[8];
      load_vec<T, 8>(y + r * p.y_row_stride + v * 8, val);
      const float w = p.weights != nullptr ? p.weights[t * p.k + j] : 1.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], p.weights != nullptr ? __fmul_rn(val[i], w) : val[i]);
    }
    alignas(16) T o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = from_float<T>(acc[i]);
    if constexpr (sizeof(T) == 2) {
      reinterpret_cast<uint4*>(out)[v] = *reinterpret_cast<const uint4*>(o);
    } else {
      reinterpret_cast<uint4*>(out)[2 * v] = reinterpret_cast<const uint4*>(o)[0];
      reinterpret_cast<uint4*>(out)[2 * v + 1] = reinterpret_cast<const uint4*>(o)[1];
    }
  }
  for (int64_t h = nvec * 8 + threadIdx.x; h < p.H; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < p.k; ++j) {
      const int r = p.row_map[t * p.k + j];
      if (r < 0) continue;
      const float val = to_float<T>(y[r * p.y_row_stride + h]);
      acc = __fadd_rn(acc, p.weights != nullptr ? __fmul_rn(val, p.weights[t * p.k + j]) : val);
    }
    out[h] = from_float<T>(acc);
  }
}

}  // namespace dsmoe::moe
