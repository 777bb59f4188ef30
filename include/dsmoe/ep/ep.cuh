// Intranode expert-parallel transport over CUDA IPC: copy rows straight into peer ranks' buffers, then
// publish per-source counts and an epoch flag in the peers' memory; receivers spin on the flags.
// The Python side (dsmoe.parallel.nvlink) builds the row lists, so one kernel serves dispatch and combine.
#pragma once
#include <cstdint>

namespace dsmoe::ep {

constexpr int kMaxRanks = 8;  // one NVLink domain (8 GPUs per node)

struct CopyParams {
  const uint8_t* __restrict__ src;     // [n, src_row_bytes] local rows
  const int* __restrict__ dest_rank;   // [n] destination rank of row i (-1: skip)
  const int* __restrict__ dest_row;    // [n] row index inside the destination's region for this rank
  const int* __restrict__ counts;      // [W] rows this rank sends to each destination (published to peers)
  uint8_t* peer_data[kMaxRanks];       // each peer's data region: [W sources][max_rows][dst_pitch bytes]
  int* peer_counts[kMaxRanks];         // each peer's counts [2W]: slot 2*rank our count, 2*rank+1 our signature
  unsigned long long* peer_flags[kMaxRanks];  // each peer's flags [W] (slot `rank` is ours)
  const unsigned long long* epoch;     // local epoch counter (advanced by the wait kernel)
  unsigned int* done_blocks;           // local counter of finished blocks (reset by the last one)
  const int* status;                   // local error word: nonzero (timed out, closed) -> copy and signal nothing
  int64_t n, src_row_bytes, row_bytes, dst_pitch, max_rows;  // row_bytes copied per row (<= dst_pitch)
  int rank, world;
  int fanout;                          // entry i copies local row i / fanout (dispatch: W entries per token)
  int signature;                       // this call's row layout (dtype, top_k, form): receivers compare it
};

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Nanoseconds of the GPU's global timer: a wall-clock budget that does not depend on the SM clock.
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One warp per row, 16-byte vectors; the grid is capped by the SM budget (persistent blocks).
// NOTE: the last block to finish fences at system scope, then writes counts and the flag into every
// peer, so a receiver that sees the flag sees all rows and counts.
// NOTE: a set status word (an earlier timeout, or close()) turns the kernel into a no-op: no peer write and
// no signal, so peers time out instead of consuming rows of a protocol that has already lost its epochs,
// and a CUDA graph replayed after close() never writes into a peer.
__global__ void __launch_bounds__(256) copy_rows_to_peers_kernel(const __grid_constant__ CopyParams p) {
  if (*p.status != 0) return;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; i < p.n; i += warps) {
    const int d = p.dest_rank[i];
    if (d < 0 || d >= p.world) continue;
    const int64_t r = p.dest_row[i];
    if (r < 0 || r >= p.max_rows) continue;
    const uint4* s = reinterpret_cast<const uint4*>(p.src + (i / p.fanout) * p.src_row_bytes);
    uint4* o = reinterpret_cast<uint4*>(p.peer_data[d] + (static_cast<int64_t>(p.rank) * p.max_rows + r) * p.dst_pitch);
    for (int64_t v = lane; v < p.row_bytes / 16; v += 32) o[v] = s[v];
  }
  // NOTE: every thread fences its own peer writes before the block reports completion.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int done = atomicAdd(p.done_blocks, 1u);
    if (done == gridDim.x - 1) {
      const unsigned long long next = *p.epoch + 1ull;
      for (int d = 0; d < p.world; ++d) {
        p.peer_counts[d][2 * p.rank] = p.counts[d];
        p.peer_counts[d][2 * p.rank + 1] = p.signature;
      }
      __threadfence_system();
      for (int d = 0; d < p.world; ++d) st_release_sys(p.peer_flags[d] + p.rank, next);
      *p.done_blocks = 0u;
    }
  }
}

struct WaitParams {
  const unsigned long long* flags;  // [W] local flags written by the peers
  unsigned long long* epoch;        // local epoch counter
  int* error;                       // set to 1 + source rank on timeout
  unsigned long long timeout_ns;
  int world;
};

// One block: thread s waits for source s; bounded by a wall-clock budget (%globaltimer) so a dead peer
// sets an error instead of hanging the stream. NOTE: after a timeout the epochs of the ranks disagree; the
// buffer is unusable (the error word stays set) and must be rebuilt. A word already set (a timeout, or
// close()) returns at once: the Python side poisons or raises, it never waits a second budget.
__global__ void __launch_bounds__(32) wait_peers_kernel(const __grid_constant__ WaitParams p) {
  const unsigned long long want = *p.epoch + 1ull;
  const int s = threadIdx.x;
  const bool failed = *reinterpret_cast<volatile int*>(p.error) != 0;
  if (s < p.world && !failed) {
    const unsigned long long t0 = global_timer_ns();
    while (ld_acquire_sys(p.flags + s) < want) {
      if (global_timer_ns() - t0 > p.timeout_ns) { atomicCAS(p.error, 0, 1 + s); break; }
      __nanosleep(64);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) *p.epoch = want;
}

}  // namespace dsmoe::ep
