"""Two-hop expert-parallel dispatch/combine for groups that span nodes (``EPBuffer(backend="hierarchical")``).

Layout: the W ranks of the group are node-major, ``R = ranks_per_node`` consecutive ranks per node
(``rank = node * R + local``, as torchrun numbers them), ``N = W / R`` nodes; experts are placed as the
flat backends place them (expert ``e`` on rank ``e // L``), hence node-major too: node ``n`` holds experts
``[n R L, (n + 1) R L)``. Two families of process groups are built once, by every rank of the group:
- inter-node: the N ranks with the same local index (one "rail"), group rank = node;
- intra-node: the R ranks of one node, group rank = local index.

Dispatch (source rank ``(n, l)``):
1. count exchange on the rail: per destination node, the rows it will receive from me, how many of them
   each of its local ranks needs, and my call signature (dtype, top_k, form);
2. count exchange in the node: each forwarder tells its node's ranks how many rows it will forward from
   every source node, with the signatures of its whole rail: every rank then holds every rank's signature,
   and ranks that disagree all raise ValueError before any payload moves (same message as "collective");
3. hop 1 (rail all_to_all): every token ONCE per destination node that hosts any of its experts, to the
   same-local-rank peer there; the row is payload | scales (FP8) | global expert ids | weights (fp32);
4. hop 2 (node all_to_all): the forwarder sends each row it received to the ranks of its node hosting any
   of the token's experts (itself included, a local copy);
5. the receiver puts the rows in the flat order (source rank, then source token), turns global ids into
   local ones (-1 elsewhere) and zeroes the weights of other ranks' slots: the outputs are the
   collective backend's, byte for byte.

Combine runs it backwards: the rows go back to their forwarder (node all_to_all), which sums the copies of
each (source, token) row in local-rank order (fp32; fp64 for fp64 rows), the node partials go back once
per node over the rail (in fp32 by default: ``combine_partials="fp32"``; or in the rows' dtype,
``"native"``), and the source sums them in node order. With fp32 partials and 16-bit rows, a partial of ONE
row (the token reached one rank of that node) crosses in the rows' dtype: it is that row, exactly, so the
sums do not change, and both ends know which rows those are from the dispatch layout (``_mixed_partials``;
not on the ``symm_mem`` rail, whose buffers hold fixed-width rows). Node-major rank order makes that the flat backend's
sum in rank order, only associated per node: equal up to fp32 summation order, exactly equal when the sums
are exact. Weight gradients (the dispatch backward) travel with the rows, masked by the receiver to its own
slots: their sums are exact. The backward of combine is a dispatch of the gradient rows along the same
two hops.

Every collective is waited with the buffer's timeout (EPBuffer._wait): a peer that died or never called
raises EPTimeoutError on its rail and node peers within the timeout, and on the other ranks within about
two timeouts (they wait on a peer that has raised). Count exchanges are host synchronizations, as in the
collective backend.

``hop1="symm_mem"`` (CUDA, torch built with NVSHMEM): the hop-1 payloads (dispatch, combine and both
backwards) go through torch symmetric memory's ``all_to_all_vdev_2d`` on the rail group, with one "expert"
per rank (``ne = 1``: a plain variable all_to_all, splits exchanged on the device by the kernel itself), from
and into symmetric buffers sized for ``max_tokens_per_rank`` tokens to or from every node. The count
exchanges stay NCCL collectives (the host needs the sizes for hop 2 anyway). NOTE: the kernel PULLS from
the peers' send buffers, so a rail barrier (a one-value NCCL all_to_all, stream-ordered after the peers'
previous pulls) precedes every write into this rank's send buffer.

``plan`` is the pure layout both the transport and tools/internode_traffic.py use: the traffic figures of
docs/internode.md are counted from the layouts the transport sends.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .common import CALL_FIELDS, EPHandle, EPTimeoutError, as_bytes_rows, disagreement, dtype_code, dtype_name, from_bytes, \
    get_dispatch_layout, pack_rows, unpack_rows

__all__ = ["HierarchicalTransport", "plan", "flat_plan"]

_SIG = len(CALL_FIELDS)


def plan(topk_idx: torch.Tensor, num_experts: int, world_size: int, ranks_per_node: int):
    """The source side of a two-hop dispatch of ``topk_idx [T, k]`` (ids checked by the caller; -1 skipped).

    Returns ``(in_rank bool [T, W], tok1 int64 [S1], send1 int64 [N], fwd int64 [N, R])``: ``tok1`` the tokens
    sent in hop 1 grouped by destination node (tokens ascending inside), ``send1[m]`` how many go to node m,
    ``fwd[m, j]`` how many of those node m's forwarder passes on to its local rank j."""
    W, R = world_size, ranks_per_node
    N = W // R
    _, _, in_rank = get_dispatch_layout(topk_idx, num_experts, W, validate=False)
    T = in_rank.shape[0]
    per = in_rank.view(T, N, R)
    dest, tok1 = per.any(2).t().nonzero(as_tuple=True)
    send1 = torch.bincount(dest, minlength=N)
    fwd = per.sum(0, dtype=torch.int64)
    return in_rank, tok1, send1, fwd


