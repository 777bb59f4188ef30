"""The pipeline executor: runs a rank's program (:mod:`.schedule`) with point-to-point transfers
between neighbouring stages, the deferred weight gradients of :class:`WeightGradStore`, and the
optional ``overlapped_forward_backward`` hook of the stage modules.

Transfers: every received tensor has one of the shapes given to :func:`set_p2p_tensor_shapes` and the
dtype of :func:`set_p2p_tensor_dtype` (activations forward, their gradients backward). Each message
carries a tag built from (direction, path, chunk), but NCCL ignores tags, matches a channel's (sender,
receiver) messages strictly in posting order, and runs all p2p operations of a pair of ranks in
posting order on one stream. Invariant: both ranks of a pair post the pair's messages (both
directions) in one common order, :func:`pair_order`, each rank its own end of each (a send once the
chunk is computed, a receive when an op needs it or an earlier operation of the pair is due); so the
operations at the heads of the two ranks' streams are always the two ends of one message. Both ranks
compute that order alike (from the programs, deterministic in schedule, PP, num_chunks and grad mode,
which the handshake checks); it is the order in which a replay of all ranks sends the messages, so a
message never waits for one placed after it. Sends are waited at the end of the step. Checked on CPU
against a model of NCCL's matching and stream order and on gloo with every tag 0; not run on GPUs.

Failures: every step starts with a handshake (one small all-gather over the pipeline group) on the
schedule, the rank layout, ``num_chunks``, the p2p shapes/dtype and the grad mode, and on whether each
rank's own argument checks passed: a disagreement, or a bad argument on any rank, raises on every rank
before any transfer. Every transfer is waited at most ``timeout`` (the process group's by default): a
peer that raises mid-step, dies or stops raises :class:`PipelineTimeoutError` on the ranks waiting for
it within that time, and the failed pipeline refuses further steps (its group holds unmatched transfers).
"""
from __future__ import annotations

import functools
import queue
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..common import as_timedelta, disagreement, dtype_code, dtype_name, group_timeout, wait_within
from .schedule import PROGRAMS, Op, Topology

__all__ = ["PipelineTimeoutError", "WeightGradStore", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype", "run_backward",
           "scatter", "gather", "PipelineSchedule"]

_P2P = {"shapes": None, "dtype": None}
_LOOKAHEAD = 2   # ops whose receives are posted before the current op runs
_TAGGED = True   # False: every message has tag 0 (the tests match by order alone, as NCCL does)


class PipelineTimeoutError(RuntimeError):
    """A pipeline transfer failed or timed out: a peer raised, died, or runs a different step."""


_KINDS = ("1f1b", "dualpipe", "dualpipev")
_HS_MAGIC = 0x5050_4950   # tells a pipeline handshake from another collective a diverged peer may be in
_HS_FIELDS = ("handshake", "schedule", "pipeline size", "rank layout", "num_chunks", "p2p dtype", "p2p shapes",
              "grad mode", "batch_dim")


def _digest(values) -> int:
    h = 0
    for v in values:
        h = (h * 1000003 + int(v) + 1) % (1 << 61)
    return h


def program(kind: str, pp: int, rank: int, num_chunks: int, forward_only: bool) -> list:
    """The ops a rank runs in one step (a forward-only step keeps the forward halves)."""
    prog = PROGRAMS[kind](pp, rank, num_chunks)
    if forward_only:
        prog = [Op("F", o.slot, o.chunk) if o.kind == "FB" else o for o in prog if o.kind in ("F", "FB")]
    return prog


def op_parts(op: Op, forward_only: bool) -> list:
    """``(kind, slot, chunk)`` of each forward/backward an op computes, in the order it computes them (an
    FB op: its forward, then its backward): what it receives before and sends after."""
    parts = []
    if op.kind in ("F", "FB"):
        parts.append(("F", op.slot, op.chunk))
    if op.kind == "B":
        parts.append(("B", op.slot, op.chunk))
    if op.kind == "FB" and not forward_only:
        parts.append(("B", op.slot_b, op.chunk_b))
    return parts


