"""dsmoe.parallel.pipeline: the schedules' bubbles against the published formulas (simulated from the
same programs the executor runs), and DualPipe / DualPipeV / 1F1B on gloo with 2 and 4 processes:
losses and outputs equal to a single-process run over the same micro-batches, gradients within 1e-12
(cosine difference), for plain nn.Linear stages (view outputs), WeightGradStore-aware stages and dsmoe
decoder-layer stages (MLA + MoE, with the overlapped forward/backward hook)."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dsmoe.parallel.pipeline import schedule as S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- schedules (no processes)
@pytest.mark.parametrize("kind,pps", [("1f1b", [2, 3, 4, 8]), ("dualpipe", [2, 4, 6, 8]), ("dualpipev", [2, 3, 4, 8])])
def test_schedule_bubble_matches_published_formula(kind, pps):
    # the formulas assume F = B - W (a forward costs what the input-gradient half of a backward costs)
    for pp in pps:
        for m in (2 * pp, 2 * pp + 6, 3 * pp + (pp % 2)):
            if kind == "dualpipe" and m % 2:
                m += 1
            for F_, B_, W_, FB in ((1, 2, 1, 2.5), (3, 5, 2, 6), (2, 3, 1, 4), (1, 2, 1, 3)):
                sim = S.simulate(kind, pp, m, F=F_, B=B_, W=W_, FB=FB)
                want = S.bubble_formula(kind, pp, F=F_, B=B_, W=W_, FB=FB)
                assert max(sim["bubble"]) == pytest.approx(want, abs=1e-9), (kind, pp, m, F_, B_, W_, FB, sim["bubble"])
            # W cheaper than that: the formula is an upper bound
            sim = S.simulate(kind, pp, m, F=1, B=2, W=0.5, FB=2.2)
            assert max(sim["bubble"]) <= S.bubble_formula(kind, pp, F=1, B=2, W=0.5, FB=2.2) + 1e-9


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
def test_programs_run_every_chunk_once(kind):
    for pp in (2, 4, 6):
        m = 2 * pp + 2
        topo = S.Topology(kind, pp)
        for r in range(pp):
            prog = S.PROGRAMS[kind](pp, r, m)
            per = m // 2 if kind == "dualpipe" else m
            fs = [(o.slot, o.chunk) for o in prog if o.kind in ("F", "FB")]
            bs = [(o.slot, o.chunk) for o in prog if o.kind == "B"] + [(o.slot_b, o.chunk_b) for o in prog if o.kind == "FB"]
            for s in topo.slots(r):
                assert sorted(c for sl, c in fs if sl == s) == list(range(per))
                assert sorted(c for sl, c in bs if sl == s) == list(range(per))
            assert sum(o.kind == "W" for o in prog) == sum(o.kind == "B" and o.zb for o in prog)
    # 1F1B's schedule makes (PP-1)(F+B) with F = 1, B = 2 for any chunk count, and DualPipe with F&B < F+B
    # beats it
    assert max(S.simulate("dualpipe", 8, 20, F=1, B=2, W=1, FB=2.5)["bubble"]) < \
        max(S.simulate("1f1b", 8, 20, F=1, B=2, W=1)["bubble"])


def _replay_nccl(kind, pp, chunks, forward_only):
    """Every rank's step against a model of NCCL's point-to-point semantics: tags ignored (the k-th
    receive a rank posts from a peer meets the k-th send that peer posts to it), each pair of ranks'
    operations run in posting order on one stream per rank, and an operation completes only when the
    peer's stream has reached its counterpart (sends larger than NCCL's buffers need the receive
    running). Ranks post as the executor does (the pair's operations in order, receives for the
    current op and the lookahead, sends once computed) and block on the receives an op needs.
    Returns per channel the (sent, received) messages as posted; raises on a deadlock."""
    from dsmoe.parallel.pipeline import runtime as R
    topo = S.Topology(kind, pp)
    progs = [R.program(kind, pp, r, chunks, forward_only) for r in range(pp)]
    chan = [R.channel_ops(kind, pp, r, chunks, forward_only) for r in range(pp)]
    cursor = [{p: 0 for p in chan[r]} for r in range(pp)]
    ready, posted_recv = [set() for _ in range(pp)], [dict() for _ in range(pp)]
    stream = {}             # (rank, peer) -> operations not completed yet, each [direction, index, done]
    count = {}              # (rank, peer, direction) -> operations posted so far
    log = {}                # (src, dst) -> (sent, received) as (kind, path, chunk)

    def path(r, slot):
        return topo.where[(r, slot)][0]

    def advance(r, p, target):
        ops = chan[r][p]
        if target in ops[: cursor[r][p]]:
            return
        while cursor[r][p] < len(ops):
            d, k, slot, c = ops[cursor[r][p]]
            if d == "send" and (k, slot, c) not in ready[r]:
                return
            n = count.get((r, p, d), 0)
            count[(r, p, d)] = n + 1
            op = [d, n, False]
            stream.setdefault((r, p), []).append(op)
            ch = (r, p) if d == "send" else (p, r)
            log.setdefault(ch, ([], []))[0 if d == "send" else 1].append((k, path(r, slot), c))
            if d == "recv":
                posted_recv[r][(k, slot, c)] = op
            cursor[r][p] += 1
            if (d, k, slot, c) == target:
                return

    def run_streams():
        moved = True
        while moved:
            moved = False
            for (r, p), q in stream.items():
                other = stream.get((p, r), [])
                # the heads of the two streams meet when they are the two ends of one message
                if q and other and q[0][0] != other[0][0] and q[0][1] == other[0][1]:
                    q[0][2] = other[0][2] = True
                while q and q[0][2]:
                    q.pop(0)
                    moved = True

    def needs(r, op):
        keys = []
        if op.kind in ("F", "FB"):
            keys.append(("F", op.slot, op.chunk))
        if op.kind == "B":
            keys.append(("B", op.slot, op.chunk))
        if op.kind == "FB" and not forward_only:
            keys.append(("B", op.slot_b, op.chunk_b))
        for k, slot, c in keys:
            peer = topo.prev(r, slot) if k == "F" else topo.next(r, slot)
            if peer is not None and peer[0] != r:
                yield peer[0], (k, slot, c)

    pc = [0] * pp
    moved = True
    while moved:
        moved = False
        for r in range(pp):
            while pc[r] < len(progs[r]):
                for nxt in progs[r][pc[r]: pc[r] + 1 + R._LOOKAHEAD]:
                    for p, key in needs(r, nxt):
                        advance(r, p, ("recv",) + key)
                run_streams()
                if not all(key in posted_recv[r] and posted_recv[r][key][2] for _, key in needs(r, progs[r][pc[r]])):
                    break
                for k, slot, c, dst in R.send_order(topo, [progs[r][pc[r]]], r, forward_only):
                    ready[r].add((k, slot, c))
                    advance(r, dst, ("send", k, slot, c))
                pc[r] += 1
                moved = True
        run_streams()
    assert all(pc[r] == len(progs[r]) for r in range(pp)), (kind, pp, chunks, forward_only, "deadlock", pc)
    assert not any(stream.values()), (kind, pp, chunks, forward_only, "operations left on a stream")
    return log


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
def test_every_channel_matches_by_order_alone(kind):
    # NCCL ignores tags and serializes a pair's operations: on every (sender, receiver) channel the
    # receiver must post its receives in the sender's send order, and the two ranks' streams must meet
    # head to head. Receives posted a few ops ahead in the receiver's own order break both (1F1B PP=2
    # already posts a gradient's receive in front of the activation send the peer waits for).
    for pp in (1, 2, 3, 4, 5, 6, 8):
        if kind == "dualpipe" and pp % 2:
            continue
        for chunks in sorted({2 * pp, 2 * pp + 2, 4 * pp} | ({3 * pp + 1} if kind != "dualpipe" else set())):
            for fo in (False, True):
                log = _replay_nccl(kind, pp, chunks, fo)
                for ch, (snt, rcv) in log.items():
                    assert snt == rcv, (kind, pp, chunks, fo, ch, snt, rcv)
                    assert abs(ch[0] - ch[1]) == 1
                if pp > 1 and not fo:
                    assert len(log) == 2 * (pp - 1)


# ----------------------------------------------------------------------------- stages
H, T_SEQ, MB = 8, 3, 2          # hidden, sequence length, micro-batch size


class LinearStage(nn.Module):
    """nn.Linear with bias on 3-D input: its output is a view."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(H, 2 * H, dtype=torch.float64), nn.Linear(2 * H, H, dtype=torch.float64)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class _WGSLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, g):
        from dsmoe.parallel.pipeline import WeightGradStore
        x, weight = ctx.saved_tensors

        def wgrad():
            dw = g.flatten(0, -2).t() @ x.flatten(0, -2)
            weight.grad = dw if weight.grad is None else weight.grad + dw

        WeightGradStore.put(wgrad) if WeightGradStore.enabled else wgrad()
        return g @ weight, None


class WGSStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * H, H, dtype=torch.float64) * 0.3)
        self.w2 = nn.Parameter(torch.randn(H, 2 * H, dtype=torch.float64) * 0.3)

    def forward(self, x):
        return _WGSLinearFn.apply(torch.tanh(_WGSLinearFn.apply(x, self.w1)), self.w2)


def _decoder_stages(n):
    from dsmoe.models.deepseek_v3 import DecoderLayer
    from dsmoe.nn.rope import RotaryEmbedding
    from dsmoe.parallel.pipeline.v3 import DecoderStage
    from dsmoe.train import preset_config
    cfg = preset_config("micro", 11)
    cfg.hidden_size = H * 4
    rot = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    # layer 0 dense, the others MoE; fp8 off, fp32
    # the reference runs the plain layers (FP8Linear, MoE.forward); the pipeline's copies get the
    # WeightGradStore linears and the segmented MoE
    return [DecoderStage([DecoderLayer(cfg, i, fp8=False)], rot, aux_scale=AUX, zero_bubble=False).train()
            for i in range(n)]


AUX = 0.5


def _stages(kind, n):
    torch.manual_seed(1234)
    if kind == "decoder":
        return _decoder_stages(n)
    return [(LinearStage if kind == "linear" else WGSStage)() for _ in range(n)]


def _hidden(kind):
    return H * 4 if kind == "decoder" else H


def _criterion(out, label):
    return (out - label).pow(2).mean()


