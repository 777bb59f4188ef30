"""Reference MoE routing, token permutation and load balancing: the specification and the CPU path.

Routing (DeepSeek-V3 gate, see docs/moe.md):
- ``s = sigmoid(logits)`` (or ``softmax``) in fp32; selection scores ``c = s + bias`` (bias fp32,
  selection only). A NaN in ``c`` counts as ``-inf`` for selection.
- group score (DeepSeek's reference gate): with a bias, the sum of the top-2 of ``c`` inside each of
  ``n_group`` equal groups (top-1 if a group has one expert; V3's rule); without a bias, the group max
  (V2's rule). The ``topk_group`` best groups are kept, every expert of another group gets ``-inf``.
- ``topk_idx`` = the ``top_k`` largest masked ``c``, in descending order; ties go to the lowest index
  (groups too); a NaN group score (``inf + -inf``) ranks as ``-inf``.
  ``topk_weights = s[topk_idx]`` (unbiased), optionally divided by ``(w_0 + w_1 + ... + w_{k-1}) + 1e-20``
  summed left to right, then times ``routed_scaling_factor``.
- node limit (V3 report, section 3.4 "node-limited routing"; optional, ``max_nodes < num_nodes``): the
  experts are placed node-major, ``num_nodes`` equal blocks (expert ``e`` on node ``e // (E / num_nodes)``).
  A node's score is the sum of its ``p = ceil(top_k / max_nodes)`` highest ``c`` (summed left to right,
  after the group mask; NaN ranks as ``-inf``); the ``max_nodes`` best nodes are kept (ties to the lowest
  index) and every expert of another node gets ``-inf`` before the final top-k. The group rule runs first
  (it is part of the model; the node limit is a placement constraint on what it kept): a node keeps only
  experts of kept groups. With groups equal to nodes (V3: 8 groups on 8 nodes, ``topk_group = max_nodes
  = 4``, top-2 group score, ``p = 8 / 4 = 2``) the node limit keeps exactly the kept groups: a no-op.

Permutation (the contiguous grouped-GEMM layout): the (token, slot) pairs are grouped by expert;
inside an expert, rows follow the token index, then the slot. Each expert's segment starts at a multiple
of ``alignment`` and is padded up to one; padding rows hold zeros and ``m_indices = -1``. Experts with
no token take no rows. ``row_map[t, j]`` is the row of pair (t, j), -1 where ``topk_idx[t, j] == -1``.
"""
from __future__ import annotations

import torch

from .quant import per_token_group_quant_fp8

__all__ = [
    "moe_route",
    "node_limit_mask",
    "moe_permute",
    "moe_permute_layout",
    "moe_permute_max_rows",
    "moe_scatter_rows",
    "moe_unpermute",
    "expert_load",
    "update_expert_bias",
    "sequence_balance_loss",
]

NORM_EPS = 1e-20


def _desc_order(v: torch.Tensor) -> torch.Tensor:
    # NOTE: torch.topk does not promise which of equal values wins; a stable descending sort keeps
    # equal values in index order, which is the documented tie rule (lowest index first).
    return torch.sort(v, dim=-1, descending=True, stable=True).indices


def moe_route(router_logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int,
              topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True,
              score_func: str = "sigmoid", num_nodes: int = 1, max_nodes: int | None = None):
    """logits ``[T, E]`` -> ``(topk_idx int32 [T, top_k], topk_weights fp32 [T, top_k])``."""
    logits = router_logits.float()
    T, E = logits.shape
    if score_func == "sigmoid":
        s = logits.sigmoid()
    elif score_func == "softmax":
        s = logits.softmax(dim=-1)
    else:
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    c = s + bias.float() if bias is not None else s.clone()
    c = torch.where(torch.isnan(c), torch.full_like(c, float("-inf")), c)
    if T == 0:
        return (torch.empty(0, top_k, dtype=torch.int32, device=logits.device),
                torch.empty(0, top_k, dtype=torch.float32, device=logits.device))
    G = E // n_group
    if topk_group < n_group:
        grouped = c.view(T, n_group, G)
        top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., : min(2, G)]
        gscore = top2[..., 0] + top2[..., 1] if G >= 2 and bias is not None else top2[..., 0]
        # NOTE: +inf + -inf (an infinite bias beside masked scores) is NaN: it ranks as -inf, like c.
        gscore = torch.where(torch.isnan(gscore), torch.full_like(gscore, float("-inf")), gscore)
        keep_groups = _desc_order(gscore)[:, :topk_group]
        gmask = torch.zeros(T, n_group, dtype=torch.bool, device=c.device)
        gmask.scatter_(1, keep_groups, True)
        c = c.masked_fill(~gmask.repeat_interleave(G, dim=1), float("-inf"))
    if max_nodes is not None and max_nodes < num_nodes:
        c = _node_limit(c, top_k, num_nodes, max_nodes)
    idx = _desc_order(c)[:, :top_k]
    w = s.gather(1, idx)
    if norm_topk_prob:
        denom = w[:, 0].clone()
        for j in range(1, top_k):  # left-to-right: the order the kernel sums in
            denom = denom + w[:, j]
        w = w / (denom + NORM_EPS).unsqueeze(1)
    w = w * routed_scaling_factor
    return idx.to(torch.int32), w.float()