def send_order(topo: Topology, prog: list, rank: int, forward_only: bool) -> list:
    """``(kind, slot, chunk, peer)`` of every message ``rank`` sends, in the order the executor posts them
    (a chunk's send follows its compute; an FB op sends its forward's output before its backward's)."""
    out = []
    for op in prog:
        for kind, slot, chunk in op_parts(op, forward_only):
            peer = topo.next(rank, slot) if kind == "F" else topo.prev(rank, slot)
            if peer is not None and peer[0] != rank:
                out.append((kind, slot, chunk, peer[0]))
    return out


@functools.lru_cache(maxsize=64)
def pair_order(kind: str, pp: int, num_chunks: int, forward_only: bool) -> dict:
    """``{(a, b): [(src, kind, src_slot, chunk), ...]}`` for each pair of neighbouring ranks a < b: every
    message between them, both directions, in one order both ranks compute alike. The order is the one
    in which a replay of all ranks sends them (each rank runs its ops while the receives they need have
    been sent; ranks in turn), so it respects every data dependency: a message's sender never needs,
    to compute it, a message that comes later in the order."""
    topo = Topology(kind, pp)
    progs = [program(kind, pp, r, num_chunks, forward_only) for r in range(pp)]
    sent: set = set()
    order: dict = {}
    pc = [0] * pp

    def needed(r, op):
        for k, slot, chunk in op_parts(op, forward_only):
            peer = topo.prev(r, slot) if k == "F" else topo.next(r, slot)
            if peer is not None and peer[0] != r:
                yield (peer[0], k, peer[1], chunk)

    moved = True
    while moved:
        moved = False
        for r in range(pp):
            while pc[r] < len(progs[r]) and all(m in sent for m in needed(r, progs[r][pc[r]])):
                for k, slot, chunk, dst in send_order(topo, [progs[r][pc[r]]], r, forward_only):
                    sent.add((r, k, slot, chunk))
                    order.setdefault((min(r, dst), max(r, dst)), []).append((r, k, slot, chunk))
                pc[r] += 1
                moved = True
    if any(pc[r] < len(progs[r]) for r in range(pp)):
        raise RuntimeError(f"pipeline: the {kind} programs (PP={pp}, num_chunks={num_chunks}) deadlock")
    return order


def channel_ops(kind: str, pp: int, rank: int, num_chunks: int, forward_only: bool) -> dict:
    """``{peer: [("send" | "recv", kind, slot, chunk), ...]}``: the p2p operations ``rank`` posts to each
    neighbour, in :func:`pair_order` (``slot`` is this rank's). The peer's list is the same messages in
    the same order with send and receive swapped."""
    topo = Topology(kind, pp)
    out = {}
    for (a, b), msgs in pair_order(kind, pp, num_chunks, forward_only).items():
        if rank not in (a, b):
            continue
        peer = b if rank == a else a
        ops = out.setdefault(peer, [])
        for src, k, slot, chunk in msgs:
            if src == rank:
                ops.append(("send", k, slot, chunk))
            else:
                mine = topo.next(src, slot) if k == "F" else topo.prev(src, slot)
                ops.append(("recv", k, mine[1], chunk))
    return out


