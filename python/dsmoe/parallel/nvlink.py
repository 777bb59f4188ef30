"""The ``nvlink`` backend of EPBuffer: our CUDA kernels write rows straight into the peers' receive
buffers over CUDA IPC (one node; also several processes on one GPU).

Memory (one ``ep_alloc`` per rank, shared with every peer through CUDA IPC handles exchanged with
``all_gather_object`` on the process group):
  dispatch data [W sources][max_tokens][row]  row = payload | global topk_idx int32[k] | weights fp32[k] (16-byte padded)
  combine data  [W sources][max_tokens][H * elem | fp32[k] weight gradients (dispatch backward only)]
  dispatch/combine counts int32[W], flags u64[W], epoch u64, done-blocks u32; error int32.
A sender copies its rows with ``ep_copy_rows`` (grid capped at ``num_sms`` blocks); its last block
publishes the per-destination counts and an epoch flag in each peer's memory. ``ep_wait`` (one warp)
spins on the local flags with a clock budget: a dead peer sets the error word instead of hanging.

Modes: ``graph_safe=False`` reads the counts back (one host sync), checks the error word (raises
EPTimeoutError) and returns compact rows, like the collective backend. ``graph_safe=True`` never syncs:
outputs are worst-case sized ``[W * max_tokens, ...]`` (source s at rows ``[s*max_tokens, ...)``),
rows past a source's count have ``recv_topk_idx = -1`` and weight 0 (their ``recv_x`` is stale), and the
error word is left for the caller (``EPBuffer._nvlink.check_error()``) outside capture.
Buffer reuse: a sender overwrites a peer's region as soon as its own previous exchange on the OTHER region
completed, i.e. once every peer has started that exchange, which each peer does only after reading out
this region (stream order). So exchanges must alternate between the two regions (dispatch, combine,
dispatch, ...; backward: combine-backward uses the dispatch region, dispatch-backward the combine region).
When a region would be used twice in a row, an empty exchange (counts and flags only) on the other region
is inserted first: a barrier that keeps the reuse safe. Every rank must issue the same sequence of calls.
Gradients: ``x`` gets its gradient through the transport (dispatch backward = combine and vice versa);
``topk_weights`` too: the dispatch backward sends each received row's weight gradients back with the row
gradient, and slot j of token t takes the gradient from the rank owning expert ``topk_idx[t, j]``.
After a timeout the ranks' epochs disagree: the buffer is unusable (build a new one).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .. import _native

_ELEM = {torch.bfloat16: 2, torch.float16: 2}


def _al16(n: int) -> int:
    return (n + 15) // 16 * 16


class _Raw:
    """A device pointer exposed to torch through __cuda_array_interface__ (no copy)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class NVLinkTransport:
    def __init__(self, buf):
        if not torch.cuda.is_available():
            raise RuntimeError("dsmoe.EPBuffer: the nvlink backend needs CUDA")
        C = _native.require_kernel("EPBuffer", "ep_copy_rows") and _native.native()
        cfg = buf.config
        if buf.world_size > C.ep_max_ranks():
            raise ValueError(f"dsmoe.EPBuffer: argument 'group': the nvlink backend supports up to {C.ep_max_ranks()} "
                             f"ranks (one node), got {buf.world_size}")
        self.C, self.buf = C, buf
        W, T, H, K = buf.world_size, cfg.max_tokens_per_rank, cfg.hidden, cfg.top_k_max
        self.W, self.T, self.H, self.K = W, T, H, K
        self.num_sms = cfg.num_sms
        self.device = torch.device("cuda", torch.cuda.current_device())
        # row = max(bf16 payload, fp8 payload + scales) | idx | weights
        self.payload = max(_al16(H * 2), _al16(H) + _al16(H // 128 * 4) if H % 128 == 0 else 0)
        self.row = self.payload + 2 * _al16(K * 4)
        self.cw_off = _al16(H * 2)  # weight gradients of the dispatch backward
        self.crow = self.cw_off + _al16(K * 4)
        off = 0
        self.o_ddata = off; off += W * T * self.row
        self.o_cdata = off; off += W * T * self.crow
        self.o_dcnt = off; off += _al16(W * 4)
        self.o_ccnt = off; off += _al16(W * 4)
        self.o_dflag = off; off += _al16(W * 8)
        self.o_cflag = off; off += _al16(W * 8)
        self.o_depoch = off; off += 16
        self.o_cepoch = off; off += 16
        self.o_ddone = off; off += 16
        self.o_cdone = off; off += 16
        self.o_err = off; off += 16
        self.nbytes = off
        self.base = C.ep_alloc(off)
        self.mem = torch.as_tensor(_Raw(self.base, off), device=self.device)
        handles = [None] * W
        dist.all_gather_object(handles, (dist.get_rank(buf.group), C.ep_ipc_get_handle(self.base)), group=buf.group)
        self.peers = []
        for r, (_, h) in enumerate(handles):
            self.peers.append(self.base if r == buf.rank else C.ep_ipc_open_handle(h))
        dist.barrier(group=buf.group)
        self._last_region = None
        self._zero_counts = torch.zeros(W, dtype=torch.int32, device=self.device)
        self._no_rows = torch.zeros(16, dtype=torch.uint8, device=self.device)
        self._no_idx = torch.zeros(1, dtype=torch.int32, device=self.device)

    def close(self):
        """Collective: every rank must call it. Waits for the GPU, closes the peers' mappings on every
        rank, and only then frees the local buffer (freeing an exported buffer that a peer still maps is
        undefined behaviour in CUDA IPC)."""
        if not self.peers:
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.buf.group)  # no kernel of any rank still writes into a peer
        for r, p in enumerate(self.peers):
            if r != self.buf.rank:
                self.C.ep_ipc_close(p)
        dist.barrier(group=self.buf.group)  # every importer has closed its mapping
        self.mem = None
        self.C.ep_free(self.base)
        self.peers = []

    def _view(self, off, n, dtype=torch.uint8):
        return self.mem[off:off + n * torch.empty((), dtype=dtype).element_size()].view(dtype)

    def check_error(self):
        err = int(self._view(self.o_err, 1, torch.int32)[0])
        if err:
            from .buffer import EPTimeoutError
            raise EPTimeoutError(f"dsmoe.EPBuffer (nvlink): peer rank {err - 1} did not signal within the timeout")

    def _region(self, name):
        """(data, counts, flags, epoch, done offsets, row pitch) of the dispatch ("d") or combine ("c") region."""
        if name == "d":
            return self.o_ddata, self.o_dcnt, self.o_dflag, self.o_depoch, self.o_ddone, self.row
        return self.o_cdata, self.o_ccnt, self.o_cflag, self.o_cepoch, self.o_cdone, self.crow

    def _timeout_s(self) -> float:
        t = self.buf.timeout
        if isinstance(t, datetime.timedelta):
            t = t.total_seconds()
        return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 else 60.0

    def _send(self, region: str, src_rows: torch.Tensor, dest_rank, dest_row, counts, row_bytes, fanout):
        if self._last_region == region:
            # NOTE: reusing a region right away could overwrite rows a peer has not read out yet; an empty
            # exchange on the other region first proves that every peer is past that read-out.
            self._exchange("c" if region == "d" else "d", self._no_rows.view(1, 16), self._no_idx[:0],
                           self._no_idx[:0], self._zero_counts, 16, 1)
        self._exchange(region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout)

    def _exchange(self, region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout):
        # NOTE: the buffers live on self.device; the launchers launch on the current device.
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with _native.on_device(self.device):
            self._launch(region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, stream)
        self._last_region = region

    def _launch(self, region, src_rows, dest_rank, dest_row, counts, row_bytes, fanout, stream):
        C, W = self.C, self.W
        data_off, cnt_off, flag_off, epoch_off, done_off, pitch = self._region(region)
        C.ep_copy_rows(src_rows.data_ptr(), dest_rank.data_ptr(), dest_row.data_ptr(), counts.data_ptr(),
                       [p + data_off for p in self.peers], [p + cnt_off for p in self.peers],
                       [p + flag_off for p in self.peers], self.base + epoch_off, self.base + done_off,
                       dest_rank.numel(), src_rows.stride(0) * src_rows.element_size(), row_bytes, pitch, self.T,
                       self.buf.rank, W, fanout, self.num_sms, stream)
        C.ep_wait(self.base + flag_off, self.base + epoch_off, self.base + self.o_err, W, self._timeout_s(), stream)

    # ------------------------------------------------------------------ dispatch
    def _check_open(self, what):
        if not self.peers:
            raise RuntimeError(f"dsmoe.EPBuffer.{what}: the nvlink buffer was closed")

    def dispatch(self, x, topk_idx, topk_weights):
        self._check_open("dispatch")
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        if xs.device != self.device or topk_idx.device != xs.device:
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
        recv_x, ridx, rw, cnt = _NVDispatch.apply(xs, topk_idx, topk_weights, self, box)
        return recv_x, ridx, rw, cnt, box["handle"]

    def _dispatch_raw(self, x, topk_idx, topk_weights):
        from .buffer import get_dispatch_layout
        fp8 = isinstance(x, (tuple, list))
        xs = x[0] if fp8 else x
        W, T, L = self.W, self.T, self.buf.num_local_experts
        Tn, k = topk_idx.shape
        _, _, in_rank = get_dispatch_layout(topk_idx, self.buf.num_experts, W)
        send_pos = (torch.cumsum(in_rank.int(), 0) - 1).to(torch.int32)
        send_pos = torch.where(in_rank, send_pos, torch.full_like(send_pos, -1))
        counts = in_rank.sum(0).to(torch.int32)
        # staging rows: payload | idx | weights  (NOTE: one extra local copy; a fused gather is future work)
        stage = torch.zeros(max(Tn, 1), self.row, dtype=torch.uint8, device=xs.device)
        if fp8:
            stage[:Tn, :self.H] = xs.view(torch.uint8)
            sb = x[1].contiguous().view(torch.uint8)
            stage[:Tn, _al16(self.H):_al16(self.H) + sb.shape[1]] = sb
        else:
            stage[:Tn, :self.H * 2] = xs.contiguous().view(torch.uint8)
        o = self.payload
        stage[:Tn, o:o + k * 4] = topk_idx.to(torch.int32).contiguous().view(torch.uint8)
        o2 = o + _al16(self.K * 4)
        stage[:Tn, o2:o2 + k * 4] = topk_weights.float().contiguous().view(torch.uint8)
        dest_rank = torch.where(in_rank, torch.arange(W, device=xs.device, dtype=torch.int32).expand(Tn, W),
                                torch.full((Tn, W), -1, dtype=torch.int32, device=xs.device)).contiguous()
        self._send("d", stage, dest_rank, send_pos.contiguous(), counts, self.row, W)
        data = self._view(self.o_ddata, W * T * self.row).view(W * T, self.row)
        rcounts = self._view(self.o_dcnt, W, torch.int32)
        slot = torch.arange(T, device=xs.device).repeat(W)
        valid_row = slot < rcounts.long().repeat_interleave(T)
        if not self.buf.graph_safe:
            torch.cuda.current_stream().synchronize()
            self.check_error()
            rc = rcounts.tolist()
            sel = torch.cat([torch.arange(s * T, s * T + c, device=xs.device) for s, c in enumerate(rc)]) if sum(rc) else \
                torch.empty(0, dtype=torch.long, device=xs.device)
            rows = data[sel].clone()
            valid = torch.ones(rows.shape[0], dtype=torch.bool, device=xs.device)
        else:
            rc = None
            rows = data
            valid = valid_row
        gidx = rows[:, o:o + k * 4].contiguous().view(torch.int32).long()
        w = rows[:, o2:o2 + k * 4].contiguous().view(torch.float32)
        me = self.buf.rank
        local = (gidx >= me * L) & (gidx < (me + 1) * L) & valid.unsqueeze(1)
        ridx = torch.where(local, gidx - me * L, torch.full_like(gidx, -1)).to(torch.int32)
        rw = torch.where(local, w, torch.zeros_like(w))
        # NOTE: scatter_add, not bincount: CUDA bincount reads the maximum back (a host sync in graph_safe mode)
        slots = torch.where(local, ridx.long(), torch.full_like(gidx, L)).flatten()
        cnt = torch.zeros(L + 1, dtype=torch.int64, device=xs.device).scatter_add_(0, slots, torch.ones_like(slots))
        cnt = cnt[:L].to(torch.int32)
        if fp8:
            rq = rows[:, :self.H].contiguous().view(torch.float8_e4m3fn)
            rs = rows[:, _al16(self.H):_al16(self.H) + self.H // 128 * 4].contiguous().view(torch.float32)
            recv = (rq, rs)
        else:
            recv = rows[:, :self.H * 2].contiguous().view(xs.dtype)
        handle = {"num_tokens": Tn, "send_pos": send_pos, "in_rank": in_rank, "recv_counts": rc,
                  "recv_counts_dev": rcounts.clone(), "dtype": xs.dtype, "topk_idx": topk_idx.long(), "k": k}
        from .buffer import EPHandle
        h = EPHandle(Tn, send_pos, [], rc if rc is not None else [T] * W, in_rank, k)
        h.nv = handle
        return recv, ridx, rw, cnt, h

    # ------------------------------------------------------------------ combine
    def combine(self, y, handle):
        self._check_open("combine")
        return _NVCombine.apply(y, handle, self)

    def _combine_raw(self, y, handle, gw=None):
        """Rows back to their sources, summed in rank order. With ``gw`` (fp32 ``[rows, k]``, the dispatch
        backward) each row also carries its weight gradients; returns ``(out, dw [T, k])`` then."""
        nv = handle.nv
        W, T = self.W, self.T
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
            srcs = torch.arange(W, dtype=torch.int32, device=dev).repeat_interleave(T)
            ok = slot < nv["recv_counts_dev"].repeat_interleave(T)
            dest_rank = torch.where(ok, srcs, torch.full_like(srcs, -1))
            dest_row = slot
        n = y.shape[0]
        if gw is None:
            send_rows = y.contiguous() if n else torch.zeros(1, self.H, dtype=y.dtype, device=dev)
            row_bytes = self.H * 2
        else:
            k = nv["k"]
            send_rows = torch.zeros(max(n, 1), self.crow, dtype=torch.uint8, device=dev)
            send_rows[:n, :self.H * 2] = y.contiguous().view(torch.uint8)
            send_rows[:n, self.cw_off:self.cw_off + k * 4] = gw.float().contiguous().view(torch.uint8)
            row_bytes = self.crow
        counts = self._zero_counts  # combine receivers know their counts already
        self._send("c", send_rows, dest_rank.contiguous(), dest_row.contiguous(), counts, row_bytes, 1)
        cview = self._view(self.o_cdata, W * T * self.crow).view(W * T, self.crow)
        cdata = cview[:, :self.H * 2].view(y.dtype)
        sp = nv["send_pos"].long()
        out = torch.zeros(nv["num_tokens"], self.H, dtype=torch.float32, device=dev)
        for d in range(W):  # rank order, fp32
            rows = cdata[(d * T + sp[:, d].clamp(min=0))].float()
            out = out + torch.where((sp[:, d] >= 0).unsqueeze(1), rows, torch.zeros_like(rows))
        dw = None
        if gw is not None:
            k = nv["k"]
            wrows = cview[:, self.cw_off:self.cw_off + k * 4].contiguous().view(torch.float32)  # [W*T, k]
            per_rank = torch.stack([wrows[d * T + sp[:, d].clamp(min=0)] for d in range(W)])  # [W, Tn, k]
            dw = owner_weight_grad(per_rank, nv["topk_idx"], self.buf.num_local_experts)
        if not self.buf.graph_safe:
            torch.cuda.current_stream().synchronize()
            self.check_error()
        out = out.to(y.dtype)
        return out if gw is None else (out, dw)


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
    def forward(ctx, x, topk_idx, topk_weights, tr, box):
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
            g = torch.zeros(ctx.recv_shape, dtype=h.nv["dtype"], device=dev)
        # NOTE: the weight gradients always travel (zeros when absent): every rank must send the same row
        # layout, whatever its local autograd graph looks like.
        gw = g_rw if g_rw is not None else torch.zeros(ctx.rw_shape, dtype=torch.float32, device=dev)
        dx, dw = tr._combine_raw(g.contiguous(), h, gw)
        return (dx if ctx.needs_input_grad[0] else None), None, \
            (dw.to(ctx.w_dtype) if ctx.needs_input_grad[2] else None), None, None


class _NVCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, handle, tr):
        ctx.tr, ctx.h = tr, handle
        return tr._combine_raw(y, handle)

    @staticmethod
    def backward(ctx, g):
        # NOTE: the backward of combine sends each token's gradient to every rank that received it,
        # into the same rows: a dispatch with the forward's layout.
        tr, h = ctx.tr, ctx.h
        nv = h.nv
        Tn = nv["num_tokens"]
        W = tr.W
        stage = torch.zeros(max(Tn, 1), tr.row, dtype=torch.uint8, device=g.device)
        stage[:Tn, :tr.H * 2] = g.to(nv["dtype"]).contiguous().view(torch.uint8)
        dest_rank = torch.where(nv["in_rank"], torch.arange(W, device=g.device, dtype=torch.int32).expand(Tn, W),
                                torch.full((Tn, W), -1, dtype=torch.int32, device=g.device)).contiguous()
        counts = nv["in_rank"].sum(0).to(torch.int32)
        tr._send("d", stage, dest_rank, nv["send_pos"].contiguous(), counts, tr.row, W)
        data = tr._view(tr.o_ddata, W * tr.T * tr.row).view(W * tr.T, tr.row)
        rc = nv["recv_counts"]
        if rc is not None:
            torch.cuda.current_stream().synchronize()
            tr.check_error()
            sel = torch.cat([torch.arange(s * tr.T, s * tr.T + c, device=g.device) for s, c in enumerate(rc)]) if sum(rc) else \
                torch.empty(0, dtype=torch.long, device=g.device)
            rows = data[sel]
        else:
            rows = data
        return rows[:, :tr.H * 2].contiguous().view(nv["dtype"]), None, None
