"""EPLB: invariants of the placement (replicas, counts, group-to-node), balance vs the naive placement,
mapping of routed ids to physical replicas."""
import pytest
import torch

from dsmoe.parallel.eplb import balanced_packing, gpu_loads, map_to_physical, rebalance_experts


def _skewed_load(layers, E):
    # a few hot experts, long tail (Zipf-like), random permutation per layer
    base = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.1
    return torch.stack([(base[torch.randperm(E)] * 10000).round() for _ in range(layers)])


@pytest.mark.parametrize("E,R,groups,nodes,gpus", [(64, 80, 8, 2, 8), (32, 48, 4, 2, 4), (16, 16, 4, 1, 4), (24, 32, 3, 2, 4)])
def test_invariants_and_balance(E, R, groups, nodes, gpus):
    layers = 3
    load = _skewed_load(layers, E)
    phy2log, log2phy, logcnt = rebalance_experts(load, R, groups, nodes, gpus)
    assert phy2log.shape == (layers, R) and logcnt.shape == (layers, E)
    assert (logcnt >= 1).all() and (logcnt.sum(1) == R).all()
    for i in range(layers):
        assert torch.equal(torch.bincount(phy2log[i], minlength=E), logcnt[i])
        for e in range(E):
            ph = log2phy[i, e]
            ph = ph[ph >= 0]
            assert ph.numel() == logcnt[i, e]
            assert (phy2log[i, ph] == e).all()
    hierarchical = groups % nodes == 0
    if hierarchical:
        # every group's experts sit on one node
        per_node = R // nodes
        gs = E // groups
        for i in range(layers):
            node_of_phy = torch.arange(R) // per_node
            for g in range(groups):
                nodes_g = {int(node_of_phy[p]) for p in range(R) if int(phy2log[i, p]) // gs == g}
                assert len(nodes_g) == 1
    # balance: max GPU load beats the naive placement (expert e on GPU e // (E / gpus), no replicas)
    got = gpu_loads(load, phy2log, logcnt, gpus).max(1).values
    naive = load.view(layers, gpus, -1).sum(-1).max(1).values if E % gpus == 0 else None
    if naive is not None:
        assert (got <= naive).all() and (got < naive).any()
    mean = load.sum(1) / gpus
    biggest_replica = (load / logcnt).max(1).values  # no placement can beat max(mean, biggest replica)
    if not hierarchical or nodes == 1:
        assert (got <= 1.35 * torch.maximum(mean, biggest_replica)).all()


def test_global_policy_and_errors():
    load = _skewed_load(2, 32)
    p_g, _, c_g = rebalance_experts(load, 40, 4, 2, 4, policy="global")
    p_h, _, c_h = rebalance_experts(load, 40, 4, 2, 4, policy="hierarchical")
    assert (c_g.sum(1) == 40).all() and (c_h.sum(1) == 40).all()
    # global packing has fewer constraints: never worse than hierarchical
    assert (gpu_loads(load, p_g, c_g, 4).max(1).values <= gpu_loads(load, p_h, c_h, 4).max(1).values + 1e-9).all()
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(load, 30, 4, 2, 4)
    with pytest.raises(ValueError, match="num_gpus"):
        rebalance_experts(load, 40, 4, 3, 4)
    with pytest.raises(ValueError, match="hierarchical"):
        rebalance_experts(load, 48, 3 * 0 + 2, 4, 4, policy="hierarchical") if False else rebalance_experts(
            _skewed_load(1, 24), 48, 3, 2, 4, policy="hierarchical")


def test_balanced_packing_equal_counts():
    w = torch.tensor([9.0, 1, 1, 1, 8, 2, 2, 2])
    pack, rank = balanced_packing(w, 2)
    assert torch.bincount(pack).tolist() == [4, 4]
    loads = [float(w[pack == p].sum()) for p in range(2)]
    assert max(loads) == 13.0  # {9,2,1,1} / {8,2,2,1}
    assert sorted(rank[pack == 0].tolist()) == [0, 1, 2, 3]


def test_map_to_physical():
    load = _skewed_load(1, 16)
    phy2log, log2phy, logcnt = rebalance_experts(load, 24, 4, 1, 4)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(50)]).to(torch.int32)
    idx[3, 1] = -1
    phys = map_to_physical(idx, log2phy[0], logcnt[0])
    assert phys.dtype == torch.int32 and phys[3, 1] == -1
    ok = idx >= 0
    assert torch.equal(phy2log[0][phys[ok].long()].to(torch.int32), idx[ok])
    # a replicated expert spreads over all its replicas
    hot = int(logcnt[0].argmax())
    col = torch.full((64, 1), hot, dtype=torch.int32)
    assert map_to_physical(col, log2phy[0], logcnt[0]).unique().numel() == int(logcnt[0, hot])
    with pytest.raises(ValueError, match="topk_idx"):
        map_to_physical(torch.tensor([[16]]), log2phy[0], logcnt[0])