def set_p2p_tensor_shapes(shapes) -> None:
    """Shapes of the tensors a stage sends to the next one (and of their gradients), one per output."""
    ok = isinstance(shapes, (list, tuple)) and len(shapes) > 0 and all(
        isinstance(s, (list, tuple, torch.Size)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
        for s in shapes)
    if not ok:
        raise ValueError(f"set_p2p_tensor_shapes: argument 'shapes' must be a non-empty list of shapes (tuples of "
                         f"ints >= 0), got {shapes!r}")
    _P2P["shapes"] = [tuple(s) for s in shapes]


def set_p2p_tensor_dtype(dtype) -> None:
    """dtype of the tensors exchanged between stages."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"set_p2p_tensor_dtype: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")
    _P2P["dtype"] = dtype


class WeightGradStore:
    """Deferred weight gradients (the zero-bubble split). A stage's autograd function calls
    ``WeightGradStore.put(fn)`` instead of computing its weight gradient when ``enabled`` is True; the
    executor turns it on for the backward chunks the schedule splits, ``flush()``es their functions as
    one group and ``pop()``s the oldest group where the schedule places a W chunk."""

    enabled: bool = False
    cache: list = []
    funcs_queue: queue.Queue = queue.Queue()

    @classmethod
    def put(cls, func: Callable) -> None:
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no deferred weight gradients (a W chunk without a split backward)")
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def run_backward(tensors, grad_tensors) -> None:
    """Backward from ``tensors`` with ``grad_tensors`` (pairs whose gradient is None are skipped)."""
    pairs = [(t, g) for t, g in zip(tensors, grad_tensors) if g is not None and t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def scatter(inputs, chunks: int, dim: int, what: str = "inputs") -> list:
    """``inputs`` (a tensor or a sequence of tensors/None) -> ``chunks`` tuples of micro-batch slices."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    parts = []
    for i, x in enumerate(inputs):
        if x is None:
            parts.append([None] * chunks)
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"step: argument '{what}'[{i}] must be a tensor or None, got {type(x).__name__}")
        if x.dim() <= dim or x.shape[dim] % chunks:
            raise ValueError(f"step: argument '{what}'[{i}] of shape {tuple(x.shape)} must split into {chunks} equal "
                             f"micro-batches along batch_dim={dim} (num_chunks and the batch size)")
        parts.append(list(x.tensor_split(chunks, dim=dim)))
    return [tuple(p[c] for p in parts) for c in range(chunks)]


def gather(chunks_out: list, dim: int) -> tuple:
    """Per-chunk outputs (tensors or sequences of tensors) -> a tuple with one concatenated tensor per
    output (a tuple even for one output, as the step's callers unpack it)."""
    chunks_out = [(c,) if isinstance(c, torch.Tensor) else c for c in chunks_out]
    return tuple(torch.cat(col, dim=dim) for col in zip(*chunks_out))


def _as_list(outputs, where: str) -> list:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in outputs):
        return list(outputs)
    raise TypeError(f"{where}: a pipeline stage must return a tensor or a tuple/list of tensors, got {type(outputs).__name__}")