def flat_plan(topk_idx: torch.Tensor, num_experts: int, world_size: int):
    """Rows the flat (collective) backend sends to each rank for ``topk_idx``: int64 ``[W]``."""
    _, _, in_rank = get_dispatch_layout(topk_idx, num_experts, world_size, validate=False)
    return in_rank.sum(0, dtype=torch.int64)


class _SymmRail:
    """Hop 1 over NVSHMEM (see the module docstring)."""

    def __init__(self, tr, group, N: int, max_rows: int, cap: int):
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as e:
            raise RuntimeError(f"dsmoe.EPBuffer: hop1='symm_mem' needs torch.distributed._symmetric_memory: {e}") from e
        if not torch.cuda.is_available() or not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d") or \
                not getattr(symm_mem, "is_nvshmem_available", lambda: False)():
            raise RuntimeError("dsmoe.EPBuffer: hop1='symm_mem' needs CUDA and a torch build with NVSHMEM "
                               "(torch.ops.symm_mem.all_to_all_vdev_2d); use hop1='collective'")
        try:
            symm_mem.set_backend("NVSHMEM")
        except Exception:  # noqa: BLE001 - already chosen by the process: rendezvous reports a mismatch
            pass
        dev = torch.device("cuda", torch.cuda.current_device())
        self.tr, self.group, self.N, self.cap = tr, group, N, cap
        self.name = group.group_name
        self.max_rows = max_rows
        self.send = symm_mem.empty(max_rows * cap, dtype=torch.uint8, device=dev)
        self.recv = symm_mem.empty(max_rows * cap, dtype=torch.uint8, device=dev)
        self.splits = symm_mem.empty(N, dtype=torch.int64, device=dev)
        self.splits_offsets = symm_mem.empty((2, N), dtype=torch.int64, device=dev)
        for t in (self.send, self.recv, self.splits, self.splits_offsets):
            symm_mem.rendezvous(t, self.name)

    def fits(self, inp) -> bool:
        # NOTE: the row width only (agreed by every rank); the row counts always fit, dispatch checks
        # T <= max_tokens_per_rank, and no rank sends or receives more than T rows per node
        return inp.is_cuda and inp.shape[1] <= self.cap

    def a2a(self, out, inp, in_splits, what):
        w = inp.shape[1]
        rows = self.send.numel() // w
        self.tr._even(self.group, torch.zeros(self.N, 1, dtype=torch.int64, device=inp.device), what)  # barrier
        src, dst = self.send[:rows * w].view(rows, w), self.recv[:rows * w].view(rows, w)
        src[:inp.shape[0]].copy_(inp)
        self.splits.copy_(torch.tensor(list(in_splits), dtype=torch.int64))
        torch.ops.symm_mem.all_to_all_vdev_2d(src, dst, self.splits, self.splits_offsets, self.name)
        out.copy_(dst[:out.shape[0]])
        return out


