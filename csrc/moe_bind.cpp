#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace dsmoe {
void register_moe(py::module_& m) { (void)m; }
}  // namespace dsmoe