def _cos_diff(a, b):
    a, b = a.double(), b.double()
    den = (a * a + b * b).sum().item()
    return 0.0 if den == 0 else 1 - 2 * (a * b).sum().item() / den


def _reference(stages, x, lab, chunks):
    """Single process, same micro-batches: per-chunk losses and outputs; gradients in the stages."""
    from dsmoe.parallel.pipeline.v3 import DecoderStage
    losses, outs = [], []
    for xc, lc in zip(x.tensor_split(chunks), lab.tensor_split(chunks)):
        h, aux = xc, 0.0
        for s in stages:
            if isinstance(s, DecoderStage):   # the layers' own forward; balance losses added to the loss
                cos, sin = s.rotary(torch.arange(h.shape[1]).unsqueeze(0))
                for layer in s.layers:
                    h = layer(h, cos, sin)
                    if getattr(layer.mlp, "aux_loss", None) is not None:
                        aux = aux + AUX * layer.mlp.aux_loss
            else:
                h = s(h)
        loss = _criterion(h, lc)
        (loss + aux).backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    return torch.stack(losses), torch.cat(outs)


def _grads_of(m):
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]


def _check_case(sched, kind, pp, rank, logs=None):
    import copy

    from dsmoe.parallel.pipeline import DualPipe, DualPipeV, OneFOneB, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    nstages = 2 * pp if sched == "dualpipev" else pp
    chunks = 2 * pp + 2
    full = _stages(kind, nstages)
    mine = copy.deepcopy(full)
    if kind == "decoder":
        from dsmoe.parallel.pipeline.v3 import enable_weight_grad_store
        for m in mine:
            enable_weight_grad_store(m)
    dt = torch.float32 if kind == "decoder" else torch.float64
    Hd = _hidden(kind)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(chunks * MB, T_SEQ, Hd, generator=g, dtype=dt)
    lab = torch.randn(chunks * MB, T_SEQ, Hd, generator=g, dtype=dt)
    ref_loss, ref_out = _reference(full, x, lab, chunks)
    if kind == "linear":
        assert full[0](x[:MB])._base is not None      # the stages really return views
    set_p2p_tensor_shapes([(MB, T_SEQ, Hd)])
    set_p2p_tensor_dtype(dt)
    first, last = rank == 0, rank == pp - 1
    if sched == "dualpipe":
        mods = (mine[rank], mine[pp - 1 - rank])
        pipe = DualPipe(mods)
        xin = x.chunk(2)[0] if first else x.chunk(2)[1] if last else None
        lin = lab.chunk(2)[1] if first else lab.chunk(2)[0] if last else None
        args = (xin,) if xin is not None else ()
        exp_loss = ref_loss.chunk(2)[1] if first else ref_loss.chunk(2)[0] if last else None
        exp_out = ref_out.chunk(2)[1] if first else ref_out.chunk(2)[0] if last else None
    elif sched == "dualpipev":
        mods = (mine[rank], mine[2 * pp - 1 - rank])
        pipe = DualPipeV(mods)
        args, lin = ((x,), lab) if first else ((), None)
        exp_loss, exp_out = (ref_loss, ref_out) if first else (None, None)
    else:
        mods = (mine[rank],)
        pipe = OneFOneB(mine[rank])
        args = (x,) if first else ()
        lin = lab if last else None
        exp_loss, exp_out = (ref_loss, ref_out) if last else (None, None)
    labels = (lin,) if lin is not None else ()
    loss, out = pipe.step(*args, num_chunks=chunks, criterion=_criterion, labels=labels, return_outputs=True)
    if logs is not None:
        logs.append(list(pipe.p2p_log))
    where = f"{sched} {kind} pp={pp} rank={rank}"
    if exp_loss is None:
        assert loss is None and out is None, where
    else:
        assert torch.equal(loss, exp_loss), (where, loss, exp_loss)
        assert torch.equal(out, exp_out), where
    # every stage's gradient: the sum over the ranks holding a copy of it (DualPipe mirrors each stage)
    mine_stage = [rank if s == 0 else (pp - 1 - rank if sched == "dualpipe" else 2 * pp - 1 - rank)
                  for s in range(len(mods))]
    sizes = [sum(p.numel() for p in m.parameters()) for m in full]
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    for s, m in enumerate(mods):
        off = sum(sizes[: mine_stage[s]])
        total[off: off + sizes[mine_stage[s]]] += torch.cat([t.reshape(-1).double() for t in _grads_of(m)])
    dist.all_reduce(total)
    for st in range(nstages):
        off = sum(sizes[:st])
        want = torch.cat([t.reshape(-1).double() for t in _grads_of(full[st])])
        assert want.abs().sum() > 0, where
        # every parameter on its own (a small one's error would hide in the whole stage's cosine)
        for (pname, prm), w in zip(full[st].named_parameters(), _grads_of(full[st])):
            got = total[off: off + prm.numel()]
            off += prm.numel()
            assert _cos_diff(got, w.reshape(-1).double()) < 1e-12, (where, st, pname, _cos_diff(got, w.reshape(-1)))
    # forward only: same losses and outputs
    with torch.no_grad():
        loss, out = pipe.step(*args, num_chunks=chunks, criterion=_criterion, labels=labels, return_outputs=True)
    if logs is not None:
        logs.append(list(pipe.p2p_log))
    if exp_loss is not None:
        assert torch.equal(loss, exp_loss) and torch.equal(out, exp_out), where


