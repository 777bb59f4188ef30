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
  any hidden size, any device torch.distributed supports. A dispatch is one small count exchange (which
  also carries each rank's call signature) and ONE byte-row all_to_all (payload | scales | local ids |
  weights); the count read-back is a host synchronization (sizes are data-dependent). A combine and each
  backward are one byte-row all_to_all.
- ``"nvlink"``: CUDA kernels that write straight into the peers' receive buffers over CUDA IPC (see
  dsmoe.parallel.nvlink); single node, CUDA only.
- ``"hierarchical"``: two hops for groups that span nodes (``ranks_per_node`` consecutive ranks per node,
  see dsmoe.parallel.hierarchical and docs/internode.md): a token crosses nodes once per destination node
  (to the same-local-rank peer), then is forwarded inside the node; combine reduces inside the node, then
  once across nodes. Same outputs as ``"collective"``, bit for bit and in the same order.

``stats()`` reports the rows and bytes this rank sent to other nodes and to other ranks of its node in the
last call (and the totals since the buffer was built), for the collective and hierarchical backends.

Collective discipline (see docs/moe.md, "Failure semantics"):
- Every rank issues the same sequence of collectives whatever its local data or autograd state: empty
  batches exchange zero rows; the backward of dispatch always returns both the row and the weight
  gradients (zeros where a rank needs neither); dispatch and combine hang on a shared autograd anchor,
  so their backward runs on every rank that runs a backward through the layer at all.
- Agreement: the first dispatch runs a handshake (hidden, num_experts, backend, world layout, buffer
  size) and every dispatch's count exchange carries (dtype, top_k, FP8 form): ranks that disagree all
  raise ValueError naming the field and each rank's value, before any payload moves.
