"""EPLB: invariants of the placement (replicas, counts, group-to-node), balance vs the naive placement,
the placement of deepseek-ai/EPLB's published algorithm (re-implemented independently below), mapping of
routed ids to physical replicas."""
from array import array

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


# ----------------------------------------------------------------------------- deepseek-ai/EPLB's algorithm
def _f32(x: float) -> float:
    """Rounds a Python float to float32 (EPLB computes in float32)."""
    return array("f", [x])[0]


def _pub_pack(w, num_packs):
    """balanced_packing as published: equal item counts; one item per pack keeps the identity; else items
    by descending weight (ties: lower index first), each into the lightest pack with room (ties: lower
    pack), float32 pack sums."""
    n = len(w)
    per = n // num_packs
    if per == 1:
        return list(range(n)), [0] * n
    sums, used = [0.0] * num_packs, [0] * num_packs
    pack, rank = [None] * n, [None] * n
    for i in sorted(range(n), key=lambda i: -w[i]):
        p = min((q for q in range(num_packs) if used[q] < per), key=lambda q: sums[q])
        pack[i], rank[i] = p, used[p]
        used[p] += 1
        sums[p] = _f32(sums[p] + w[i])
    return pack, rank


def _pub_replicate(w, num_phy):
    """replicate_experts as published: one replica each, then each extra one to the expert with the
    largest float32 load per replica (ties: lower id). Returns (phy2log, replica rank, count)."""
    n = len(w)
    cnt, p2l, rk = [1] * n, list(range(n)), [0] * n
    for _ in range(num_phy - n):
        ratio = [_f32(w[i] / cnt[i]) for i in range(n)]
        e = max(range(n), key=lambda i: (ratio[i], -i))
        p2l.append(e)
        rk.append(cnt[e])
        cnt[e] += 1
    return p2l, rk, cnt


