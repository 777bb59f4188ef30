"""Pipeline parallelism: DualPipe, DualPipeV and a 1F1B baseline with the API of DeepSeek's DualPipe
(``DualPipe(modules, batch_dim, process_group, rank_mapping).step(*inputs, num_chunks, criterion,
labels, return_outputs)``), WeightGradStore for the zero-bubble weight-gradient split, and a V3
decoder-layer stage whose ``overlapped_forward_backward`` overlaps one chunk's expert-parallel
all-to-all with the other chunk's computation. See docs/pipeline.md."""
from .runtime import (DualPipe, DualPipeV, OneFOneB, PipelineSchedule, PipelineTimeoutError, WeightGradStore, gather,
                      run_backward, scatter, set_p2p_tensor_dtype, set_p2p_tensor_shapes)
from .schedule import Op, Topology, bubble_formula, simulate

__all__ = ["DualPipe", "DualPipeV", "OneFOneB", "PipelineSchedule", "PipelineTimeoutError", "WeightGradStore",
           "set_p2p_tensor_shapes", "set_p2p_tensor_dtype", "run_backward", "scatter", "gather", "simulate", "bubble_formula", "Op", "Topology"]
