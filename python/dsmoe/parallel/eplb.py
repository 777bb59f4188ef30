"""Expert-parallel load balancing: redundant experts and their placement on GPUs.

``rebalance_experts(load [layers, E], num_replicas, num_groups, num_nodes, num_gpus)`` returns
``(phy2log [layers, num_replicas], log2phy [layers, E, max_rep] (-1 padded), logcnt [layers, E])``.
Physical expert ``p`` lives on GPU ``p // (num_replicas / num_gpus)``; GPUs ``[n*G/N, (n+1)*G/N)`` form
node ``n``.

Policies (the published algorithm of deepseek-ai/EPLB; same placement on the same inputs):
- hierarchical (``num_groups % num_nodes == 0``): 1) pack expert groups onto nodes, same number of
  groups per node, balancing the summed group load (keeps V3's node-limited routing valid: a group never
  spans nodes); 2) inside each node, replicate: each extra replica goes to the logical expert with the
  largest load per replica; 3) pack the node's replicas onto its GPUs, same count per GPU, balancing
  the per-replica loads (greedy largest-first into the lightest GPU with room).
- global (otherwise, or ``policy="global"``): the same replicate + pack over all GPUs at once.
A packing with one item per pack keeps item ``i`` in pack ``i`` (one group per node stays on its node,
one replica per GPU stays in order): reordering gains no balance and would migrate every expert.
Arithmetic is float32, as in deepseek-ai/EPLB (loads above 2**24 round the same way). Ties go to the
lowest index everywhere (EPLB's own order among equal loads follows torch's unstable sort: undefined).
``log2phy[l, e, r]`` is the physical slot of replica ``r`` of expert ``e`` (replica 0 = the first one
created); EPLB lists the replicas of an expert, whose per-replica loads are equal, in its sort's
arbitrary order, so compare log2phy with EPLB's as a set per expert (phy2log and logcnt exactly).

``map_to_physical`` turns routed logical ids into physical ids; a token spreads over an expert's
replicas by its GLOBAL index (``token_offset`` + local index; deterministic), so that ranks sending one
token each to a hot expert use different replicas.
"""
from __future__ import annotations

import torch

from .. import _checks as C

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts", "map_to_physical", "gpu_loads"]


def balanced_packing(weights: torch.Tensor, num_packs: int):
    """Packs ``n`` items into ``num_packs`` packs of exactly ``n / num_packs`` items each, greedy
    largest-first into the lightest pack with room (ties: lowest item, lowest pack; float32 pack sums).
    One item per pack: item ``i`` goes to pack ``i``. Returns (pack int64 [n], rank_in_pack int64 [n])."""
    n = weights.numel()
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"balanced_packing: {n} items cannot fill {num_packs} packs equally")
    cap = n // num_packs
    if cap == 1:
        return torch.arange(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    w32 = weights.float().cpu()
    order = torch.sort(w32, descending=True, stable=True).indices.tolist()
    load = torch.zeros(num_packs, dtype=torch.float32)  # NOTE: float32 sums, the comparisons EPLB makes
    count = [0] * num_packs
    pack = [0] * n
    rank = [0] * n
    for i in order:
        best = min((p for p in range(num_packs) if count[p] < cap), key=lambda p: (float(load[p]), p))
        pack[i], rank[i] = best, count[best]
        load[best] += w32[i]
        count[best] += 1
    return torch.tensor(pack, dtype=torch.long), torch.tensor(rank, dtype=torch.long)


def replicate_experts(weights: torch.Tensor, num_phy: int):
    """``num_phy >= n`` replicas of ``n`` logical experts: one each, then every extra replica to the
    expert with the largest float32 load per replica (ties: lowest id). Returns (phy2log [num_phy], rank
    [num_phy] (replica number of that expert), logcnt [n])."""
    n = weights.numel()
    if num_phy < n:
        raise ValueError(f"replicate_experts: {num_phy} physical slots for {n} logical experts")
    w32 = weights.float().cpu()
    cnt = torch.ones(n, dtype=torch.long)
    phy2log = list(range(n))
    rank = [0] * n
    for _ in range(num_phy - n):
        e = int(torch.argmax(w32 / cnt))  # argmax: the first maximum
        phy2log.append(e)
        rank.append(int(cnt[e]))
        cnt[e] += 1
    return torch.tensor(phy2log, dtype=torch.long), torch.tensor(rank, dtype=torch.long), cnt


def _place_one(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, hierarchical: bool):
    """One layer: (phy2log [num_replicas], phyrank [num_replicas])."""
    E = load.numel()
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    load = load.float()
    group_size = E // num_groups
    phy_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_replicas // num_gpus
    group_load = load.view(num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    phy2log = torch.empty(num_replicas, dtype=torch.long)
    phyrank = torch.empty(num_replicas, dtype=torch.long)
    for node in range(num_nodes):
        # the node's experts in the order of their groups' rank in the node
        groups = sorted((int(g) for g in torch.nonzero(gpack == node).flatten()), key=lambda g: int(grank[g]))
        experts = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in groups])
        p2l_local, rep_local, cnt_local = replicate_experts(load[experts], phy_per_node)
        per_replica = (load[experts] / cnt_local)[p2l_local]
        pack, rank = balanced_packing(per_replica, gpus_per_node)
        slot = node * phy_per_node + pack * phy_per_gpu + rank
        phy2log[slot] = experts[p2l_local]
        phyrank[slot] = rep_local
    return phy2log, phyrank


