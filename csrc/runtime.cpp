// Build information and small runtime queries; compiled with or without CUDA.
#include "common.h"
#include <atomic>
#include <cstdlib>
#include <pybind11/pybind11.h>

namespace py = pybind11;

#if DSMOE_WITH_CUDA
namespace dsmoe {
void check_launch(const char* kernel_name, cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, kernel_name);
  static const bool sync = [] {
    const char* v = std::getenv("DSMOE_SYNC_CHECK");
    return v && v[0] == '1';
  }();
  if (sync) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &status);
    if (status == cudaStreamCaptureStatusNone) check_cuda(cudaStreamSynchronize(stream), kernel_name);
  }
}
int num_sms(int device) {
  if (device < 0) DSMOE_CUDA_CHECK(cudaGetDevice(&device));
  int n = 0;
  DSMOE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

std::string insufficient_driver_hint(cudaError_t err) {
  if (err != cudaErrorInsufficientDriver) return {};
  int drv = 0;
  cudaDriverGetVersion(&drv);
  std::ostringstream os;
  os << "; dsmoe._C links the CUDA " << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10
     << " runtime statically and needs a driver that supports CUDA " << CUDART_VERSION / 1000 << ".0 or later; ";
  if (drv <= 0) os << "no CUDA driver was found";
  else os << "the installed one supports " << drv / 1000 << "." << (drv % 1000) / 10;
  os << " (`python -m dsmoe info` names the driver branch)";
  return os.str();
}

void require_sm90a(const char* op) {
  if (!kBuiltSm90a) {
    throw std::runtime_error(std::string("dsmoe.") + op + ": this dsmoe._C was compiled for CUDA archs '" + DSMOE_CUDA_ARCHS +
                             "' without 90a: the FP8 GEMM and MLA decode kernels need sm_90a (wgmma, setmaxnreg) and "
                             "this build holds only traps in their place; rebuild with DSMOE_CUDA_ARCHS=90a");
  }
  // NOTE: the compute capability of a device never changes: 1 = sm_90, 2 = another one (per device id).
  static std::atomic<int8_t> state[64] = {};
  int dev = 0;
  DSMOE_CUDA_CHECK(cudaGetDevice(&dev));
  const int8_t known = dev < 64 ? state[dev].load(std::memory_order_relaxed) : 0;
  if (known == 1) return;
  int major = 0, minor = 0;
  DSMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  DSMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool ok = major == 9 && minor == 0;
  if (dev < 64) state[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  if (!ok) {
    throw std::runtime_error(std::string("dsmoe.") + op + ": the kernel needs an sm_90 (Hopper) GPU, device " +
                             std::to_string(dev) + " is sm_" + std::to_string(major) + std::to_string(minor));
  }
}
}  // namespace dsmoe
#endif

namespace dsmoe {
void register_runtime(py::module_& m) {
  py::dict info;
  info["cuda_compiled"] = bool(DSMOE_WITH_CUDA);
  info["cuda_archs"] = std::string(DSMOE_CUDA_ARCHS);
  info["cuda_version"] = std::string(DSMOE_CUDA_VERSION);
  // sm_90a code compiled (the GEMM and MLA decode kernels refuse to launch without it).
  info["sm90a"] = bool(DSMOE_WITH_CUDA) && kBuiltSm90a;
#if DSMOE_WITH_CUDA
  info["cudart_version"] = int(CUDART_VERSION);  // the statically linked runtime (1000 * major + 10 * minor)
#else
  info["cudart_version"] = 0;
#endif
  info["compiler"] = std::string(
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
  m.attr("build_info") = info;
  // Number of visible CUDA devices according to the driver; 0 (never an exception) when there is no
  // driver or no device, so `dsmoe info` works everywhere.
  m.def("cuda_device_count", []() {
#if DSMOE_WITH_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
#else
    return 0;
#endif
  });
  // CUDA version the installed driver supports (cudaDriverGetVersion), 0 without a driver; never raises.
  m.def("cuda_driver_version", []() {
#if DSMOE_WITH_CUDA
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return v;
#else
    return 0;
#endif
  });
  m.def("num_sms", [](int device) {
#if DSMOE_WITH_CUDA
    return num_sms(device);
#else
    (void)device;
    throw std::runtime_error("dsmoe._C was built without CUDA");
    return 0;
#endif
  }, py::arg("device") = -1);
}
}  // namespace dsmoe