def _worker(rank, world, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for sched, kind in cases:
            _check_case(sched, kind, world, rank)
            dist.barrier()
        _check_original_api(rank, world)
        dist.barrier()
        if world == 2:
            solo = dist.new_group([0])       # the original's examples run DualPipeV down to one rank
            if rank == 0:
                _check_original_api(0, 1, solo)
            _check_errors(rank)
            _check_train(rank)
        if world == 4:
            _check_ep(rank, world)
            _check_train(rank, ep=2)
    finally:
        dist.destroy_process_group()


def _check_errors(rank):
    from dsmoe.parallel.pipeline import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    mods = (LinearStage(), LinearStage())
    with pytest.raises(ValueError, match="rank_mapping"):
        DualPipe(mods, rank_mapping=[0, 0])
    with pytest.raises(ValueError, match="modules"):
        DualPipe((mods[0],))
    pipe = DualPipe(mods)
    set_p2p_tensor_shapes([(MB, T_SEQ, H)])
    set_p2p_tensor_dtype(torch.float64)
    x = torch.zeros(8 * MB, T_SEQ, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_chunks.*even and >= 2 \\* PP = 4"):
        pipe.step(x, num_chunks=2, criterion=_criterion, labels=(x,))
    with pytest.raises(ValueError, match="num_chunks.*even"):
        pipe.step(x, num_chunks=5, criterion=_criterion, labels=(x,))
    with pytest.raises(ValueError, match="criterion"):
        pipe.step(x, num_chunks=4)
    with pytest.raises(ValueError, match="needs the inputs"):
        pipe.step(num_chunks=4, criterion=_criterion)
    with pytest.raises(ValueError, match="equal\\s+micro-batches|split into"):
        pipe.step(x[:7], num_chunks=4, criterion=_criterion, labels=(x[:7],))
    with pytest.raises(ValueError, match="num_chunks.*>= 2 \\* PP = 4"):
        DualPipeV(mods).step(x, num_chunks=3, criterion=_criterion, labels=(x,))
    with pytest.raises(ValueError, match="set_p2p_tensor_shapes"):
        set_p2p_tensor_shapes("bad")
    solo = dist.new_group([0])          # a one-rank pipeline: odd
    if rank == 0:
        with pytest.raises(ValueError, match="number of pipeline ranks must be even, got 1"):
            DualPipe(mods, process_group=solo)
        with pytest.raises(ValueError, match="modules"):
            DualPipeV((mods[0],), process_group=solo)
    with pytest.raises(ValueError, match="batch_dim"):
        DualPipe(mods, batch_dim=-1)
    with pytest.raises(ValueError, match="'timeout' must be positive, got 0"):
        DualPipe(mods, timeout=0)
    with pytest.raises(TypeError, match="'timeout'"):
        DualPipe(mods, timeout="1s")


def _check_train(rank, ep=1):
    """`dsmoe train --pp 2`'s loop (embedding + MTP head stages, the ids carried along, balance losses
    attached to the activations, gradients summed over the ranks): the single-process loss curve.
    DualPipeV with 4 stages over the micro preset's 2 layers also has stages without layers; ``ep=2``:
    two replicas with their routed experts split between them (four processes)."""
    from dsmoe.train import train, train_pipeline
    ref = train("micro", fp8=False, steps=2, progress=False)[2] if rank == 0 else None
    for sched in ("dualpipe", "dualpipev") if ep == 1 else ("dualpipe",):
        hist = train_pipeline("micro", pp=2, schedule=sched, fp8=False, steps=2, progress=False, ep=ep)[2]
        if rank == 0:
            for k in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
                assert hist[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), (sched, k, hist[k], ref[k])
            # every token counted once per MoE layer (which experts may flip on a near-tie: micro-batches
            # round differently from the full batch)
            assert [sum(map(sum, l)) for l in hist["load"]] == [sum(map(sum, l)) for l in ref["load"]], sched


_CASES = [(s, k) for s in ("dualpipe", "dualpipev", "1f1b") for k in ("linear", "wgs", "decoder")]


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_pipelines_two_ranks():
    mp.spawn(_worker, args=(2, _free_port(), _CASES), nprocs=2, join=True)


# four ranks: every schedule; DualPipe and DualPipeV with the three stage kinds; then PP = 2 x EP = 2
_CASES4 = [("dualpipe", "linear"), ("dualpipe", "wgs"), ("dualpipe", "decoder"), ("dualpipev", "linear"),
           ("dualpipev", "wgs"), ("dualpipev", "decoder"), ("1f1b", "linear")]


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_pipelines_four_ranks_and_expert_parallel():
    mp.spawn(_worker, args=(4, _free_port(), _CASES4), nprocs=4, join=True)


def _untagged_worker(rank, world, port):
    # every message with tag 0: gloo then matches a channel by posting order alone, as NCCL does; the
    # results must still equal the single-process reference, and the executor's own record of what it
    # posted must show each channel's sends and receives in the same order
    from dsmoe.parallel.pipeline import runtime as R
    torch.set_num_threads(1)
    R._TAGGED = False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for sched in ("dualpipe", "dualpipev", "1f1b"):
            logs = []
            _check_case(sched, "linear", world, rank, logs)
            for training, log in zip((True, False), logs):
                every = [None] * world
                dist.all_gather_object(every, log)
                for src in range(world):
                    for dst in range(world):
                        snt = [m[2:] for m in every[src] if m[0] == "send" and m[1] == dst]
                        rcv = [m[2:] for m in every[dst] if m[0] == "recv" and m[1] == src]
                        assert snt == rcv, (sched, world, src, dst, snt, rcv)
                        # a training step uses every neighbour channel (gradients flow back)
                        assert snt or not training or abs(src - dst) != 1, (sched, world, src, dst)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_pipelines_match_by_order_without_tags(world):
    mp.spawn(_untagged_worker, args=(world, _free_port()), nprocs=world, join=True)


# ----------------------------------------------------------------------------- pipeline x expert parallel
def _ep_cfg():
    from dsmoe.models import DeepseekV3Config
    return DeepseekV3Config(vocab_size=16, hidden_size=16, moe_intermediate_size=16, n_routed_experts=4,
                            num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, num_hidden_layers=2,
                            first_k_dense_replace=0, intermediate_size=32, num_attention_heads=2, kv_lora_rank=16,
                            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _check_ep(rank, world):
    """PP = 2 (DualPipe) x EP = 2: global rank e * 2 + p is pipeline rank p of replica e; each replica
    feeds its own data, the routed experts are split over the replicas. The overlapped hook runs the
    chunks' dispatch/combine as async all-to-alls. Reference: one process, the full layers, per replica."""
    import copy

    from dsmoe.models.deepseek_v3 import DecoderLayer
    from dsmoe.nn import MoE
    from dsmoe.nn.rope import RotaryEmbedding
    from dsmoe.parallel.pipeline import DualPipe, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dsmoe.parallel.pipeline.v3 import DecoderStage

    pp, ne = 2, 2
    e, p = divmod(rank, pp)
    pipe_groups = [dist.new_group([r * pp + q for q in range(pp)]) for r in range(ne)]
    ep_groups = [dist.new_group([r * pp + q for r in range(ne)]) for q in range(pp)]
    cfg, dt = _ep_cfg(), torch.float32   # the grouped GEMM takes no float64
    torch.manual_seed(7)
    rot = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    full = [DecoderStage([DecoderLayer(cfg, 0, fp8=False, dtype=dt)], rot, aux_scale=AUX, zero_bubble=False).train()
            for _ in range(pp)]
    L = cfg.n_routed_experts // ne

    def ep_copy(st, group):
        mine = copy.deepcopy(st)
        moe = MoE(cfg, fp8=False, dtype=dt, ep_group=group).train()
        ref = st.layers[0].mlp
        with torch.no_grad():
            moe.gate.load_state_dict(ref.gate.state_dict())
            moe.shared_experts.load_state_dict(ref.shared_experts.state_dict())
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.experts, n).copy_(getattr(ref.experts, n)[e * L:(e + 1) * L])
        mine.layers[0].mlp = moe
        return mine

    # rank p holds stages p and 1 - p; the EP group of a stage copy: the replicas' ranks holding it at
    # the same pipeline rank
    mods = (ep_copy(full[p], ep_groups[p]), ep_copy(full[pp - 1 - p], ep_groups[p]))
    chunks, T = 4, 5
    set_p2p_tensor_shapes([(MB, T, cfg.hidden_size)])
    set_p2p_tensor_dtype(dt)
    data = {}
    for r in range(ne):
        g = torch.Generator().manual_seed(500 + r)
        data[r] = (torch.randn(chunks * MB, T, cfg.hidden_size, generator=g, dtype=dt),
                   torch.randn(chunks * MB, T, cfg.hidden_size, generator=g, dtype=dt))
    x, lab = data[e]
    first, last = p == 0, p == pp - 1
    pipe = DualPipe(mods, process_group=pipe_groups[e])
    xin = x.chunk(2)[0] if first else x.chunk(2)[1]
    lin = lab.chunk(2)[1] if first else lab.chunk(2)[0]
    loss, out = pipe.step(xin, num_chunks=chunks, criterion=_criterion, labels=(lin,), return_outputs=True)
    # reference per replica (fresh copies: the gradients of replica e alone, and of both for the experts)
    refs = {}
    for r in range(ne):
        st = copy.deepcopy(full)
        refs[r] = (st, *_reference(st, *data[r], chunks))
    _, ref_loss, ref_out = refs[e]
    exp_loss = ref_loss.chunk(2)[1] if first else ref_loss.chunk(2)[0]
    exp_out = ref_out.chunk(2)[1] if first else ref_out.chunk(2)[0]
    # the experts' partial sums come back per rank: equal up to fp32 rounding
    assert torch.allclose(loss, exp_loss, rtol=1e-5, atol=0), (loss, exp_loss)
    assert torch.allclose(out, exp_out, rtol=1e-4, atol=1e-5)
    # gradients: the mirrored copies summed over the pipeline ranks of this replica
    for slot, st_idx in ((0, p), (1, pp - 1 - p)):
        m = mods[slot]
        other = torch.cat([t.reshape(-1) for t in _grads_of(m)])
        # pipeline rank 1 - p holds stage st_idx in its other slot, and needs our copy of its own stage
        mirror = torch.empty_like(other)
        send = torch.cat([t.reshape(-1) for t in _grads_of(mods[1 - slot])])
        peer = e * pp + (pp - 1 - p)
        for q in [dist.isend(send, peer), dist.irecv(mirror, peer)]:
            q.wait()
        total = other + mirror
        off = 0
        for (name, prm) in m.named_parameters():
            n = prm.numel()
            got = total[off: off + n].view_as(prm)
            off += n
            if ".experts." in name:      # sharded: both replicas' tokens, this replica's slice
                want = sum(dict(refs[r][0][st_idx].named_parameters())[name].grad[e * L:(e + 1) * L] for r in range(ne))
            else:
                want = dict(refs[e][0][st_idx].named_parameters())[name].grad
            assert _cos_diff(got, want) < 1e-10, (name, rank, _cos_diff(got, want))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fp8", [True, False])
def test_zero_bubble_fp8_linear_defers_the_same_weight_gradient(fp8, device):
    """ZeroBubbleFP8Linear: FP8Linear's output and input gradient; its weight gradient (the FP8 Wgrad
    recipe) equal to FP8Linear's, computed at once or deferred to WeightGradStore.pop()."""
    from dsmoe.nn.fp8 import FP8Linear
    from dsmoe.parallel.pipeline import WeightGradStore
    from dsmoe.parallel.pipeline.v3 import ZeroBubbleFP8Linear, enable_weight_grad_store
    ref = FP8Linear(40, 24, fp8=fp8).to(device)
    zb = enable_weight_grad_store(nn.Sequential(FP8Linear(40, 24, fp8=fp8)))[0].to(device)
    assert type(zb) is ZeroBubbleFP8Linear
    zb.weight.data.copy_(ref.weight.data)
    x = torch.randn(3, 5, 40, device=device)
    g = torch.randn(3, 5, 24, device=device)
    outs = []
    for m, defer in ((ref, False), (zb, False), (zb, True)):
        m.weight.grad = None
        xr = x.clone().requires_grad_()
        y = m(xr)
        WeightGradStore.clear()
        WeightGradStore.enabled = defer
        try:
            y.backward(g)
        finally:
            WeightGradStore.enabled = False
        if defer:
            assert m.weight.grad is None
            WeightGradStore.flush()
            WeightGradStore.pop()
        outs.append((y.detach(), xr.grad, m.weight.grad.clone()))
    WeightGradStore.clear()
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])
        assert torch.allclose(o[2], outs[0][2], rtol=1e-6, atol=1e-7) if not fp8 else torch.equal(o[2], outs[0][2])
    with pytest.raises(RuntimeError, match="no deferred"):
        WeightGradStore.pop()


