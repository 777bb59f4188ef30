#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <vector>
#include "quant.h"

namespace py = pybind11;
namespace dsmoe {
void register_quant(py::module_& m) {
  m.def("token_group_quant", &launch_token_group_quant, "1xG FP8 quantization (see dsmoe.ops.per_token_group_quant_fp8)",
        py::arg("x"), py::arg("dtype"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("K"),
        py::arg("x_row_stride"), py::arg("q_row_stride"), py::arg("rows_inner"), py::arg("s_batch"), py::arg("s_row"),
        py::arg("s_col"), py::arg("group_size"), py::arg("ue8m0"), py::arg("stream"));
  m.def("block_quant", &launch_block_quant, "BNxBK FP8 quantization (see dsmoe.ops.per_block_quant_fp8)",
        py::arg("w"), py::arg("dtype"), py::arg("q"), py::arg("scale_inv"), py::arg("N"), py::arg("K"),
        py::arg("w_row_stride"), py::arg("q_row_stride"), py::arg("block_n"), py::arg("block_k"), py::arg("ue8m0"),
        py::arg("stream"));
  m.attr("token_group_sizes") = std::vector<int>(std::begin(kTokenGroupSizes), std::end(kTokenGroupSizes));
}
}  // namespace dsmoe
