"""A pipeline stage made of DeepSeek-V3 decoder layers, with the DualPipe computation-communication
overlap.

Every MoE layer runs as compute segments separated by its two expert-parallel exchanges:

    S1  attention, post-attention norm, router, shared experts      (compute)
    C1  dispatch: token rows, local expert ids and weights          (all-to-all, async)
    S2  local experts on the received rows                          (compute)
    C2  combine: expert outputs back to their tokens                (all-to-all, async)
    S3  residual add                                                (compute)

and the backward runs the same chain in reverse (S3', C2' = the gradients of the combine travel like a
dispatch, S2', C1' = the gradients of the dispatch travel like a combine, S1'). Segments are cut with
detached leaves, and each chunk's chain is a Python generator that yields the in-flight collectives.
``DecoderStage.overlapped_forward_backward`` drives the forward generator of one chunk and the backward
generator of another in turn: while one chunk's all-to-all is in flight, the other chunk computes, which
is the pairing of the DeepSeek-V3 report. A chunk that runs alone (an F or B op of the schedule) drives
its generator to the end, waiting at each exchange.

On CPU/gloo the collectives progress in gloo's own threads while the Python thread computes, so the
overlap is real but the compute is the CPU's; on GPUs the same structure needs the all-to-all on a
separate stream (NCCL does that for async collectives) and SM partitioning to overlap fully.

Weight gradients of the FP8 (and master-dtype) linears go through :class:`WeightGradStore`: the linear's
output passes through a tap whose backward computes dW with the same FP8 Wgrad path as
``dsmoe.nn.fp8`` (``dy`` and ``x`` quantized 1x128 along tokens), now or, inside a split backward, when
the schedule places the W chunk. The routed experts' grouped Wgrad stays in the backward chunk.
"""
from __future__ import annotations

import collections
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...models.deepseek_v3 import DecoderLayer
from ...nn import fp8 as _fp8
from ...nn.fp8 import FP8Linear
from ...nn.moe import MoE
from ..common import EPTimeoutError, get_dispatch_layout, wait_within
from .runtime import WeightGradStore

__all__ = ["DecoderStage", "ZeroBubbleFP8Linear", "enable_weight_grad_store"]


# ----------------------------------------------------------------------------- deferred weight gradients
class _WgradTap(torch.autograd.Function):
    """Identity on the linear's output; its backward computes (or defers) ``dW = dy^T x``."""

    @staticmethod
    def forward(ctx, y, x, weight, use_fp8: bool):
        ctx.save_for_backward(x)
        ctx.weight, ctx.use_fp8 = weight, use_fp8
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        weight, use_fp8 = ctx.weight, ctx.use_fp8
        N, K = weight.shape

        def wgrad():
            g2 = gy.reshape(-1, N).to(x.dtype)
            x2 = x.reshape(-1, K)
            if use_fp8 and N and K and g2.shape[0]:
                # the FP8 recipe's Wgrad: both operands re-quantized 1x128 along the tokens
                dw = _fp8._wgrad(_fp8.pad_to(g2, 1, 128), _fp8.pad_to(x2, 1, 128))[:N, :K]
            else:
                dw = g2.t().to(torch.float32 if use_fp8 else g2.dtype) @ x2.to(torch.float32 if use_fp8 else x2.dtype)
            dw = dw.to(weight.dtype)
            if weight.grad is None:
                weight.grad = dw
            else:
                weight.grad += dw

        if WeightGradStore.enabled:
            WeightGradStore.put(wgrad)
        else:
            wgrad()
        return gy, None, None, None


class ZeroBubbleFP8Linear(FP8Linear):
    """FP8Linear whose weight gradient can be deferred to a W chunk (:class:`WeightGradStore`); the
    forward and input gradient are FP8Linear's own."""

    def forward(self, x):
        if self.is_fp8_weight or not self.weight.requires_grad or not torch.is_grad_enabled():
            return super().forward(x)
        w = self.weight.detach()
        use = self.fp8 and _fp8.fp8_is_enabled()
        y = _fp8.fp8_linear(x, w) if use else F.linear(x, w.to(x.dtype))
        return _WgradTap.apply(y, x, self.weight, use)


