// Host side of the intranode EP transport: CUDA IPC helpers and the two launchers.
#include <algorithm>
#include <cstring>
#include "common.h"
#include "ep.h"
#include "dsmoe/ep/ep.cuh"

namespace dsmoe {
namespace {
constexpr const char* kOp = "EPBuffer";
}

uintptr_t ep_alloc(int64_t bytes) {
  DSMOE_CHECK_ARG(bytes > 0, kOp, "bytes", "must be positive, got ", bytes);
  void* p = nullptr;
  DSMOE_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(bytes)));
  DSMOE_CUDA_CHECK(cudaMemset(p, 0, static_cast<size_t>(bytes)));
  // NOTE: peers write into this buffer as soon as they have its IPC handle; the zeroing (flags, epochs)
  // must be complete before the handle leaves this process.
  DSMOE_CUDA_CHECK(cudaDeviceSynchronize());
  return reinterpret_cast<uintptr_t>(p);
}

void ep_free(uintptr_t ptr) { if (ptr) DSMOE_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr))); }

std::string ep_ipc_get_handle(uintptr_t ptr) {
  cudaIpcMemHandle_t h;
  DSMOE_CUDA_CHECK(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(ptr)));
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

uintptr_t ep_ipc_open_handle(const std::string& handle) {
  DSMOE_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t), kOp, "handle", "must be ", sizeof(cudaIpcMemHandle_t),
                  " bytes, got ", handle.size());
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* p = nullptr;
  DSMOE_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<uintptr_t>(p);
}

void ep_ipc_close(uintptr_t ptr) { if (ptr) DSMOE_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr))); }

int ep_max_ranks() { return ep::kMaxRanks; }

void launch_ep_copy_rows(uintptr_t src, uintptr_t dest_rank, uintptr_t dest_row, uintptr_t counts,
                         const std::vector<uintptr_t>& peer_data, const std::vector<uintptr_t>& peer_counts,
                         const std::vector<uintptr_t>& peer_flags, uintptr_t epoch, uintptr_t done_blocks, uintptr_t status, int64_t n,
                         int64_t src_row_bytes, int64_t row_bytes, int64_t dst_pitch, int64_t max_rows, int rank, int world,
                         int fanout, int signature, int num_sms, uintptr_t stream) {
  DSMOE_CHECK_ARG(world >= 1 && world <= ep::kMaxRanks, kOp, "group", "world size must be in [1, ", ep::kMaxRanks,
                  "] for the nvlink backend, got ", world);
  DSMOE_CHECK_ARG(rank >= 0 && rank < world, kOp, "rank", "must be in [0, ", world, "), got ", rank);
  DSMOE_CHECK_ARG(static_cast<int>(peer_data.size()) == world && static_cast<int>(peer_counts.size()) == world &&
                      static_cast<int>(peer_flags.size()) == world,
                  kOp, "peers", "need one pointer per rank (", world, ")");
  DSMOE_CHECK_ARG(row_bytes > 0 && row_bytes % 16 == 0 && src_row_bytes % 16 == 0 && is_aligned(src, 16), kOp, "x",
                  "rows must be 16-byte multiples and aligned, got row_bytes=", row_bytes, " src_row_bytes=", src_row_bytes);
  DSMOE_CHECK_ARG(src_row_bytes >= row_bytes, kOp, "x", "source rows (", src_row_bytes, " bytes) are shorter than the ",
                  row_bytes, " bytes copied per row");
  DSMOE_CHECK_ARG(dst_pitch >= row_bytes && dst_pitch % 16 == 0, kOp, "dst_pitch",
                  "must be a multiple of 16 and >= row_bytes=", row_bytes, ", got ", dst_pitch);
  DSMOE_CHECK_ARG(n >= 0 && max_rows >= 0, kOp, "n", "negative sizes n=", n, " max_rows=", max_rows);
  DSMOE_CHECK_ARG(fanout >= 1, kOp, "fanout", "must be >= 1, got ", fanout);
  DSMOE_CHECK_ARG(num_sms >= 1, kOp, "num_sms", "must be >= 1, got ", num_sms);
  ep::CopyParams p{};
  p.src = reinterpret_cast<const uint8_t*>(src);
  p.dest_rank = reinterpret_cast<const int*>(dest_rank);
  p.dest_row = reinterpret_cast<const int*>(dest_row);
  p.counts = reinterpret_cast<const int*>(counts);
  for (int d = 0; d < world; ++d) {
    DSMOE_CHECK_ARG(is_aligned(peer_data[d], 16), kOp, "peers", "peer buffer ", d, " is not 16-byte aligned");
    p.peer_data[d] = reinterpret_cast<uint8_t*>(peer_data[d]);
    p.peer_counts[d] = reinterpret_cast<int*>(peer_counts[d]);
    p.peer_flags[d] = reinterpret_cast<unsigned long long*>(peer_flags[d]);
  }
  p.epoch = reinterpret_cast<const unsigned long long*>(epoch);
  p.done_blocks = reinterpret_cast<unsigned int*>(done_blocks);
  DSMOE_CHECK_ARG(status != 0, kOp, "status", "the status word pointer must be set");
  p.status = reinterpret_cast<const int*>(status);
  p.n = n; p.src_row_bytes = src_row_bytes; p.row_bytes = row_bytes; p.dst_pitch = dst_pitch; p.max_rows = max_rows;
  p.rank = rank; p.world = world; p.fanout = fanout; p.signature = signature;
  // NOTE: the grid is the SM budget (at least one block so the signal is always sent, even for n = 0).
  const int64_t want = (n + 7) / 8;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_sms, want)));
  cudaStream_t s = as_stream(stream);
  ep::copy_rows_to_peers_kernel<<<blocks, 256, 0, s>>>(p);
  check_launch("dsmoe::ep::copy_rows_to_peers_kernel", s);
}

void launch_ep_wait(uintptr_t flags, uintptr_t epoch, uintptr_t error, int world, double timeout_s, uintptr_t stream) {
  DSMOE_CHECK_ARG(world >= 1 && world <= 32, kOp, "group", "world size must be in [1, 32], got ", world);
  DSMOE_CHECK_ARG(timeout_s > 0, kOp, "timeout", "must be positive, got ", timeout_s);
  DSMOE_CHECK_ARG(timeout_s < 1e9, kOp, "timeout", "must be < 1e9 seconds, got ", timeout_s);
  ep::WaitParams p{reinterpret_cast<const unsigned long long*>(flags), reinterpret_cast<unsigned long long*>(epoch),
                   reinterpret_cast<int*>(error), static_cast<unsigned long long>(timeout_s * 1e9), world};
  cudaStream_t s = as_stream(stream);
  ep::wait_peers_kernel<<<1, 32, 0, s>>>(p);
  check_launch("dsmoe::ep::wait_peers_kernel", s);
}
}  // namespace dsmoe