def _pub_layer(load, R, groups, nodes, gpus):
    """rebalance_experts(_hierarchical) as published, one layer; global = one group on one node."""
    w = [_f32(float(v)) for v in load]
    E = len(w)
    if groups % nodes:
        groups, nodes = 1, 1
    gs = E // groups
    gsum = []
    for g in range(groups):
        acc = 0.0
        for v in w[g * gs:(g + 1) * gs]:
            acc = _f32(acc + v)
        gsum.append(acc)
    gpack, grank = _pub_pack(gsum, nodes)
    per_node, per_gpu = R // nodes, R // gpus
    phy2log, phyrank = [None] * R, [None] * R
    for node in range(nodes):
        mine = sorted((g for g in range(groups) if gpack[g] == node), key=lambda g: grank[g])
        experts = [g * gs + j for g in mine for j in range(gs)]
        p2l, rk, cnt = _pub_replicate([w[e] for e in experts], per_node)
        per_replica = [_f32(w[experts[m]] / cnt[m]) for m in p2l]
        pack, rank = _pub_pack(per_replica, gpus // nodes)
        for i, m in enumerate(p2l):
            slot = node * per_node + pack[i] * per_gpu + rank[i]
            phy2log[slot], phyrank[slot] = experts[m], rk[i]
    logcnt = [phy2log.count(e) for e in range(E)]
    log2phy = [[-1] * max(logcnt) for _ in range(E)]
    for slot, (e, r) in enumerate(zip(phy2log, phyrank)):
        log2phy[e][r] = slot
    return phy2log, log2phy, logcnt


@pytest.mark.parametrize("E,R,groups,nodes,gpus,kind", [
    (64, 80, 8, 2, 8, "zipf"), (32, 40, 4, 4, 8, "zipf"),   # hierarchical; one group per node
    (16, 24, 4, 4, 4, "random"), (8, 8, 8, 8, 8, "random"),  # one group per node; one replica per GPU
    (24, 32, 3, 2, 4, "zipf"), (20, 30, 5, 1, 5, "random"),  # global (3 % 2); one node
    (32, 48, 8, 2, 4, "ties"), (16, 32, 4, 2, 4, "zeros"),   # many equal loads: the lowest-index rule
    (32, 64, 4, 2, 8, "big"),                                # loads past 2**24: float32 rounding
])
def test_placement_equals_published_eplb_algorithm(E, R, groups, nodes, gpus, kind):
    layers = 4
    if kind == "zipf":
        load = _skewed_load(layers, E)
    elif kind == "random":
        load = torch.randint(0, 100000, (layers, E)).double()
    elif kind == "ties":
        load = torch.randint(0, 4, (layers, E)).double() * 100
    elif kind == "zeros":
        load = torch.zeros(layers, E)
    else:
        load = torch.randint(0, 256, (layers, E)).double() * 2**20 + torch.randint(0, 8, (layers, E)).double()
    phy2log, log2phy, logcnt = rebalance_experts(load.to(torch.int64), R, groups, nodes, gpus)
    for i in range(layers):
        p2l, l2p, cnt = _pub_layer(load[i].tolist(), R, groups, nodes, gpus)
        assert phy2log[i].tolist() == p2l, i
        assert logcnt[i].tolist() == cnt
        assert log2phy[i, :, :len(l2p[0])].tolist() == l2p and (log2phy[i, :, len(l2p[0]):] == -1).all()


def test_one_group_per_node_keeps_groups_in_place():
    """With one group per node there is nothing to balance between nodes: group g stays on node g
    whatever the loads, so a rebalance moves no expert across nodes."""
    E, groups, R, gpus = 32, 4, 48, 8
    load = _skewed_load(3, E)
    load[:, 24:] *= 50  # the last group is by far the hottest
    phy2log, _, _ = rebalance_experts(load, R, groups, groups, gpus)
    per_node = R // groups
    for g in range(groups):
        assert ((phy2log[:, g * per_node:(g + 1) * per_node] // (E // groups)) == g).all()


def test_map_to_physical_spreads_by_global_token_index():
    """8 ranks each send one token to a hot expert that has 9 replicas: with each rank's global token
    offset, the 8 tokens land on 8 different replicas (a rank-local index would put them all on one)."""
    E, R = 8, 16
    load = torch.tensor([1000] + [1] * 7)
    _, log2phy, logcnt = rebalance_experts(load, R, 1, 1, 4)
    assert int(logcnt[0, 0]) == 9
    one = torch.zeros(1, 1, dtype=torch.int32)
    picks = [int(map_to_physical(one, log2phy[0], logcnt[0], token_offset=r)) for r in range(8)]
    assert len(set(picks)) == 8 and set(picks) <= set(log2phy[0, 0].tolist())
    as_tensor = [int(map_to_physical(one, log2phy[0], logcnt[0], token_offset=torch.tensor([r]))) for r in range(8)]
    assert as_tensor == picks
    # ranks with 3 tokens each: offsets rank * 3 continue the global order
    three = torch.zeros(3, 2, dtype=torch.int64)
    got = torch.cat([map_to_physical(three, log2phy[0], logcnt[0], token_offset=3 * r) for r in range(3)])
    assert torch.equal(got, map_to_physical(torch.zeros(9, 2, dtype=torch.int64), log2phy[0], logcnt[0]))
    with pytest.raises(ValueError, match="token_offset"):
        map_to_physical(one, log2phy[0], logcnt[0], token_offset=-1)
    with pytest.raises(ValueError, match="token_offset"):
        map_to_physical(one, log2phy[0], logcnt[0], token_offset=torch.tensor([1.0]))


def test_zero_sizes_and_bad_counts():
    with pytest.raises(ValueError, match=r"rebalance_experts: argument 'load' must have at least one expert"):
        rebalance_experts(torch.zeros(2, 0), 4, 1, 1, 2)
    with pytest.raises(ValueError, match=r"argument 'load' must be finite and >= 0"):
        rebalance_experts(torch.tensor([1.0, float("nan"), 2.0, 3.0]), 4, 1, 1, 2)
    with pytest.raises(ValueError, match=r"argument 'load' must be finite and >= 0"):
        rebalance_experts(torch.tensor([1.0, -1.0, 2.0, 3.0]), 4, 1, 1, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(torch.ones(4), 0, 1, 1, 2)
    p, l2p, c = rebalance_experts(torch.zeros(0, 4), 8, 2, 1, 2)   # no layer: empty, defined
    assert p.shape == (0, 8) and l2p.shape == (0, 4, 0) and c.shape == (0, 4)
    _, log2phy, logcnt = rebalance_experts(torch.tensor([5, 1, 1, 1]), 6, 1, 1, 2)
    zero = logcnt[0].clone()
    zero[2] = 0
    assert logcnt[0].tolist() == [3, 1, 1, 1] and log2phy.shape[-1] == 3
    with pytest.raises(ValueError, match=r"map_to_physical: argument 'logcnt': values must be in \[1, 4\)"):
        map_to_physical(torch.tensor([[0, 1]]), log2phy[0], zero)
    too_many = logcnt[0].clone()
    too_many[1] = 7
    with pytest.raises(ValueError, match=r"argument 'logcnt'.*max_rep=3"):
        map_to_physical(torch.tensor([[0, 1]]), log2phy[0], too_many)
    # zero tokens, and an empty expert table with every id skipped
    empty = map_to_physical(torch.empty(0, 3, dtype=torch.int32), log2phy[0], logcnt[0])
    assert empty.shape == (0, 3) and empty.dtype == torch.int32
    none = map_to_physical(torch.full((2, 2), -1), torch.empty(0, 1, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert (none == -1).all()