def test_p2p_settings_are_checked():
    from dsmoe.parallel.pipeline import set_p2p_tensor_dtype, set_p2p_tensor_shapes
    with pytest.raises(ValueError, match="'shapes'"):
        set_p2p_tensor_shapes([])
    with pytest.raises(ValueError, match="'shapes'"):
        set_p2p_tensor_shapes([(2, -1)])
    with pytest.raises(ValueError, match="'dtype'"):
        set_p2p_tensor_dtype(torch.int64)


def test_train_cli_pipeline_errors(monkeypatch, tmp_path, capsys):
    from dsmoe.train import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "run")
    for argv, msg in ((["--pp", "2"], "launch with torchrun --nproc-per-node 2"),
                      (["--pp", "2", "--ep", "2"], "launch with torchrun --nproc-per-node 4"),
                      (["--ep", "2"], "--ep 2: only with --pp >= 2"),
                      (["--pp", "3"], "DualPipe needs an even number"),
                      (["--pp", "2", "--compare"], "--compare: not with --pp"),
                      (["--pp", "2", "--chunks", "3"], "--chunks 3: dualpipe needs at least 2 * PP = 4"),
                      (["--pp", "2", "--batch", "10"], "--batch 10: must split into --chunks 4")):
        assert main(["--preset", "micro", "--out", out, *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--preset", "micro", "--out", out, "--pp", "2"]) == 2
    assert "needs 2 processes, torchrun started 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the original's API, as its examples use it
class _OrigLinearFn(torch.autograd.Function):
    """The weight gradient as the original's example defers it: ``weight.grad`` pre-created, ``+=`` later."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, g):
        from dsmoe.parallel.pipeline import WeightGradStore
        x, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

        def grad_weight_fn():
            weight.grad += g.flatten(0, -2).T @ x.flatten(0, -2)

        if WeightGradStore.enabled:
            _OrigStage.deferred += 1
            WeightGradStore.put(grad_weight_fn)
        else:
            grad_weight_fn()
        return g @ weight, None


class _OrigLinear(nn.Linear):
    def forward(self, x):
        return _OrigLinearFn.apply(x, self.weight)


class _OrigStage(nn.Module):
    """The original example's stage: two bias-free linears through WeightGradStore, and the classmethod
    hook with its exact signature, calling run_backward on the gradients it is handed."""
    hooks = 0
    deferred = 0

    def __init__(self, h):
        super().__init__()
        self.linear1 = _OrigLinear(h, 2 * h, bias=False, dtype=torch.float64)
        self.linear2 = _OrigLinear(2 * h, h, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        from dsmoe.parallel.pipeline import run_backward
        cls.hooks += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def _orig_criterion(output, target):
    return F.mse_loss(output, target).clone()


def _check_original_api(rank, pp, group=None):
    """Drives DualPipe and DualPipeV line by line as deepseek-ai/DualPipe's examples do (construction from
    an nn.Sequential pair, None inputs/labels on the ranks without a first stage, the module-level p2p
    settings, step's keyword forms, zero_grad) and checks what each rank gets back: the chunk losses on
    the loss ranks and None elsewhere, outputs None unless asked, gradients of every stage."""
    from dsmoe.parallel import pipeline as P
    chunks_v = 2 * pp + 1                        # DualPipeV takes an odd count, DualPipe needs an even one
    for sched, nstages, num_chunks in (("dualpipe", pp, 2 * pp + 2), ("dualpipev", 2 * pp, chunks_v)):
        if sched == "dualpipe" and pp % 2:
            continue
        torch.manual_seed(233)
        mb, seq, h = 3, 5, 8
        P.set_p2p_tensor_shapes([(mb, seq, h)])
        P.set_p2p_tensor_dtype(torch.float64)
        full = nn.Sequential(*[_OrigStage(h) for _ in range(nstages)])
        full_x = torch.randn(num_chunks * mb, seq, h, dtype=torch.float64)
        full_l = torch.randn(num_chunks * mb, seq, h, dtype=torch.float64)
        ys, ls = [], []
        for mx, ml in zip(full_x.chunk(num_chunks), full_l.chunk(num_chunks)):
            y = full(mx)
            loss = _orig_criterion(y, ml)
            loss.backward()
            ys.append(y.detach())
            ls.append(loss.detach())
        loss_ref, out_ref = torch.stack(ls), torch.cat(ys)
        other = pp - 1 - rank if sched == "dualpipe" else 2 * pp - 1 - rank
        local_full = nn.Sequential(full[rank], full[other])
        local = nn.Sequential(_OrigStage(h), _OrigStage(h))
        local[0].load_state_dict(local_full[0].state_dict())
        local[1].load_state_dict(local_full[1].state_dict())
        model = (P.DualPipe if sched == "dualpipe" else P.DualPipeV)(local, process_group=group)
        assert model.overlapped_forward_backward is True
        first, last = rank == 0, rank == pp - 1
        if sched == "dualpipe":
            x = full_x.chunk(2)[0] if first else full_x.chunk(2)[1] if last else None
            l = full_l.chunk(2)[1] if first else full_l.chunk(2)[0] if last else None
            want = loss_ref.chunk(2)[1] if first else loss_ref.chunk(2)[0] if last else None
            want_out = out_ref.chunk(2)[1] if first else out_ref.chunk(2)[0] if last else None
        else:
            x, l = (full_x, full_l) if first else (None, None)
            want, want_out = (loss_ref, out_ref) if first else (None, None)
        hooks0, deferred0 = _OrigStage.hooks, _OrigStage.deferred
        loss, outputs = model.step(x, num_chunks=num_chunks, criterion=_orig_criterion, labels=(l,),
                                   return_outputs=False)
        where = (sched, pp, rank)
        assert outputs is None, where
        if want is None:
            assert loss is None, where
        else:
            assert loss.shape == want.shape and torch.equal(loss, want), where
        assert _OrigStage.hooks > hooks0 and _OrigStage.deferred > deferred0, where
        if sched == "dualpipe":        # the example's mirror exchange: each stage's two copies summed
            for p0, p1 in zip(local[0].parameters(), local[1].parameters()):
                p0all = [torch.empty_like(p0) for _ in range(pp)]     # (gloo has no stacked all-gather)
                p1all = [torch.empty_like(p1) for _ in range(pp)]
                dist.all_gather(p0all, p0.grad, group=group)
                dist.all_gather(p1all, p1.grad, group=group)
                p0.grad += p1all[pp - 1 - rank]
                p1.grad += p0all[pp - 1 - rank]
        for (n, p), p_ref in zip(local.named_parameters(), local_full.parameters()):
            assert _cos_diff(p.grad, p_ref.grad) < 1e-13, (where, n)
        model.zero_grad()
        with torch.no_grad():
            loss, outputs = model.step(x, num_chunks=num_chunks, criterion=_orig_criterion, labels=(l,),
                                       return_outputs=True)
        if want is None:
            assert loss is None and outputs is None, where
        else:
            assert torch.equal(loss, want) and torch.equal(outputs, want_out), where
        # no criterion in a forward-only step: no loss, outputs still returned
        with torch.no_grad():
            loss, outputs = model.step(x, num_chunks=num_chunks, return_outputs=True)
        assert loss is None and (outputs is None) == (want is None), where
        if want is not None:
            assert torch.equal(outputs, want_out), where


def test_weight_grad_store_api_matches_the_original():
    """The class-level API the original's users call: enabled, cache, funcs_queue (a FIFO of groups),
    put, flush, pop, clear."""
    import queue

    from dsmoe.parallel.pipeline import WeightGradStore as W
    W.clear()
    assert W.enabled is False and W.cache == [] and isinstance(W.funcs_queue, queue.Queue) and W.funcs_queue.empty()
    ran = []
    W.put(lambda: ran.append(1))
    W.put(lambda: ran.append(2))
    assert len(W.cache) == 2
    W.flush()
    W.put(lambda: ran.append(3))
    W.flush()
    assert W.cache == [] and W.funcs_queue.qsize() == 2
    W.pop()
    assert ran == [1, 2]
    W.pop()
    assert ran == [1, 2, 3] and W.funcs_queue.empty()
    W.put(lambda: ran.append(4))
    W.flush()
    W.clear()
    assert W.cache == [] and W.funcs_queue.empty() and ran == [1, 2, 3]
    with pytest.raises(RuntimeError):
        W.pop()
    import inspect

    from dsmoe.parallel.pipeline import DualPipe, DualPipeV
    from dsmoe.parallel.pipeline.v3 import DecoderStage
    for cls in (DualPipe, DualPipeV):
        sig = inspect.signature(cls.__init__)
        assert list(sig.parameters)[:5] == ["self", "modules", "batch_dim", "process_group", "rank_mapping"]
        assert sig.parameters["batch_dim"].default == 0
        st = inspect.signature(cls.step)
        assert [(n, p.default) for n, p in st.parameters.items() if n not in ("self", "inputs")] == \
            [("num_chunks", 0), ("criterion", None), ("labels", ()), ("return_outputs", False)]
    hook = inspect.signature(DecoderStage.overlapped_forward_backward)
    assert list(hook.parameters) == ["module0", "inputs0", "criterion0", "labels0", "module1", "loss1", "outputs1",
                                     "output_grads1"]


# ----------------------------------------------------------------------------- failures: every rank errors, bounded
class _FailingStage(nn.Module):
    def __init__(self, fail_after=None):
        super().__init__()
        self.lin = nn.Linear(H, H, dtype=torch.float64)
        self.fail_after, self.calls = fail_after, 0

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("stage exploded")
        return self.lin(x)


def _failure_worker(rank, world, port, results):
    import time

    from dsmoe.parallel.pipeline import DualPipeV, PipelineTimeoutError, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    torch.set_num_threads(1)
    # the group's own timeout is long: what bounds the failures below is the pipeline's
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    out = []
    try:
        chunks = 2 * world
        x = torch.randn(chunks * MB, T_SEQ, H, dtype=torch.float64)
        args = dict(criterion=_criterion, labels=(x,)) if rank == 0 else {}
        inp = (x,) if rank == 0 else ()
        shapes = [(MB, T_SEQ, H)]
        set_p2p_tensor_shapes(shapes)
        set_p2p_tensor_dtype(torch.float64)
        pipe = DualPipeV((_FailingStage(), _FailingStage()), timeout=3)

        def outcome(fn):
            t0 = time.monotonic()
            try:
                fn()
                return ("ok", "", time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001
                return (type(e).__name__, str(e), time.monotonic() - t0)

        # disagreements and one-rank argument errors: every rank raises, the group stays usable
        out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks + (rank == world - 1), **args)))
        set_p2p_tensor_shapes([(MB, T_SEQ, H + (rank == 1))])
        out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks, **args)))
        set_p2p_tensor_shapes(shapes)
        if rank == 0:
            out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks, labels=(x,))))   # no criterion
        else:
            out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks, **args)))
        with torch.set_grad_enabled(rank != 1):
            out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks, **args)))
        out.append(outcome(lambda: pipe.step(*inp, num_chunks=chunks, **args)))            # still works
        # a stage that raises mid-step on the last rank (alive, not dead): every rank errors within the
        # pipeline's timeout, and the failed pipeline refuses further steps at once
        g = dist.new_group(list(range(world)))
        bad = DualPipeV((_FailingStage(1 if rank == world - 1 else None), _FailingStage()), process_group=g,
                        timeout=3)
        out.append(outcome(lambda: bad.step(*inp, num_chunks=chunks, **args)))
        out.append(outcome(lambda: bad.step(*inp, num_chunks=chunks, **args)))
        results[rank] = out
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_pipeline_failures_raise_on_every_rank_within_the_timeout():
    world = 3
    with mp.Manager() as mgr:
        results = mgr.dict()
        mp.spawn(_failure_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        res = dict(results)
    assert sorted(res) == list(range(world))
    for r in range(world):
        nc, shp, arg, mode, ok, mid, after = res[r]
        assert nc[0] == "ValueError" and "num_chunks: rank 0 = 6, rank 1 = 6, rank 2 = 7" in nc[1], (r, nc)
        assert shp[0] == "ValueError" and "p2p shapes" in shp[1], (r, shp)
        if r == 0:
            assert arg[0] == "ValueError" and "criterion" in arg[1], arg
        else:
            assert arg[0] == "ValueError" and "rank(s) [0] rejected" in arg[1], (r, arg)
        assert mode[0] == "ValueError" and "grad mode" in mode[1] and "rank 1 = no_grad" in mode[1], (r, mode)
        assert ok[0] == "ok", (r, ok)
        if r == world - 1:
            assert mid[0] == "RuntimeError" and "stage exploded" in mid[1], mid
        else:
            assert mid[0] == "PipelineTimeoutError" and "pipeline rank" in mid[1], (r, mid)
        # bounded by the pipeline's 3 s (a rank waits on a peer that itself waits: a few timeouts at most),
        # far below the group's 300 s
        assert mid[2] < 60, (r, mid)
        assert after[0] == "PipelineTimeoutError" and "earlier step" in after[1] and after[2] < 5, (r, after)
