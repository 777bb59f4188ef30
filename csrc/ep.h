// Launchers and CUDA IPC helpers of the intranode EP transport (include/dsmoe/ep/ep.cuh).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsmoe {
uintptr_t ep_alloc(int64_t bytes);  // cudaMalloc + zero; IPC-shareable (not from torch's caching allocator)
void ep_free(uintptr_t ptr);
std::string ep_ipc_get_handle(uintptr_t ptr);      // 64-byte cudaIpcMemHandle_t
uintptr_t ep_ipc_open_handle(const std::string& handle);
void ep_ipc_close(uintptr_t ptr);
int ep_max_ranks();
void launch_ep_copy_rows(uintptr_t src, uintptr_t dest_rank, uintptr_t dest_row, uintptr_t counts,
                         const std::vector<uintptr_t>& peer_data, const std::vector<uintptr_t>& peer_counts,
                         const std::vector<uintptr_t>& peer_flags, uintptr_t epoch, uintptr_t done_blocks, uintptr_t status, int64_t n,
                         int64_t src_row_bytes, int64_t row_bytes, int64_t dst_pitch, int64_t max_rows, int rank, int world,
                         int fanout, int signature, int num_sms, uintptr_t stream);
void launch_ep_wait(uintptr_t flags, uintptr_t epoch, uintptr_t error, int world, double timeout_s, uintptr_t stream);
}  // namespace dsmoe
