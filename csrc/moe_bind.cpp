// Python bindings of the MoE launchers (csrc/moe.cu). Declarations only; see dsmoe.ops.moe.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <vector>
#include "moe.h"

namespace py = pybind11;
namespace dsmoe {
void register_moe(py::module_& m) {
  m.def("moe_route", &launch_moe_route, "DeepSeek-V3 routing, one warp per token (see dsmoe.ops.moe_route)", py::arg("logits"),
        py::arg("dtype"), py::arg("bias"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("T"), py::arg("E"),
        py::arg("row_stride"), py::arg("top_k"), py::arg("n_group"), py::arg("topk_group"), py::arg("routed_scaling_factor"),
        py::arg("norm_topk_prob"), py::arg("score_func"), py::arg("stream"));
  m.def("moe_layout_workspace_ints", &moe_layout_workspace_ints, "int32 workspace size of moe_permute_layout",
        py::arg("T"), py::arg("k"), py::arg("E"));
  m.def("moe_permute_layout", &launch_moe_permute_layout, "grouped-GEMM layout of topk_idx (see dsmoe.ops.moe_permute)",
        py::arg("topk_idx"), py::arg("idx64"), py::arg("T"), py::arg("k"), py::arg("E"), py::arg("alignment"),
        py::arg("num_rows"), py::arg("m_indices"), py::arg("tokens_per_expert"), py::arg("row_map"), py::arg("workspace"),
        py::arg("workspace_ints"), py::arg("stream"));
  m.def("moe_scatter_rows", &launch_moe_scatter_rows, "rows of x to their permuted rows (optionally weighted)",
        py::arg("x"), py::arg("dtype"), py::arg("row_map"), py::arg("weights"), py::arg("out"), py::arg("m_indices"),
        py::arg("T"), py::arg("k"), py::arg("H"), py::arg("x_row_stride"), py::arg("num_rows"), py::arg("stream"));
  m.def("moe_scatter_rows_fp8", &launch_moe_scatter_rows_fp8, "permutation fused with 1x128 FP8 quantization",
        py::arg("x"), py::arg("dtype"), py::arg("row_map"), py::arg("m_indices"), py::arg("q"), py::arg("scales"),
        py::arg("T"), py::arg("k"), py::arg("H"), py::arg("x_row_stride"), py::arg("num_rows"), py::arg("stream"));
  m.def("moe_unpermute", &launch_moe_unpermute, "weighted gather-sum of permuted rows (see dsmoe.ops.moe_unpermute)",
        py::arg("y"), py::arg("dtype"), py::arg("row_map"), py::arg("weights"), py::arg("out"), py::arg("T"), py::arg("k"),
        py::arg("H"), py::arg("y_row_stride"), py::arg("num_rows_y"), py::arg("stream"));
  m.attr("moe_route_experts_per_lane") =
      std::vector<int>(std::begin(kRouteExpertsPerLane), std::end(kRouteExpertsPerLane));
}
}  // namespace dsmoe
