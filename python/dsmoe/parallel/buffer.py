"""Expert-parallel dispatch/combine: ``EPBuffer`` with a validated ``EPConfig``.

Layout: the ``num_experts`` (physical) experts are split evenly over the ``W`` ranks of ``group``; expert
``e`` lives on rank ``e // L`` as local expert ``e % L`` (``L = num_experts / W``).

``dispatch`` sends ONE copy of a token to every rank that hosts at least one of its experts. On the
receiver, rows are ordered by source rank, then by the source's token index. ``recv_topk_idx`` holds
local expert ids (-1 for slots whose expert lives elsewhere, or was -1) and ``recv_topk_weights`` the
weights of the local slots (0 elsewhere). ``combine`` sends each received row back and sums the copies
of a token in rank order (fp32 accumulation): with identity experts ``combine(dispatch(x))`` is
``sum_k w_k x`` once the receiver has applied its weights.

Both are differentiable: the backward of dispatch is a combine of the gradient (and the weight
gradients travel back the same way); the backward of combine is a dispatch of the gradient.

Backends:
- ``"collective"``: ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU). Any world size,
  any hidden size, any device torch.distributed supports. Each call first exchanges the per-rank counts
  (one small all_to_all), then the payload; this is a host synchronization (sizes are data-dependent).
- ``"nvlink"``: CUDA kernels that write straight into the peers' receive buffers over CUDA IPC (see
  dsmoe.parallel.nvlink); single node, CUDA only.

Failure handling: every collective runs under the process group's timeout; a peer that died or never
calls raises ``EPTimeoutError`` (a RuntimeError) naming the operation, never hangs.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _checks as C
from .. import _native

__all__ = ["EPConfig", "EPBuffer", "EPHandle", "EPTimeoutError", "get_dispatch_layout"]

_BACKENDS = ("collective", "nvlink")


class EPTimeoutError(RuntimeError):
    """A collective of the EP buffer failed or timed out (a peer died, or never joined)."""


@dataclass(frozen=True)
class EPConfig:
    """Validated configuration. ``max_tokens_per_rank`` sizes the worst-case receive buffer of the nvlink
    backend (each source writes at most that many tokens to each peer); ``num_sms`` bounds its kernels."""
    world_size: int
    num_experts: int
    hidden: int
    backend: str = "collective"
    max_tokens_per_rank: int = 0
    num_sms: int = 20
    top_k_max: int = 32
    num_local_experts: int = field(init=False)

    def __post_init__(self):
        def bad(arg, msg):
            raise ValueError(f"dsmoe.EPBuffer: argument '{arg}': {msg}")

        for name in ("world_size", "num_experts", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive int, got {v!r}")
        if self.num_experts % self.world_size:
            bad("num_experts", f"{self.num_experts} experts cannot be split evenly over world size {self.world_size}")
        if self.backend not in _BACKENDS:
            bad("backend", f"must be one of {_BACKENDS}, got {self.backend!r}")
        if self.backend == "nvlink":
            if self.max_tokens_per_rank <= 0:
                bad("max_tokens_per_rank", f"the nvlink backend needs a positive worst-case token count per rank, "
                    f"got {self.max_tokens_per_rank}")
            if not (1 <= self.num_sms <= 132):
                bad("num_sms", f"must be in [1, 132], got {self.num_sms}")
            if self.hidden % 8:
                bad("hidden", f"the nvlink backend moves 16-byte vectors: hidden must be a multiple of 8, got {self.hidden}")
        object.__setattr__(self, "num_local_experts", self.num_experts // self.world_size)

    def nvlink_recv_bytes(self, elem_size: int = 2, top_k: int = 8) -> int:
        """Bytes of one rank's receive buffer: W sources x max_tokens rows of payload + idx + weights."""
        row = self.hidden * elem_size + top_k * 8
        return self.world_size * self.max_tokens_per_rank * row


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, world_size: int, *, validate: bool = True):
    """``(num_tokens_per_rank int32 [W], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, W])``.

    A token counts once per rank that hosts any of its experts; -1 entries are skipped. Any other id
    outside ``[0, E)`` is a ValueError naming 'topk_idx' (``validate=True``: reads the range back, a host
    sync on a GPU, skipped while compiling or capturing a CUDA graph); unchecked, such ids are skipped
    like -1 (as the permutation layout kernel does), never an out-of-bounds access."""
    op = "get_dispatch_layout"
    C.check_tensor(op, "topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), ndim=2)
    C.check_int(op, "num_experts", num_experts, min_value=1)
    C.check_int(op, "world_size", world_size, min_value=1)
    if num_experts % world_size:
        raise ValueError(f"dsmoe.{op}: argument 'num_experts'={num_experts} must be a multiple of world_size={world_size}")
    if validate:
        C.check_index_range(op, "topk_idx", topk_idx, -1, num_experts, "-1 = skipped")
    T, k = topk_idx.shape
    L = num_experts // world_size
    idx = topk_idx.long()
    valid = (idx >= 0) & (idx < num_experts)
    rank_of = torch.where(valid, idx // L, torch.full_like(idx, world_size))
    in_rank = torch.zeros(T, world_size + 1, dtype=torch.bool, device=idx.device)
    in_rank.scatter_(1, rank_of, True)
    in_rank = in_rank[:, :world_size]
    # NOTE: no boolean-mask indexing or CUDA bincount here (both read sizes back to the host): the nvlink
    # backend's graph-safe mode calls this under CUDA graph capture.
    slots = torch.where(valid, idx, torch.full_like(idx, num_experts)).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    per_expert.scatter_add_(0, slots, torch.ones_like(slots))
    return in_rank.sum(0).to(torch.int32), per_expert[:num_experts].to(torch.int32), in_rank


@dataclass
class EPHandle:
    """What combine (and the backward passes) need from a dispatch."""
    num_tokens: int
    send_token_idx: torch.Tensor   # int64 [S]: local token of each sent row, grouped by destination rank
    send_counts: list              # rows sent to each rank
    recv_counts: list              # rows received from each rank
    slot_is_local: torch.Tensor    # bool [S, k]: slot j of sent row i belongs to its destination
    top_k: int


def _a2a(group, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str, timeout) -> torch.Tensor:
    try:
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
    except Exception as e:  # noqa: BLE001 - every backend raises its own type
        raise EPTimeoutError(f"dsmoe.EPBuffer.{what}: all_to_all failed (a peer died, diverged or did not call within "
                             f"the process-group timeout {timeout}): {e}") from e
    return out


def _as_bytes_rows(t: torch.Tensor) -> torch.Tensor:
    # NOTE: gloo has no float8 type; every payload travels as raw bytes [rows, nbytes].
    row = t.element_size()
    for d in t.shape[1:]:
        row *= d
    return t.contiguous().view(torch.uint8).view(t.shape[0], row)


class EPBuffer:
    """DeepEP-style expert-parallel communication buffer (see the module docstring)."""

    def __init__(self, group, num_experts: int, hidden: int, *, backend: str = "collective",
                 max_tokens_per_rank: int = 0, num_sms: int = 20, graph_safe: bool = False,
                 timeout=None):
        if group is None:
            group = dist.group.WORLD
        if not dist.is_initialized():
            raise RuntimeError("dsmoe.EPBuffer: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.config = EPConfig(self.world_size, num_experts, hidden, backend, max_tokens_per_rank, num_sms)
        self.num_experts = num_experts
        self.num_local_experts = self.config.num_local_experts
        self.hidden = hidden
        self.backend = backend
        self.graph_safe = graph_safe
        # NOTE: the process group's own timeout bounds every collective here; ``timeout`` only names it
        # in error messages (torch exposes no public getter for a group's timeout).
        self.timeout = timeout if timeout is not None else "set at init_process_group"
        self._nvlink = None
        if backend == "nvlink" and "ep" in _native.disabled_kernels():
            # DSMOE_DISABLE_KERNELS=ep: the collective backend is the reference of the nvlink kernels. Its
            # outputs are compact, so the worst-case sized graph_safe layout has no stand-in.
            if graph_safe:
                raise RuntimeError("dsmoe.EPBuffer: DSMOE_DISABLE_KERNELS disables the ep kernels, and the nvlink "
                                   "backend's graph_safe=True layout has no reference; use graph_safe=False")
            self.backend = "collective"
        elif backend == "nvlink":
            from .nvlink import NVLinkTransport
            self._nvlink = NVLinkTransport(self)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor):
        self._check_topk(topk_idx, "get_dispatch_layout")
        return get_dispatch_layout(topk_idx, self.num_experts, self.world_size)

    def _check_topk(self, topk_idx, op, topk_weights=None, num_tokens=None):
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64) or topk_idx.dim() != 2:
            raise TypeError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx' must be an int32/int64 tensor [T, k], got "
                            f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {tuple(getattr(topk_idx, 'shape', ()))}")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx' must have {num_tokens} rows (one per token), "
                             f"got shape {tuple(topk_idx.shape)}")
        if topk_idx.numel() and C.can_read_device_values(topk_idx):
            lo, hi = int(topk_idx.min()), int(topk_idx.max())
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx': values must be in [-1, {self.num_experts}), "
                                 f"got range [{lo}, {hi}]")
        if topk_weights is not None and (not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape
                                         or not topk_weights.dtype.is_floating_point):
            raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_weights' must be a float tensor of shape "
                             f"{tuple(topk_idx.shape)}, got {tuple(getattr(topk_weights, 'shape', ()))}")

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        """``x [T, H]`` or ``(x_fp8 [T, H], scales [T, H/128])`` -> ``(recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert, handle)``. Differentiable in x and the weights
        (not for FP8 input)."""
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        if not isinstance(xs, torch.Tensor) or xs.dim() != 2 or xs.shape[1] != self.hidden:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x' must be [T, {self.hidden}], got "
                             f"{tuple(getattr(xs, 'shape', ()))}")
        if fp8:
            if xs.dtype != torch.float8_e4m3fn or self.hidden % 128:
                raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x': the FP8 form takes float8_e4m3fn [T, H] with H a "
                                 f"multiple of 128, got {xs.dtype} H={self.hidden}")
            if x[1].shape != (xs.shape[0], self.hidden // 128) or x[1].dtype != torch.float32:
                raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x' scales must be fp32 {(xs.shape[0], self.hidden // 128)}, "
                                 f"got {x[1].dtype} {tuple(x[1].shape)}")
        self._check_topk(topk_idx, "dispatch", topk_weights, xs.shape[0])
        if self._nvlink is not None:
            return self._nvlink.dispatch(x, topk_idx, topk_weights)
        if fp8:
            handle, (rq, rs), ridx, rw, cnt = _dispatch_impl(self, (x[0], x[1]), topk_idx, topk_weights)
            return (rq, rs), ridx, rw, cnt, handle
        box = {}
        recv_x, recv_w, ridx, cnt = _Dispatch.apply(x, topk_weights, topk_idx, self, box)
        return recv_x, ridx, recv_w, cnt, box["handle"]

    def combine(self, y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """``y [R, H]`` (rows as dispatch delivered them) -> ``out [T, H]``: the per-rank copies of each
        token summed in rank order (fp32 accumulation, y's dtype). Differentiable."""
        R = sum(handle.recv_counts)
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != R or y.shape[1] != self.hidden:
            raise ValueError(f"dsmoe.EPBuffer.combine: argument 'y' must be [{R}, {self.hidden}] (the received rows), "
                             f"got {tuple(getattr(y, 'shape', ()))}")
        if self._nvlink is not None:
            return self._nvlink.combine(y, handle)
        return _Combine.apply(y, handle, self)

    def close(self) -> None:
        """Releases the nvlink backend's CUDA IPC buffer. Collective: every rank calls it (it synchronizes
        the GPU and the group so no peer still maps or writes the memory). No-op for ``collective``."""
        if self._nvlink is not None:
            self._nvlink.close()  # later dispatch/combine calls raise


def _dispatch_impl(buf: EPBuffer, x, topk_idx, topk_weights):
    W, L = buf.world_size, buf.num_local_experts
    fp8 = isinstance(x, tuple)
    xs = x[0] if fp8 else x
    T, k = topk_idx.shape
    idx = topk_idx.long()
    _, _, in_rank = get_dispatch_layout(topk_idx, buf.num_experts, W)
    # rows grouped by destination rank, tokens ascending inside
    dest, tok = in_rank.t().nonzero(as_tuple=True)
    send_counts = torch.bincount(dest, minlength=W)
    send_idx = idx[tok]  # [S, k] global ids
    local = (send_idx >= 0) & (send_idx // L == dest.unsqueeze(1))
    send_lidx = torch.where(local, send_idx - dest.unsqueeze(1) * L, torch.full_like(send_idx, -1)).to(torch.int32)
    send_w = torch.where(local, topk_weights[tok].float(), torch.zeros((), dtype=torch.float32, device=xs.device))
    recv_counts_t = torch.empty_like(send_counts)
    _a2a(buf.group, recv_counts_t, send_counts, None, None, "dispatch", buf.timeout)
    sc, rc = send_counts.tolist(), recv_counts_t.tolist()
    R = sum(rc)
    handle = EPHandle(T, tok, sc, rc, local, k)

    def move(rows: torch.Tensor) -> torch.Tensor:
        b = _as_bytes_rows(rows)
        out = torch.empty(R, b.shape[1], dtype=torch.uint8, device=b.device)
        _a2a(buf.group, out, b, rc, sc, "dispatch", buf.timeout)
        return out.view(rows.dtype).view(R, *rows.shape[1:])

    if fp8:
        recv = (move(x[0][tok]), move(x[1][tok]))
    else:
        recv = move(xs[tok])
    ridx = move(send_lidx)
    rw = move(send_w)
    cnt = torch.bincount(ridx[ridx >= 0].long(), minlength=L).to(torch.int32)
    return handle, recv, ridx, rw, cnt


def _combine_impl(buf: EPBuffer, y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Sends received rows back and sums the copies of each token in rank order."""
    S = sum(handle.send_counts)
    b = _as_bytes_rows(y)
    back = torch.empty(S, b.shape[1], dtype=torch.uint8, device=y.device)
    _a2a(buf.group, back, b, handle.send_counts, handle.recv_counts, "combine", buf.timeout)
    back = back.view(y.dtype).view(S, y.shape[1])
    acc_t = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros(handle.num_tokens, y.shape[1], dtype=acc_t, device=y.device)
    start = 0
    for c in handle.send_counts:  # NOTE: rank order; a token appears at most once per rank slice
        sl = slice(start, start + c)
        out[handle.send_token_idx[sl]] += back[sl].to(acc_t)
        start += c
    return out.to(y.dtype)


def _dispatch_rows(buf: EPBuffer, rows: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Sends ``rows[send_token_idx]`` with the handle's splits (dispatch of a gradient / of [T, *] data)."""
    R = sum(handle.recv_counts)
    src = rows[handle.send_token_idx]
    b = _as_bytes_rows(src)
    out = torch.empty(R, b.shape[1], dtype=torch.uint8, device=rows.device)
    _a2a(buf.group, out, b, handle.recv_counts, handle.send_counts, "dispatch", buf.timeout)
    return out.view(rows.dtype).view(R, *rows.shape[1:])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buf, box):
        handle, recv, ridx, rw, cnt = _dispatch_impl(buf, x, topk_idx, topk_weights)
        box["handle"] = handle
        ctx.buf, ctx.handle, ctx.w_dtype = buf, handle, topk_weights.dtype
        ctx.mark_non_differentiable(ridx, cnt)
        return recv, rw, ridx, cnt

    @staticmethod
    def backward(ctx, g_recv, g_w, _g_idx, _g_cnt):
        buf, h = ctx.buf, ctx.handle
        dx = None
        if ctx.needs_input_grad[0]:
            if g_recv is None:
                g_recv = torch.zeros(sum(h.recv_counts), buf.hidden, device=h.send_token_idx.device)
            dx = _combine_impl(buf, g_recv.contiguous(), h)
        dw = None
        if ctx.needs_input_grad[1]:
            R, S = sum(h.recv_counts), sum(h.send_counts)
            gw = g_w if g_w is not None else torch.zeros(R, h.top_k, device=h.send_token_idx.device)
            b = _as_bytes_rows(gw.float().contiguous())
            back = torch.empty(S, b.shape[1], dtype=torch.uint8, device=b.device)
            _a2a(buf.group, back, b, h.send_counts, h.recv_counts, "dispatch backward", buf.timeout)
            back = back.view(torch.float32).view(S, h.top_k)
            back = torch.where(h.slot_is_local, back, torch.zeros_like(back))
            dw = torch.zeros(h.num_tokens, h.top_k, dtype=torch.float32, device=back.device)
            dw.index_add_(0, h.send_token_idx, back)  # one local slot per (token, j): exact
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, handle, buf):
        ctx.buf, ctx.handle = buf, handle
        return _combine_impl(buf, y, handle)

    @staticmethod
    def backward(ctx, g):
        return _dispatch_rows(ctx.buf, g.contiguous(), ctx.handle), None, None