class PipelineSchedule(nn.Module):
    """Shared executor; :class:`DualPipe`, :class:`DualPipeV` and :class:`OneFOneB` choose the schedule."""

    kind = ""
    n_modules = 2

    def __init__(self, modules, batch_dim: int = 0, process_group=None, rank_mapping=None, *, timeout=None) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(modules, nn.Module) and self.n_modules == 1 and not isinstance(modules, (nn.ModuleList, nn.Sequential)):
            modules = (modules,)
        modules = tuple(modules) if isinstance(modules, (list, tuple, nn.ModuleList, nn.Sequential)) else None
        if modules is None or len(modules) != self.n_modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"{name}: argument 'modules' must be {self.n_modules} nn.Module(s) "
                             f"({self._modules_doc()}), got {modules!r}")
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool) or batch_dim < 0:
            raise ValueError(f"{name}: argument 'batch_dim' must be an int >= 0, got {batch_dim!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name}: torch.distributed is not initialized (launch with torchrun and call "
                               f"dist.init_process_group first)")
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        self.group = process_group if process_group is not None else dist.group.WORLD
        # every transfer and the handshake wait at most this long (seconds or a timedelta)
        self.timeout = group_timeout(self.group) if timeout is None else as_timedelta(timeout, name)
        self._failed: str | None = None
        self._orphans: list = []   # transfers left in flight by a failed step: their buffers must outlive them
        n = dist.get_world_size(self.group)
        if rank_mapping is None:
            rank_mapping = list(range(n))
        if not isinstance(rank_mapping, (list, tuple)) or sorted(rank_mapping) != list(range(n)):
            raise ValueError(f"{name}: argument 'rank_mapping' must be a permutation of range({n}) (pipeline rank of "
                             f"each process-group rank), got {rank_mapping!r}")
        self._check_size(n)
        self.num_ranks = n
        self.rank = rank_mapping[dist.get_rank(self.group)]
        inverse = [0] * n
        for g, p in enumerate(rank_mapping):
            inverse[p] = g
        # global rank of each pipeline rank (p2p calls take global ranks)
        self._global = [dist.get_global_rank(self.group, inverse[p]) if self.group is not dist.group.WORLD else inverse[p]
                        for p in range(n)]
        self.topo = Topology(self.kind, n)
        self.is_first_rank, self.is_last_rank = self.rank == 0, self.rank == n - 1
        m0 = modules[0]
        self.overlapped_forward_backward = (len(modules) == 2 and type(m0) is type(modules[1])
                                            and hasattr(type(m0), "overlapped_forward_backward"))
        self.record_timeline = False   # True: self.timeline gets (op, start, end) per op of the last step
        self.timeline: list = []
        self.p2p_log: list = []   # ("send"/"recv", peer, kind, path, chunk, shapes) per message of the last step, in posting order
        self._layout = _digest(self._global)

    # ------------------------------------------------------------------ per-schedule
    def _modules_doc(self) -> str:
        return ""

    def _check_size(self, n: int) -> None:
        pass

    def _check_chunks(self, num_chunks: int) -> None:
        pass

    def _feeds(self, num_chunks: int):
        """``(slot fed by this rank's inputs or None, micro-batches per fed path, slot whose last stage
        computes the loss here or None)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ step
    def step(self, *inputs, num_chunks: int = 0, criterion: Callable | None = None, labels=(),
             return_outputs: bool = False):
        """Runs one training step (or a forward-only one under ``torch.no_grad()``) over ``num_chunks``
        micro-batches. Returns ``(loss, outputs)``: the stacked per-chunk losses and the concatenated
        outputs on the ranks that hold a last stage (``None`` elsewhere and for what was not asked)."""
        name = f"{type(self).__name__}.step"
        if self._failed is not None:
            raise PipelineTimeoutError(f"{name}: an earlier step of this pipeline failed ({self._failed}); its "
                                       f"process group holds unmatched transfers: rebuild the group and the pipeline")
        if isinstance(labels, torch.Tensor):
            labels = (labels,)
        self.forward_only = not torch.is_grad_enabled()
        # NOTE: argument errors are held until every rank has joined the handshake: a rank that raised
        # alone would leave its peers waiting for its first transfer
        local_error = None
        try:
            loss_slot, first_inputs, chunk_labels = self._check_step(name, inputs, num_chunks, criterion, labels)
        except (ValueError, TypeError, RuntimeError) as e:
            local_error = e
        self._handshake(name, num_chunks, local_error)
        self._reset()
        self.return_outputs = return_outputs
        self.criterion = criterion
        self.first_inputs, self.labels = first_inputs, chunk_labels
        prog = program(self.kind, self.num_ranks, self.rank, num_chunks, self.forward_only)
        self.timeline = []
        self.p2p_log = []
        # per neighbour, the p2p operations in the pair's common order, and how many are posted
        self._chan = channel_ops(self.kind, self.num_ranks, self.rank, num_chunks, self.forward_only)
        self._cursor = {p: 0 for p in self._chan}
        try:
            for i, op in enumerate(prog):
                for nxt in prog[i: i + 1 + _LOOKAHEAD]:
                    self._post_recvs(nxt)
                t0 = time.perf_counter()
                self._run(op)
                if self.record_timeline:
                    self.timeline.append((op, t0, time.perf_counter()))
            left = {p: ops[self._cursor[p]:] for p, ops in self._chan.items() if self._cursor[p] < len(ops)}
            if left:
                raise RuntimeError(f"{name}: pipeline rank {self.rank} never posted {left} (a schedule defect)")
            while self.sends:
                work, _buf, what = self.sends[0]
                self._wait(work, what)
                self.sends.pop(0)
            if not self.forward_only and not WeightGradStore.funcs_queue.empty():
                raise RuntimeError(f"{name}: deferred weight gradients left after the schedule (WeightGradStore)")
        except BaseException as e:
            # the peers now wait for transfers this rank will never make: they time out (bounded); this
            # pipeline keeps the in-flight buffers alive and refuses further steps
            self._failed = f"pipeline rank {self.rank}: {type(e).__name__}: {str(e)[:200]}"
            self._orphans.append((self.recvs, self.sends))
            self.recvs, self.sends = {}, []
            raise
        finally:
            WeightGradStore.clear()
        loss = outputs = None
        if loss_slot is not None:
            if criterion is not None:
                loss = torch.stack([l.detach() for l in self.losses])
            if return_outputs:
                outputs = gather(self.last_outputs, self.batch_dim)
                if len(outputs) == 1:
                    outputs = outputs[0]
        self._reset()
        return loss, outputs

    def _check_step(self, name, inputs, num_chunks, criterion, labels):
        """``(loss slot, per-chunk inputs, per-chunk labels)`` of this rank, or the argument error."""
        if _P2P["shapes"] is None or _P2P["dtype"] is None:
            raise RuntimeError(f"{name}: call set_p2p_tensor_shapes and set_p2p_tensor_dtype before a step")
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks <= 0:
            raise ValueError(f"{name}: argument 'num_chunks' must be an int > 0, got {num_chunks!r}")
        self._check_chunks(num_chunks)
        feed_slot, n_feed, loss_slot = self._feeds(num_chunks)
        if feed_slot is not None and (len(inputs) == 0 or all(x is None for x in inputs)):
            raise ValueError(f"{name}: pipeline rank {self.rank} holds a first stage: it needs the inputs")
        if loss_slot is not None and not self.forward_only and criterion is None:
            raise ValueError(f"{name}: pipeline rank {self.rank} holds a last stage: a training step needs 'criterion'")
        first_inputs = scatter(inputs, n_feed, self.batch_dim, "inputs") if feed_slot is not None else None
        chunk_labels = None
        if loss_slot is not None:
            chunk_labels = scatter(labels, n_feed, self.batch_dim, "labels") if len(labels) else [()] * n_feed
        return loss_slot, first_inputs, chunk_labels

    def _handshake(self, name, num_chunks, local_error):
        """Every rank's step signature and argument-check outcome, gathered; raises on every rank if one
        rank's arguments were rejected or the ranks disagree."""
        shapes, dtype = _P2P["shapes"] or [], _P2P["dtype"]
        nc = num_chunks if isinstance(num_chunks, int) and not isinstance(num_chunks, bool) else -1
        row = [_HS_MAGIC, _KINDS.index(self.kind), self.num_ranks, self._layout, nc,
               dtype_code(dtype) if dtype is not None else -1,
               _digest([len(shapes)] + [d for sh in shapes for d in (len(sh), *sh)]), int(self.forward_only),
               self.batch_dim, int(local_error is not None)]
        mine = torch.tensor(row, dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            mine = mine.to(self._device())
        got = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        try:
            wait_within(dist.all_gather(got, mine, group=self.group, async_op=True), self.timeout,
                        PipelineTimeoutError, f"{name}: the pipeline's step handshake")
        except PipelineTimeoutError as e:
            self._failed = str(e)[:300]
            raise
        if local_error is not None:
            raise local_error
        rows = [g.tolist() for g in got]
        bad = [r for r, rw in enumerate(rows) if rw[-1]]
        if bad:
            raise ValueError(f"{name}: process-group rank(s) {bad} rejected their step arguments (their errors say "
                             f"why); no rank ran the step")
        diff = disagreement([rw[:-1] for rw in rows], _HS_FIELDS,
                            {"schedule": lambda v: _KINDS[v] if 0 <= v < len(_KINDS) else v,
                             "p2p dtype": dtype_name,
                             "grad mode": lambda v: "no_grad" if v else "training"})
        if diff:
            raise ValueError(f"{name}: the ranks of the pipeline disagree on the step ({diff}); every rank must run "
                             f"the same schedule over the same group with the same num_chunks, set_p2p_tensor_shapes/"
                             f"dtype, batch_dim and grad mode (local: num_chunks={num_chunks!r}, p2p shapes={shapes}, "
                             f"dtype={dtype})")

    def _reset(self):
        WeightGradStore.clear()
        self.inputs = [{}, {}]
        self.outputs = [{}, {}]
        self.out_grads = [{}, {}]
        self.recvs = {}
        self.sends = []
        self._chan, self._cursor, self._ready, self._posted = {}, {}, {}, set()
        self.losses, self.last_outputs = [], []
        self.first_inputs = self.labels = None
        self.criterion = None

    # ------------------------------------------------------------------ transfers
    def _tag(self, kind: str, slot: int, chunk: int) -> int:
        path = self.topo.where[(self.rank, slot)][0]
        return (chunk * 2 + (kind == "B")) * 2 + path if _TAGGED else 0

    def _tag_path(self, slot):
        return self.topo.where[(self.rank, slot)][0]

    def _post_recvs(self, op: Op):
        for kind, slot, chunk in op_parts(op, self.forward_only):
            self._post_recv(kind, slot, chunk)

    def _post_recv(self, kind, slot, chunk):
        key = (kind, slot, chunk)
        if key in self.recvs:
            return
        peer = self.topo.prev(self.rank, slot) if kind == "F" else self.topo.next(self.rank, slot)
        if peer is None or peer[0] == self.rank:
            return
        self._advance(peer[0], ("recv", kind, slot, chunk))

    def _advance(self, peer, target):
        """Posts this pair's next operations in their common order up to ``target`` (stopping early at a
        send not computed yet); later receives wait, so few receive buffers are held at once.
        NOTE: NCCL ignores tags and runs a pair's p2p operations in posting order on one stream: both
        ranks posting the same sequence (each send facing the peer's receive of it) keeps every
        operation at the head of one stream matched by the one at the head of the other."""
        if target in self._posted:
            return
        ops, i = self._chan.get(peer, []), self._cursor.get(peer, 0)
        while i < len(ops):
            d, kind, slot, chunk = ops[i]
            if d == "recv":
                self._post_one(peer, kind, slot, chunk)
            elif (kind, slot, chunk) in self._ready:
                self._isend(peer, kind, slot, chunk, self._ready.pop((kind, slot, chunk)))
            else:
                break
            self._posted.add(ops[i])
            i += 1
            if ops[i - 1] == target:
                break
        self._cursor[peer] = i

    def _post_one(self, src_rank, kind, slot, chunk):
        bufs = [torch.empty(s, dtype=_P2P["dtype"], device=self._device()) for s in _P2P["shapes"]]
        peer = (src_rank,)
        src = self._global[src_rank]
        self.p2p_log.append(("recv", src_rank, kind, self._tag_path(slot), chunk, [tuple(b.shape) for b in bufs]))
        works = [dist.irecv(b, src=src, group=self.group if self.group is not dist.group.WORLD else None,
                            tag=self._tag(kind, slot, chunk)) for b in bufs]
        what = (f"{type(self).__name__}.step: pipeline rank {self.rank} receiving the "
                f"{'activations' if kind == 'F' else 'gradients'} of chunk {chunk} from pipeline rank {peer[0]}")
        self.recvs[(kind, slot, chunk)] = (works, bufs, what)

    def _take_recv(self, kind, slot, chunk):
        self._post_recv(kind, slot, chunk)
        if (kind, slot, chunk) not in self.recvs:
            # pair_order puts every message after the sends its receiver computes first: unreachable
            raise RuntimeError(f"{type(self).__name__}.step: pipeline rank {self.rank} must receive "
                               f"{(kind, slot, chunk)} before one of its own sends is computed (a schedule defect)")
        works, bufs, what = self.recvs[(kind, slot, chunk)]
        for w in works:
            self._wait(w, what)
        del self.recvs[(kind, slot, chunk)]
        return bufs

    def _wait(self, work, what):
        wait_within(work, self.timeout, PipelineTimeoutError, what)

    def _send(self, kind, slot, chunk, tensors, peer_rank):
        where = f"{type(self).__name__}.step"
        shapes, dtype = _P2P["shapes"], _P2P["dtype"]
        if len(tensors) != len(shapes) or any(tuple(t.shape) != s for t, s in zip(tensors, shapes)) \
                or any(t.dtype != dtype for t in tensors):
            raise ValueError(f"{where}: stage {self.topo.where[(self.rank, slot)][1]} (pipeline rank {self.rank}) "
                             f"{'outputs' if kind == 'F' else 'input gradients'} are "
                             f"{[(tuple(t.shape), t.dtype) for t in tensors]}; set_p2p_tensor_shapes/dtype declared "
                             f"{[(s, dtype) for s in shapes]}")
        # NOTE: a stage output may be a view (nn.Linear with bias on 3-D input) or non-contiguous; the
        # copy that travels is contiguous and detached, the autograd graph keeps the original
        self._ready[(kind, slot, chunk)] = [t.detach().contiguous() for t in tensors]
        self._advance(peer_rank, ("send", kind, slot, chunk))

    def _isend(self, peer_rank, kind, slot, chunk, bufs):
        where = f"{type(self).__name__}.step"
        self.p2p_log.append(("send", peer_rank, kind, self._tag_path(slot), chunk, [tuple(b.shape) for b in bufs]))
        for buf in bufs:
            # both ends tag with their own slot's path: the same path
            work = dist.isend(buf, dst=self._global[peer_rank], tag=self._tag(kind, slot, chunk),
                              group=self.group if self.group is not dist.group.WORLD else None)
            what = (f"{where}: pipeline rank {self.rank} sending the {'activations' if kind == 'F' else 'gradients'} "
                    f"of chunk {chunk} to pipeline rank {peer_rank}")
            self.sends.append((work, buf, what))     # the buffer lives until the send completes

    def _device(self):
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ compute
    def _is_last(self, slot):
        return self.topo.next(self.rank, slot) is None

    def _is_first(self, slot):
        return self.topo.prev(self.rank, slot) is None

    def _stage_inputs(self, slot, chunk):
        if self._is_first(slot):
            return list(self.first_inputs[chunk])
        if chunk in self.inputs[slot]:          # handed over locally (the V's bend)
            return self.inputs[slot][chunk]
        ins = self._take_recv("F", slot, chunk)
        if not self.forward_only:
            ins = [t.requires_grad_() for t in ins]
        self.inputs[slot][chunk] = ins
        return ins

    def _run(self, op: Op):
        if op.kind == "F":
            self._forward(op.slot, op.chunk)
        elif op.kind == "B":
            self._backward(op.slot, op.chunk, op.zb)
        elif op.kind == "W":
            WeightGradStore.pop()
        elif self.overlapped_forward_backward:
            self._overlapped(op)
        else:
            self._forward(op.slot, op.chunk)
            self._backward(op.slot_b, op.chunk_b, False)

    def _forward(self, slot, chunk):
        ins = self._stage_inputs(slot, chunk)
        outs = _as_list(self.module[slot](*ins), f"{type(self).__name__}.step")
        loss = None
        if self._is_last(slot) and self.criterion is not None:
            loss = self.criterion(*outs, *self.labels[chunk])
        self._after_forward(slot, chunk, outs, loss)

    def _after_forward(self, slot, chunk, outs, loss):
        if self._is_last(slot):
            if loss is not None:
                self.losses.append(loss)
            if self.return_outputs:
                self.last_outputs.append([t.detach() for t in outs])
            return
        nxt = self.topo.next(self.rank, slot)
        if nxt[0] == self.rank:                  # the bend: the next stage is this rank's other module
            self.inputs[nxt[1]][chunk] = [t.detach().requires_grad_(not self.forward_only) for t in outs]
        else:
            self._send("F", slot, chunk, outs, nxt[0])
        if not self.forward_only:
            self.outputs[slot][chunk] = outs

    def _backward_inputs(self, slot, chunk):
        """(loss or None, outputs, output gradients) of this stage's chunk."""
        if self._is_last(slot):
            return self.losses[chunk], [], []
        outs = self.outputs[slot].pop(chunk)
        if chunk in self.out_grads[slot]:
            grads = self.out_grads[slot].pop(chunk)
        else:
            grads = self._take_recv("B", slot, chunk)
        return None, outs, grads

    def _backward(self, slot, chunk, zb):
        loss, outs, grads = self._backward_inputs(slot, chunk)
        WeightGradStore.enabled = zb
        try:
            if loss is not None:
                loss.backward()
            else:
                run_backward(outs, grads)
        finally:
            WeightGradStore.enabled = False
        if zb:
            WeightGradStore.flush()
        self._after_backward(slot, chunk)

    def _after_backward(self, slot, chunk):
        prev = self.topo.prev(self.rank, slot)
        ins = self.inputs[slot].pop(chunk, None)
        if prev is None:
            return
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ins]
        if prev[0] == self.rank:
            self.out_grads[prev[1]][chunk] = grads
        else:
            self._send("B", slot, chunk, grads, prev[0])

    def _overlapped(self, op: Op):
        m0, m1 = self.module[op.slot], self.module[op.slot_b]
        ins0 = self._stage_inputs(op.slot, op.chunk)
        last0 = self._is_last(op.slot) and self.criterion is not None
        crit0, labels0 = (self.criterion, list(self.labels[op.chunk])) if last0 else (None, [])
        loss1, outs1, grads1 = self._backward_inputs(op.slot_b, op.chunk_b)
        if loss1 is None:
            pairs = [(t, g) for t, g in zip(outs1, grads1) if g is not None and t.requires_grad]
            outs1, grads1 = [t for t, _ in pairs], [g for _, g in pairs]
        outs0, loss0 = type(m0).overlapped_forward_backward(m0, ins0, crit0, labels0, m1, loss1, outs1, grads1)
        self._after_forward(op.slot, op.chunk, _as_list(outs0, f"{type(m0).__name__}.overlapped_forward_backward"),
                            loss0 if last0 else None)
        self._after_backward(op.slot_b, op.chunk_b)


