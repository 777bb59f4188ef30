"""MoE with expert parallelism (dsmoe.parallel.EPBuffer, collective backend on gloo, 2 and 3 processes):
outputs and gradients equal a single-process MoE holding every expert, in each situation: random routing,
every token routed to one rank's experts, ranks with no tokens, gradients needed on some ranks only; eager
and (2 processes) under torch.compile."""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

E = 12
HID = 64  # small: CPU grouped GEMMs run over 128-row padded expert segments
SITUATIONS = ("random", "one_rank", "empty_ranks", "grad_some")


def _tokens(situation, r):
    if situation == "empty_ranks":
        return 0 if r % 2 else 19 + r
    return [37, 21, 13][r]


def _cfg():
    from dsmoe.models import DeepseekV3Config
    return DeepseekV3Config(vocab_size=16, hidden_size=HID, moe_intermediate_size=32, n_routed_experts=E,
                            num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, num_hidden_layers=1,
                            first_k_dense_replace=0, intermediate_size=64, num_attention_heads=1, kv_lora_rank=32,
                            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _inputs(situation, r):
    g = torch.Generator().manual_seed(100 + r + 10 * SITUATIONS.index(situation))
    T = _tokens(situation, r)
    return torch.randn(1, T, HID, generator=g), torch.randn(1, T, HID, generator=g)


def _worker(rank, world, port, q):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for situation in SITUATIONS:
            _check(rank, world, False, situation)
        if world == 2:  # the FP8 GEMMs and compilation are slow on CPU; the transport is the same
            _check(rank, world, True, "random")
            _check_compiled(rank, world)
        q.put((rank, "ok"))
    except BaseException:  # noqa: BLE001
        import traceback
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_compiled(rank, world):
    """torch.compile of the EP layer, an empty rank included: same output and gradients as eager.
    bf16 weights: the grouped GEMM's meta kernel takes bf16 only."""
    from dsmoe.nn import MoE
    torch.manual_seed(1)
    eager = MoE(_cfg(), fp8=False, dtype=torch.bfloat16, ep_group=dist.group.WORLD).train()
    torch.manual_seed(1)
    comp = MoE(_cfg(), fp8=False, dtype=torch.bfloat16, ep_group=dist.group.WORLD).train()
    model = torch.compile(comp, backend="eager", dynamic=True)  # dynamo only (aot_eager: tests/test_ep.py)
    for situation in ("empty_ranks",):  # rank 1 has no token: a zero-size graph next to a non-empty one
        x, g = _inputs(situation, rank)
        outs = []
        for m in (eager, model):
            xr = x.bfloat16().requires_grad_()
            y = m(xr)
            (y.float() * g).sum().backward()
            outs.append((y.detach(), xr.grad))
        assert torch.equal(outs[0][0], outs[1][0]), situation
        assert torch.allclose(outs[0][1].float(), outs[1][1].float(), atol=1e-2, rtol=1e-2), situation
    for n in ("gate_proj", "up_proj", "down_proj"):
        a, b = getattr(eager.experts, n).grad.float(), getattr(comp.experts, n).grad.float()
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2), n
    assert torch.allclose(eager.gate.weight.grad.float(), comp.gate.weight.grad.float(), atol=1e-2, rtol=1e-2)


def _check(rank, world, fp8, situation):
    from dsmoe.nn import MoE
    torch.manual_seed(0)
    full = MoE(_cfg(), fp8=fp8).train()
    ep = MoE(_cfg(), fp8=fp8, ep_group=dist.group.WORLD).train()
    L = E // world
    with torch.no_grad():
        if situation == "one_rank":  # every token picks rank 0's experts (the bias steers selection only)
            full.gate.e_score_correction_bias[:L] += 10.0
        ep.gate.load_state_dict(full.gate.state_dict())
        ep.shared_experts.load_state_dict(full.shared_experts.state_dict())
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ep.experts, n).copy_(getattr(full.experts, n)[rank * L:(rank + 1) * L])
    # grad_some: x needs a gradient on rank 0 only; the last rank's gate is frozen (its routing weights need
    # no gradient), so rank 1 of 3 needs neither; the experts need theirs everywhere
    need_x = situation != "grad_some" or rank == 0
    gate_on = [situation != "grad_some" or r != world - 1 for r in range(world)]
    ep.gate.weight.requires_grad_(gate_on[rank])
    # reference: the full layer over every rank's tokens, one rank's tokens at a time
    ys, gate_ref = {}, torch.zeros_like(full.gate.weight)
    for r in range(world):
        x, g = _inputs(situation, r)
        x.requires_grad_()
        full.gate.weight.grad = None
        y = full(x)
        (y * g).sum().backward()
        ys[r] = (y.detach(), x.grad)
        if gate_on[r]:
            gate_ref += full.gate.weight.grad
    x, g = _inputs(situation, rank)
    x.requires_grad_(need_x)
    y = ep(x)
    (y * g).sum().backward()
    tol = 1e-5
    what = f"{situation} fp8={fp8} rank {rank}"
    assert torch.allclose(y, ys[rank][0], atol=tol, rtol=tol), (what, (y - ys[rank][0]).abs().max())
    if situation == "one_rank":
        assert ep.load[L:].sum() == 0 and full.load[L:].sum() == 0
    if not fp8:
        if need_x:
            assert torch.allclose(x.grad, ys[rank][1], atol=tol, rtol=tol), what
        else:
            assert x.grad is None
        for n in ("gate_proj", "up_proj", "down_proj"):
            ref = getattr(full.experts, n).grad[rank * L:(rank + 1) * L]
            assert torch.allclose(getattr(ep.experts, n).grad, ref, atol=tol, rtol=tol), (what, n)
        gg = ep.gate.weight.grad.clone() if gate_on[rank] else torch.zeros_like(gate_ref)
        dist.all_reduce(gg)                      # the gate is replicated: data-parallel sum
        assert torch.allclose(gg, gate_ref, atol=tol, rtol=tol), what
    load = ep.update_bias(0.01)                 # loads all-reduced over the EP group
    assert load.sum() == sum(_tokens(situation, r) for r in range(world)) * 3


@pytest.mark.dist
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_moe_expert_parallel_matches_single_process(world):
    """BF16 path: outputs, input/expert/gate gradients; FP8 path: outputs (row-wise quantization makes
    them independent of where a row is computed); each situation."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in ps:
        p.start()
    try:
        res = dict(q.get(timeout=140) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    assert res == {r: "ok" for r in range(world)}, res
