#include <pybind11/pybind11.h>
#include "mla.h"

namespace py = pybind11;
namespace dsmoe {
void register_mla(py::module_& m) {
  m.def("mla_get_metadata", &launch_mla_get_metadata, "MLA split-KV schedule (see dsmoe.ops.get_mla_metadata)",
        py::arg("seqlens"), py::arg("B"), py::arg("num_parts"), py::arg("metadata"), py::arg("num_splits"),
        py::arg("stream"));
  m.def("mla_decode", &launch_mla_decode, "MLA decode over a paged cache (see dsmoe.ops.mla_decode_with_kvcache)",
        py::arg("q"), py::arg("kv"), py::arg("block_table"), py::arg("seqlens"), py::arg("metadata"),
        py::arg("num_splits"), py::arg("out"), py::arg("lse"), py::arg("o_accum"), py::arg("lse_accum"), py::arg("B"),
        py::arg("s_q"), py::arg("H"), py::arg("num_blocks"), py::arg("max_blocks"), py::arg("num_parts"),
        py::arg("q_batch"), py::arg("q_token"), py::arg("q_head"), py::arg("bt_stride"), py::arg("kv_block_bytes"),
        py::arg("kv_fp8"), py::arg("softmax_scale"), py::arg("causal"), py::arg("stream"));
  m.def("mla_kvcache_append", &launch_mla_kvcache_append, "Append tokens to the paged MLA cache (see dsmoe.ops.mla_kvcache_append)",
        py::arg("kv"), py::arg("block_table"), py::arg("batch_ids"), py::arg("positions"), py::arg("latent"),
        py::arg("k_rope"), py::arg("norm_weight"), py::arg("cos"), py::arg("sin"), py::arg("T"), py::arg("num_blocks"),
        py::arg("B"), py::arg("max_blocks"), py::arg("bt_stride"), py::arg("latent_stride"), py::arg("rope_stride"),
        py::arg("cos_stride"), py::arg("sin_stride"), py::arg("kv_block_bytes"), py::arg("kv_fp8"), py::arg("eps"),
        py::arg("rope_interleaved"), py::arg("ue8m0"), py::arg("stream"));
}
}  // namespace dsmoe
