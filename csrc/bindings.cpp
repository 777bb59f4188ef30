// The Python module dsmoe._C. One registration function per kernel family, each defined in
// csrc/<family>_bind.cpp beside the family's launchers (csrc/<family>.cu).
#include <pybind11/pybind11.h>
#include "common.h"

namespace py = pybind11;
namespace dsmoe {
void register_runtime(py::module_& m);
#if DSMOE_WITH_CUDA
void register_quant(py::module_& m);
void register_gemm(py::module_& m);
void register_mla(py::module_& m);
void register_moe(py::module_& m);
void register_ep(py::module_& m);
#endif
}  // namespace dsmoe

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsmoe native kernels (no libtorch; pointers, sizes, strides and a CUDA stream)";
  dsmoe::register_runtime(m);
#if DSMOE_WITH_CUDA
  dsmoe::register_quant(m);
  dsmoe::register_gemm(m);
  dsmoe::register_mla(m);
  dsmoe::register_moe(m);
  dsmoe::register_ep(m);
#endif
}
