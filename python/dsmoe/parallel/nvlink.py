"""The ``nvlink`` backend of EPBuffer: our CUDA kernels write rows straight into the peers' receive
buffers over CUDA IPC (one node; also several processes on one GPU).

Memory (one ``ep_alloc`` per rank, ``common.NVLinkLayout``; ``EPConfig.nvlink_recv_bytes()`` is its exact
size), shared with every peer through CUDA IPC handles exchanged with ``all_gather_object``:
  dispatch data [W sources][max_tokens][pitch]: payload | global topk_idx int32[k] | weights fp32[k]
      (bf16: 2H bytes of payload; FP8: H bytes + H/128 fp32 scales: a dispatch copies only its own form's
      row, ~7.4 KB per token at H=7168 and k=8 instead of ~14.4 KB)
  combine data  [W sources][max_tokens][H * elem | fp32[k] weight gradients (dispatch backward only)]
  counts int32[2W] per region (rows from source s, and s's call signature), flags u64[W], epochs,
  done-blocks, and two status words (int32 error: 0, 1 + s = timed out waiting for source s, -1 = closed;
  int32 local input error: 1 = topk ids out of range, 2 = ranks disagree on dtype/top_k/form).
A sender copies its rows with ``ep_copy_rows`` (grid capped at ``num_sms`` blocks); its last block
publishes the per-destination counts, its call signature and an epoch flag in each peer's memory.
``ep_wait`` (one warp) spins on the local flags with a clock budget (the EPBuffer timeout, by default the
process group's): a dead peer sets the error word instead of hanging.

Modes: ``graph_safe=False`` reads the counts back (one host sync), checks the status words (EPTimeoutError,
or ValueError when the ranks' signatures differ) and returns compact rows, like the collective backend.
``graph_safe=True`` never syncs (no value checks either): outputs are worst-case sized
``[W * max_tokens, ...]`` (source s at rows ``[s*max_tokens, ...)``), rows past a source's count have
``recv_topk_idx = -1`` and weight 0 (their ``recv_x`` is stale); ``EPBuffer.check_error()`` reports the
status words outside capture.

Failure semantics (both modes): the error word is sticky. Once set (a timeout, or close()), the copy
kernel does nothing (no peer writes, no signal) and the wait kernel returns at once, so the failure
spreads to the peers (they time out) instead of the epochs drifting apart; eager calls raise
(EPTimeoutError / RuntimeError), graph-safe outputs are poisoned: ``recv_x``, ``recv_topk_weights``, the
combine output and the weight gradients are NaN, ``recv_topk_idx`` is -1 and the counts 0 (and once
``check_error()`` has reported the timeout, calls raise). No call after a failure returns stale rows as data. A local input error (graph-safe: ids outside [-1, E), or ranks that
disagree) poisons the outputs the same way, of that call and of every later one on this rank until
``check_error()`` raises it (and clears it).

Lifetime: ``close()`` (collective) sets the error word to "closed", synchronizes, closes the peers'
mappings and frees the memory, unless a call of this buffer was captured into a CUDA graph: then the
memory and mappings stay until the process exits, so a graph replayed after close() runs its kernels as
no-ops over live memory and returns NaN (never writes into a peer, never touches freed memory). An
EPBuffer dropped without close() is released by a finalizer (``weakref.finalize``, also at interpreter
exit): non-collective, so peers still exchanging with it time out.

Buffer reuse: a sender overwrites a peer's region as soon as its own previous exchange on the OTHER region
completed, i.e. once every peer has started that exchange, which each peer does only after reading out
this region (stream order). So exchanges must alternate between the two regions (dispatch, combine,
dispatch, ...; backward: combine-backward uses the dispatch region, dispatch-backward the combine region).
When a region would be used twice in a row, an empty exchange (counts and flags only) on the other region
is inserted first: a barrier that keeps the reuse safe. Every rank must issue the same sequence of calls.
Gradients: ``x`` gets its gradient through the transport (dispatch backward = combine and vice versa);
``topk_weights`` too: the dispatch backward sends each received row's weight gradients back with the row
gradient, and slot j of token t takes the gradient from the rank owning expert ``topk_idx[t, j]``.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .. import _native
from .common import EPHandle, EPTimeoutError, al16, dtype_code, dtype_name, get_dispatch_layout

_ELEM = {torch.bfloat16: 2, torch.float16: 2}
_EMPTY_SIG = -1  # signature of the inserted empty exchanges (never checked)
_KINDS = ("dispatch", "combine", "dispatch backward", "combine backward")


def _signature(kind: int, dtype: torch.dtype, k: int, fp8: bool) -> int:
    """One int32 per exchange that every receiver compares with its own: the row layout depends on it."""
    return dtype_code(dtype) | int(fp8) << 4 | kind << 5 | k << 8


def _describe(sig: int) -> str:
    if sig < 0:
        return "no call"
    kind = (sig >> 5) & 7
    return (f"{_KINDS[kind] if kind < len(_KINDS) else kind}(dtype={dtype_name(sig & 15)}, top_k={sig >> 8}, "
            f"fp8={bool(sig >> 4 & 1)})")


class _Raw:
    """A device pointer exposed to torch through __cuda_array_interface__ (no copy)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class _Memory:
    """The IPC allocation and the peers' mappings; what the finalizer releases (holds no transport)."""

    def __init__(self, C, device):
        self.C, self.device = C, device
        self.base, self.peers, self.rank = 0, [], 0
        self.status = None       # int32 [2] view: error word, local input error
        self.captured = False    # a call ran under CUDA graph capture: graphs may replay it later

    def release(self, collective_group=None, timeout=None):
        """Frees what is still held. With a group: close()'s collective order (every rank stops writing,
        then every importer unmaps, then each exporter frees). Without (finalizer): local only.

        NOTE: the barriers wait at most ``timeout`` (a timedelta). A peer that is gone makes close() raise
        EPTimeoutError instead of blocking until the process group's own timeout (or, on NCCL, the
        watchdog); the memory then stays mapped until the process exits, since a live peer may still
        write into it."""
        if not self.base:
            return
        with torch.cuda.device(self.device):
            if self.status is not None:
                self.status[0].fill_(-1)  # closed: kernels replayed from captured graphs become no-ops
            torch.cuda.synchronize(self.device)
            if collective_group is not None:
                self._barrier(collective_group, timeout, "no rank writes into a peer any more")
            # NOTE: captured graphs hold raw pointers into this memory and into the peers'; then both stay
            # mapped until the process exits rather than let a replay touch freed memory. The barriers run
            # either way (every rank must issue the same collectives).
            if not self.captured:
                for r, p in enumerate(self.peers):
                    if r != self.rank:
                        self.C.ep_ipc_close(p)
            if collective_group is not None:
                self._barrier(collective_group, timeout, "every importer has closed its mapping")
            if not self.captured:
                self.status = None
                self.C.ep_free(self.base)
            self.base, self.peers = 0, []

    def _barrier(self, group, timeout, what):
        try:
            work = dist.barrier(group=group, async_op=True)
            ok = work.wait(timeout) if timeout is not None else work.wait()
            if ok is False:
                raise RuntimeError("barrier wait returned False")
        except Exception as e:  # noqa: BLE001 - a vanished peer surfaces as backend-specific errors
            # keep the mapping (and the exported memory) alive: a peer may still be writing into it
            self.captured = True
            self.base, self.peers = 0, []
            raise EPTimeoutError(f"dsmoe.EPBuffer.close (nvlink): the barrier ({what}) did not complete "
                                 f"within the timeout ({timeout}): {e}; the buffer's memory stays mapped "
                                 f"until the process exits") from e