def enable_weight_grad_store(module: nn.Module) -> nn.Module:
    """Turns every FP8Linear under ``module`` into a :class:`ZeroBubbleFP8Linear` (same parameters)."""
    for m in module.modules():
        if type(m) is FP8Linear:
            m.__class__ = ZeroBubbleFP8Linear
    return module


# ----------------------------------------------------------------------------- segment helpers
def _leaf(t):
    return t.detach().requires_grad_(t.requires_grad or t.is_floating_point())


def _grad(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


class _AttachAux(torch.autograd.Function):
    """Identity on ``h``; the backward also gives the balance loss its gradient ``scale``, so the loss
    term is trained when the activation's gradient comes back (no extra backward pass)."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((), ctx.scale, dtype=torch.float32, device=g.device), None


class _Async:
    """An in-flight exchange: ``works`` to wait for before the buffers are read, each within the EP
    buffer's timeout (a peer that died or raised becomes an EPTimeoutError here, not a hang)."""

    def __init__(self, works, timeout, what: str):
        self.works, self.timeout, self.what = works, timeout, what

    def wait(self):
        for w in self.works:
            wait_within(w, self.timeout, EPTimeoutError, f"dsmoe pipeline stage: expert-parallel {self.what}")


def _a2a(group, out, inp, out_splits, in_splits):
    return dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group, async_op=True)