def rebalance_experts(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, policy: str = "auto"):
    """See the module docstring. ``load``: tokens per logical expert, ``[layers, E]`` or ``[E]``."""
    if not isinstance(load, torch.Tensor):
        raise TypeError(f"rebalance_experts: argument 'load' must be a torch.Tensor, got {type(load).__name__}")
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.dim() != 2:
        raise ValueError(f"rebalance_experts: argument 'load' must be [layers, E], got shape {tuple(load.shape)}")
    layers, E = load.shape
    if E == 0:
        raise ValueError(f"rebalance_experts: argument 'load' must have at least one expert (E >= 1), got shape "
                         f"{tuple(load.shape)}")
    if load.is_complex() or load.dtype == torch.bool:
        raise TypeError(f"rebalance_experts: argument 'load' must be a real tensor, got {load.dtype}")
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
    loadf = load.detach().float().cpu()
    if loadf.numel() and not (torch.isfinite(loadf).all() and (loadf >= 0).all()):
        bad = loadf[~(torch.isfinite(loadf) & (loadf >= 0))]
        raise ValueError(f"rebalance_experts: argument 'load' must be finite and >= 0 (token counts), got "
                         f"{bad.numel()} bad value(s), e.g. {float(bad[0])}")
    if layers == 0:  # defined: no layer, no placement
        return (torch.empty(0, num_replicas, dtype=torch.long), torch.empty(0, E, 0, dtype=torch.long),
                torch.empty(0, E, dtype=torch.long))
    placed = [_place_one(loadf[i], num_replicas, num_groups, num_nodes, num_gpus, hier) for i in range(layers)]
    phy2log = torch.stack([p for p, _ in placed])
    phyrank = torch.stack([r for _, r in placed])
    logcnt = torch.stack([torch.bincount(phy2log[i], minlength=E) for i in range(layers)])
    max_rep = int(logcnt.max())
    log2phy = torch.full((layers, E, max_rep), -1, dtype=torch.long)
    rows = torch.arange(layers).unsqueeze(1).expand(-1, num_replicas)
    log2phy[rows, phy2log, phyrank] = torch.arange(num_replicas).expand(layers, -1)
    return phy2log, log2phy, logcnt


def gpu_loads(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Expected load per GPU ``[layers, num_gpus]`` if each expert's tokens split evenly over its replicas."""
    if load.dim() == 1:
        load, phy2log, logcnt = load.unsqueeze(0), phy2log.unsqueeze(0), logcnt.unsqueeze(0)
    per = load.double().gather(1, phy2log) / logcnt.double().gather(1, phy2log)
    return per.view(load.shape[0], num_gpus, -1).sum(-1)


def map_to_physical(topk_idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                    token_offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Logical ``topk_idx [T, k]`` (-1 kept) -> physical ids (same dtype), for one layer's ``log2phy [E,
    max_rep]`` and ``logcnt [E]``: token ``t`` uses replica ``(token_offset + t) % logcnt[e]``.

    ``token_offset``: the global index of this rank's first token (an int, or an integer tensor of one
    element on any device, which costs no host synchronization): ``rank * T`` when every rank holds
    ``T`` tokens, the exclusive prefix sum of the ranks' token counts otherwise. With the default 0 on
    every rank, ranks that each send one token to a hot expert would all pick its replica 0.
    Checks (they read ``logcnt`` and ``topk_idx`` back: a host sync on a GPU, skipped while compiling or
    capturing): every expert has a count in ``[1, max_rep]``; ids are in ``[-1, E)``."""
    op = "map_to_physical"
    if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
        raise ValueError(f"map_to_physical: one layer's log2phy [E, max_rep] and logcnt [E] expected, got "
                         f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}")
    C.check_tensor(op, "topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), ndim=2)
    C.check_tensor(op, "log2phy", log2phy, dtypes=(torch.int32, torch.int64))
    C.check_tensor(op, "logcnt", logcnt, dtypes=(torch.int32, torch.int64))
    E = logcnt.shape[0]
    C.check_index_range(op, "logcnt", logcnt, 1, log2phy.shape[1] + 1,
                        f"every expert needs >= 1 replica and at most max_rep={log2phy.shape[1]} (log2phy's last dim)")
    C.check_index_range(op, "topk_idx", topk_idx, -1, E, "-1 = skipped")
    if isinstance(token_offset, torch.Tensor):
        if token_offset.numel() != 1 or token_offset.is_floating_point() or token_offset.is_complex():
            raise ValueError(f"map_to_physical: argument 'token_offset' must be an int or a one-element integer tensor, "
                             f"got {token_offset.dtype} of shape {tuple(token_offset.shape)}")
        off = token_offset.reshape(()).to(device=topk_idx.device, dtype=torch.long)
    else:
        off = C.check_int(op, "token_offset", token_offset, min_value=0)
    idx = topk_idx.long()
    valid = idx >= 0
    e = idx.clamp(min=0)
    t = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) + off
    # NOTE: for E = 0 every id is -1; a zero-length count table cannot be indexed, so no lookup happens.
    if E == 0:
        return torch.full_like(topk_idx, -1)
    rep = t % logcnt.to(idx.device).long()[e]
    phys = log2phy.to(idx.device).long()[e, rep]
    return torch.where(valid, phys, torch.full_like(phys, -1)).to(topk_idx.dtype)
