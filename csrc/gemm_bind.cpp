// Python bindings of the FP8 GEMM launchers (csrc/gemm.cu). Declarations only; no torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gemm.h"

namespace py = pybind11;
namespace dsmoe {
void register_gemm(py::module_& m) {
  m.def("fp8_gemm_nt", &launch_fp8_gemm_nt, "FP8 NT GEMM (see dsmoe.ops.fp8_gemm_nt)", py::arg("a"), py::arg("a_scales"),
        py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("sa_ld"),
        py::arg("sb_ld"), py::arg("out_f32"), py::arg("block_m"), py::arg("block_n"), py::arg("num_stages"),
        py::arg("num_ctas"), py::arg("raster_group_n"), py::arg("stream"));
  m.def("m_grouped_fp8_gemm_nt_contiguous", &launch_m_grouped_fp8_gemm_nt_contiguous,
        "MoE grouped FP8 GEMM, contiguous layout (see dsmoe.ops.m_grouped_fp8_gemm_nt_contiguous)", py::arg("a"),
        py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("m_indices"), py::arg("out"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("G"), py::arg("sa_ld"), py::arg("sb_ld_n"), py::arg("sb_ld_g"),
        py::arg("block_m"), py::arg("block_n"), py::arg("num_stages"), py::arg("num_ctas"), py::arg("raster_group_n"),
        py::arg("stream"));
  m.def("m_grouped_fp8_gemm_nt_masked", &launch_m_grouped_fp8_gemm_nt_masked,
        "MoE grouped FP8 GEMM, masked layout (see dsmoe.ops.m_grouped_fp8_gemm_nt_masked)", py::arg("a"),
        py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("masked_m"), py::arg("out"), py::arg("G"),
        py::arg("M_max"), py::arg("N"), py::arg("K"), py::arg("sa_ld_k"), py::arg("sa_ld_g"), py::arg("sb_ld_n"),
        py::arg("sb_ld_g"), py::arg("block_m"), py::arg("block_n"), py::arg("num_stages"), py::arg("num_ctas"),
        py::arg("raster_group_n"), py::arg("stream"));
  m.def("k_grouped_fp8_gemm_tn", &launch_k_grouped_fp8_gemm_tn,
        "FP8 TN weight-gradient GEMM, dense or k-grouped (see dsmoe.ops.k_grouped_fp8_gemm_tn_contiguous)", py::arg("a"),
        py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("group_sizes"), py::arg("out"), py::arg("M"),
        py::arg("N"), py::arg("T"), py::arg("G"), py::arg("sa_ld"), py::arg("sb_ld"), py::arg("accumulate"),
        py::arg("block_m"), py::arg("block_n"), py::arg("num_stages"), py::arg("num_ctas"), py::arg("raster_group_n"),
        py::arg("stream"));
  m.def("transpose_quant_fp8", &launch_transpose_quant_fp8,
        "x [T, K] -> x^T quantized 1x128 along T (see dsmoe.ops.per_token_group_quant_fp8_transposed)", py::arg("x"),
        py::arg("dtype"), py::arg("q"), py::arg("scales"), py::arg("T"), py::arg("K"), py::arg("x_ld"), py::arg("q_ld"),
        py::arg("s_ld"), py::arg("ue8m0"), py::arg("stream"));
  m.def("gemm_smem_bytes", &gemm_smem_bytes, "shared memory of one GEMM CTA", py::arg("kind"), py::arg("block_m"),
        py::arg("block_n"), py::arg("num_stages"));
  m.attr("gemm_instantiations") = gemm_instantiations();
}
}  // namespace dsmoe