class _EPRoute:
    """One chunk's routing across the expert-parallel group (built at dispatch, reused by the backward)."""

    def __init__(self, moe: MoE, idx, T):
        self.group = moe.ep_group
        W, E = moe.ep_world, moe.num_experts
        L = E // W
        _, _, in_rank = get_dispatch_layout(idx, E, W, validate=False)
        dest, tok = in_rank.t().nonzero(as_tuple=True)
        self.tok, self.T, self.k = tok, T, idx.shape[1]
        sidx = idx.long()[tok]
        self.local = (sidx >= 0) & (sidx // L == dest.unsqueeze(1))
        self.send_lidx = torch.where(self.local, sidx - dest.unsqueeze(1) * L, torch.full_like(sidx, -1)).to(torch.int32)
        sc = torch.bincount(dest, minlength=W)
        rc = torch.empty_like(sc)
        self.timeout = moe._ep.timeout
        wait_within(dist.all_to_all_single(rc, sc, group=self.group, async_op=True), self.timeout, EPTimeoutError,
                    "dsmoe pipeline stage: expert-parallel row counts")     # sizes first: small and blocking
        self.sc, self.rc = sc.tolist(), rc.tolist()
        self.S, self.R = sum(self.sc), sum(self.rc)


def _moe_layer_forward(layer: DecoderLayer, h, cos, sin, rec: list, aux_scale: float, stage=None):
    """Generator: one decoder layer's forward as segments; appends its backward record to ``rec``."""
    moe = layer.mlp
    hl = _leaf(h)
    grad = torch.is_grad_enabled()
    h1 = hl + layer.self_attn(layer.input_layernorm(hl), cos, sin)
    x = layer.post_attention_layernorm(h1)
    if not isinstance(moe, MoE):                               # a dense layer: one segment
        out = h1 + moe(x)
        rec.append(("dense", hl, out))
        return out
    shape, H = x.shape, x.shape[-1]
    x2 = x.reshape(-1, H)
    idx, w, scores = moe.route(x2)
    if moe.training:
        S = shape[-2]
        B = math.prod(shape[:-2]) if x.dim() > 2 else 1
        moe.aux_loss = aux = ops.sequence_balance_loss(scores.view(B, S, moe.num_experts),
                                                             idx.view(B, S, moe.top_k), alpha=moe.cfg.aux_loss_alpha)
        with torch.no_grad():
            moe.load += ops.expert_load(idx, moe.num_experts).to(moe.load.dtype)
        if grad and aux_scale:
            h1 = _AttachAux.apply(h1, aux, aux_scale)
            if stage is not None:
                stage.aux_total += float(aux.detach()) * aux_scale
    shared = moe.shared_experts(x2) if moe.shared_experts is not None else None
    w = w.to(torch.float32)
    # ---- C1: dispatch
    if moe._ep is not None:
        rt = _EPRoute(moe, idx, x2.shape[0])
        sx = x2.detach()[rt.tok]
        sw = torch.where(rt.local, w.detach()[rt.tok], torch.zeros((), dtype=torch.float32))
        rx = x2.new_empty(rt.R, H)
        rw = torch.empty(rt.R, rt.k, dtype=torch.float32)
        ridx = torch.empty(rt.R, rt.k, dtype=torch.int32)
        yield _Async([_a2a(rt.group, rx, sx, rt.rc, rt.sc), _a2a(rt.group, rw, sw, rt.rc, rt.sc),
                      _a2a(rt.group, ridx, rt.send_lidx, rt.rc, rt.sc)], rt.timeout, "dispatch")
        n_local = moe.experts.num_experts
    else:
        rt, rx, rw, ridx, n_local = None, x2.detach(), w.detach(), idx, moe.num_experts
    # ---- S2: local experts
    rxl, rwl = rx.requires_grad_(grad), rw.requires_grad_(grad)
    yl = moe._local_experts(rxl, ridx, rwl, n_local).to(x2.dtype)
    # ---- C2: combine
    if rt is not None:
        back = yl.new_empty(rt.S, H)
        yield _Async([_a2a(rt.group, back, yl.detach(), rt.sc, rt.rc)], rt.timeout, "combine")
        acc = torch.float64 if back.dtype == torch.float64 else torch.float32
        comb = torch.zeros(rt.T, H, dtype=acc).index_add_(0, rt.tok, back.to(acc)).to(yl.dtype)
    else:
        comb = yl.detach()
    # ---- S3: residual
    cl, h1l = comb.requires_grad_(grad), _leaf(h1)
    shl = _leaf(shared) if shared is not None else None
    y = cl + shl if shl is not None else cl
    out = h1l + y.view(shape)
    rec.append(("moe", hl, (h1, x2, w, shared), (rxl, rwl, yl), (cl, h1l, shl, out), rt))
    return out


def _moe_layer_backward(r, g_out):
    """Generator: the reverse of :func:`_moe_layer_forward` for its record ``r``; returns dL/dh."""
    if r[0] == "dense":
        _, hl, out = r
        torch.autograd.backward([out], [g_out])
        return _grad(hl)
    _, hl, (h1, x2, w, shared), (rxl, rwl, yl), (cl, h1l, shl, out), rt = r
    torch.autograd.backward([out], [g_out])                      # S3'
    g_comb, g_h1 = _grad(cl), _grad(h1l)
    if rt is not None:                                            # C2': combine gradients travel like a dispatch
        g_yl = yl.new_empty(rt.R, yl.shape[1])
        yield _Async([_a2a(rt.group, g_yl, g_comb[rt.tok], rt.rc, rt.sc)], rt.timeout, "combine backward")
    else:
        g_yl = g_comb
    torch.autograd.backward([yl], [g_yl])                         # S2'
    g_rx, g_rw = _grad(rxl), _grad(rwl)
    if rt is not None:                                            # C1': dispatch gradients travel like a combine
        bx = g_rx.new_empty(rt.S, g_rx.shape[1])
        bw = torch.empty(rt.S, rt.k, dtype=torch.float32)
        yield _Async([_a2a(rt.group, bx, g_rx, rt.sc, rt.rc), _a2a(rt.group, bw, g_rw.float(), rt.sc, rt.rc)],
                     rt.timeout, "dispatch backward")
        acc = torch.float64 if bx.dtype == torch.float64 else torch.float32
        g_x2 = torch.zeros(rt.T, bx.shape[1], dtype=acc).index_add_(0, rt.tok, bx.to(acc)).to(x2.dtype)
        bw = torch.where(rt.local, bw, torch.zeros_like(bw))
        g_w = torch.zeros(rt.T, rt.k, dtype=torch.float32).index_add_(0, rt.tok, bw)
    else:
        g_x2, g_w = g_rx, g_rw
    outs, grads = [h1, x2, w], [g_h1, g_x2, g_w]
    if shared is not None:
        outs.append(shared)
        grads.append(_grad(shl))
    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])   # S1'
    return _grad(hl)