def _finalize(mem: _Memory):
    try:
        mem.release()
    except Exception:  # noqa: BLE001 - a finalizer must not raise (the CUDA context may be gone at exit)
        pass


class NVLinkTransport:
    def __init__(self, buf):
        if not torch.cuda.is_available():
            raise RuntimeError("dsmoe.EPBuffer: the nvlink backend needs CUDA")
        C = _native.require_kernel("EPBuffer", "ep_copy_rows") and _native.native()
        cfg = buf.config
        if buf.world_size > C.ep_max_ranks():
            raise ValueError(f"dsmoe.EPBuffer: argument 'group': the nvlink backend supports up to {C.ep_max_ranks()} "
                             f"ranks (one node), got {buf.world_size}")
        self.device = torch.device("cuda", torch.cuda.current_device())
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        if cfg.num_sms > sms:
            raise ValueError(f"dsmoe.EPBuffer: argument 'num_sms': at most the device's {sms} SMs, got {cfg.num_sms}")
        # the agreement check runs before any memory is shared: the layout depends on every field of it
        buf._handshake("cuda" if dist.get_backend(buf.group) == "nccl" else "cpu")
        self.C, self.buf = C, buf
        self.lay = cfg.nvlink_layout()
        W, T, H, K = buf.world_size, cfg.max_tokens_per_rank, cfg.hidden, cfg.top_k_max
        self.W, self.T, self.H, self.K = W, T, H, K
        self.num_sms = cfg.num_sms
        self.row, self.crow, self.cw_off = self.lay.row, self.lay.crow, self.lay.bf16_payload
        o = self.lay.offsets()
        self.o_ddata, self.o_cdata, self.o_dcnt, self.o_ccnt = o["ddata"], o["cdata"], o["dcnt"], o["ccnt"]
        self.o_dflag, self.o_cflag, self.o_depoch, self.o_cepoch = o["dflag"], o["cflag"], o["depoch"], o["cepoch"]
        self.o_ddone, self.o_cdone, self.o_err = o["ddone"], o["cdone"], o["err"]
        self.nbytes = o["total"]
        self._memory = _Memory(C, self.device)
        self.base = C.ep_alloc(self.nbytes)
        self._memory.base, self._memory.rank = self.base, buf.rank
        # NOTE: registered before anything can fail, so a buffer dropped without close() (or a failed
        # construction) does not leak the IPC allocation.
        self._finalizer = weakref.finalize(self, _finalize, self._memory)
        self.mem = torch.as_tensor(_Raw(self.base, self.nbytes), device=self.device)
        self._status = self._view(self.o_err, 2, torch.int32)
        self._memory.status = self._status
        handles = [None] * W
        dist.all_gather_object(handles, (dist.get_rank(buf.group), C.ep_ipc_get_handle(self.base)), group=buf.group)
        self.peers = []
        for r, (_, h) in enumerate(handles):
            self.peers.append(self.base if r == buf.rank else C.ep_ipc_open_handle(h))
            self._memory.peers = list(self.peers)
        dist.barrier(group=buf.group)
        self._last_region = None
        self._failed = None
        self._zero_counts = torch.zeros(W, dtype=torch.int32, device=self.device)
        self._no_rows = torch.zeros(16, dtype=torch.uint8, device=self.device)
        self._no_idx = torch.zeros(1, dtype=torch.int32, device=self.device)

    @property
    def peers_open(self) -> bool:
        return bool(self.peers)

    def close(self):
        """Collective: every rank must call it. See the module docstring (captured graphs)."""
        if not self.peers:
            return
        self._finalizer.detach()
        self.peers = []
        self.mem = None
        self._memory.release(self.buf.group, self.buf.timeout)

    def _view(self, off, n, dtype=torch.uint8):
        return self.mem[off:off + n * torch.empty((), dtype=dtype).element_size()].view(dtype)

    def check_error(self):
        """Raises what the status words say (a host read: call it outside graph capture)."""
        if not self.peers:
            raise RuntimeError("dsmoe.EPBuffer: the nvlink buffer was closed")
        err, inp = self._status.tolist()
        if err > 0:
            self._failed = f"peer rank {err - 1} did not signal within the timeout ({self.buf.timeout})"
            raise EPTimeoutError(f"dsmoe.EPBuffer (nvlink): {self._failed}; the buffer is unusable (every later call "
                                 f"fails or returns NaN): rebuild it")
        if err < 0:
            raise RuntimeError("dsmoe.EPBuffer (nvlink): the buffer was closed; captured graphs replay as no-ops")
        if inp:
            self._status[1].zero_()
            if inp == 1:
                raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'topk_idx': values must be in "
                                 f"[-1, {self.buf.num_experts}) (graph-safe mode dropped the others and returned NaN)")
            raise ValueError("dsmoe.EPBuffer (nvlink): the ranks disagreed on a call's dtype, top_k or form "
                             "(graph-safe mode returned NaN)")

    def _check_signatures(self, cnt_off, sig, what):
        """Eager mode, after the sync: every source's published signature must equal ours (on every rank)."""
        got = self._view(cnt_off, 2 * self.W, torch.int32).tolist()
        sigs = got[1::2]
        if any(s != sig for s in sigs):
            per = ", ".join(f"rank {r} = {_describe(s)}" for r, s in enumerate(sigs))
            raise ValueError(f"dsmoe.EPBuffer.{what}: the ranks disagree on this call: {per}")
        return got[0::2]

    def _poison_flag(self):
        return (self._status != 0).any()

    def _region(self, name):
        """(data, counts, flags, epoch, done offsets, row pitch) of the dispatch ("d") or combine ("c") region."""
        if name == "d":
            return self.o_ddata, self.o_dcnt, self.o_dflag, self.o_depoch, self.o_ddone, self.row
        return self.o_cdata, self.o_ccnt, self.o_cflag, self.o_cepoch, self.o_cdone, self.crow

    def _timeout_s(self) -> float:
        return float(self.buf.timeout.total_seconds())

    def _send(self, region: str, src_rows: torch.Tensor, dest_rank, dest_row, counts, row_bytes, fanout, sig):
        if torch.cuda.is_current_stream_capturing():
            self._memory.captured = True
        if self._last_region == region:
            # NOTE: reusing a region right away could overwrite rows a peer has not read out yet; an empty
            # exchange on the other region first proves that every peer is past that read-out.
            self._exchange("c" if region == "d" else "d", self._no_rows.view(1, 16), self._no_idx[:0],
                           self._no_idx[:0], self._zero_counts, 16, 1, _EMPTY_SIG)
        self._exchange(region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, sig)

    def _exchange(self, region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, sig):
        # NOTE: the buffers live on self.device; the launchers launch on the current device.
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with _native.on_device(self.device):
            self._launch(region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, sig, stream)
        self._last_region = region

    def _launch(self, region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, sig, stream):
        C, W = self.C, self.W
        data_off, cnt_off, flag_off, epoch_off, done_off, pitch = self._region(region)
        C.ep_copy_rows(src_rows.data_ptr(), dest_rank.data_ptr(), dest_row.data_ptr(), counts.data_ptr(),
                       [p + data_off for p in self.peers], [p + cnt_off for p in self.peers],
                       [p + flag_off for p in self.peers], self.base + epoch_off, self.base + done_off,
                       self.base + self.o_err, dest_rank.numel(), src_rows.stride(0) * src_rows.element_size(),
                       row_bytes, pitch, self.T, self.buf.rank, W, fanout, sig, self.num_sms, stream)
        C.ep_wait(self.base + flag_off, self.base + epoch_off, self.base + self.o_err, W, self._timeout_s(), stream)

    def _check_open(self, what):
        if not self.peers:
            raise RuntimeError(f"dsmoe.EPBuffer.{what}: the nvlink buffer was closed")
        if self._failed is not None:
            raise EPTimeoutError(f"dsmoe.EPBuffer.{what}: an earlier exchange failed ({self._failed}); rebuild the buffer")

    def _eager_check(self, cnt_off, sig, what):
        """Eager mode: one sync, then the status words and the signatures (raises on every rank)."""
        torch.cuda.current_stream(self.device).synchronize()
        self.check_error()
        return self._check_signatures(cnt_off, sig, what)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx, topk_weights):
        self._check_open("dispatch")
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        if xs.device != self.device or topk_idx.device != xs.device or topk_weights.device != xs.device:
            raise ValueError("dsmoe.EPBuffer.dispatch: the nvlink backend needs CUDA tensors on this rank's device")
        if not fp8 and xs.dtype not in _ELEM:
            raise TypeError(f"dsmoe.EPBuffer.dispatch: the nvlink backend moves bf16/fp16 or FP8 rows, got {xs.dtype}")
        Tn, k = topk_idx.shape
        if Tn > self.T or k > self.K:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: {Tn} tokens x top-{k} exceed the buffer "
                             f"(max_tokens_per_rank={self.T}, top_k_max={self.K})")
        if fp8:
            recv, ridx, rw, cnt, h = self._dispatch_raw(x, topk_idx, topk_weights)
            return recv, ridx, rw, cnt, h
        box = {}
        recv_x, ridx, rw, cnt = _NVDispatch.apply(xs, topk_idx, topk_weights, self.buf._anchor, self, box)
        return recv_x, ridx, rw, cnt, box["handle"]

    def _dispatch_raw(self, x, topk_idx, topk_weights):
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        dev = xs.device
        W, T, H, L, E = self.W, self.T, self.H, self.buf.num_local_experts, self.buf.num_experts
        Tn, k = topk_idx.shape
        row_bytes, o_idx, o_w = self.lay.dispatch_row(fp8, k)
        idx = topk_idx
        if self.buf.graph_safe:
            # NOTE: no value check (a host sync): out-of-range ids are dropped and flagged in the input-error
            # word, which poisons this call's outputs and is raised by check_error().
            ok = (idx >= -1) & (idx < E)
            self._status[1:].masked_fill_((~ok).any().view(1), 1)
            idx = torch.where(ok, idx, torch.full_like(idx, -1))
        _, _, in_rank = get_dispatch_layout(idx, E, W, validate=False)  # no sync; bad ids handled above
        send_pos = (torch.cumsum(in_rank.int(), 0) - 1).to(torch.int32)
        send_pos = torch.where(in_rank, send_pos, torch.full_like(send_pos, -1))
        counts = in_rank.sum(0).to(torch.int32)
        # staging rows of this form only (FP8: bytes + scales, not the bf16-sized payload)
        stage = torch.zeros(max(Tn, 1), row_bytes, dtype=torch.uint8, device=dev)
        if fp8:
            stage[:Tn, :H] = xs.contiguous().view(torch.uint8)
            stage[:Tn, al16(H):al16(H) + H // 128 * 4] = x[1].contiguous().view(torch.uint8)
        else:
            stage[:Tn, :H * 2] = xs.contiguous().view(torch.uint8)
        stage[:Tn, o_idx:o_idx + k * 4] = idx.to(torch.int32).contiguous().view(torch.uint8)
        stage[:Tn, o_w:o_w + k * 4] = topk_weights.float().contiguous().view(torch.uint8)
        dest_rank = torch.where(in_rank, torch.arange(W, device=dev, dtype=torch.int32).expand(Tn, W),
                                torch.full((Tn, W), -1, dtype=torch.int32, device=dev)).contiguous()
        sig = _signature(0, xs.dtype, k, fp8)
        self._send("d", stage, dest_rank, send_pos.contiguous(), counts, row_bytes, W, sig)
        data = self._view(self.o_ddata, W * T * self.row).view(W * T, self.row)
        rcounts = self._view(self.o_dcnt, 2 * W, torch.int32)[0::2]
        if not self.buf.graph_safe:
            rc = self._eager_check(self.o_dcnt, sig, "dispatch")
            sel = torch.cat([torch.arange(s * T, s * T + c, device=dev) for s, c in enumerate(rc)]) if sum(rc) else \
                torch.empty(0, dtype=torch.long, device=dev)
            rows = data[sel]
            valid = torch.ones(rows.shape[0], dtype=torch.bool, device=dev)
            poison = None
        else:
            rc = None
            rows = data
            # NOTE: expand, not repeat_interleave (no output size to read back)
            slot = torch.arange(T, device=dev).repeat(W)
            valid = slot < rcounts.long().view(W, 1).expand(W, T).reshape(-1)
            sigs = self._view(self.o_dcnt, 2 * W, torch.int32)[1::2]
            self._status[1:].masked_fill_((sigs != sig).any().view(1), 2)
            poison = self._poison_flag()
        gidx = rows[:, o_idx:o_idx + k * 4].contiguous().view(torch.int32).long()
        w = rows[:, o_w:o_w + k * 4].contiguous().view(torch.float32)
        me = self.buf.rank
        local = (gidx >= me * L) & (gidx < (me + 1) * L) & valid.unsqueeze(1)
        if poison is not None:
            local = local & ~poison
        ridx = torch.where(local, gidx - me * L, torch.full_like(gidx, -1)).to(torch.int32)
        rw = torch.where(local, w, torch.zeros_like(w))
        # NOTE: scatter_add, not bincount: CUDA bincount reads the maximum back (a host sync in graph_safe mode)
        slots = torch.where(local, ridx.long(), torch.full_like(gidx, L)).flatten()
        cnt = torch.zeros(L + 1, dtype=torch.int64, device=dev).scatter_add_(0, slots, torch.ones_like(slots))
        cnt = cnt[:L].to(torch.int32)
        if fp8:
            rq = rows[:, :H].contiguous()
            rs = rows[:, al16(H):al16(H) + H // 128 * 4].contiguous().view(torch.float32)
            if poison is not None:
                rq = torch.where(poison, torch.full((), 0x7F, dtype=torch.uint8, device=dev), rq)  # e4m3 NaN
                rs = torch.where(poison, torch.full((), float("nan"), device=dev), rs)
            recv = (rq.view(torch.float8_e4m3fn), rs)
        else:
            recv = rows[:, :H * 2].contiguous().view(xs.dtype)
            if poison is not None:
                recv = torch.where(poison, torch.full((), float("nan"), dtype=xs.dtype, device=dev), recv)
        if poison is not None:
            rw = torch.where(poison, torch.full((), float("nan"), device=dev), rw)
        nv = {"num_tokens": Tn, "send_pos": send_pos, "in_rank": in_rank, "recv_counts": rc,
              "recv_counts_dev": rcounts.clone(), "dtype": xs.dtype, "topk_idx": idx.long(), "k": k}
        h = EPHandle(Tn, send_pos, [], rc if rc is not None else [T] * W, in_rank, k,
                     torch.bfloat16 if fp8 else xs.dtype, nv)
        return recv, ridx, rw, cnt, h

    # ------------------------------------------------------------------ combine
    def combine(self, y, handle):
        self._check_open("combine")
        if handle.nv is None:
            raise TypeError("dsmoe.EPBuffer.combine: argument 'handle' comes from another backend's dispatch")
        return _NVCombine.apply(y, self.buf._anchor, handle, self)

    def _combine_raw(self, y, handle, gw=None):
        """Rows back to their sources, summed in rank order. With ``gw`` (fp32 ``[rows, k]``, the dispatch
        backward) each row also carries its weight gradients; returns ``(out, dw [T, k])`` then."""
        # NOTE: the backward passes get here without combine()'s check: an autograd graph can outlive close()
        self._check_open("combine" if gw is None else "dispatch backward")
        nv = handle.nv
        W, T, H = self.W, self.T, self.H
        dev = y.device
        if y.dtype not in _ELEM:
            raise TypeError(f"dsmoe.EPBuffer.combine: the nvlink backend takes bf16/fp16 rows, got {y.dtype}")
        if dev != self.device:
            raise ValueError(f"dsmoe.EPBuffer.combine: argument 'y' must be on the buffer's device {self.device}, got {dev}")
        rc = nv["recv_counts"]
        if rc is not None:  # compact rows: row i came from source s, slot i - start_s
            src = torch.cat([torch.full((c,), s, dtype=torch.int32, device=dev) for s, c in enumerate(rc)]) if sum(rc) else \
                torch.empty(0, dtype=torch.int32, device=dev)
            starts = torch.tensor([sum(rc[:s]) for s in range(W)], dtype=torch.int32, device=dev)
            slot = torch.arange(y.shape[0], dtype=torch.int32, device=dev) - starts[src.long()] if y.shape[0] else src
            dest_rank, dest_row = src, slot
        else:
            slot = torch.arange(T, dtype=torch.int32, device=dev).repeat(W)
            srcs = torch.arange(W, dtype=torch.int32, device=dev).view(W, 1).expand(W, T).reshape(-1)
            ok = slot < nv["recv_counts_dev"].view(W, 1).expand(W, T).reshape(-1)
            dest_rank = torch.where(ok, srcs, torch.full_like(srcs, -1))
            dest_row = slot
        n = y.shape[0]
        k = nv["k"]
        if gw is None:
            send_rows = y.contiguous() if n else torch.zeros(1, H, dtype=y.dtype, device=dev)
            row_bytes = H * 2
            sig = _signature(1, y.dtype, k, False)
        else:
            row_bytes = self.cw_off + al16(k * 4)
            send_rows = torch.zeros(max(n, 1), row_bytes, dtype=torch.uint8, device=dev)
            send_rows[:n, :H * 2] = y.contiguous().view(torch.uint8)
            send_rows[:n, self.cw_off:self.cw_off + k * 4] = gw.float().contiguous().view(torch.uint8)
            sig = _signature(2, y.dtype, k, False)
        counts = self._zero_counts  # combine receivers know their counts already
        self._send("c", send_rows, dest_rank.contiguous(), dest_row.contiguous(), counts, row_bytes, 1, sig)
        cview = self._view(self.o_cdata, W * T * self.crow).view(W * T, self.crow)
        cdata = cview[:, :H * 2].view(y.dtype)
        sp = nv["send_pos"].long()
        out = torch.zeros(nv["num_tokens"], H, dtype=torch.float32, device=dev)
        for d in range(W):  # rank order, fp32
            rows = cdata[(d * T + sp[:, d].clamp(min=0))].float()
            out = out + torch.where((sp[:, d] >= 0).unsqueeze(1), rows, torch.zeros_like(rows))
        dw = None
        if gw is not None:
            wrows = cview[:, self.cw_off:self.cw_off + k * 4].contiguous().view(torch.float32)  # [W*T, k]
            per_rank = torch.stack([wrows[d * T + sp[:, d].clamp(min=0)] for d in range(W)])  # [W, Tn, k]
            dw = owner_weight_grad(per_rank, nv["topk_idx"], self.buf.num_local_experts)
        if not self.buf.graph_safe:
            self._eager_check(self.o_ccnt, sig, "combine" if gw is None else "dispatch backward")
        else:
            sigs = self._view(self.o_ccnt, 2 * W, torch.int32)[1::2]
            self._status[1:].masked_fill_((sigs != sig).any().view(1), 2)
            poison = self._poison_flag()
            nan = torch.full((), float("nan"), device=dev)
            out = torch.where(poison, nan, out)
            if dw is not None:
                dw = torch.where(poison, nan, dw)
        out = out.to(y.dtype)
        return out if gw is None else (out, dw)

    def _combine_backward(self, g, handle):
        """The backward of combine: each token's gradient to every rank that received it, into the same rows
        (a dispatch with the forward's layout; bf16/fp16 payload only)."""
        self._check_open("combine backward")
        nv = handle.nv
        Tn, W, T, H = nv["num_tokens"], self.W, self.T, self.H
        dev = g.device
        row_bytes = self.lay.bf16_payload
        stage = torch.zeros(max(Tn, 1), row_bytes, dtype=torch.uint8, device=dev)
        stage[:Tn, :H * 2] = g.to(handle.dtype).contiguous().view(torch.uint8)
        dest_rank = torch.where(nv["in_rank"], torch.arange(W, device=dev, dtype=torch.int32).expand(Tn, W),
                                torch.full((Tn, W), -1, dtype=torch.int32, device=dev)).contiguous()
        counts = nv["in_rank"].sum(0).to(torch.int32)
        sig = _signature(3, handle.dtype, nv["k"], False)
        self._send("d", stage, dest_rank, nv["send_pos"].contiguous(), counts, row_bytes, W, sig)
        data = self._view(self.o_ddata, W * T * self.row).view(W * T, self.row)
        rc = nv["recv_counts"]
        if rc is not None:
            self._eager_check(self.o_dcnt, sig, "combine backward")
            sel = torch.cat([torch.arange(s * T, s * T + c, device=dev) for s, c in enumerate(rc)]) if sum(rc) else \
                torch.empty(0, dtype=torch.long, device=dev)
            return data[sel][:, :H * 2].contiguous().view(handle.dtype)
        sigs = self._view(self.o_dcnt, 2 * W, torch.int32)[1::2]
        self._status[1:].masked_fill_((sigs != sig).any().view(1), 2)
        out = data[:, :H * 2].contiguous().view(handle.dtype)
        return torch.where(self._poison_flag(), torch.full((), float("nan"), dtype=handle.dtype, device=dev), out)


def owner_weight_grad(per_rank: torch.Tensor, topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """``per_rank [W, T, k]``: the weight gradients rank d returned for token t (zeros where it did not
    receive t). Slot j of token t belongs to rank ``topk_idx[t, j] // L``: its gradient comes from there
    (exactly one rank; 0 for ``-1`` slots). This is the collective backend's masked sum, without adds."""
    W = per_rank.shape[0]
    idx = topk_idx.long()
    owner = (idx.clamp(min=0) // num_local_experts).clamp(max=W - 1)
    dw = per_rank.gather(0, owner.unsqueeze(0)).squeeze(0)
    return torch.where(idx >= 0, dw, torch.zeros_like(dw))


class _NVDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, _anchor, tr, box):
        recv, ridx, rw, cnt, h = tr._dispatch_raw(x, topk_idx, topk_weights)
        box["handle"] = h
        ctx.tr, ctx.h = tr, h
        ctx.w_dtype = topk_weights.dtype
        ctx.recv_shape = tuple(recv.shape)
        ctx.rw_shape = tuple(rw.shape)
        ctx.mark_non_differentiable(ridx, cnt)
        return recv, ridx, rw, cnt

    @staticmethod
    def backward(ctx, g, _g_idx, g_rw, _g_cnt):
        tr, h = ctx.tr, ctx.h
        dev = tr.device
        if g is None:
            g = torch.zeros(ctx.recv_shape, dtype=h.dtype, device=dev)
        # NOTE: the weight gradients always travel (zeros when absent): every rank must send the same row
        # layout, whatever its local autograd graph looks like.
        gw = g_rw if g_rw is not None else torch.zeros(ctx.rw_shape, dtype=torch.float32, device=dev)
        dx, dw = tr._combine_raw(g.to(h.dtype).contiguous(), h, gw)
        return (dx if ctx.needs_input_grad[0] else None), None, \
            (dw.to(ctx.w_dtype) if ctx.needs_input_grad[2] else None), None, None, None


class _NVCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, _anchor, handle, tr):
        ctx.tr, ctx.h = tr, handle
        return tr._combine_raw(y, handle)

    @staticmethod
    def backward(ctx, g):
        dy = ctx.tr._combine_backward(g, ctx.h)
        return (dy if ctx.needs_input_grad[0] else None), None, None, None
