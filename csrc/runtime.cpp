// Build information and small runtime queries; compiled with or without CUDA.
#include "common.h"
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
}  // namespace dsmoe
#endif

namespace dsmoe {
void register_runtime(py::module_& m) {
  py::dict info;
  info["cuda_compiled"] = bool(DSMOE_WITH_CUDA);
  info["cuda_archs"] = std::string(DSMOE_CUDA_ARCHS);
  info["cuda_version"] = std::string(DSMOE_CUDA_VERSION);
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
