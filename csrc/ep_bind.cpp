// Python bindings of the intranode EP transport (csrc/ep.cu). See dsmoe.parallel.nvlink.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "ep.h"

namespace py = pybind11;
namespace dsmoe {
void register_ep(py::module_& m) {
  m.def("ep_alloc", &ep_alloc, "cudaMalloc'd, zeroed, IPC-shareable buffer", py::arg("bytes"));
  m.def("ep_free", &ep_free, py::arg("ptr"));
  m.def("ep_ipc_get_handle", [](uintptr_t p) { return py::bytes(ep_ipc_get_handle(p)); }, py::arg("ptr"));
  m.def("ep_ipc_open_handle", [](py::bytes h) { return ep_ipc_open_handle(std::string(h)); }, py::arg("handle"));
  m.def("ep_ipc_close", &ep_ipc_close, py::arg("ptr"));
  m.def("ep_max_ranks", &ep_max_ranks);
  m.def("ep_copy_rows", &launch_ep_copy_rows, "rows to peer buffers + counts/flag signal", py::arg("src"),
        py::arg("dest_rank"), py::arg("dest_row"), py::arg("counts"), py::arg("peer_data"), py::arg("peer_counts"),
        py::arg("peer_flags"), py::arg("epoch"), py::arg("done_blocks"), py::arg("status"), py::arg("n"), py::arg("src_row_bytes"),
        py::arg("row_bytes"), py::arg("dst_pitch"), py::arg("max_rows"), py::arg("rank"), py::arg("world"), py::arg("fanout"), py::arg("signature"), py::arg("num_sms"), py::arg("stream"));
  m.def("ep_wait", &launch_ep_wait, "bounded wait for every peer's flag", py::arg("flags"), py::arg("epoch"),
        py::arg("error"), py::arg("world"), py::arg("timeout_s"), py::arg("stream"));
}
}  // namespace dsmoe
