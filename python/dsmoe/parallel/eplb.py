"""Expert-parallel load balancing: redundant experts and their placement on GPUs.

``rebalance_experts(load [layers, E], num_replicas, num_groups, num_nodes, num_gpus)`` returns
``(phy2log [layers, num_replicas], log2phy [layers, E, max_rep] (-1 padded), logcnt [layers, E])``.
Physical expert ``p`` lives on GPU ``p // (num_replicas / num_gpus)``; GPUs ``[n*G/N, (n+1)*G/N)`` form
node ``n``.

Policies:
- hierarchical (``num_groups % num_nodes == 0``): 1) pack expert groups onto nodes, same number of
  groups per node, balancing the summed group load (keeps V3's node-limited routing valid: a group never
  spans nodes); 2) inside each node, replicate: each extra replica goes to the logical expert with the
  largest load per replica; 3) pack the node's replicas onto its GPUs, same count per GPU, balancing
  the per-replica loads (greedy largest-first into the lightest GPU with room).
- global (otherwise, or ``policy="global"``): the same replicate + pack over all GPUs at once.

``map_to_physical`` turns routed logical ids into physical ids; a token spreads over an expert's
replicas by its index (deterministic).
"""
from __future__ import annotations

import torch

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts", "map_to_physical", "gpu_loads"]


def balanced_packing(weights: torch.Tensor, num_packs: int):
    """Packs ``n`` items into ``num_packs`` packs of exactly ``n / num_packs`` items each, greedy
    largest-first into the lightest pack with room (ties: lowest pack). Returns (pack int64 [n],
    rank_in_pack int64 [n])."""
    n = weights.numel()
    if n % num_packs:
        raise ValueError(f"balanced_packing: {n} items cannot fill {num_packs} packs equally")
    cap = n // num_packs
    order = torch.sort(weights.double(), descending=True, stable=True).indices.tolist()
    load = [0.0] * num_packs
    count = [0] * num_packs
    pack = [0] * n
    rank = [0] * n
    w = weights.double().tolist()
    for i in order:
        best = min((p for p in range(num_packs) if count[p] < cap), key=lambda p: (load[p], p))
        pack[i], rank[i] = best, count[best]
        load[best] += w[i]
        count[best] += 1
    return torch.tensor(pack, dtype=torch.long), torch.tensor(rank, dtype=torch.long)


def replicate_experts(weights: torch.Tensor, num_phy: int):
    """``num_phy >= n`` replicas of ``n`` logical experts: one each, then every extra replica to the
    expert with the largest load per replica (ties: lowest id). Returns (phy2log [num_phy], rank
    [num_phy] (replica number of that expert), logcnt [n])."""
    n = weights.numel()
    if num_phy < n:
        raise ValueError(f"replicate_experts: {num_phy} physical slots for {n} logical experts")
    w = weights.double().tolist()
    cnt = [1] * n
    phy2log = list(range(n))
    rank = [0] * n
    for _ in range(num_phy - n):
        e = max(range(n), key=lambda i: (w[i] / cnt[i], -i))
        phy2log.append(e)
        rank.append(cnt[e])
        cnt[e] += 1
    return torch.tensor(phy2log, dtype=torch.long), torch.tensor(rank, dtype=torch.long), torch.tensor(cnt, dtype=torch.long)


def _place_one(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, hierarchical: bool):
    E = load.numel()
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_replicas // num_gpus
    group_load = load.view(num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    phy2log = torch.empty(num_replicas, dtype=torch.long)
    for node in range(num_nodes):
        groups = sorted((int(g) for g in torch.nonzero(gpack == node).flatten()), key=lambda g: int(grank[g]))
        experts = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in groups])
        p2l_local, _, cnt_local = replicate_experts(load[experts], phy_per_node)
        per_replica = load[experts].double()[p2l_local] / cnt_local[p2l_local].double()
        pack, rank = balanced_packing(per_replica, gpus_per_node)
        slot = node * phy_per_node + pack * phy_per_gpu + rank
        phy2log[slot] = experts[p2l_local]
    return phy2log


def rebalance_experts(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, policy: str = "auto"):
    """See the module docstring. ``load``: tokens per logical expert, ``[layers, E]`` or ``[E]``."""
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.dim() != 2:
        raise ValueError(f"rebalance_experts: argument 'load' must be [layers, E], got shape {tuple(load.shape)}")
    layers, E = load.shape
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"rebalance_experts: argument '{name}' must be a positive int, got {v!r}")
    if num_replicas < E:
        raise ValueError(f"rebalance_experts: argument 'num_replicas'={num_replicas} must be >= the {E} logical experts")
    if num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: argument 'num_gpus'={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: argument 'num_replicas'={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if E % num_groups:
        raise ValueError(f"rebalance_experts: argument 'num_groups'={num_groups} must divide the {E} experts")
    if policy not in ("auto", "hierarchical", "global"):
        raise ValueError(f"rebalance_experts: argument 'policy' must be auto, hierarchical or global, got {policy!r}")
    hier = num_groups % num_nodes == 0 and policy != "global"
    if policy == "hierarchical" and not hier:
        raise ValueError(f"rebalance_experts: the hierarchical policy needs num_groups ({num_groups}) to be a multiple of "
                         f"num_nodes ({num_nodes})")
    if hier and (num_replicas // num_nodes) < E // num_nodes:
        raise ValueError("rebalance_experts: too few replicas per node for its experts")
    loadf = load.double().cpu()
    phy2log = torch.stack([_place_one(loadf[i], num_replicas, num_groups, num_nodes, num_gpus, hier) for i in range(layers)])
    logcnt = torch.stack([torch.bincount(phy2log[i], minlength=E) for i in range(layers)])
    max_rep = int(logcnt.max())
    log2phy = torch.full((layers, E, max_rep), -1, dtype=torch.long)
    for i in range(layers):
        fill = [0] * E
        for p, e in enumerate(phy2log[i].tolist()):
            log2phy[i, e, fill[e]] = p
            fill[e] += 1
    return phy2log, log2phy, logcnt


def gpu_loads(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Expected load per GPU ``[layers, num_gpus]`` if each expert's tokens split evenly over its replicas."""
    if load.dim() == 1:
        load, phy2log, logcnt = load.unsqueeze(0), phy2log.unsqueeze(0), logcnt.unsqueeze(0)
    per = load.double().gather(1, phy2log) / logcnt.double().gather(1, phy2log)
    return per.view(load.shape[0], num_gpus, -1).sum(-1)


def map_to_physical(topk_idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """Logical ``topk_idx [T, k]`` (-1 kept) -> physical ids (same dtype), for one layer's ``log2phy [E,
    max_rep]`` and ``logcnt [E]``: token ``t`` uses replica ``t % logcnt[e]``."""
    if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
        raise ValueError(f"map_to_physical: one layer's log2phy [E, max_rep] and logcnt [E] expected, got "
                         f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}")
    E = logcnt.shape[0]
    idx = topk_idx.long()
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= E):
        raise ValueError(f"map_to_physical: argument 'topk_idx': values must be in [-1, {E}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    valid = idx >= 0
    e = idx.clamp(min=0)
    t = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
    rep = t % logcnt.to(idx.device)[e]
    phys = log2phy.to(idx.device)[e, rep]
    return torch.where(valid, phys, torch.full_like(phys, -1)).to(topk_idx.dtype)
