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

// True when the comma-separated CMake arch list `list` (as DSMOE_CUDA_ARCHS is passed in, e.g.
// "90a,100a" or "90a-real") names `arch` exactly (the suffix after '-' is ignored).
constexpr bool archs_have(const char* list, const char* arch) {
  while (*list) {
    const char* a = arch;
    const char* p = list;
    while (*a && *p == *a) ++p, ++a;
    if (*a == 0 && (*p == 0 || *p == ',' || *p == '-')) return true;
    while (*list && *list != ',') ++list;
    if (*list == ',') ++list;
  }
  return false;
}
// NOTE: compile-time tests of the check that refuses a build without sm_90a code (a "90" build gives
// the GEMM and MLA decode kernels empty bodies that trap).
static_assert(archs_have("90a", "90a") && archs_have("80,90a-real", "90a") && archs_have("90a,100a", "90a"),
              "archs_have must find 90a");
static_assert(!archs_have("90", "90a") && !archs_have("", "90a") && !archs_have("90a0", "90a") &&
                  !archs_have("100a", "90a") && !archs_have("native", "90a") && !archs_have("9", "90a"),
              "archs_have must not match a prefix or another arch");

// Whether this build compiled the sm_90a code paths of the GEMM and MLA decode kernels.
constexpr bool kBuiltSm90a = archs_have(DSMOE_CUDA_ARCHS, "90a");

}  // namespace dsmoe

#if DSMOE_WITH_CUDA
#include <cuda_runtime.h>
namespace dsmoe {
// Raises a Python RuntimeError (via std::runtime_error) that names the kernel.
// What a driver too old for this build's statically linked runtime needs (empty when err is another one).
std::string insufficient_driver_hint(cudaError_t err);
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream os;
    os << "dsmoe: CUDA error in " << what << ": " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")"
       << insufficient_driver_hint(err);
    throw std::runtime_error(os.str());
  }
}
// After a launch: configuration errors are reported synchronously by cudaGetLastError.
// Set DSMOE_SYNC_CHECK=1 to also synchronize and surface asynchronous faults at the kernel that caused them.
void check_launch(const char* kernel_name, cudaStream_t stream);
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
int num_sms(int device = -1);
// Throws a RuntimeError naming `op` unless the current device can run the sm_90a kernels: this build
// compiled 90a (kBuiltSm90a) and the device is sm_90. Cached per device; call before any launch.
void require_sm90a(const char* op);
}  // namespace dsmoe
#define DSMOE_CUDA_CHECK(expr) ::dsmoe::check_cuda((expr), #expr)
#endif