- Timeouts: every collective is issued with ``async_op=True`` and waited with ``work.wait(timeout)``
  (``timeout`` defaults to the process group's); a dead or absent peer raises ``EPTimeoutError`` within
  it. The buffer then refuses later calls (the group's state is unknown after a failed collective).
  Argument errors are raised as they are, before any collective, never relabelled as timeouts.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist

from .. import _checks as C
from .. import _native
from .common import BACKENDS, CALL_FIELDS, COMBINE_PARTIALS, HOP1, EPConfig, EPHandle, EPTimeoutError, as_bytes_rows, \
    as_timedelta, disagreement, dtype_code, dtype_name, from_bytes, get_dispatch_layout, group_timeout, pack_rows, \
    unpack_rows
from .hierarchical import HierarchicalTransport
from .nvlink import NVLinkTransport

__all__ = ["EPConfig", "EPBuffer", "EPHandle", "EPTimeoutError", "get_dispatch_layout"]

_HANDSHAKE_MAGIC = 0x44534D4F45  # "DSMOE": a rank whose first collective is something else shows up here
_HS_FIELDS = ("magic", "hidden", "num_experts", "backend", "world_size", "max_tokens_per_rank", "group_ranks",
              "ranks_per_node", "combine_partials", "hop1")
_CALL_FIELDS = CALL_FIELDS
_STAT_KEYS = ("inter_node_rows", "inter_node_bytes", "intra_node_rows", "intra_node_bytes")


def _eager_only(fn):
    """``torch.compiler.disable(fn)``, created on first use: dispatch/combine run eagerly at a graph break
    under torch.compile (their sizes come from the peers). NOTE: lazily, because applying it at import time
    imports torch._dynamo (seconds per process); without dynamo loaded nothing can be compiling."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


_as_bytes_rows = as_bytes_rows
_from_bytes = from_bytes


def _default_ranks_per_node(backend: str, world_size: int) -> int:
    """torchrun's LOCAL_WORLD_SIZE. The collective and nvlink backends use it for ``stats()`` only: one that
    does not divide the group (a subgroup) counts the group as one node instead of failing."""
    try:
        r = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    except ValueError:
        r = 0
    if backend == "hierarchical":
        return r
    return r if r > 0 and world_size % r == 0 else 0


class EPBuffer:
    """DeepEP-style expert-parallel communication buffer (see the module docstring)."""

    def __init__(self, group, num_experts: int, hidden: int, *, backend: str = "collective",
                 max_tokens_per_rank: int = 0, num_sms: int = 20, graph_safe: bool = False,
                 timeout=None, ranks_per_node: int | None = None, combine_partials: str = "fp32",
                 hop1: str = "collective"):
        if group is None:
            group = dist.group.WORLD
        if not dist.is_initialized():
            raise RuntimeError("dsmoe.EPBuffer: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if ranks_per_node is None:
            ranks_per_node = _default_ranks_per_node(backend, self.world_size)
        self.config = EPConfig(self.world_size, num_experts, hidden, backend, max_tokens_per_rank, num_sms,
                               ranks_per_node=ranks_per_node, combine_partials=combine_partials, hop1=hop1)
        self.ranks_per_node = self.config.ranks_per_node or self.world_size
        self.num_nodes = self.world_size // self.ranks_per_node
        self.num_experts = num_experts
        self.num_local_experts = self.config.num_local_experts
        self.hidden = hidden
        self.backend = backend
        self.graph_safe = graph_safe
        # every wait (collective work, nvlink wait kernel) is bounded by this; the group's own by default
        self.timeout = group_timeout(group) if timeout is None else as_timedelta(timeout)
        self._failed: str | None = None
        self._handshake_done = False
        # NOTE: dispatch/combine take this leaf as an extra input so that their backward nodes exist (and
        # run) on every rank, whatever requires grad locally: the backward is collective.
        self._anchor = torch.zeros((), requires_grad=True)
        self._nvlink = None
        self._hier = None
        self._stats_last: dict = {"call": None, **{k: 0 for k in _STAT_KEYS}}
        self._stats_total: dict = {k: 0 for k in _STAT_KEYS}
        if backend == "nvlink" and "ep" in _native.disabled_kernels():
            # DSMOE_DISABLE_KERNELS=ep: the collective backend is the reference of the nvlink kernels. Its
            # outputs are compact, so the worst-case sized graph_safe layout has no stand-in.
            if graph_safe:
                raise RuntimeError("dsmoe.EPBuffer: DSMOE_DISABLE_KERNELS disables the ep kernels, and the nvlink "
                                   "backend's graph_safe=True layout has no reference; use graph_safe=False")
            self.backend = "collective"
        elif backend == "nvlink":
            self._nvlink = NVLinkTransport(self)  # runs the handshake first (its first collective)
        elif backend == "hierarchical":
            self._hier = HierarchicalTransport(self)  # builds the intra- and inter-node groups (collective)

    # ------------------------------------------------------------------ traffic
    def stats(self) -> dict:
        """Rows and bytes this rank sent in the last dispatch/combine (or backward) call: ``call`` (its name),
        ``inter_node_rows``/``inter_node_bytes`` (to ranks on other nodes), ``intra_node_rows``/
        ``intra_node_bytes`` (to other ranks of its node), and ``total``: the same sums since the buffer was
        built. Byte rows only (payload, scales, ids, weights, gradients); the small count exchanges and a
        rank's copies to itself are not counted. Nodes: ``ranks_per_node`` consecutive ranks. The nvlink
        backend does not record (its kernels move the rows): its stats stay at zero."""
        return {**self._stats_last, "total": dict(self._stats_total)}

    def reset_stats(self) -> None:
        self._stats_last = {"call": None, **{k: 0 for k in _STAT_KEYS}}
        self._stats_total = {k: 0 for k in _STAT_KEYS}

    def _record(self, call: str, inter_rows: int, inter_bytes: int, intra_rows: int, intra_bytes: int) -> None:
        vals = (int(inter_rows), int(inter_bytes), int(intra_rows), int(intra_bytes))
        self._stats_last = {"call": call, **dict(zip(_STAT_KEYS, vals))}
        for k, v in zip(_STAT_KEYS, vals):
            self._stats_total[k] += v

    def _record_flat(self, call: str, rows_to_rank, width: int) -> None:
        """A one-hop exchange: ``rows_to_rank[d]`` rows of ``width`` bytes to each group rank d."""
        R, me = self.ranks_per_node, self.rank
        inter = sum(int(c) for d, c in enumerate(rows_to_rank) if d // R != me // R)
        intra = sum(int(c) for d, c in enumerate(rows_to_rank) if d // R == me // R and d != me)
        self._record(call, inter, inter * width, intra, intra * width)

    # ------------------------------------------------------------------ agreement
    def _handshake_row(self) -> list[int]:
        ranks = dist.get_process_group_ranks(self.group)
        h = 0
        for r in ranks:  # order-sensitive digest of the world layout (global ranks of the group members)
            h = (h * 1000003 + r + 1) % (1 << 61)
        cfg = self.config
        return [_HANDSHAKE_MAGIC, cfg.hidden, cfg.num_experts, BACKENDS.index(self.backend), cfg.world_size,
                cfg.max_tokens_per_rank if self.backend == "nvlink" or cfg.hop1 == "symm_mem" else 0, h,
                cfg.ranks_per_node, COMBINE_PARTIALS.index(cfg.combine_partials), HOP1.index(cfg.hop1)]

    def _handshake(self, device, what: str = "dispatch") -> None:
        """First call: every rank gathers every rank's structural config; any difference raises ValueError
        on every rank. Both backends run it as their first collective (same form), so a backend mismatch
        is caught too."""
        if self._handshake_done:
            return
        mine = torch.tensor(self._handshake_row(), dtype=torch.int64, device=device)
        got = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(got, mine, group=self.group, async_op=True), f"{what} (first-call handshake)")
        rows = [g.tolist() for g in got]
        diff = disagreement(rows, _HS_FIELDS, {"backend": lambda v: BACKENDS[v] if 0 <= v < len(BACKENDS) else v,
                                               "combine_partials": lambda v: COMBINE_PARTIALS[v],
                                               "hop1": lambda v: HOP1[v]})
        if diff:
            raise ValueError(f"dsmoe.EPBuffer: the ranks of the group disagree on the configuration ({diff}); every "
                             f"rank must build its EPBuffer with the same num_experts, hidden, backend, group and "
                             f"node layout")
        self._handshake_done = True

    # ------------------------------------------------------------------ collectives
    def _check_usable(self, what):
        if self._failed is not None:
            raise EPTimeoutError(f"dsmoe.EPBuffer.{what}: an earlier collective of this buffer failed ({self._failed}); "
                                 f"the process group is in an unknown state: rebuild it and the buffer")

    def _wait(self, issue, what):
        """Runs ``issue()`` (an async collective) and waits for it within the timeout. Communication failures
        become EPTimeoutError and poison the buffer; ValueError/TypeError (arguments) pass unchanged."""
        self._check_usable(what)
        try:
            work = issue()
            ok = work.wait(self.timeout)
        except (ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own type
            self._failed = f"{what}: {type(e).__name__}: {str(e)[:200]}"
            raise EPTimeoutError(f"dsmoe.EPBuffer.{what}: collective failed or timed out after {self.timeout} (a peer "
                                 f"died, diverged or did not call): {e}") from e
        if ok is False:
            self._failed = f"{what}: timed out"
            raise EPTimeoutError(f"dsmoe.EPBuffer.{what}: collective did not complete within {self.timeout}")

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str) -> torch.Tensor:
        if out_splits is not None:
            if len(out_splits) != self.world_size or len(in_splits) != self.world_size or \
                    sum(out_splits) != out.shape[0] or sum(in_splits) != inp.shape[0]:
                raise ValueError(f"dsmoe.EPBuffer.{what}: split sizes {list(in_splits)} -> {list(out_splits)} do not "
                                 f"match {inp.shape[0]} -> {out.shape[0]} rows over {self.world_size} ranks")
        elif out.shape[0] % self.world_size or out.shape != inp.shape:
            raise ValueError(f"dsmoe.EPBuffer.{what}: even all_to_all needs equal [W*n, ...] tensors, got "
                             f"{tuple(inp.shape)} -> {tuple(out.shape)}")
        inp = inp.contiguous()
        self._wait(lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True),
                   what)
        return out

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor):
        self._check_topk(topk_idx, "get_dispatch_layout")
        return get_dispatch_layout(topk_idx, self.num_experts, self.world_size, validate=False)

    def _check_topk(self, topk_idx, op, topk_weights=None, num_tokens=None):
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64) or topk_idx.dim() != 2:
            raise TypeError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx' must be an int32/int64 tensor [T, k], got "
                            f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {tuple(getattr(topk_idx, 'shape', ()))}")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx' must have {num_tokens} rows (one per token), "
                             f"got shape {tuple(topk_idx.shape)}")
        # NOTE: graph_safe never reads values back (a host sync): out-of-range ids are then dropped by the
        # layout and reported by the nvlink status word (check_error), see nvlink.py.
        sync_free = self.graph_safe and self.backend == "nvlink"
        if topk_idx.numel() and not sync_free and C.can_read_device_values(topk_idx):
            lo, hi = int(topk_idx.min()), int(topk_idx.max())
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_idx': values must be in [-1, {self.num_experts}), "
                                 f"got range [{lo}, {hi}]")
        if topk_weights is not None and (not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape
                                         or not topk_weights.dtype.is_floating_point):
            raise ValueError(f"dsmoe.EPBuffer.{op}: argument 'topk_weights' must be a float tensor of shape "
                             f"{tuple(topk_idx.shape)}, got {tuple(getattr(topk_weights, 'shape', ()))}")
        if topk_weights is not None and topk_weights.device != topk_idx.device:
            raise ValueError(f"dsmoe.EPBuffer.{op}: 'topk_idx' and 'topk_weights' must be on one device, got "
                             f"{topk_idx.device} and {topk_weights.device}")

    # ------------------------------------------------------------------ dispatch
    @_eager_only
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        """``x [T, H]`` or ``(x_fp8 [T, H], scales [T, H/128])`` -> ``(recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert, handle)``. Differentiable in x and the weights
        (not for FP8 input). Under torch.compile it runs eagerly (a graph break: its sizes come from peers)."""
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        if not isinstance(xs, torch.Tensor) or xs.dim() != 2 or xs.shape[1] != self.hidden:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x' must be [T, {self.hidden}], got "
                             f"{tuple(getattr(xs, 'shape', ()))}")
        if fp8:
            if xs.dtype != torch.float8_e4m3fn or self.hidden % 128:
                raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x': the FP8 form takes float8_e4m3fn [T, H] with H a "
                                 f"multiple of 128, got {xs.dtype} H={self.hidden}")
            if not isinstance(x[1], torch.Tensor) or x[1].shape != (xs.shape[0], self.hidden // 128) or \
                    x[1].dtype != torch.float32:
                raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x' scales must be fp32 {(xs.shape[0], self.hidden // 128)}, "
                                 f"got {getattr(x[1], 'dtype', None)} {tuple(getattr(x[1], 'shape', ()))}")
        elif not xs.dtype.is_floating_point or xs.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise TypeError(f"dsmoe.EPBuffer.dispatch: argument 'x' must be a float tensor (or the (fp8, scales) "
                            f"pair), got {xs.dtype}")
        self._check_topk(topk_idx, "dispatch", topk_weights, xs.shape[0])
        if topk_idx.device != xs.device:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: 'x' and 'topk_idx' must be on one device, got {xs.device} "
                             f"and {topk_idx.device}")
        self._check_usable("dispatch")
        if self._nvlink is not None:
            return self._nvlink.dispatch(x, topk_idx, topk_weights)
        self._handshake(xs.device)
        if fp8:
            handle, (rq, rs), ridx, rw, cnt = _dispatch_impl(self, (x[0], x[1]), topk_idx, topk_weights)
            return (rq, rs), ridx, rw, cnt, handle
        box = {}
        recv_x, recv_w, ridx, cnt = _Dispatch.apply(x, topk_weights, self._anchor, topk_idx, self, box)
        return recv_x, ridx, recv_w, cnt, box["handle"]

    @_eager_only
    def combine(self, y: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """``y [R, H]`` (rows as dispatch delivered them, in the dispatch's dtype; bfloat16 after an FP8
        dispatch) -> ``out [T, H]``: the per-rank copies of each token summed in rank order (fp32
        accumulation, y's dtype). Differentiable."""
        if not isinstance(handle, EPHandle):
            raise TypeError(f"dsmoe.EPBuffer.combine: argument 'handle' must be the EPHandle of a dispatch, got "
                            f"{type(handle).__name__}")
        R = sum(handle.recv_counts)
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != R or y.shape[1] != self.hidden:
            raise ValueError(f"dsmoe.EPBuffer.combine: argument 'y' must be [{R}, {self.hidden}] (the received rows), "
                             f"got {tuple(getattr(y, 'shape', ()))}")
        if y.dtype != handle.dtype:
            # NOTE: the row size on the wire follows the dtype; every rank holds the same handle dtype (agreed
            # at dispatch), so requiring it keeps the ranks' byte counts equal.
            raise TypeError(f"dsmoe.EPBuffer.combine: argument 'y' must have the dispatch's dtype {handle.dtype} "
                            f"(every rank sends rows of that size), got {y.dtype}")
        self._check_usable("combine")
        if self._nvlink is not None:
            return self._nvlink.combine(y, handle)
        return _Combine.apply(y, self._anchor, handle, self)

    def check_error(self) -> None:
        """nvlink backend: raises what the device status word reports (a peer timed out: EPTimeoutError;
        invalid topk ids or ranks that disagree in graph-safe mode: ValueError). A host sync; call it outside
        graph capture, e.g. after a step. No-op for the collective backend (it raises at the call)."""
        if self._nvlink is not None:
            self._nvlink.check_error()

    def close(self) -> None:
        """Releases the nvlink backend's CUDA IPC buffer. Collective: every rank calls it (it synchronizes
        the GPU and the group so no peer still maps or writes the memory). Captured CUDA graphs that replay
        after close() do nothing and return NaN (see nvlink.py). No-op for ``collective``."""
        if self._nvlink is not None:
            self._nvlink.close()  # later dispatch/combine calls raise


def _exchange_signature(buf: EPBuffer, send_counts: torch.Tensor, sig: list[int], what: str) -> list[int]:
    """The count exchange: row d = [rows to d, *signature]. Returns the counts received; raises ValueError on
    every rank when any rank's signature differs (each rank receives every rank's signature)."""
    W = buf.world_size
    mine = torch.tensor(sig, dtype=torch.int64, device=send_counts.device)
    send = torch.cat([send_counts.to(torch.int64).view(W, 1), mine.view(1, -1).expand(W, -1)], 1).contiguous()
    recv = torch.empty_like(send)
    buf._a2a(recv, send, None, None, what)
    rows = recv.tolist()
    diff = disagreement([r[1:] for r in rows], _CALL_FIELDS, {"dtype": dtype_name})
    if diff:
        raise ValueError(f"dsmoe.EPBuffer.{what}: the ranks disagree on this call ({diff}); every rank must dispatch "
                         f"the same dtype, top_k and form")
    return [r[0] for r in rows]


def _dispatch_impl(buf: EPBuffer, x, topk_idx, topk_weights):
    if buf._hier is not None:
        return buf._hier.dispatch(x, topk_idx, topk_weights)
    W, L = buf.world_size, buf.num_local_experts
    fp8 = isinstance(x, tuple)
    xs = x[0] if fp8 else x
    dev = xs.device
    T, k = topk_idx.shape
    idx = topk_idx.long()
    _, _, in_rank = get_dispatch_layout(topk_idx, buf.num_experts, W, validate=False)  # checked by dispatch
    # rows grouped by destination rank, tokens ascending inside
    dest, tok = in_rank.t().nonzero(as_tuple=True)
    send_counts = torch.bincount(dest, minlength=W)
    send_idx = idx[tok]  # [S, k] global ids
    local = (send_idx >= 0) & (send_idx // L == dest.unsqueeze(1))
    send_lidx = torch.where(local, send_idx - dest.unsqueeze(1) * L, torch.full_like(send_idx, -1)).to(torch.int32)
    send_w = torch.where(local, topk_weights[tok].float(), torch.zeros((), dtype=torch.float32, device=dev))
    sig = [dtype_code(xs.dtype), k, int(fp8)]
    rc = _exchange_signature(buf, send_counts, sig, "dispatch")
    sc = send_counts.tolist()
    R = sum(rc)
    handle = EPHandle(T, tok, sc, rc, local, k, torch.bfloat16 if fp8 else xs.dtype)
    # ONE byte row per (token, destination): payload | scales (FP8) | local ids | weights
    rows, widths = pack_rows(xs[tok], x[1][tok] if fp8 else None, send_lidx, send_w)
    out = torch.empty(R, sum(widths), dtype=torch.uint8, device=dev)
    buf._a2a(out, rows, rc, sc, "dispatch")
    buf._record_flat("dispatch", sc, sum(widths))
    recv, ridx, rw = unpack_rows(out, widths, xs.dtype, buf.hidden, k)
    cnt = torch.bincount(ridx[ridx >= 0].long(), minlength=L).to(torch.int32)
    return handle, recv, ridx, rw, cnt


def _sum_back(back: torch.Tensor, handle: EPHandle, acc_t) -> torch.Tensor:
    out = torch.zeros(handle.num_tokens, back.shape[1], dtype=acc_t, device=back.device)
    start = 0
    for c in handle.send_counts:  # NOTE: rank order; a token appears at most once per rank slice
        sl = slice(start, start + c)
        out.index_add_(0, handle.send_token_idx[sl], back[sl].to(acc_t))
        start += c
    return out


def _combine_impl(buf: EPBuffer, y: torch.Tensor, handle: EPHandle, gw: torch.Tensor | None = None, what="combine"):
    """Sends received rows back and sums the copies of each token in rank order. With ``gw`` (fp32
    ``[R, k]``, the dispatch backward) the rows carry the weight gradients too: returns ``(out, dw fp32 [T, k])``."""
    if buf._hier is not None:
        return buf._hier.combine(y, handle, gw, what)
    S = sum(handle.send_counts)
    H, k = y.shape[1], handle.top_k
    b = _as_bytes_rows(y)
    if gw is not None:
        b = torch.cat([b, _as_bytes_rows(gw.float())], 1)
    back = torch.empty(S, b.shape[1], dtype=torch.uint8, device=y.device)
    buf._a2a(back, b, handle.send_counts, handle.recv_counts, what)
    buf._record_flat(what, handle.recv_counts, b.shape[1])
    vals = _from_bytes(back, 0, H * y.element_size(), y.dtype, H)
    acc_t = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = _sum_back(vals, handle, acc_t).to(y.dtype)
    if gw is None:
        return out
    wb = _from_bytes(back, H * y.element_size(), b.shape[1], torch.float32, k)
    wb = torch.where(handle.slot_is_local, wb, torch.zeros_like(wb))
    dw = torch.zeros(handle.num_tokens, k, dtype=torch.float32, device=y.device)
    dw.index_add_(0, handle.send_token_idx, wb)  # one local slot per (token, j): exact
    return out, dw


def _dispatch_rows(buf: EPBuffer, rows: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Sends ``rows[send_token_idx]`` with the handle's splits (dispatch of a gradient / of [T, *] data)."""
    if buf._hier is not None:
        return buf._hier.dispatch_rows(rows, handle)
    R = sum(handle.recv_counts)
    b = _as_bytes_rows(rows[handle.send_token_idx])
    out = torch.empty(R, b.shape[1], dtype=torch.uint8, device=rows.device)
    buf._a2a(out, b, handle.recv_counts, handle.send_counts, "combine backward")
    buf._record_flat("combine backward", handle.send_counts, b.shape[1])
    return out.view(rows.dtype).view(R, *rows.shape[1:])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, _anchor, topk_idx, buf, box):
        handle, recv, ridx, rw, cnt = _dispatch_impl(buf, x, topk_idx, topk_weights)
        box["handle"] = handle
        ctx.buf, ctx.handle, ctx.w_dtype = buf, handle, topk_weights.dtype
        ctx.mark_non_differentiable(ridx, cnt)
        return recv, rw, ridx, cnt

    @staticmethod
    def backward(ctx, g_recv, g_w, _g_idx, _g_cnt):
        buf, h = ctx.buf, ctx.handle
        dev = h.send_token_idx.device
        R = sum(h.recv_counts)
        # NOTE: both gradients always travel (zeros when absent or not needed here): every rank must run the
        # same collective with the same row size, whatever its own autograd graph needs.
        g = g_recv.to(h.dtype) if g_recv is not None else torch.zeros(R, buf.hidden, dtype=h.dtype, device=dev)
        gw = g_w.float() if g_w is not None else torch.zeros(R, h.top_k, dtype=torch.float32, device=dev)
        dx, dw = _combine_impl(buf, g.contiguous(), h, gw.contiguous(), "dispatch backward")
        return (dx if ctx.needs_input_grad[0] else None), (dw.to(ctx.w_dtype) if ctx.needs_input_grad[1] else None), \
            None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, _anchor, handle, buf):
        ctx.buf, ctx.handle = buf, handle
        return _combine_impl(buf, y, handle)

    @staticmethod
    def backward(ctx, g):
        h = ctx.handle
        dy = _dispatch_rows(ctx.buf, g.to(h.dtype).contiguous(), h)
        return (dy if ctx.needs_input_grad[0] else None), None, None, None
