"""MoE routing, token permutation into the contiguous grouped-GEMM layout, and load balancing.

- ``moe_route``: the DeepSeek-V3 gate (sigmoid or softmax scores, group-limited top-k, optional
  node-limited top-k, -inf mask, ties to the lowest index). Fixed output shape: works under torch.compile and CUDA graphs.
- ``moe_permute`` / ``moe_unpermute``: rows grouped by expert, each expert's segment padded to
  ``alignment`` rows (``m_indices = -1`` and zero data on padding); both differentiable: the backward of
  the permutation is an unpermute (gather-sum) and the backward of the unpermute is a weighted scatter.

Output size of ``moe_permute``: ``R = sum_e ceil(c_e / alignment) * alignment`` depends on the routing.
With ``max_rows=None`` it is exact: the CPU path computes it directly, the CUDA path reads it back with
one host synchronization (not capturable), and under torch.compile it is an unbacked symbolic size.
With ``max_rows=moe_permute_max_rows(T, k, E, alignment)`` (or any larger value) the shape is fixed,
no host synchronization happens, and rows past R are padding: the CUDA-graph-safe form.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from .. import _native
from ..ref import moe as ref
from ._registry import register

__all__ = [
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "moe_permute_max_rows",
    "expert_load",
    "update_expert_bias",
    "sequence_balance_loss",
]

moe_permute_max_rows = ref.moe_permute_max_rows

_FLOAT_IN = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IDX = (torch.int32, torch.int64)
_SCORE_FUNCS = {"sigmoid": 0, "softmax": 1}
_FP8 = torch.float8_e4m3fn


_check_int = C.check_int


def _check_topk_idx(op: str, topk_idx: torch.Tensor, num_experts: int, ndim=2) -> None:
    C.check_tensor(op, "topk_idx", topk_idx, dtypes=_IDX, ndim=ndim)
    C.check_index_range(op, "topk_idx", topk_idx, -1, num_experts, "-1 = skipped")


# ----------------------------------------------------------------------------- routing
@torch.library.custom_op("dsmoe::moe_route", mutates_args=())
def _route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
           routed_scaling_factor: float, norm_topk_prob: bool, score_func: str, num_nodes: int = 1,
           max_nodes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    # NOTE: the fused kernel knows groups, not nodes: an active node limit runs the torch reference on the
    # logits' device (device ops only, no host sync: still capturable; see docs/internode.md).
    if max_nodes < num_nodes or not _native.use_kernel("moe", logits):
        return ref.moe_route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                             routed_scaling_factor=routed_scaling_factor, norm_topk_prob=norm_topk_prob,
                             score_func=score_func, num_nodes=num_nodes, max_nodes=max_nodes)
    T, E = logits.shape
    idx = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return idx, w
    launch = _native.require_kernel("moe_route", "moe_route", logits.device)
    b = bias.float().contiguous() if bias is not None else None
    launch(logits.data_ptr(), _native.DTYPE_CODES[logits.dtype], _native.ptr(b), idx.data_ptr(), w.data_ptr(),
           T, E, logits.stride(0), top_k, n_group, topk_group, float(routed_scaling_factor), bool(norm_topk_prob),
           _SCORE_FUNCS[score_func], _native.stream(logits))
    return idx, w


@_route.register_fake
def _(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, score_func, num_nodes=1,
      max_nodes=1):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.int32), logits.new_empty(T, top_k, dtype=torch.float32))


def moe_route(router_logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int, topk_group: int,
              routed_scaling_factor: float, norm_topk_prob: bool = True, score_func: str = "sigmoid",
              num_nodes: int = 1, max_nodes: int | None = None):
    """DeepSeek-V3 routing of ``router_logits [T, E]`` (fp32/bf16/fp16; computed in fp32).

    Node-limited routing (V3's training rule): with ``max_nodes=M < num_nodes`` each token's experts lie on
    at most M of the ``num_nodes`` nodes (experts placed node-major in equal blocks, as dsmoe.parallel
    places them), the nodes ranked by the sum of their ``ceil(top_k / M)`` best biased scores after the
    group mask (see dsmoe.ref.moe). When groups and nodes both limit, one must nest in the other
    (``n_group % num_nodes == 0`` or ``num_nodes % n_group == 0``) so that ``top_k`` candidates always
    remain. On CUDA a node limit runs the torch reference on the device (the fused kernel has no node rule).

    ``bias``: ``e_score_correction_bias [E]`` (selection only) or None. Returns
    ``(topk_idx int32 [T, top_k], topk_weights fp32 [T, top_k])``, experts in descending order of the
    biased score, ties to the lowest index; weights from the unbiased scores (see dsmoe.ref.moe).
    Not differentiable (the V3 gate is trained through the weights of the MoE output only when the
    caller recomputes them; see docs/moe.md).
    NaN handling (no host check, it would cost a sync): a NaN score or group score ranks as ``-inf``, so
    a token whose logits are all NaN gets the lowest-index experts of the lowest-index groups and NaN
    weights; other tokens are unaffected.
    """
    op = "moe_route"
    C.check_tensor(op, "router_logits", router_logits, dtypes=_FLOAT_IN, ndim=2)
    C.check_last_dim_contiguous(op, "router_logits", router_logits)
    T, E = router_logits.shape
    if bias is not None:
        C.check_tensor(op, "bias", bias, dtypes=_FLOAT_IN, ndim=1)
        C.check_shape(op, "bias", bias, (E,))
        C.check_same_device(op, {"router_logits": router_logits, "bias": bias})
    _check_int(op, "top_k", top_k, min_value=1)
    _check_int(op, "n_group", n_group, min_value=1)
    _check_int(op, "topk_group", topk_group, min_value=1)
    if E % n_group:
        raise ValueError(f"dsmoe.{op}: argument 'n_group': the expert count E={E} must be a multiple of n_group={n_group}")
    if topk_group > n_group:
        raise ValueError(f"dsmoe.{op}: argument 'topk_group' must be <= n_group={n_group}, got {topk_group}")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"dsmoe.{op}: argument 'top_k'={top_k} exceeds the experts of the kept groups "
                         f"(topk_group * E / n_group = {topk_group * (E // n_group)})")
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"dsmoe.{op}: argument 'score_func' must be 'sigmoid' or 'softmax', got {score_func!r}")
    routed_scaling_factor = C.check_float(op, "routed_scaling_factor", routed_scaling_factor)
    _check_int(op, "num_nodes", num_nodes, min_value=1)
    if E % num_nodes:
        raise ValueError(f"dsmoe.{op}: argument 'num_nodes': the expert count E={E} must be a multiple of "
                         f"num_nodes={num_nodes}")
    if max_nodes is None:
        max_nodes = num_nodes
    _check_int(op, "max_nodes", max_nodes, min_value=1)
    if max_nodes > num_nodes:
        raise ValueError(f"dsmoe.{op}: argument 'max_nodes' must be <= num_nodes={num_nodes}, got {max_nodes}")
    if max_nodes < num_nodes:
        grouped = topk_group < n_group
        if grouped and n_group % num_nodes and num_nodes % n_group:
            raise ValueError(f"dsmoe.{op}: argument 'num_nodes'={num_nodes}: with group-limited routing "
                             f"(topk_group={topk_group} < n_group={n_group}) groups and nodes must nest (one count a "
                             f"multiple of the other)")
        # every kept node holds at least min(group, node) experts of kept groups: the top_k must fit
        per = min(E // num_nodes, E // n_group) if grouped else E // num_nodes
        if top_k > max_nodes * per:
            raise ValueError(f"dsmoe.{op}: argument 'top_k'={top_k} exceeds what max_nodes={max_nodes} nodes "
                             f"guarantee (max_nodes * {per} experts)")
    return torch.ops.dsmoe.moe_route(router_logits, bias, top_k, n_group, topk_group, routed_scaling_factor,
                                     bool(norm_topk_prob), score_func, num_nodes, max_nodes)


# ----------------------------------------------------------------------------- permutation
@torch.library.custom_op("dsmoe::moe_permute_layout", mutates_args=())
def _layout(topk_idx: torch.Tensor, num_experts: int, alignment: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_rows < 0: exact size."""
    mr = None if max_rows < 0 else max_rows
    if not _native.use_kernel("moe", topk_idx):
        return ref.moe_permute_layout(topk_idx, num_experts, alignment, mr)
    T, k = topk_idx.shape
    dev = topk_idx.device
    if mr is None:
        # NOTE: the one host synchronization of the exact-size path.
        counts = ref.expert_load(topk_idx, num_experts)
        mr = int(((counts + alignment - 1) // alignment * alignment).sum())
    m_indices = torch.empty(mr, dtype=torch.int32, device=dev)
    tpe = torch.empty(num_experts, dtype=torch.int32, device=dev)
    row_map = torch.empty(T, k, dtype=torch.int32, device=dev)
    launch = _native.require_kernel("moe_permute", "moe_permute_layout", dev)
    ws = torch.empty(_native.native().moe_layout_workspace_ints(T, k, num_experts), dtype=torch.int32, device=dev)
    idx = topk_idx.contiguous()
    launch(idx.data_ptr(), idx.dtype == torch.int64, T, k, num_experts, alignment, mr, m_indices.data_ptr(),
           tpe.data_ptr(), row_map.data_ptr(), ws.data_ptr(), ws.numel(), _native.stream(topk_idx))
    return m_indices, tpe, row_map


@_layout.register_fake
def _(topk_idx, num_experts, alignment, max_rows):
    if max_rows < 0:
        R = torch.library.get_ctx().new_dynamic_size()
    else:
        R = max_rows
    T, k = topk_idx.shape
    return (topk_idx.new_empty(R, dtype=torch.int32), topk_idx.new_empty(num_experts, dtype=torch.int32),
            topk_idx.new_empty(T, k, dtype=torch.int32))


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows as ``base + r * stride(0) + h``: they need ``stride(-1) == 1``.

    NOTE: gradients reaching the custom ops directly (autograd backward) can be expanded views, e.g.
    ``y.sum().backward()`` hands over strides (0, 0); those are copied here instead of read out of bounds."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``_unit_stride_rows`` plus 16-byte aligned data pointer and row pitch (the FP8 kernel's vector loads)."""
    t = _unit_stride_rows(t)
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t


def _launch_scatter(x, row_map, weights, out, m_indices):
    T, k = row_map.shape
    launch = _native.require_kernel("moe_permute", "moe_scatter_rows", x.device)
    launch(x.data_ptr(), _native.DTYPE_CODES[x.dtype], row_map.data_ptr(), _native.ptr(weights), out.data_ptr(),
           _native.ptr(m_indices), T, k, x.shape[1], x.stride(0), out.shape[0], _native.stream(x))


@torch.library.custom_op("dsmoe::moe_scatter_rows", mutates_args=())
def _scatter(x: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None, m_indices: torch.Tensor | None,
             num_rows: int) -> torch.Tensor:
    """m_indices (optional, [num_rows]) tells the kernel which rows are padding (-1) so that it zeroes
    only those; without it the output is zeroed first."""
    if not _native.use_kernel("moe", x):
        return ref.moe_scatter_rows(x, row_map, weights, num_rows)
    out = torch.empty(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if m_indices is None:
        out.zero_()
    else:
        m_indices = m_indices.contiguous()
    x = _unit_stride_rows(x)
    _launch_scatter(x, row_map.contiguous(), None if weights is None else weights.float().contiguous(), out, m_indices)
    return out


@_scatter.register_fake
def _(x, row_map, weights, m_indices, num_rows):
    return x.new_empty(num_rows, x.shape[1])


def _weight_grad(rows_src: torch.Tensor, row_map: torch.Tensor, per_token: torch.Tensor):
    """``dw[t, j] = <per_token[t], rows_src[row_map[t, j]]>`` (0 where row_map = -1), fp32/fp64.

    NOTE: the tokens are scattered to the rows (each used row holds exactly one pair) and the per-row
    dot products are gathered from a vector with one extra zero slot that the -1 entries point to, so
    that T = 0 and R = 0 (every pair skipped) need no branch; a branch on R would be data-dependent
    under torch.compile, where R is an unbacked size."""
    R = rows_src.shape[0]
    acc = torch.float64 if per_token.dtype == torch.float64 else torch.float32
    spread = torch.ops.dsmoe.moe_scatter_rows(per_token, row_map, None, None, R)
    row_dot = (spread.to(acc) * rows_src.to(acc)).sum(-1)
    row_dot = torch.cat([row_dot, row_dot.new_zeros(1)])
    r = row_map.long()
    return row_dot[torch.where(r >= 0, r, R)]


def _scatter_setup(ctx, inputs, output):
    x, row_map, weights, m_indices, num_rows = inputs
    ctx.save_for_backward(x, row_map, weights)


def _scatter_backward(ctx, grad):
    x, row_map, weights = ctx.saved_tensors
    dx = torch.ops.dsmoe.moe_unpermute(grad, row_map, weights) if ctx.needs_input_grad[0] else None
    dw = None
    if weights is not None and ctx.needs_input_grad[2]:
        dw = _weight_grad(grad, row_map, x).to(weights.dtype)
    return dx, None, dw, None, None


_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op("dsmoe::moe_scatter_rows_fp8", mutates_args=())
def _scatter_fp8(x: torch.Tensor, row_map: torch.Tensor, m_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    R = m_indices.shape[0]
    if not _native.use_kernel("moe", x):
        from ..ref.quant import per_token_group_quant_fp8
        return per_token_group_quant_fp8(ref.moe_scatter_rows(x, row_map, None, R), 128)
    H = x.shape[1]
    q = torch.empty(R, H, dtype=_FP8, device=x.device)
    s = torch.empty(R, H // 128, dtype=torch.float32, device=x.device)
    if R == 0:
        return q, s
    T, k = row_map.shape
    x, row_map, m_indices = _aligned_rows(x), row_map.contiguous(), m_indices.contiguous()
    launch = _native.require_kernel("moe_permute", "moe_scatter_rows_fp8", x.device)
    launch(x.data_ptr(), _native.DTYPE_CODES[x.dtype], row_map.data_ptr(), m_indices.data_ptr(), q.data_ptr(),
           s.data_ptr(), T, k, H, x.stride(0), R, _native.stream(x))
    return q, s


@_scatter_fp8.register_fake
def _(x, row_map, m_indices):
    R, H = m_indices.shape[0], x.shape[1]
    return x.new_empty(R, H, dtype=_FP8), x.new_empty(R, H // 128, dtype=torch.float32)


@torch.library.custom_op("dsmoe::moe_unpermute", mutates_args=())
def _unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if not _native.use_kernel("moe", y_perm):
        return ref.moe_unpermute(y_perm, row_map, weights)
    T, k = row_map.shape
    H = y_perm.shape[1]
    out = torch.empty(T, H, dtype=y_perm.dtype, device=y_perm.device)
    if out.numel() == 0:
        return out
    launch = _native.require_kernel("moe_unpermute", "moe_unpermute", y_perm.device)
    y_perm = _unit_stride_rows(y_perm)
    rm = row_map.contiguous()
    w = None if weights is None else weights.float().contiguous()
    launch(y_perm.data_ptr(), _native.DTYPE_CODES[y_perm.dtype], rm.data_ptr(), _native.ptr(w), out.data_ptr(),
           T, k, H, y_perm.stride(0), y_perm.shape[0], _native.stream(y_perm))
    return out


@_unpermute.register_fake
def _(y_perm, row_map, weights):
    return y_perm.new_empty(row_map.shape[0], y_perm.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y_perm, row_map, weights = inputs
    ctx.save_for_backward(y_perm, row_map, weights)


def _unpermute_backward(ctx, grad):
    y_perm, row_map, weights = ctx.saved_tensors
    dy = torch.ops.dsmoe.moe_scatter_rows(grad, row_map, weights, None, y_perm.shape[0]) if ctx.needs_input_grad[0] else None
    dw = None
    if weights is not None and ctx.needs_input_grad[2]:
        dw = _weight_grad(y_perm, row_map, grad).to(weights.dtype)
    return dy, None, dw


_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def _check_permute_args(op, x, topk_idx, num_experts, alignment):
    C.check_tensor(op, "x", x, dtypes=_FLOAT_ALL, ndim=2)
    C.check_last_dim_contiguous(op, "x", x)
    _check_int(op, "num_experts", num_experts, min_value=1)
    _check_int(op, "alignment", alignment, min_value=1)
    _check_topk_idx(op, topk_idx, num_experts)
    if topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"dsmoe.{op}: argument 'topk_idx' must have {x.shape[0]} rows (one per token of x), "
                         f"got shape {tuple(topk_idx.shape)}")
    C.check_same_device(op, {"x": x, "topk_idx": topk_idx})
    if x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError(f"dsmoe.{op}: argument 'x': float64 is CPU-only, got a CUDA float64 tensor")


def moe_permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *, alignment: int = 128,
                quantize_fp8: bool = False, max_rows: int | None = None):
    """Permutes tokens ``x [T, H]`` into the contiguous grouped-GEMM layout of ``topk_idx [T, k]``.

    Returns ``(x_perm [R, H], m_indices int32 [R], tokens_per_expert int32 [E], row_map int32 [T, k])``,
    or with ``quantize_fp8`` ``(x_fp8 [R, H], scales fp32 [R, H/128], m_indices, tokens_per_expert,
    row_map)`` (1x128 groups; H must be a multiple of 128; not differentiable). ``x_perm`` is
    differentiable in ``x``. ``R``: see the module docstring (``max_rows`` for a fixed size).
    """
    op = "moe_permute"
    _check_permute_args(op, x, topk_idx, num_experts, alignment)
    T, k = topk_idx.shape
    if max_rows is not None:
        _check_int(op, "max_rows", max_rows, min_value=0)
        need = ref.moe_permute_max_rows(T, k, num_experts, alignment)
        if max_rows < need:
            raise ValueError(f"dsmoe.{op}: argument 'max_rows' must be >= the worst case "
                             f"moe_permute_max_rows(T={T}, k={k}, E={num_experts}, alignment={alignment}) = {need}, "
                             f"got {max_rows}")
    if quantize_fp8:
        if x.dtype == torch.float64:
            raise TypeError(f"dsmoe.{op}: argument 'x': quantize_fp8 takes float32/float16/bfloat16, got float64")
        if x.shape[1] % 128:
            raise ValueError(f"dsmoe.{op}: argument 'x': hidden size (last dim)={x.shape[1]} must be a multiple of "
                             "128 with quantize_fp8=True (1x128 scale groups)")
    m_indices, tpe, row_map = torch.ops.dsmoe.moe_permute_layout(topk_idx, num_experts, alignment,
                                                                 -1 if max_rows is None else max_rows)
    if quantize_fp8:
        q, s = torch.ops.dsmoe.moe_scatter_rows_fp8(x, row_map, m_indices)
        return q, s, m_indices, tpe, row_map
    x_perm = torch.ops.dsmoe.moe_scatter_rows(x, row_map, None, m_indices, m_indices.shape[0])
    return x_perm, m_indices, tpe, row_map


def moe_unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """``y [T, H] = sum_j topk_weights[t, j] * y_perm[row_map[t, j]]`` (fp32 accumulation, slots in
    order, y_perm's dtype; row_map -1 skipped; ``topk_weights=None`` sums unweighted). Differentiable
    in ``y_perm`` and ``topk_weights``."""
    op = "moe_unpermute"
    C.check_tensor(op, "y_perm", y_perm, dtypes=_FLOAT_ALL, ndim=2)
    C.check_last_dim_contiguous(op, "y_perm", y_perm)
    C.check_tensor(op, "row_map", row_map, dtypes=(torch.int32,), ndim=2)
    named = {"y_perm": y_perm, "row_map": row_map}
    if topk_weights is not None:
        C.check_tensor(op, "topk_weights", topk_weights, dtypes=_FLOAT_ALL, ndim=2)
        C.check_shape(op, "topk_weights", topk_weights, tuple(row_map.shape))
        named["topk_weights"] = topk_weights
    C.check_same_device(op, named)
    if y_perm.device.type == "cuda" and y_perm.dtype == torch.float64:
        raise TypeError(f"dsmoe.{op}: argument 'y_perm': float64 is CPU-only, got a CUDA float64 tensor")
    C.check_index_range(op, "row_map", row_map, -1, y_perm.shape[0], "rows of y_perm; -1 = skipped")
    return torch.ops.dsmoe.moe_unpermute(y_perm, row_map, topk_weights)


# ----------------------------------------------------------------------------- balancing
def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert (int64 ``[E]``) of ``topk_idx [..., k]``; -1 entries are skipped."""
    op = "expert_load"
    _check_int(op, "num_experts", num_experts, min_value=1)
    _check_topk_idx(op, topk_idx, num_experts, ndim=None)
    return ref.expert_load(topk_idx, num_experts)


def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (V3): in place, ``bias -= gamma`` for experts whose load is above
    the mean and ``+= gamma`` below it. ``load [E]``: tokens per expert over the batch. Returns ``bias``.

    A NaN or infinite load is an error (ValueError naming 'load'). Integer loads (``expert_load``'s
    counts) cannot hold one: no check, no host sync. A floating load is checked by reading one flag back,
    a host sync on a GPU; under torch.compile or CUDA-graph capture, where nothing can be read back, the
    check is skipped and a non-finite load leaves the whole bias unchanged (see dsmoe.ref.moe)."""
    op = "update_expert_bias"
    C.check_tensor(op, "bias", bias, dtypes=_FLOAT_ALL, ndim=1)
    C.check_tensor(op, "load", load, ndim=1)
    if load.dtype == torch.bool or load.is_complex():
        raise TypeError(f"dsmoe.{op}: argument 'load' must be a real (integer or floating) tensor, got {load.dtype}")
    C.check_shape(op, "load", load, tuple(bias.shape))
    C.check_same_device(op, {"bias": bias, "load": load})
    gamma = C.check_float(op, "gamma", gamma, min_value=0.0)
    if load.is_floating_point() and load.numel() and C.can_read_device_values(load):
        bad = ~torch.isfinite(load)
        n_bad = int(bad.sum())  # NOTE: the one host read (a sync on a GPU), floating loads only
        if n_bad:
            raise ValueError(f"dsmoe.{op}: argument 'load' must be finite (tokens per expert), got {n_bad} NaN/inf "
                             f"value(s), first at expert {int(bad.nonzero()[0, 0])}")
    return ref.update_expert_bias(bias, load, gamma)


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, *, alpha: float = 1e-4) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss ``alpha * sum_i f_i P_i`` (mean over sequences),
    differentiable in ``scores``. ``scores``: unbiased affinities ``[S, E]`` or ``[B, S, E]``;
    ``topk_idx`` ``[S, k]`` or ``[B, S, k]`` (-1 skipped). No token (S = 0 or B = 0) or no slot (k = 0):
    the loss is 0; a token whose scores all underflow to 0 adds nothing to ``P`` (finite loss and
    gradient). See dsmoe.ref.moe.sequence_balance_loss."""
    op = "sequence_balance_loss"
    C.check_tensor(op, "scores", scores, dtypes=_FLOAT_ALL, ndim=(2, 3))
    _check_topk_idx(op, topk_idx, scores.shape[-1], ndim=scores.dim())
    if topk_idx.shape[:-1] != scores.shape[:-1]:
        raise ValueError(f"dsmoe.{op}: argument 'topk_idx' must have leading dims {tuple(scores.shape[:-1])} "
                         f"(those of scores), got shape {tuple(topk_idx.shape)}")
    C.check_same_device(op, {"scores": scores, "topk_idx": topk_idx})
    alpha = C.check_float(op, "alpha", alpha, min_value=0.0)
    return ref.sequence_balance_loss(scores, topk_idx, alpha=alpha)


register("moe_route", "moe", ["moe_route"])
register("moe_permute", "moe", ["moe_permute_layout", "moe_scatter_rows", "moe_scatter_rows_fp8"])
register("moe_unpermute", "moe", ["moe_unpermute"])
register("expert_load", "moe", [], "torch on every device")
register("update_expert_bias", "moe", [], "torch on every device")
register("sequence_balance_loss", "moe", [], "torch on every device")