class DualPipe(PipelineSchedule):
    """Bidirectional pipeline (DeepSeek-V3): ``modules = (stage r, stage PP-1-r)`` on pipeline rank r.

    Inputs are given on the first rank (fed to direction 0) and on the last rank (direction 1), each
    split into ``num_chunks / 2`` micro-batches; ``labels`` on the first rank belong to the last rank's
    inputs and vice versa. The mirrored copies of a stage (module 0 of rank r, module 1 of rank PP-1-r)
    each accumulate the gradients of their own direction: sum them before the optimizer step."""

    kind = "dualpipe"

    def _modules_doc(self):
        return "stage r and stage PP-1-r"

    def _check_size(self, n):
        if n % 2:
            raise ValueError(f"DualPipe: the number of pipeline ranks must be even, got {n} (DualPipeV takes any)")

    def _check_chunks(self, num_chunks):
        if num_chunks % 2 or num_chunks < 2 * self.num_ranks:
            raise ValueError(f"DualPipe.step: argument 'num_chunks' must be even and >= 2 * PP = {2 * self.num_ranks}, "
                             f"got {num_chunks}")

    def _feeds(self, num_chunks):
        if self.is_first_rank:
            return 0, num_chunks // 2, 1
        if self.is_last_rank:
            return 1, num_chunks // 2, 0
        return None, 0, None


class DualPipeV(PipelineSchedule):
    """V-shaped DualPipe ("cut in half"): ``modules = (stage r, stage 2PP-1-r)`` on pipeline rank r;
    inputs, labels, loss and outputs all on the first rank."""

    kind = "dualpipev"

    def _modules_doc(self):
        return "stage r and stage 2PP-1-r"

    def _check_chunks(self, num_chunks):
        if num_chunks < 2 * self.num_ranks:
            raise ValueError(f"DualPipeV.step: argument 'num_chunks' must be >= 2 * PP = {2 * self.num_ranks}, "
                             f"got {num_chunks}")

    def _feeds(self, num_chunks):
        return (0, num_chunks, 1) if self.is_first_rank else (None, 0, None)


class OneFOneB(PipelineSchedule):
    """The 1F1B baseline under the same API: ``modules = stage r`` (one module); inputs on the first
    rank, labels, loss and outputs on the last."""

    kind = "1f1b"
    n_modules = 1

    def _modules_doc(self):
        return "stage r"

    def _feeds(self, num_chunks):
        n = self.num_ranks
        feed = 0 if self.rank == 0 else None
        loss = 0 if self.rank == n - 1 else None
        return feed, num_chunks, loss
