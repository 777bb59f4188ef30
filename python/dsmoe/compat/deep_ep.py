"""DeepEP's normal-mode Python API (``deep_ep.Buffer``, ``Config``, ``EventOverlap``) on dsmoe's EPBuffer.

A framework that calls DeepEP changes one line (``import dsmoe.compat.deep_ep as deep_ep``) and keeps its
calls: ``get_dispatch_layout`` returns DeepEP's five values, ``dispatch`` takes the layout tensors as
keywords and returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
event)``, ``combine`` returns ``(combined_x, combined_topk_weights, event)``. docs/compat.md has the table.

Semantics (DeepEP's intranode normal mode; checked by tests/test_compat_deep_ep.py):
- A token is sent ONCE to every rank that hosts at least one of its experts (``is_token_in_rank``); the
  receiver's rows are ordered by source rank, then by the source's token index (DeepEP's channels are
  contiguous token ranges, so its order is the same). ``handle[0]`` is DeepEP's ``rank_prefix_matrix``:
  ``[W, W]`` int32, ``m[s][d]`` = tokens sent to rank ``d`` by ranks ``0..s``.
- ``recv_topk_idx``: local expert ids (``e - rank * L``), -1 where the expert lives elsewhere (or was -1),
  in ``topk_idx``'s dtype; ``recv_topk_weights``: the weights of the local slots, 0 elsewhere.
- ``num_recv_tokens_per_expert_list``: the senders' ``num_tokens_per_expert`` summed over sources, each
  rounded up to ``expert_alignment`` (``recv_x`` itself is not padded); empty when ``num_worst_tokens > 0``.
- ``num_worst_tokens > 0``: outputs have exactly that many rows; rows past the received ones have
  ``recv_topk_idx = -1``, weight 0 and zero payload (DeepEP leaves the payload unspecified). Receiving
  more rows than that raises ValueError (DeepEP would write past its allocation).
- Cached dispatch (``handle`` given, no top-k): the handle's layout moves new rows the same way.
- ``combine(x, handle)``: every rank sends each received row back to its source, which sums the copies of
  a token in rank order in fp32 and rounds once to ``x``'s dtype, WITHOUT weights (DeepEP's definition).
  ``topk_weights`` (any width) are summed the same way (fp32): with the dispatch's ``recv_topk_weights``
  this gives back the original weights (0 for -1 slots).

How it maps onto dsmoe: one dispatch is a small header all_gather (every rank's call signature: ranks that
disagree all raise ValueError naming the field), in non-cached mode one count all_gather (the layout
counts of every rank, DeepEP's ``notify_dispatch``), then ONE ``EPBuffer.dispatch`` whose top-k is the
caller's top-k followed by ``W`` routing columns (column ``r`` holds expert ``r * L`` where the token goes
to rank ``r``; its "weight" carries the token index, which becomes ``recv_src_idx``). That routes by
``is_token_in_rank`` whether or not top-k is given (cached and top-k-less dispatch) and costs 8 bytes per
rank and row. ``combine`` is a header all_gather, ``EPBuffer.combine`` and, with ``topk_weights``, one
all_to_all of the weights.

Backends (``Buffer(..., backend=...)``, default from ``DSMOE_DEEP_EP_BACKEND``, else ``"collective"``):
- ``"collective"``: any torch.distributed backend (gloo on CPU, NCCL on GPUs), any world size.
- ``"nvlink"``: dsmoe's CUDA IPC kernels (one node, <= 8 ranks). It needs a worst-case token count per
  rank, which DeepEP's API does not carry (DeepEP's ``num_nvl_bytes`` sizes a ring buffer, independent of
  the batch): ``max_tokens_per_rank=`` or, without it, the most tokens whose buffer fits ``num_nvl_bytes``.
  Not chosen automatically: a batch above the bound raises ValueError instead of running.

Differences from DeepEP (raise or documented): low-latency mode and every ``low_latency_*`` method,
``bias`` in combine, UE8M0/int scales, ``comm`` (mpi4py), ``enable_shrink`` raise NotImplementedError;
``num_tokens_per_rdma_rank`` is always None (no RDMA stage; the handle keeps the intranode layout at any
world size); ``config`` and ``allocate_on_comm_stream`` do not change the result (there is no separate
communication stream: work runs on the current stream, and with the collective backend it has completed
when the call returns); dispatch moves any floating dtype on the collective backend (DeepEP: bf16);
``get_dispatch_config``/``get_combine_config`` accept any world size. FP8 payloads take any number of fp32
scale columns, as DeepEP does; other than ``hidden // 128`` (e.g. per-token ``[T, 1]``) they travel as one
opaque row (data bytes then scale bytes) and need the collective backend.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .. import _native
from ..parallel import EPBuffer, EPConfig, EPTimeoutError, get_dispatch_layout as _layout
from ..parallel.common import disagreement, dtype_code, dtype_name

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t", "EPTimeoutError"]

# DeepEP exports the dtype its top-k indices use
topk_idx_t = torch.int64

_DISPATCH_MAGIC = 0x44454550  # first header field: a rank whose call is something else shows up as a mismatch
_COMBINE_MAGIC = 0x434F4D42
# NOTE: both headers have 7 fields, so a rank calling dispatch while a peer calls combine is a "call" mismatch
# (a ValueError on every rank), not an all_gather of unequal sizes
_HDR_FIELDS = ("call", "cached", "hidden", "num_experts", "top_k", "fp8 scale columns", "dtype")
_COMB_FIELDS = ("call", "cached", "hidden", "num_experts", "topk_weights columns", "fp8", "dtype")
_BACKENDS = ("collective", "nvlink")
_ENV_BACKEND = "DSMOE_DEEP_EP_BACKEND"
_MAX_TOKENS_EXACT = 1 << 24  # token indices travel as fp32 "weights": exact below 2**24


def _err(op: str, msg: str) -> str:
    return f"dsmoe.compat.deep_ep.{op}: {msg}"


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


# ----------------------------------------------------------------------------- events
class EventHandle:
    """A point on the current CUDA stream (a recorded ``torch.cuda.Event``). Where no CUDA device is in
    use the work is already complete when a call returns, and the handle holds nothing to wait for."""

    def __init__(self, device: torch.device | None = None):
        self.event = None
        if device is None:
            use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """DeepEP's event wrapper: ``current_stream_wait()`` makes the current stream wait for the event, and
    ``with event:`` (or ``with event(release_handle=True):``) does so on exit. Calls made with
    ``async_finish=False`` return one without an event."""

    def __init__(self, event: EventHandle | None = None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors  # kept alive until the event is waited on (DeepEP's contract)
        self.hook_after_wait = None
        self._release_on_exit = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        if self.event is None:
            raise RuntimeError(_err("EventOverlap.current_stream_wait", "this EventOverlap holds no event (the call "
                                    "ran with async_finish=False; only async calls return one to wait on)"))
        self.event.current_stream_wait()
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait) -> None:
        """``hook_after_wait()`` runs once, right after the next ``current_stream_wait()``."""
        if self.hook_after_wait is not None:
            raise RuntimeError(_err("EventOverlap.register_hook_after_wait", "a hook is already registered"))
        if not callable(hook_after_wait):
            raise TypeError(_err("EventOverlap.register_hook_after_wait", f"argument 'hook_after_wait' must be "
                                 f"callable, got {type(hook_after_wait).__name__}"))
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        # NOTE: returns self, so `with event(release_handle=True):` waits on this very event at exit
        self._release_on_exit = release_handle
        return self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_on_exit)
        self._release_on_exit = False


# ----------------------------------------------------------------------------- config
class Config:
    """DeepEP's tuning config. dsmoe's transports do not chunk, so the values only feed the size hints and
    the handle's channel matrices (``num_sms // 2`` channels)."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        vals = dict(num_sms=num_sms, num_max_nvl_chunked_send_tokens=num_max_nvl_chunked_send_tokens,
                    num_max_nvl_chunked_recv_tokens=num_max_nvl_chunked_recv_tokens,
                    num_max_rdma_chunked_send_tokens=num_max_rdma_chunked_send_tokens,
                    num_max_rdma_chunked_recv_tokens=num_max_rdma_chunked_recv_tokens)
        for k, v in vals.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(_err("Config", f"argument '{k}' must be an int, got {v!r}"))
        if num_sms < 0:
            raise ValueError(_err("Config", f"argument 'num_sms' must be >= 0, got {num_sms}"))
        for kind in ("nvl", "rdma"):
            s, r = vals[f"num_max_{kind}_chunked_send_tokens"], vals[f"num_max_{kind}_chunked_recv_tokens"]
            if s <= 0 or r <= 0 or s >= r:
                raise ValueError(_err("Config", f"arguments 'num_max_{kind}_chunked_send_tokens'={s} and "
                                      f"'num_max_{kind}_chunked_recv_tokens'={r} must be positive with send < recv"))
        # the RDMA receive queue holds whole send chunks (rounded up, as DeepEP does)
        r = -(-num_max_rdma_chunked_recv_tokens // num_max_rdma_chunked_send_tokens) * num_max_rdma_chunked_send_tokens
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = r

    @property
    def num_channels(self) -> int:
        return max(self.num_sms // 2, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of dsmoe's nvlink transport holding ``num_max_nvl_chunked_recv_tokens`` tokens per channel
        (``num_sms // 2`` channels) per rank at ``hidden = hidden_bytes // 2`` (bf16) and top-k up to 32:
        the token bound a ``Buffer(..., backend="nvlink")`` built with this many bytes gets."""
        if not isinstance(hidden_bytes, int) or hidden_bytes <= 0 or not isinstance(num_ranks, int) or num_ranks <= 0:
            raise ValueError(_err("Config.get_nvl_buffer_size_hint", f"arguments 'hidden_bytes'={hidden_bytes!r} and "
                                  f"'num_ranks'={num_ranks!r} must be positive ints"))
        hidden = max(8, -(-(hidden_bytes // 2) // 8) * 8)
        tokens = self.num_max_nvl_chunked_recv_tokens * self.num_channels
        return EPConfig(num_ranks, num_ranks, hidden, "nvlink", tokens, 1).nvlink_recv_bytes()

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: dsmoe has no RDMA buffer."""
        return 0

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
                f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
                f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
                f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})")


# ----------------------------------------------------------------------------- handle
class _Handle(tuple):
    """DeepEP's intranode handle: ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
    recv_src_idx, is_token_in_rank, send_head)`` with DeepEP's shapes and dtypes. ``send_head[t, r]`` is the
    position of token ``t`` among the rows sent to rank ``r`` (-1 if not sent); DeepEP stores a slot of its
    ring buffer there. The attributes carry what dsmoe's combine needs."""

    def __new__(cls, fields, **state):
        h = super().__new__(cls, fields)
        h.__dict__.update(state)
        return h

    rank_prefix_matrix = property(lambda self: self[0])
    recv_src_idx = property(lambda self: self[3])
    is_token_in_rank = property(lambda self: self[4])


def _channel_ranges(T: int, C: int):
    per = -(-T // C) if T else 0
    return [(min(c * per, T), min(c * per + per, T)) for c in range(C)]


def _channel_prefix(in_rank: torch.Tensor, C: int) -> torch.Tensor:
    """``[W, C]`` int32: tokens of channels ``0..c`` (contiguous token ranges) sent to each rank."""
    T, W = in_rank.shape
    ends = torch.tensor([e for _, e in _channel_ranges(T, C)], dtype=torch.long, device=in_rank.device)
    csum = torch.cat([torch.zeros(1, W, dtype=torch.long, device=in_rank.device), in_rank.long().cumsum(0)])
    return csum[ends].t().contiguous().to(torch.int32)


# ----------------------------------------------------------------------------- buffer
class Buffer:
    """DeepEP's ``Buffer`` (normal mode) on dsmoe's EPBuffer; see the module docstring."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None, *, backend: str | None = None, max_tokens_per_rank: int | None = None, timeout=None):
        op = "Buffer"
        if low_latency_mode:
            raise NotImplementedError(_err(op, "low_latency_mode=True is not implemented: dsmoe provides DeepEP's "
                                           "normal (high-throughput) mode only (SGLang: --deepep-mode normal)"))
        if enable_shrink:
            raise NotImplementedError(_err(op, "enable_shrink=True (rank masking) is not implemented"))
        if group is None:
            if comm is not None:
                raise NotImplementedError(_err(op, "an mpi4py 'comm' is not supported: pass a torch.distributed group"))
            raise ValueError(_err(op, "either 'group' or 'comm' must be provided"))
        if not dist.is_initialized():
            raise RuntimeError(_err(op, "torch.distributed is not initialized (call init_process_group first)"))
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes),
                        ("num_qps_per_rank", num_qps_per_rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(_err(op, f"argument '{name}' must be a non-negative int, got {v!r}"))
        backend = backend if backend is not None else os.environ.get(_ENV_BACKEND, "collective")
        if backend not in _BACKENDS:
            raise ValueError(_err(op, f"argument 'backend' (or ${_ENV_BACKEND}) must be one of {_BACKENDS}, got {backend!r}"))
        if max_tokens_per_rank is not None and (not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank <= 0):
            raise ValueError(_err(op, f"argument 'max_tokens_per_rank' must be a positive int, got {max_tokens_per_rank!r}"))
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = False
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = False
        self.backend = backend
        self.max_tokens_per_rank = max_tokens_per_rank
        if timeout is None:
            from ..parallel.buffer import group_timeout
            timeout = group_timeout(group)
        elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = datetime.timedelta(seconds=float(timeout))
        if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(_err(op, f"argument 'timeout' must be positive seconds or a timedelta, got {timeout!r}"))
        self.timeout = timeout
        self._buffers: dict = {}
        self._destroyed = False
        self._failed: str | None = None

    # ------------------------------------------------------------------ static API
    @staticmethod
    def is_sm90_compiled() -> bool:
        return _native.cuda_compiled()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if not isinstance(new_num_sms, int) or isinstance(new_num_sms, bool) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(_err("Buffer.set_num_sms", f"the SM count must be a positive even int, got {new_num_sms!r}"))
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (to pass as ``previous_event``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Buffer._default_config("get_dispatch_config", num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Buffer._default_config("get_combine_config", num_ranks)

    @staticmethod
    def _default_config(op, num_ranks) -> Config:
        if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks <= 0:
            raise ValueError(_err(f"Buffer.{op}", f"argument 'num_ranks' must be a positive int, got {num_ranks!r}"))
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(*args, **kwargs) -> int:
        raise NotImplementedError(_err("Buffer.get_low_latency_rdma_size_hint", "low-latency mode is not implemented; "
                                       "configure the framework for normal mode only (SGLang: --deepep-mode normal)"))

    # ------------------------------------------------------------------ not implemented
    def _no_low_latency(self, name):
        raise NotImplementedError(_err(f"Buffer.{name}", "low-latency mode is not implemented; use the normal-mode "
                                       "dispatch/combine"))

    def low_latency_dispatch(self, *args, **kwargs):
        self._no_low_latency("low_latency_dispatch")

    def low_latency_combine(self, *args, **kwargs):
        self._no_low_latency("low_latency_combine")

    def clean_low_latency_buffer(self, *args, **kwargs):
        self._no_low_latency("clean_low_latency_buffer")

    def get_next_low_latency_combine_buffer(self, *args, **kwargs):
        self._no_low_latency("get_next_low_latency_combine_buffer")

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        self._no_low_latency("low_latency_update_mask_buffer")

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        self._no_low_latency("low_latency_query_mask_buffer")

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        self._no_low_latency("low_latency_clean_mask_buffer")

    def internode_dispatch(self, *args, **kwargs):
        raise NotImplementedError(_err("Buffer.internode_dispatch", "call dispatch(): it serves any world size with "
                                       "the intranode handle layout"))

    def internode_combine(self, *args, **kwargs):
        raise NotImplementedError(_err("Buffer.internode_combine", "call combine()"))

    def get_local_buffer_tensor(self, *args, **kwargs):
        raise NotImplementedError(_err("Buffer.get_local_buffer_tensor", "dsmoe exposes no raw communication buffer"))

    def get_comm_stream(self):
        raise NotImplementedError(_err("Buffer.get_comm_stream", "dsmoe has no separate communication stream: work "
                                       "runs on the current stream"))

    # ------------------------------------------------------------------ lifetime
    def destroy(self) -> None:
        """Releases the transports (collective: every rank calls it). DeepEP requires explicitly_destroy=True."""
        if not self.explicitly_destroy:
            raise RuntimeError(_err("Buffer.destroy", "the `explicitly_destroy` flag must be set at construction"))
        self._check_alive("destroy")
        self._destroyed = True
        for ep in self._buffers.values():
            ep.close()
        self._buffers.clear()

    def _check_handle_buffer(self, op, handle) -> None:
        # NOTE: a DeepEP handle is plain layout tensors, valid on any buffer of its group; frameworks rebuild
        # their buffer when a larger one is needed (Megatron's get_buffer) while autograd still holds handles
        src = handle.buffer
        if src is not self and src.group is not self.group:
            raise ValueError(_err(op, "argument 'handle' comes from a Buffer of another process group"))
        if src._destroyed:
            raise RuntimeError(_err(op, "argument 'handle' comes from a Buffer that was destroyed"))

    def _check_alive(self, op):
        if self._destroyed:
            raise RuntimeError(_err(f"Buffer.{op}", "the buffer was destroyed"))
        if self._failed is not None:
            raise EPTimeoutError(_err(f"Buffer.{op}", f"an earlier collective of this buffer failed ({self._failed}); "
                                      f"rebuild the process group and the buffer"))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _events(op, previous_event, async_finish, allocate_on_comm_stream):
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(_err(op, f"argument 'previous_event' must be an EventOverlap (Buffer.capture()), got "
                                 f"{type(previous_event).__name__}"))
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError(_err(op, "allocate_on_comm_stream=True needs a previous_event and async_finish=True "
                                  "(as in DeepEP)"))
        if previous_event is not None and previous_event.event is not None:
            previous_event.event.current_stream_wait()

    @staticmethod
    def _finish(async_finish, device, extra=None) -> EventOverlap:
        return EventOverlap(EventHandle(device), extra) if async_finish else EventOverlap(None)

    def _comm_device(self, device: torch.device) -> torch.device:
        # NOTE: gloo reduces CPU tensors only; NCCL needs CUDA ones
        if device.type == "cuda" and "nccl" in str(dist.get_backend(self.group)).lower():
            return device
        return torch.device("cpu")

    def _wait(self, issue, what):
        try:
            work = issue()
            ok = work.wait(self.timeout)
        except (ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own type
            self._failed = f"{what}: {type(e).__name__}: {str(e)[:200]}"
            raise EPTimeoutError(_err(f"Buffer.{what}", f"collective failed or timed out after {self.timeout} (a peer "
                                      f"died, diverged or did not call): {e}")) from e
        if ok is False:
            self._failed = f"{what}: timed out"
            raise EPTimeoutError(_err(f"Buffer.{what}", f"collective did not complete within {self.timeout}"))

    def _gather(self, row: list, device, what) -> list:
        mine = torch.tensor(row, dtype=torch.int64, device=self._comm_device(device))
        got = [torch.empty_like(mine) for _ in range(self.group_size)]
        self._wait(lambda: dist.all_gather(got, mine, group=self.group, async_op=True), what)
        return [g.tolist() for g in got]

    def _ep(self, hidden: int, num_experts: int, device: torch.device) -> EPBuffer:
        key = (hidden, num_experts)
        ep = self._buffers.get(key)
        if ep is not None:
            return ep
        if self.backend == "nvlink":
            if device.type != "cuda":
                raise ValueError(_err("Buffer.dispatch", f"backend='nvlink' needs CUDA tensors, got {device}"))
            T = self.max_tokens_per_rank or _nvlink_capacity(self.group_size, num_experts, hidden, self.num_nvl_bytes)
            if T <= 0:
                need = EPConfig(self.group_size, num_experts, hidden, "nvlink", 1, 1).nvlink_recv_bytes()
                raise ValueError(_err("Buffer.dispatch", f"argument 'num_nvl_bytes'={self.num_nvl_bytes} holds no token "
                                      f"at hidden={hidden} on {self.group_size} ranks (one token needs {need} bytes); "
                                      f"pass max_tokens_per_rank= or more num_nvl_bytes"))
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            ep = EPBuffer(self.group, num_experts, hidden, backend="nvlink", max_tokens_per_rank=T,
                          num_sms=max(1, min(Buffer.num_sms, sms)), timeout=self.timeout)
        else:
            ep = EPBuffer(self.group, num_experts, hidden, backend="collective", timeout=self.timeout)
        self._buffers[key] = ep
        return ep

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """``(num_tokens_per_rank int32 [W], None, num_tokens_per_expert int32 [E], is_token_in_rank bool [T, W],
        event)``; -1 ids are skipped, others outside ``[0, E)`` raise ValueError."""
        op = "Buffer.get_dispatch_layout"
        self._check_alive("get_dispatch_layout")
        self._events(op, previous_event, async_finish, allocate_on_comm_stream)
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int64, torch.int32) or topk_idx.dim() != 2:
            raise TypeError(_err(op, f"argument 'topk_idx' must be an int64 (or int32) tensor [num_tokens, num_topk], got "
                                 f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {_shape(topk_idx)}"))
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0 \
                or num_experts % self.group_size:
            raise ValueError(_err(op, f"argument 'num_experts' must be a positive multiple of the group size "
                                  f"{self.group_size}, got {num_experts!r}"))
        ntpr, ntpe, in_rank = _layout(topk_idx, num_experts, self.group_size)
        return ntpr, None, ntpe, in_rank, self._finish(async_finish, topk_idx.device)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's normal-mode dispatch; see the module docstring for the semantics."""
        op = "Buffer.dispatch"
        self._check_alive("dispatch")
        self._events(op, previous_event, async_finish, allocate_on_comm_stream)
        W, me = self.group_size, self.rank
        # --- payload
        fp8 = isinstance(x, (tuple, list))
        packed = False
        if fp8:
            if len(x) != 2:
                raise ValueError(_err(op, f"argument 'x': the FP8 form is a pair (x_fp8, scales), got {len(x)} items"))
            xs, sc = x
        else:
            xs, sc = x, None
        if not isinstance(xs, torch.Tensor) or xs.dim() != 2:
            raise ValueError(_err(op, f"argument 'x' must be a tensor [num_tokens, hidden], got "
                                  f"{type(xs).__name__} {_shape(xs)}"))
        T, H = xs.shape
        dev = xs.device
        if fp8:
            if xs.dtype != torch.float8_e4m3fn:
                raise TypeError(_err(op, f"argument 'x': the FP8 form takes float8_e4m3fn data, got {xs.dtype}"))
            if not isinstance(sc, torch.Tensor):
                raise TypeError(_err(op, f"argument 'x': the FP8 scales must be a tensor, got {type(sc).__name__}"))
            if sc.dtype != torch.float32:
                raise NotImplementedError(_err(op, f"argument 'x': scales of dtype {sc.dtype} (UE8M0-packed) are not "
                                               f"supported; pass fp32 scales [num_tokens, num_scales]"))
            if sc.dim() != 2 or sc.shape[0] != T or sc.shape[1] < 1:
                raise ValueError(_err(op, f"argument 'x': FP8 scales must be fp32 [{T}, num_scales] (hidden // 128 "
                                      f"per 128-channel block, or 1 per token), got {_shape(sc)}"))
            if sc.device != dev:
                raise ValueError(_err(op, f"argument 'x': data and scales must be on one device, got {dev} and {sc.device}"))
            # NOTE: EPBuffer's FP8 form carries hidden // 128 scales; any other count (per-token scales) travels
            # as one opaque row of data bytes | scale bytes on the collective backend
            packed = H % 128 != 0 or sc.shape[1] != H // 128
            if packed and H % 4:
                raise ValueError(_err(op, f"argument 'x': FP8 rows with {sc.shape[1]} scales need hidden a multiple "
                                      f"of 4, got {H}"))
            if packed and self.backend == "nvlink":
                raise NotImplementedError(_err(op, f"backend='nvlink' moves FP8 rows with hidden // 128 scales, got "
                                               f"{sc.shape[1]} scales for hidden={H}; use backend='collective'"))
        elif not xs.dtype.is_floating_point or xs.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise TypeError(_err(op, f"argument 'x' must be a floating tensor (bf16) or the (float8_e4m3fn, fp32 scales) "
                                 f"pair, got {xs.dtype}"))
        for name, v, lo in (("expert_alignment", expert_alignment, 1), ("num_worst_tokens", num_worst_tokens, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(_err(op, f"argument '{name}' must be an int >= {lo}, got {v!r}"))
        if config is not None and not hasattr(config, "num_sms"):
            raise TypeError(_err(op, f"argument 'config' must be a Config, got {type(config).__name__}"))
        C = max(getattr(config, "num_sms", None) or Buffer.num_sms, 2) // 2
        if T >= _MAX_TOKENS_EXACT:
            raise ValueError(_err(op, f"argument 'x': at most {_MAX_TOKENS_EXACT - 1} tokens per rank, got {T}"))
        # --- layout
        cached = handle is not None
        if cached:
            if not isinstance(handle, _Handle):
                raise TypeError(_err(op, f"argument 'handle' must be a handle returned by this module's dispatch, got "
                                     f"{type(handle).__name__}"))
            if topk_idx is not None or topk_weights is not None:
                raise ValueError(_err(op, "a cached dispatch (handle given) takes no 'topk_idx'/'topk_weights'"))
            self._check_handle_buffer(op, handle)
            in_rank = handle.is_token_in_rank
            if in_rank.shape[0] != T or in_rank.device != dev:
                raise ValueError(_err(op, f"argument 'x' must have the handle's {in_rank.shape[0]} tokens on "
                                      f"{in_rank.device}, got {T} on {dev}"))
            E, k = handle.num_experts, 0
            out_rows = handle.num_rows
        else:
            missing = [n for n, v in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                      ("num_tokens_per_expert", num_tokens_per_expert)) if v is None]
            if missing:
                raise ValueError(_err(op, f"a non-cached dispatch needs {', '.join(repr(m) for m in missing)} (from "
                                      f"get_dispatch_layout), or pass 'handle' for a cached one"))
            in_rank, ntpr, ntpe = is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert
            if not isinstance(in_rank, torch.Tensor) or in_rank.dtype != torch.bool or in_rank.shape != (T, W):
                raise ValueError(_err(op, f"argument 'is_token_in_rank' must be bool [{T}, {W}], got "
                                      f"{getattr(in_rank, 'dtype', None)} {_shape(in_rank)}"))
            if not isinstance(ntpr, torch.Tensor) or ntpr.dtype not in (torch.int32, torch.int64) or ntpr.shape != (W,):
                raise ValueError(_err(op, f"argument 'num_tokens_per_rank' must be int32 [{W}], got "
                                      f"{getattr(ntpr, 'dtype', None)} {_shape(ntpr)}"))
            if not isinstance(ntpe, torch.Tensor) or ntpe.dtype not in (torch.int32, torch.int64) or ntpe.dim() != 1 \
                    or ntpe.numel() == 0 or ntpe.numel() % W:
                raise ValueError(_err(op, f"argument 'num_tokens_per_expert' must be int32 [num_experts] with num_experts "
                                      f"a positive multiple of {W}, got {getattr(ntpe, 'dtype', None)} {_shape(ntpe)}"))
            for name, t in (("is_token_in_rank", in_rank), ("num_tokens_per_rank", ntpr), ("num_tokens_per_expert", ntpe)):
                if t.device != dev:
                    raise ValueError(_err(op, f"argument '{name}' must be on x's device {dev}, got {t.device}"))
            E = ntpe.numel()
            if not torch.equal(ntpr.long(), in_rank.sum(0)):
                raise ValueError(_err(op, f"argument 'num_tokens_per_rank' {ntpr.tolist()} does not count "
                                      f"'is_token_in_rank' per rank {in_rank.sum(0).tolist()}"))
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError(_err(op, "'topk_idx' and 'topk_weights' must be given together"))
            k = 0
            if topk_idx is not None:
                if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int64, torch.int32) \
                        or topk_idx.dim() != 2 or topk_idx.shape[0] != T:
                    raise ValueError(_err(op, f"argument 'topk_idx' must be int64 [{T}, num_topk], got "
                                          f"{getattr(topk_idx, 'dtype', None)} {_shape(topk_idx)}"))
                if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
                    raise TypeError(_err(op, f"argument 'topk_weights' must be a float32 tensor, got "
                                         f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)}"))
                if topk_weights.shape != topk_idx.shape or topk_idx.device != dev or topk_weights.device != dev:
                    raise ValueError(_err(op, f"arguments 'topk_idx' {_shape(topk_idx)} and 'topk_weights' "
                                          f"{_shape(topk_weights)} must have one shape, on x's device {dev}"))
                k = topk_idx.shape[1]
                # NOTE: DeepEP routes by is_token_in_rank and maps the top-k by topk_idx; when they disagree rows
                # arrive without their experts (or experts without rows). That is an error here, not garbage.
                _, l_ntpe, l_in = _layout(topk_idx, E, W)  # ValueError for ids outside [-1, E)
                if not torch.equal(l_in, in_rank):
                    raise ValueError(_err(op, "argument 'is_token_in_rank' does not match 'topk_idx' (pass what "
                                          "get_dispatch_layout returned for it)"))
                if not torch.equal(l_ntpe.long(), ntpe.long()):
                    raise ValueError(_err(op, f"argument 'num_tokens_per_expert' {ntpe.tolist()} does not match "
                                          f"'topk_idx' ({l_ntpe.tolist()})"))
            elif num_worst_tokens > 0:
                raise ValueError(_err(op, "num_worst_tokens > 0 needs 'topk_idx' and 'topk_weights' (as in DeepEP)"))
            out_rows = num_worst_tokens if num_worst_tokens > 0 else None
        if self.backend == "nvlink" and k + W > 32:
            raise ValueError(_err(op, f"backend='nvlink': num_topk + group size must be <= 32, got {k} + {W}"))
        L = E // W
        # --- every rank's call signature, then (non-cached) every rank's layout counts
        sig = [_DISPATCH_MAGIC, int(cached), H, E, k, sc.shape[1] if fp8 else 0, dtype_code(xs.dtype)]
        rows = self._gather(sig, dev, "dispatch")
        diff = disagreement(rows, _HDR_FIELDS, {"dtype": dtype_name})
        if diff:
            raise ValueError(_err(op, f"the ranks disagree on this call ({diff}); every rank must make the same "
                                  f"call with the same hidden size, experts, top-k and payload form"))
        if not cached:
            counts = self._gather(in_rank.sum(0).tolist() + ntpe.long().tolist() + [T], dev, "dispatch")
            M = torch.tensor([c[:W] for c in counts], dtype=torch.int64)            # M[s, d]: rows s -> d
            P = torch.tensor([c[W:W + E] for c in counts], dtype=torch.int64)       # senders' per-expert counts
            Ts = [c[-1] for c in counts]
            rank_prefix = M.cumsum(0).to(torch.int32).to(dev)
        else:
            rank_prefix, Ts = handle.rank_prefix_matrix, handle.source_tokens
        # --- one EPBuffer dispatch: caller's top-k | W routing columns (expert r*L iff the token goes to r),
        # whose weights carry the token index
        ranks = torch.arange(W, device=dev)
        route = torch.where(in_rank, (ranks * L).expand(T, W), torch.full((T, W), -1, device=dev, dtype=torch.long))
        tok = torch.arange(T, device=dev, dtype=torch.float32).view(T, 1).expand(T, W)
        if k:
            aug_idx = torch.cat([topk_idx.long(), route], 1)
            aug_w = torch.cat([topk_weights, tok], 1)
        else:
            aug_idx, aug_w = route, tok
        ep = self._ep(H, E, dev)
        if ep.backend == "nvlink" and max(Ts) > ep.config.max_tokens_per_rank:
            # NOTE: decided from the gathered counts, so every rank raises (one rank refusing inside the
            # transport would leave its peers waiting for its rows)
            s = max(range(W), key=lambda r: Ts[r])
            raise ValueError(_err(op, f"rank {s} dispatches {Ts[s]} tokens, more than the nvlink transport holds "
                                  f"(max_tokens_per_rank={ep.config.max_tokens_per_rank}, from 'num_nvl_bytes'="
                                  f"{self.num_nvl_bytes} unless given); raise it or use backend='collective'"))
        if packed:
            # fp32 rows of H / 4 + S words: the collective backend moves them bit for bit
            payload = torch.cat([xs.contiguous().view(torch.uint8), sc.contiguous().view(torch.uint8)], 1)
            payload, move = payload.view(torch.float32), self._ep(H // 4 + sc.shape[1], E, dev)
        else:
            payload = (xs.contiguous(), sc.contiguous()) if fp8 else xs.contiguous()
            move = ep
        with torch.no_grad():
            recv, ridx, rw, _, eph = move.dispatch(payload, aug_idx.to(torch.int32).contiguous(), aug_w.contiguous())
        if packed:
            b = recv.view(torch.uint8)
            recv = (b[:, :H].contiguous().view(torch.float8_e4m3fn), b[:, H:].contiguous().view(torch.float32))
            # combine sends bf16 [R, H] rows back along the same routes (the handle's dtype is what it checks)
            eph = dataclasses.replace(eph, dtype=torch.bfloat16)
        R = sum(eph.recv_counts)
        if R != int(rank_prefix[W - 1, me]):
            raise RuntimeError(_err(op, f"received {R} rows, the layout announced {int(rank_prefix[W - 1, me])}"))
        recv_src = rw[:, k + me].to(torch.int32)
        recv_idx = ridx[:, :k].to(topk_idx.dtype) if k else None
        recv_w = rw[:, :k].contiguous() if k else None
        # --- per-expert counts (DeepEP: from the senders' num_tokens_per_expert, aligned; empty with num_worst_tokens)
        if cached:
            per_expert = None
        elif num_worst_tokens > 0:
            per_expert = []
        else:
            a = expert_alignment
            per_expert = [-(-int(c) // a) * a for c in P[:, me * L:(me + 1) * L].sum(0).tolist()]
        # --- padding to the worst case
        if out_rows is not None:
            if R > out_rows:
                raise ValueError(_err(op, f"argument 'num_worst_tokens'={out_rows}: this rank received {R} rows"))
            pad = out_rows - R

            def padded(t, fill):
                return torch.cat([t, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)]) if pad else t

            if fp8:
                recv = (padded(recv[0].view(torch.uint8), 0).view(torch.float8_e4m3fn), padded(recv[1], 0.0))
            else:
                recv = padded(recv, 0)
            recv_src = padded(recv_src, -1)
            if k:
                recv_idx, recv_w = padded(recv_idx, -1), padded(recv_w, 0.0)
        if cached:
            new_handle = handle
        else:
            # recv_channel_prefix_matrix[s, c]: first row of source s's channel c in recv_x
            rcp = torch.zeros(W, C, dtype=torch.int32)
            src_rows = recv_src[:R].long().cpu()
            start = 0
            for s, n in enumerate(eph.recv_counts):
                per = max(-(-Ts[s] // C), 1)  # tokens per channel on source s (contiguous ranges)
                ch = torch.bincount(src_rows[start:start + n] // per, minlength=C)[:C]
                rcp[s] = start + torch.cat([torch.zeros(1, dtype=torch.long), ch.cumsum(0)[:-1]]).to(torch.int32)
                start += n
            send_head = torch.where(in_rank, in_rank.int().cumsum(0) - 1, torch.full_like(in_rank, -1, dtype=torch.int32))
            new_handle = _Handle((rank_prefix, _channel_prefix(in_rank, C), rcp.to(dev), recv_src,
                                  in_rank, send_head.to(torch.int32)),
                                 buffer=self, ep=ep, ep_handle=eph, num_experts=E, hidden=H, num_recv=R,
                                 num_rows=recv_src.shape[0], source_tokens=Ts,
                                 dtype=torch.bfloat16 if fp8 else xs.dtype,
                                 send_counts=in_rank.sum(0).tolist(), send_token=in_rank.t().nonzero()[:, 1])
        event = self._finish(async_finish, dev)
        if cached:
            # as DeepEP: no new handle; combine keeps using the one that described this layout
            return recv, None, None, None, None, event
        return recv, recv_idx, recv_w, per_expert, new_handle, event

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sums each token's rows from every rank it was sent to (no weights), and ``topk_weights`` likewise;
        returns ``(combined_x [T, H], combined_topk_weights [T, k] | None, event)``."""
        op = "Buffer.combine"
        self._check_alive("combine")
        self._events(op, previous_event, async_finish, allocate_on_comm_stream)
        if not isinstance(handle, _Handle):
            raise TypeError(_err(op, f"argument 'handle' must be the handle of a dispatch of this module, got "
                                 f"{type(handle).__name__}"))
        self._check_handle_buffer(op, handle)
        if bias is not None:
            raise NotImplementedError(_err(op, "argument 'bias' is not supported (dsmoe's combine rounds the sum once; "
                                           "add the bias to the result)"))
        if config is not None and not hasattr(config, "num_sms"):
            raise TypeError(_err(op, f"argument 'config' must be a Config, got {type(config).__name__}"))
        n, H = handle.num_rows, handle.hidden
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != (n, H):
            raise ValueError(_err(op, f"argument 'x' must be [{n}, {H}] (the dispatched rows), got "
                                  f"{type(x).__name__} {_shape(x)}"))
        if x.dtype != handle.dtype:
            raise TypeError(_err(op, f"argument 'x' must have dtype {handle.dtype} (the dispatch's payload; bf16 after "
                                 f"an FP8 dispatch), got {x.dtype}"))
        kw = -1
        if topk_weights is not None:
            if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
                raise TypeError(_err(op, f"argument 'topk_weights' must be a float32 tensor, got "
                                     f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)}"))
            if topk_weights.dim() != 2 or topk_weights.shape[0] != n or topk_weights.device != x.device:
                raise ValueError(_err(op, f"argument 'topk_weights' must be [{n}, num_topk] on {x.device}, got "
                                      f"{_shape(topk_weights)} on {topk_weights.device}"))
            kw = topk_weights.shape[1]
        rows = self._gather([_COMBINE_MAGIC, 0, H, handle.num_experts, kw, 0, dtype_code(x.dtype)], x.device, "combine")
        diff = disagreement(rows, _COMB_FIELDS, {"dtype": dtype_name})
        if diff:
            raise ValueError(_err(op, f"the ranks disagree on this call ({diff}); every rank must combine rows of "
                                  f"one size and pass topk_weights of one width (or none)"))
        R = handle.num_recv
        with torch.no_grad():
            out = handle.ep.combine(x[:R].contiguous(), handle.ep_handle)
        combined_w = None
        if kw >= 0:
            combined_w = self._combine_weights(topk_weights[:R], handle, x.device)
        return out, combined_w, self._finish(async_finish, x.device)

    def _combine_weights(self, w: torch.Tensor, handle, device) -> torch.Tensor:
        """Received rows' weights back to their sources (one all_to_all), summed per token in rank order."""
        cdev = self._comm_device(device)
        send = w.contiguous().to(cdev)
        back = torch.empty(sum(handle.send_counts), w.shape[1], dtype=torch.float32, device=cdev)
        self._wait(lambda: dist.all_to_all_single(back, send, handle.send_counts, list(handle.ep_handle.recv_counts),
                                                  group=self.group, async_op=True), "combine")
        back = back.to(device)
        T = handle.is_token_in_rank.shape[0]
        out = torch.zeros(T, w.shape[1], dtype=torch.float32, device=device)
        start = 0
        for c in handle.send_counts:  # NOTE: one rank at a time: the sums follow rank order
            out.index_add_(0, handle.send_token[start:start + c], back[start:start + c])
            start += c
        return out


def _nvlink_capacity(W: int, E: int, H: int, nbytes: int) -> int:
    """The most tokens per rank whose nvlink transport fits ``nbytes`` (its size is linear in the count)."""
    one = EPConfig(W, E, H, "nvlink", 1, 1).nvlink_recv_bytes()
    two = EPConfig(W, E, H, "nvlink", 2, 1).nvlink_recv_bytes()
    per = two - one
    return max(0, (nbytes - (one - per)) // per)