class _Stitch(torch.autograd.Function):
    """Connects a stage's inputs to its segmented outputs for autograd: a plain backward through the
    outputs runs the stage's backward chain to the end (each exchange waited)."""

    # NOTE: the segment outputs come in detached: the chain's own backward walks their graphs, and an
    # edge from this node into them would let the engine walk them a second time. ``anchor`` (a leaf
    # that requires grad) makes the outputs differentiable when no input is (the embedding stage).

    @staticmethod
    def forward(ctx, stage, rec, n_in, anchor, *tensors):
        ctx.stage, ctx.rec, ctx.n_in = stage, rec, n_in
        return tuple(t.view_as(t) for t in tensors[n_in:])

    @staticmethod
    def backward(ctx, *g_outs):
        rec = ctx.stage._take_record(ctx.rec)
        g_ins = _drive(ctx.stage._backward_gen(rec, list(g_outs)))
        return (None, None, None, None, *g_ins, *([None] * len(g_outs)))


def _drive(gen):
    """Runs a segment generator to its end, waiting for each exchange as soon as it is posted."""
    try:
        while True:
            next(gen).wait()
    except StopIteration as e:
        return e.value


def _interleave(g0, g1):
    """Runs two segment generators in turn: each one's exchange is in flight while the other computes."""
    gens, res, pend = [g0, g1], [None, None], [None, None]
    alive = [True, True]
    while any(alive):
        for i in (0, 1):
            if not alive[i]:
                continue
            if pend[i] is not None:
                pend[i].wait()
            try:
                pend[i] = next(gens[i])
            except StopIteration as e:
                res[i], alive[i], pend[i] = e.value, False, None
    return res


