"""MoE with expert parallelism (dsmoe.parallel.EPBuffer, collective backend on gloo, 2 processes):
outputs and gradients equal a single-process MoE holding every expert."""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TOKENS = [37, 21]


def _cfg():
    from dsmoe.models import DeepseekV3Config
    return DeepseekV3Config(vocab_size=16, hidden_size=128, moe_intermediate_size=64, n_routed_experts=8,
                            num_experts_per_tok=3, n_group=2, topk_group=2, n_shared_experts=1, num_hidden_layers=1,
                            first_k_dense_replace=0, intermediate_size=64, num_attention_heads=1, kv_lora_rank=32,
                            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _inputs(r):
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(1, TOKENS[r], 128, generator=g), torch.randn(1, TOKENS[r], 128, generator=g)


def _worker(rank, port, q):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        for fp8 in (False, True):
            _check(rank, fp8)
        q.put((rank, "ok"))
    except BaseException:  # noqa: BLE001
        import traceback
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check(rank, fp8):
    from dsmoe.nn import MoE
    torch.manual_seed(0)
    full = MoE(_cfg(), fp8=fp8).train()
    ep = MoE(_cfg(), fp8=fp8, ep_group=dist.group.WORLD).train()
    L = 8 // WORLD
    with torch.no_grad():
        ep.gate.load_state_dict(full.gate.state_dict())
        ep.shared_experts.load_state_dict(full.shared_experts.state_dict())
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ep.experts, n).copy_(getattr(full.experts, n)[rank * L:(rank + 1) * L])
    # reference: the full layer over every rank's tokens
    ys = {}
    for r in range(WORLD):
        x, g = _inputs(r)
        x.requires_grad_()
        y = full(x)
        (y * g).sum().backward()
        ys[r] = (y.detach(), x.grad)
    x, g = _inputs(rank)
    x.requires_grad_()
    y = ep(x)
    (y * g).sum().backward()
    tol = 1e-5
    assert torch.allclose(y, ys[rank][0], atol=tol, rtol=tol), (y - ys[rank][0]).abs().max()
    if not fp8:
        assert torch.allclose(x.grad, ys[rank][1], atol=tol, rtol=tol)
        for n in ("gate_proj", "up_proj", "down_proj"):
            ref = getattr(full.experts, n).grad[rank * L:(rank + 1) * L]
            assert torch.allclose(getattr(ep.experts, n).grad, ref, atol=tol, rtol=tol), n
        gg = ep.gate.weight.grad.clone()
        dist.all_reduce(gg)                      # the gate is replicated: data-parallel sum
        assert torch.allclose(gg, full.gate.weight.grad, atol=tol, rtol=tol)
    load = ep.update_bias(0.01)                 # loads all-reduced over the EP group
    assert load.sum() == sum(TOKENS) * 3


@pytest.mark.dist
def test_moe_expert_parallel_matches_single_process():
    """BF16 path: outputs, input/expert/gate gradients; FP8 path: outputs (row-wise quantization makes
    them independent of where a row is computed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(WORLD)]
    for p in ps:
        p.start()
    res = dict(q.get(timeout=180) for _ in ps)
    for p in ps:
        p.join(timeout=60)
    assert res == {0: "ok", 1: "ok"}, res