class HierarchicalTransport:
    """The two-hop transport of one EPBuffer (built by it; see the module docstring)."""

    def __init__(self, buf):
        self.buf = buf
        W, R = buf.world_size, buf.ranks_per_node
        self.R, self.N = R, W // R
        self.node, self.local = divmod(buf.rank, R)
        # NOTE: the handshake first (as the nvlink transport does): ranks that disagree on the node layout
        # would otherwise build different groups and wait on each other until the timeout
        buf._handshake("cuda" if dist.get_backend(buf.group) == "nccl" else "cpu", "__init__")
        ranks = dist.get_process_group_ranks(buf.group)  # global ranks, in group-rank order
        # NOTE: every member builds its own two groups, intra first: only members synchronize
        # (use_local_synchronization), so ranks outside the EP group need not call, and no rank waits on a
        # group whose members are still building another one.
        intra_ranks = [ranks[self.node * R + j] for j in range(R)]
        inter_ranks = [ranks[m * R + self.local] for m in range(self.N)]
        self.intra = self._group(intra_ranks, "intra-node")
        self.inter = self._group(inter_ranks, "inter-node")
        # new_group orders members by global rank: the group ranks must be the node/local indices
        if [dist.get_group_rank(self.intra, g) for g in intra_ranks] != list(range(R)) or \
                [dist.get_group_rank(self.inter, g) for g in inter_ranks] != list(range(self.N)):
            raise ValueError("dsmoe.EPBuffer: argument 'group': the hierarchical backend needs the group's global "
                             "ranks in ascending order (node-major), got " + str(ranks))
        self.symm = None
        cfg = buf.config
        if cfg.hop1 == "symm_mem":
            cap = 4 * cfg.hidden + 4 * (cfg.hidden // 128) + 8 * cfg.top_k_max  # fp32 rows + scales + ids + weights
            self.symm = _SymmRail(self, self.inter, self.N, cfg.max_tokens_per_rank * self.N, cap)
            self.max_tokens = cfg.max_tokens_per_rank

    def _group(self, ranks, what):
        try:
            return dist.new_group(ranks, timeout=self.buf.timeout, use_local_synchronization=True)
        except Exception as e:  # noqa: BLE001 - the store raises its own types on a missing peer
            self.buf._failed = f"building the {what} group: {type(e).__name__}"
            raise EPTimeoutError(f"dsmoe.EPBuffer: building the {what} process group {ranks} failed (a peer "
                                 f"died or did not build its EPBuffer): {e}") from e

    # ------------------------------------------------------------------ collectives
    def _a2a(self, group, out, inp, out_splits, in_splits, what):
        n = len(out_splits)
        if len(in_splits) != n or sum(out_splits) != out.shape[0] or sum(in_splits) != inp.shape[0]:
            raise ValueError(f"dsmoe.EPBuffer.{what}: split sizes {list(in_splits)} -> {list(out_splits)} do not "
                             f"match {inp.shape[0]} -> {out.shape[0]} rows over {n} ranks")
        inp = inp.contiguous()
        self.buf._wait(lambda: dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=group,
                                                      async_op=True), what)
        return out

    def _rail(self, out, inp, out_splits, in_splits, what):
        """A hop-1 payload exchange: NVSHMEM when chosen and the rows fit its buffers (fp64 rows do not: every
        rank decides alike, the row width is agreed), the rail collective otherwise."""
        if self.symm is not None and self.symm.fits(inp):
            return self.symm.a2a(out, inp, in_splits, what)
        return self._a2a(self.inter, out, inp, out_splits, in_splits, what)

    def _even(self, group, send, what):
        recv = torch.empty_like(send)
        self.buf._wait(lambda: dist.all_to_all_single(recv, send.contiguous(), group=group, async_op=True), what)
        return recv

    def _record(self, what, rail_rows, node_rows, w1, w2):
        """rail_rows[m]: rows this rank sent to node m over the rail; node_rows[j]: to local rank j."""
        inter = sum(int(c) for m, c in enumerate(rail_rows) if m != self.node)
        intra = sum(int(c) for j, c in enumerate(node_rows) if j != self.local)
        self.buf._record(what, inter, inter * w1, intra, intra * w2)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx, topk_weights):
        buf, N, R = self.buf, self.N, self.R
        E, W, L, rank = buf.num_experts, buf.world_size, buf.num_local_experts, buf.rank
        fp8 = isinstance(x, tuple)
        xs = x[0] if fp8 else x
        dev = xs.device
        T, k = topk_idx.shape
        if self.symm is not None and T > self.max_tokens:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: argument 'x': {T} tokens exceed max_tokens_per_rank="
                             f"{self.max_tokens} (the size of the hop1='symm_mem' buffers)")
        idx = topk_idx.long()
        in_rank, tok1, send1, fwd = plan(topk_idx, E, W, R)
        sig = torch.tensor([dtype_code(xs.dtype), k, int(fp8)], dtype=torch.int64, device=dev)
        # 1. rail counts: [rows to node m, rows node m forwards to each of its ranks, my signature]
        c1 = torch.cat([send1.view(N, 1), fwd, sig.view(1, -1).expand(N, -1)], 1)
        r1 = self._even(self.inter, c1, "dispatch").tolist()
        recv1 = [row[0] for row in r1]
        fwd_in = [row[1:1 + R] for row in r1]            # [source node][local rank j]
        rail_sigs = [row[1 + R:] for row in r1]          # signatures of (m, my local index)
        # 2. node counts: to local rank j, the rows I forward to it from each source node, and my rail's signatures
        c2 = torch.tensor([[fwd_in[m][j] for m in range(N)] + [v for sg in rail_sigs for v in sg] for j in range(R)],
                          dtype=torch.int64, device=dev)
        r2 = self._even(self.intra, c2, "dispatch").tolist()
        recv2 = [row[:N] for row in r2]                  # [forwarder j'][source node m']
        sigs = [r2[s % R][N + (s // R) * _SIG: N + (s // R + 1) * _SIG] for s in range(W)]
        diff = disagreement(sigs, CALL_FIELDS, {"dtype": dtype_name})
        if diff:
            raise ValueError(f"dsmoe.EPBuffer.dispatch: the ranks disagree on this call ({diff}); every rank must "
                             f"dispatch the same dtype, top_k and form")
        # 3. hop 1: one row per (token, destination node), global ids and fp32 weights
        rows, widths = pack_rows(xs[tok1], x[1][tok1] if fp8 else None, idx[tok1].to(torch.int32),
                                 topk_weights[tok1].float())
        width = sum(widths)
        S1r = sum(recv1)
        got1 = torch.empty(S1r, width, dtype=torch.uint8, device=dev)
        self._rail(got1, rows, recv1, send1.tolist(), "dispatch")
        # 4. hop 2: forward to the ranks of this node that host any of the token's experts
        gids = from_bytes(got1, width - 8 * k, width - 4 * k, torch.int32, k)
        _, _, fin = get_dispatch_layout(gids, E, W, validate=False)
        dest2, row2 = fin[:, self.node * R:(self.node + 1) * R].t().nonzero(as_tuple=True)
        send2 = torch.bincount(dest2, minlength=R).tolist()
        if send2 != [sum(fwd_in[m][j] for m in range(N)) for j in range(R)]:
            raise RuntimeError(f"dsmoe.EPBuffer.dispatch: internal: forwarded rows {send2} differ from the counts "
                               f"the sources announced")
        recv2_tot = [sum(r) for r in recv2]
        got2 = torch.empty(sum(recv2_tot), width, dtype=torch.uint8, device=dev)
        self._a2a(self.intra, got2, got1[row2], recv2_tot, send2, "dispatch")
        self._record("dispatch", send1.tolist(), send2, width, width)
        # 5. flat order: source rank s = m' R + j' ascending; received grouped by forwarder j', then m'
        off = [0] * R
        for j in range(1, R):
            off[j] = off[j - 1] + recv2_tot[j - 1]
        blocks, recv_counts = [], []
        for s in range(W):
            m, j = divmod(s, R)
            start = off[j] + sum(recv2[j][:m])
            blocks.append(torch.arange(start, start + recv2[j][m], device=dev))
            recv_counts.append(recv2[j][m])
        perm = torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.int64, device=dev)
        out = got2[perm]
        recv, g, w = unpack_rows(out, widths, xs.dtype, buf.hidden, k)
        g = g.long()
        local = (g >= 0) & (g // L == rank)
        ridx = torch.where(local, g - rank * L, torch.full_like(g, -1)).to(torch.int32)
        rw = torch.where(local, w, torch.zeros((), dtype=torch.float32, device=dev))
        cnt = torch.bincount(ridx[ridx >= 0].long(), minlength=L).to(torch.int32)
        # the flat backend's handle fields (what a caller may inspect), then the two hops' state
        dest, tok = in_rank.t().nonzero(as_tuple=True)
        send_idx = idx[tok]
        slot_local = (send_idx >= 0) & (send_idx // L == dest.unsqueeze(1))
        handle = EPHandle(T, tok, in_rank.sum(0).tolist(), recv_counts, slot_local, k,
                          torch.bfloat16 if fp8 else xs.dtype)
        handle.hier = {"tok1": tok1, "send1": send1.tolist(), "recv1": recv1, "row2": row2, "send2": send2,
                       "recv2": recv2_tot, "perm": perm, "recv_local": local, "S1r": S1r}
        if buf.config.combine_partials == "fp32" and self.symm is None and handle.dtype.itemsize < 4:
            # the combine's single-row partials (see _mixed_partials), laid out here where the dispatch already
            # synchronizes the host: the combine itself then needs no host synchronization
            dest1 = torch.repeat_interleave(torch.arange(N, device=dev), send1)
            src1 = torch.repeat_interleave(torch.arange(N, device=dev), torch.tensor(recv1, dtype=torch.int64,
                                                                                     device=dev))
            one_s = in_rank.view(T, N, R).sum(2)[tok1, dest1] == 1   # mine, per hop-1 row I sent
            one_f = torch.bincount(row2, minlength=S1r) == 1            # as forwarder, per hop-1 row I received
            cnt = torch.stack([torch.bincount(dest1[one_s], minlength=N), torch.bincount(src1[one_f], minlength=N)])
            n_one_s, n_one_f = cnt.tolist()
            handle.hier["mixed"] = {"one_s": one_s.nonzero().squeeze(1), "sum_s": (~one_s).nonzero().squeeze(1),
                                    "one_f": one_f.nonzero().squeeze(1), "sum_f": (~one_f).nonzero().squeeze(1),
                                    "n_one_s": n_one_s, "n_one_f": n_one_f}
        return handle, recv, ridx, rw, cnt

    def dispatch_rows(self, rows, handle):
        """The backward of combine: ``rows [T, *]`` along the dispatch's two hops, in the flat order."""
        h = handle.hier
        dev = rows.device
        b = as_bytes_rows(rows[h["tok1"]])
        width = b.shape[1]
        got1 = torch.empty(h["S1r"], width, dtype=torch.uint8, device=dev)
        self._rail(got1, b, h["recv1"], h["send1"], "combine backward")
        got2 = torch.empty(sum(h["recv2"]), width, dtype=torch.uint8, device=dev)
        self._a2a(self.intra, got2, got1[h["row2"]], h["recv2"], h["send2"], "combine backward")
        self._record("combine backward", h["send1"], h["send2"], width, width)
        R = got2.shape[0]
        return got2[h["perm"]].view(rows.dtype).view(R, *rows.shape[1:])

    # ------------------------------------------------------------------ combine
    def combine(self, y, handle, gw=None, what="combine"):
        h = handle.hier
        dev = y.device
        H, k = y.shape[1], handle.top_k
        acc_t = torch.float64 if y.dtype == torch.float64 else torch.float32
        # back to the hop-2 receive order, grouped by forwarder
        z = torch.empty_like(y)
        z[h["perm"]] = y
        b = as_bytes_rows(z)
        if gw is not None:
            gwm = torch.where(h["recv_local"], gw.float(), torch.zeros((), dtype=torch.float32, device=dev))
            gz = torch.empty_like(gwm)
            gz[h["perm"]] = gwm
            b = torch.cat([b, as_bytes_rows(gz)], 1)
        yb = H * y.element_size()
        back2 = torch.empty(sum(h["send2"]), b.shape[1], dtype=torch.uint8, device=dev)
        self._a2a(self.intra, back2, b, h["send2"], h["recv2"], what)
        # the forwarder's node partial of every row it received in hop 1, local ranks in order
        vals = from_bytes(back2, 0, yb, y.dtype, H)
        part = torch.zeros(h["S1r"], H, dtype=acc_t, device=dev)
        start = 0
        for c in h["send2"]:  # NOTE: local-rank order; a row appears at most once per local rank's block
            sl = slice(start, start + c)
            part.index_add_(0, h["row2"][sl], vals[sl].to(acc_t))
            start += c
        pdt = acc_t if self.buf.config.combine_partials == "fp32" else y.dtype
        pw = None
        if gw is not None:
            pw = torch.zeros(h["S1r"], k, dtype=torch.float32, device=dev)
            pw.index_add_(0, h["row2"], from_bytes(back2, yb, b.shape[1], torch.float32, k))  # disjoint slots: exact
        if pdt != y.dtype and "mixed" in h:
            pv, pwv = self._mixed_partials(part, pw, y.dtype, h, what, b.shape[1])
        else:
            pb = as_bytes_rows(part.to(pdt))
            if pw is not None:
                pb = torch.cat([pb, as_bytes_rows(pw)], 1)
            back1 = torch.empty(sum(h["send1"]), pb.shape[1], dtype=torch.uint8, device=dev)
            self._rail(back1, pb, h["send1"], h["recv1"], what)
            self._record(what, h["recv1"], h["recv2"], pb.shape[1], b.shape[1])
            pyb = H * torch.empty((), dtype=pdt).element_size()
            pv = from_bytes(back1, 0, pyb, pdt, H)
            pwv = from_bytes(back1, pyb, pb.shape[1], torch.float32, k) if pw is not None else None
        out = torch.zeros(handle.num_tokens, H, dtype=acc_t, device=dev)
        start = 0
        for c in h["send1"]:  # node order: with node-major ranks, the flat backend's rank order per node
            sl = slice(start, start + c)
            out.index_add_(0, h["tok1"][sl], pv[sl].to(acc_t))
            start += c
        out = out.to(y.dtype)
        if gw is None:
            return out
        dw = torch.zeros(handle.num_tokens, k, dtype=torch.float32, device=dev)
        dw.index_add_(0, h["tok1"], pwv)
        return out, dw

    def _mixed_partials(self, part, pw, row_dtype, h, what, w2):
        """Hop 1 of combine with exact fp32 partials in fewer bytes: a partial of ONE row (the token reached one
        rank of that node) is that row, exactly representable in the rows' dtype, so it crosses in it; real
        sums cross in fp32. Both ends know which rows are which from the dispatch layout (no extra exchange):
        per node, the single rows then the summed ones, as one byte stream. Returns the partials (fp32, in
        the hop-1 send order) and the weight-gradient partials (or None)."""
        mx, dev, H = h["mixed"], part.device, part.shape[1]
        extra = 0 if pw is None else 4 * pw.shape[1]
        w_one, w_sum = H * torch.empty((), dtype=row_dtype).element_size() + extra, 4 * H + extra

        def rows(sel, dt):
            r = as_bytes_rows(part[sel].to(dt))
            return torch.cat([r, as_bytes_rows(pw[sel])], 1) if pw is not None else r

        a, z = rows(mx["one_f"], row_dtype), rows(mx["sum_f"], torch.float32)
        pieces, out_bytes, ia, iz = [], [], 0, 0
        for c, n1 in zip(h["recv1"], mx["n_one_f"]):  # the forwarder's hop-1 rows, grouped by source node
            pieces += [a[ia:ia + n1].reshape(-1), z[iz:iz + c - n1].reshape(-1)]
            out_bytes.append(n1 * w_one + (c - n1) * w_sum)
            ia, iz = ia + n1, iz + c - n1
        in_bytes = [n1 * w_one + (c - n1) * w_sum for c, n1 in zip(h["send1"], mx["n_one_s"])]
        send = torch.cat(pieces).view(-1, 1)
        back = torch.empty(sum(in_bytes), 1, dtype=torch.uint8, device=dev)
        self._a2a(self.inter, back, send, in_bytes, out_bytes, what)
        inter = sum(b for m, b in enumerate(out_bytes) if m != self.node)
        inter_rows = sum(c for m, c in enumerate(h["recv1"]) if m != self.node)
        intra_rows = sum(c for j, c in enumerate(h["recv2"]) if j != self.local)
        self.buf._record(what, inter_rows, inter, intra_rows, intra_rows * w2)
        flat, pos, ga, gz = back.view(-1), 0, [], []
        for c, n1 in zip(h["send1"], mx["n_one_s"]):
            ga.append(flat[pos:pos + n1 * w_one])
            pos += n1 * w_one
            gz.append(flat[pos:pos + (c - n1) * w_sum])
            pos += (c - n1) * w_sum
        ra, rz = torch.cat(ga).view(-1, w_one), torch.cat(gz).view(-1, w_sum)
        S1 = h["tok1"].shape[0]
        pv = torch.empty(S1, H, dtype=torch.float32, device=dev)
        pv[mx["one_s"]] = from_bytes(ra, 0, w_one - extra, row_dtype, H).float()
        pv[mx["sum_s"]] = from_bytes(rz, 0, w_sum - extra, torch.float32, H)
        if pw is None:
            return pv, None
        k = pw.shape[1]
        pwv = torch.empty(S1, k, dtype=torch.float32, device=dev)
        pwv[mx["one_s"]] = from_bytes(ra, w_one - extra, w_one, torch.float32, k)
        pwv[mx["sum_s"]] = from_bytes(rz, w_sum - extra, w_sum, torch.float32, k)
        return pv, pwv