def node_limit_mask(c: torch.Tensor, top_k: int, num_nodes: int, max_nodes: int) -> torch.Tensor:
    """bool ``[T, num_nodes]``: the ``max_nodes`` nodes kept per token from selection scores ``c [T, E]``
    (``-inf`` where already masked). See the module docstring."""
    T, E = c.shape
    p = min(-(-top_k // max_nodes), E // num_nodes)
    top = torch.sort(c.view(T, num_nodes, E // num_nodes), dim=-1, descending=True, stable=True).values
    nscore = top[..., 0]
    for i in range(1, p):  # left to right, like the kernel's group sums
        nscore = nscore + top[..., i]
    nscore = torch.where(torch.isnan(nscore), torch.full_like(nscore, float("-inf")), nscore)
    keep = _desc_order(nscore)[:, :max_nodes]
    return torch.zeros(T, num_nodes, dtype=torch.bool, device=c.device).scatter_(1, keep, True)


def _node_limit(c: torch.Tensor, top_k: int, num_nodes: int, max_nodes: int) -> torch.Tensor:
    mask = node_limit_mask(c, top_k, num_nodes, max_nodes)
    return c.masked_fill(~mask.repeat_interleave(c.shape[1] // num_nodes, dim=1), float("-inf"))


def moe_permute_max_rows(num_tokens: int, top_k: int, num_experts: int, alignment: int = 128) -> int:
    """Worst-case row count of the permuted layout, a fixed size for CUDA graphs: at most
    ``min(E, T*k)`` experts are non-empty and each pads by at most ``a - 1`` rows, so
    ``R <= T*k + min(E, T*k) * (a - 1)``, rounded down to a multiple of ``a`` (every real R is one)."""
    pairs = num_tokens * top_k
    n = pairs + min(num_experts, pairs) * (alignment - 1)
    return n // alignment * alignment


def moe_permute_layout(topk_idx: torch.Tensor, num_experts: int, alignment: int = 128,
                       max_rows: int | None = None):
    """``topk_idx [T, k]`` -> ``(m_indices int32 [R], tokens_per_expert int32 [E], row_map int32 [T, k])``.

    ``R = sum_e ceil(c_e / alignment) * alignment`` or ``max_rows`` when given (rows past the real
    layout are padding). Entries -1 are skipped. Entries out of ``[-1, E)`` are an error here.
    """
    T, k = topk_idx.shape
    dev = topk_idx.device
    flat = topk_idx.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) >= num_experts):
        raise ValueError(f"topk_idx values must be in [-1, {num_experts}), got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=num_experts)
    padded = (counts + alignment - 1) // alignment * alignment
    seg_start = torch.cumsum(padded, 0) - padded
    R = int(padded.sum())
    if max_rows is not None:
        if R > max_rows:
            raise ValueError(f"the layout needs {R} rows, more than max_rows={max_rows}")
        R = max_rows
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices  # by expert, then by (token, slot)
    sorted_key = key[order]
    n_valid = int(valid.sum())
    order, sorted_key = order[:n_valid], sorted_key[:n_valid]
    cnt_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n_valid, device=dev) - cnt_start[sorted_key]
    rows = seg_start[sorted_key] + rank_in_expert
    row_map = torch.full((T * k,), -1, dtype=torch.long, device=dev)
    row_map[order] = rows
    m_indices = torch.full((R,), -1, dtype=torch.int32, device=dev)
    m_indices[rows] = sorted_key.to(torch.int32)
    return m_indices, counts.to(torch.int32), row_map.view(T, k).to(torch.int32)


def moe_scatter_rows(x: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None,
                     num_rows: int) -> torch.Tensor:
    """``out [num_rows, H]`` zeros, then ``out[row_map[t, j]] = x[t] (* weights[t, j])`` (in fp32,
    cast to x's dtype). The gradient of :func:`moe_unpermute` with respect to ``y_perm``."""
    T, k = row_map.shape
    H = x.shape[-1]
    out = x.new_zeros(num_rows, H)
    rm = row_map.reshape(-1).long()
    valid = rm >= 0
    tok = torch.arange(T * k, device=x.device) // k
    src = x[tok[valid]]
    if weights is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        src = (src.to(acc) * weights.reshape(-1)[valid].to(acc).unsqueeze(1)).to(x.dtype)
    out[rm[valid]] = src
    return out


def moe_permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *, alignment: int = 128,
                quantize_fp8: bool = False, max_rows: int | None = None):
    """``x [T, H]`` -> ``(x_perm [R, H] [, scales fp32 [R, H/128]], m_indices, tokens_per_expert, row_map)``.

    With ``quantize_fp8`` the rows are quantized 1x128 (the reference quantizer); padding rows are the
    quantization of zeros (bytes 0, scale 1e-4/448)."""
    m_indices, tpe, row_map = moe_permute_layout(topk_idx, num_experts, alignment, max_rows)
    x_perm = moe_scatter_rows(x, row_map, None, m_indices.shape[0])
    if quantize_fp8:
        q, s = per_token_group_quant_fp8(x_perm, 128)
        return q, s, m_indices, tpe, row_map
    return x_perm, m_indices, tpe, row_map


def moe_unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """``y [T, H] = sum_j w[t, j] * y_perm[row_map[t, j]]`` over ``row_map >= 0``, accumulated in fp32
    (fp64 for fp64 inputs) slot by slot in order j = 0..k-1, cast to y_perm's dtype. ``topk_weights``
    None means all ones (the gradient of the permutation)."""
    T, k = row_map.shape
    acc_t = torch.float64 if y_perm.dtype == torch.float64 else torch.float32
    acc = torch.zeros(T, y_perm.shape[-1], dtype=acc_t, device=y_perm.device)
    if y_perm.shape[0] == 0:  # every entry is -1 (R = 0): nothing to gather from
        return acc.to(y_perm.dtype)
    for j in range(k):
        r = row_map[:, j].long()
        valid = r >= 0
        g = y_perm[r.clamp(min=0)].to(acc_t)
        if topk_weights is not None:
            g = g * topk_weights[:, j].to(acc_t).unsqueeze(1)
        acc = acc + torch.where(valid.unsqueeze(1), g, torch.zeros_like(g))
    return acc.to(y_perm.dtype)


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 ``[E]``); -1 entries are skipped."""
    flat = topk_idx.reshape(-1).long()
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step, in place: ``b -= gamma`` where load > mean(load),
    ``b += gamma`` where load < mean(load), unchanged where equal. A load with a NaN or infinite entry
    leaves the whole bias unchanged (decided on the device: no host sync; dsmoe.ops raises instead
    wherever it can read the values back). Returns ``bias``."""
    lf = load.double()
    mean = lf.mean()
    step = torch.where(lf > mean, -gamma, torch.where(lf < mean, gamma, 0.0))
    step = torch.where(torch.isfinite(lf).all(), step, torch.zeros_like(step)).to(bias.dtype)
    bias.add_(step)
    return bias


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, *, alpha: float = 1e-4) -> torch.Tensor:
    """Complementary sequence-wise balance loss ``alpha * sum_i f_i P_i`` (mean over sequences).

    ``scores [S, E]`` or ``[B, S, E]``: the unbiased affinities ``s`` (sigmoid outputs);
    ``topk_idx [S, k]`` or ``[B, S, k]``. ``f_i = E / (k S) * #{t : i in topk_t}`` (no gradient),
    ``P_i = mean_t s_{i,t} / sum_j s_{j,t}``. Entries -1 are not counted.
    Degenerate cases (defined, never NaN): no token (S = 0 or B = 0) or no slot (k = 0): 0 (still
    connected to ``scores``); a token whose scores all underflow to 0 has no distribution to
    normalize: it adds 0 to ``P`` and gets a zero gradient.
    """
    sc = scores if scores.dim() == 3 else scores.unsqueeze(0)
    ti = topk_idx if topk_idx.dim() == 3 else topk_idx.unsqueeze(0)
    B, S, E = sc.shape
    k = ti.shape[-1]
    if S == 0 or B == 0 or k == 0:  # no token or no slot: no imbalance (and no 0/0)
        return sc.sum() * 0.0
    with torch.no_grad():
        t = ti.long()
        onehot = torch.zeros(B, S, E + 1, dtype=sc.dtype, device=sc.device)
        onehot.scatter_add_(2, torch.where(t >= 0, t, E), torch.ones_like(t, dtype=sc.dtype))
        f = onehot[..., :E].sum(1) * (E / (k * S))
    den = sc.sum(-1, keepdim=True)
    # NOTE: the safe denominator keeps the gradient of the where's unused branch finite (0 * inf = NaN)
    pos = den > 0
    sn = torch.where(pos, sc / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(sc))
    P = sn.mean(1)
    return alpha * (f * P).sum(-1).mean()
