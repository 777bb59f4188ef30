// Host-side helpers shared by every launcher: argument checks and CUDA error reporting.
// NOTE: no torch headers here or anywhere in csrc/: launchers take raw device pointers (as integers
// from Python), sizes, strides and a cudaStream_t handle.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsmoe {

// Thrown for bad arguments; pybind11 maps std::invalid_argument to Python's ValueError.
template <typename... Args>
[[noreturn]] inline void fail_arg(const char* op, const char* arg, Args&&... parts) {
  std::ostringstream os;
  os << "dsmoe." << op << ": argument '" << arg << "': ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

#define DSMOE_CHECK_ARG(cond, op, arg, ...)          \
  do {                                               \
    if (!(cond)) ::dsmoe::fail_arg(op, arg, __VA_ARGS__); \
  } while (0)

inline bool is_aligned(uintptr_t p, uintptr_t bytes) { return (p % bytes) == 0; }

}  // namespace dsmoe

#if DSMOE_WITH_CUDA
#include <cuda_runtime.h>
namespace dsmoe {
// Raises a Python RuntimeError (via std::runtime_error) that names the kernel.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream os;
    os << "dsmoe: CUDA error in " << what << ": " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")";
    throw std::runtime_error(os.str());
  }
}
// After a launch: configuration errors are reported synchronously by cudaGetLastError.
// Set DSMOE_SYNC_CHECK=1 to also synchronize and surface asynchronous faults at the kernel that caused them.
void check_launch(const char* kernel_name, cudaStream_t stream);
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
int num_sms(int device = -1);
}  // namespace dsmoe
#define DSMOE_CUDA_CHECK(expr) ::dsmoe::check_cuda((expr), #expr)
#endif