class DecoderStage(nn.Module):
    """Decoder layers (and optionally the embedding in front, a head behind) as one pipeline stage.

    ``forward(h)`` -> ``h`` for a stage of layers; with ``embed``, the inputs are the token ids (any
    float or integer tensor ``[b, T]``) and the stage returns ``(h, ids)`` so that later stages (an MTP
    head) see the ids; a stage between them takes and returns ``(h, ids)``; with ``head`` (a module
    called as ``head(h, ids)``) the stage returns what the head returns. ``aux_scale``: the weight of
    the MoE balance losses in the gradient (the pipeline's per-chunk loss scale); 0 leaves them out.
    ``zero_bubble``: FP8Linear weight gradients go through :class:`WeightGradStore`."""

    def __init__(self, layers, rotary, *, embed=None, head=None, carry_ids: bool = False, aux_scale: float = 0.0,
                 zero_bubble: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, l in enumerate(self.layers):
            if not isinstance(l, DecoderLayer):
                raise TypeError(f"DecoderStage: argument 'layers'[{i}] must be a DecoderLayer, got {type(l).__name__}")
        self.rotary = rotary
        self.embed, self.head = embed, head
        self.carry_ids = carry_ids or embed is not None or head is not None
        self.aux_scale = float(aux_scale)
        self.aux_total = 0.0                  # the balance losses' share of the loss since the last reset
        self._records = collections.deque()   # forward records in chunk order, popped by the backward
        self._stitched, self._inputs = {}, {}
        if zero_bubble:
            enable_weight_grad_store(self)

    # ------------------------------------------------------------------ segments
    def _forward_gen(self, ins, rec):
        if self.embed is not None:
            ids = ins[0]
            h = self.embed(ids.long())
            hin = None
        else:
            h, ids = ins[0], (ins[1] if self.carry_ids else None)
            hin = h
        T = h.shape[1]
        cos, sin = self.rotary(torch.arange(T, device=h.device).unsqueeze(0))
        rec.append(("in", hin, h))
        for layer in self.layers:
            h = yield from _moe_layer_forward(layer, h, cos, sin, rec, self.aux_scale, self)
        if self.head is not None:
            hl = _leaf(h)
            outs = self.head(hl, ids)
            outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
            rec.append(("head", hl, outs))
            return outs
        rec.append(("out", h))
        return [h, ids] if self.carry_ids else [h]

    def _backward_gen(self, rec, g_outs):
        """Generator: the stage's backward from the gradients of its outputs; returns the inputs' grads."""
        i = len(rec) - 1
        if rec[i][0] == "head":
            _, hl, outs = rec[i]
            pairs = [(o, g) for o, g in zip(outs, g_outs) if g is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            g = _grad(hl)
            i -= 1
        else:
            g = g_outs[0] if g_outs[0] is not None else torch.zeros_like(rec[i][1])
            i -= 1
        while rec[i][0] != "in":
            g = yield from _moe_layer_backward(rec[i], g)
            i -= 1
        _, hin, h = rec[i]
        if self.embed is not None:
            torch.autograd.backward([h], [g])
            return [None]
        g_ins = [g]
        if self.carry_ids:
            g_ins.append(None)
        return g_ins

    def _take_record(self, rec):
        for i, r in enumerate(self._records):
            if r is rec:
                del self._records[i]
                break
        self._stitched.pop(id(rec), None)
        self._inputs.pop(id(rec), None)
        return rec

    def _start(self, ins):
        """(generator, record) for a forward of ``ins``."""
        rec = []
        return self._forward_gen(list(ins), rec), rec

    def _finish(self, ins, rec, outs):
        if not torch.is_grad_enabled():
            return outs
        self._records.append(rec)
        anchor = torch.empty(0, requires_grad=True)
        stitched = list(_Stitch.apply(self, rec, len(ins), anchor, *ins, *[o.detach() for o in outs]))
        self._stitched[id(rec)], self._inputs[id(rec)] = stitched, list(ins)
        return stitched

    def forward(self, *ins):
        gen, rec = self._start(ins)
        outs = _drive(gen)
        outs = self._finish(ins, rec, outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    # ------------------------------------------------------------------ the DualPipe hook
    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        """Forward of one chunk on ``module0`` and backward of another on ``module1``, each one's
        all-to-all in flight while the other computes. Returns ``(outputs0, loss0)``."""
        rec1 = module1._records[0]            # backwards come in forward order
        stage_outs, ins1 = module1._stitched[id(rec1)], module1._inputs[id(rec1)]
        module1._take_record(rec1)
        if loss1 is not None:
            want = [o for o in stage_outs if o.requires_grad]
            got = torch.autograd.grad(loss1, want, allow_unused=True)
            by_id = {id(o): g for o, g in zip(want, got)}
            loss1.detach_()
        else:
            by_id = {id(o): g for o, g in zip(outputs1, output_grads1)}
        g1 = [by_id.get(id(o)) for o in stage_outs]
        fgen, rec0 = module0._start(inputs0)
        bgen = module1._backward_gen(rec1, g1)
        outs0, g_ins1 = _interleave(fgen, bgen)
        pairs = [(t, g) for t, g in zip(ins1, g_ins1) if g is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        outs0 = module0._finish(inputs0, rec0, outs0)
        loss0 = criterion0(*outs0, *labels0) if criterion0 is not None else None
        return outs0, loss0
