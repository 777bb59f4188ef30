"""Inter-node traffic per token, flat (collective) vs hierarchical EP, counted from the layouts the code sends.

No network: every simulated rank routes its own tokens with ``dsmoe.ops.moe_route`` (V3's rule, node limit
included) and the counts come from the transports' own layout functions: ``dsmoe.parallel.hierarchical.plan``
(what the hierarchical backend sends in hop 1 and forwards in hop 2) and ``flat_plan`` (what the collective
backend sends). Row sizes are the transports' byte rows: dispatch FP8 payload + fp32 scales + int32 ids + fp32
weights; combine rows in bf16, the hierarchical node partials in fp32 (``combine_partials="fp32"``, default:
a partial of one row crosses as that bf16 row, a real sum in fp32) or bf16 (``"native"``).

Router logits are random (N(0, 1) plus a small random bias), so the "typical" columns describe a router
without learned structure; the per-token maxima are the bounds whatever the router does.

    PYTHONPATH=python python tools/internode_traffic.py            # V3: 8 nodes x 8 GPUs, 256 experts, top-8, M=4
    PYTHONPATH=python python tools/internode_traffic.py --json out.json
"""
from __future__ import annotations

import argparse
import json

import torch

from dsmoe import ops
from dsmoe.parallel.hierarchical import flat_plan, plan


def measure(*, nodes=8, ranks_per_node=8, num_experts=256, top_k=8, max_nodes=4, tokens_per_rank=256, hidden=7168,
            n_group=8, topk_group=4, seed=0) -> dict:
    N, R = nodes, ranks_per_node
    W, E, k, H = N * R, num_experts, top_k, hidden
    P = E // N
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(E, generator=g) * 0.01
    row = {"dispatch": H + 4 * (H // 128) + 8 * k, "combine_flat": 2 * H, "combine_hier_fp32": 4 * H,
           "combine_hier_native": 2 * H}
    flat = dict(dispatch_inter_rows=0, dispatch_intra_rows=0, dispatch_inter_rows_per_token_max=0)
    hier = dict(dispatch_inter_rows=0, dispatch_intra_rows=0, dispatch_inter_rows_per_token_max=0,
                combine_inter_single_rows=0)
    routing = dict(max_nodes_per_token=0, nodes=0, ranks=0, remote_node_pairs=0, remote_rank_pairs=0)
    T = tokens_per_rank
    for s in range(W):
        n_s, l_s = divmod(s, R)
        logits = torch.randn(T, E, generator=g)
        idx, _ = ops.moe_route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group,
                               routed_scaling_factor=2.5, num_nodes=N, max_nodes=max_nodes)
        # flat: one row per (token, destination rank)
        per_rank = flat_plan(idx, E, W)
        on_node = torch.arange(W) // R == n_s
        flat["dispatch_inter_rows"] += int(per_rank[~on_node].sum())
        flat["dispatch_intra_rows"] += int(per_rank[on_node].sum() - per_rank[s])
        # hierarchical: hop 1 one row per (token, destination node); hop 2 forwarded by the rail peers
        in_rank, tok1, send1, fwd = plan(idx, E, W, R)
        remote = torch.arange(N) != n_s
        hier["dispatch_inter_rows"] += int(send1[remote].sum())
        hier["dispatch_intra_rows"] += int(fwd.sum() - fwd[:, l_s].sum())
        # per token: remote nodes (hier rows), remote ranks (flat rows)
        tok_nodes = in_rank.view(T, N, R).any(2)
        tok_ranks = in_rank
        rn = tok_nodes[:, remote].sum(1)
        # combine: a remote node's partial of a token that reached one of its ranks is one row (sent in bf16)
        hier["combine_inter_single_rows"] += int((in_rank.view(T, N, R).sum(2)[:, remote] == 1).sum())
        rr = tok_ranks[:, ~on_node].sum(1)
        hier["dispatch_inter_rows_per_token_max"] = max(hier["dispatch_inter_rows_per_token_max"], int(rn.max()))
        flat["dispatch_inter_rows_per_token_max"] = max(flat["dispatch_inter_rows_per_token_max"], int(rr.max()))
        spans = (idx.long() // P)
        nodes_per_tok = torch.zeros(T, N, dtype=torch.bool).scatter_(1, spans, True).sum(1)
        routing["max_nodes_per_token"] = max(routing["max_nodes_per_token"], int(nodes_per_tok.max()))
        routing["nodes"] += int(nodes_per_tok.sum())
        routing["ranks"] += int(tok_ranks.sum())
        routing["remote_node_pairs"] += int(rn.sum())
        routing["remote_rank_pairs"] += int(rr.sum())
    tok = W * T
    routing["mean_nodes_per_token"] = routing.pop("nodes") / tok
    routing["mean_ranks_per_token"] = routing.pop("ranks") / tok
    for d in (flat, hier):
        d["dispatch_inter_rows_per_token"] = d["dispatch_inter_rows"] / tok
        d["dispatch_inter_bytes_per_token"] = d["dispatch_inter_rows"] * row["dispatch"] / tok
        d["dispatch_intra_bytes_per_token"] = d["dispatch_intra_rows"] * row["dispatch"] / tok
    # combine sends every dispatched row back: same row counts, combine row sizes
    flat["combine_inter_bytes_per_token"] = flat["dispatch_inter_rows"] * row["combine_flat"] / tok
    flat["combine_intra_bytes_per_token"] = flat["dispatch_intra_rows"] * row["combine_flat"] / tok
    one = hier["combine_inter_single_rows"]
    hier["combine_inter_bytes_per_token_fp32"] = ((hier["dispatch_inter_rows"] - one) * row["combine_hier_fp32"] +
                                                  one * row["combine_hier_native"]) / tok
    hier["combine_inter_bytes_per_token_all_fp32"] = hier["dispatch_inter_rows"] * row["combine_hier_fp32"] / tok
    hier["combine_inter_bytes_per_token_native"] = hier["dispatch_inter_rows"] * row["combine_hier_native"] / tok
    hier["combine_intra_bytes_per_token"] = hier["dispatch_intra_rows"] * row["combine_flat"] / tok
    return {"config": dict(nodes=N, ranks_per_node=R, num_experts=E, top_k=k, max_nodes=max_nodes, n_group=n_group,
                           topk_group=topk_group, hidden=H, tokens_per_rank=T, seed=seed),
            "row_bytes": row, "routing": routing, "flat": flat, "hierarchical": hier}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--max-nodes", type=int, default=4)
    ap.add_argument("--n-group", type=int, default=8)
    ap.add_argument("--topk-group", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--tokens-per-rank", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    rep = measure(nodes=a.nodes, ranks_per_node=a.ranks_per_node, num_experts=a.experts, top_k=a.top_k,
                  max_nodes=a.max_nodes, tokens_per_rank=a.tokens_per_rank, hidden=a.hidden, n_group=a.n_group,
                  topk_group=a.topk_group, seed=a.seed)
    f, h, r = rep["flat"], rep["hierarchical"], rep["routing"]
    print(json.dumps(rep["config"]))
    print(f"routing: nodes per token mean {r['mean_nodes_per_token']:.3f} max {r['max_nodes_per_token']}, "
          f"ranks per token mean {r['mean_ranks_per_token']:.3f}")
    print(f"row bytes: {rep['row_bytes']}")
    print(f"{'per token':38s} {'flat':>12s} {'hierarchical':>14s}")
    rows = [("inter-node dispatch rows (mean)", f["dispatch_inter_rows_per_token"], h["dispatch_inter_rows_per_token"]),
            ("inter-node dispatch rows (max)", f["dispatch_inter_rows_per_token_max"], h["dispatch_inter_rows_per_token_max"]),
            ("inter-node dispatch bytes, FP8 (mean)", f["dispatch_inter_bytes_per_token"], h["dispatch_inter_bytes_per_token"]),
            ("inter-node combine bytes, fp32 partials", f["combine_inter_bytes_per_token"], h["combine_inter_bytes_per_token_fp32"]),
            ("inter-node combine bytes, bf16 partials", f["combine_inter_bytes_per_token"], h["combine_inter_bytes_per_token_native"]),
            ("  (fp32 partials all 4 B/elem: symm_mem)", f["combine_inter_bytes_per_token"], h["combine_inter_bytes_per_token_all_fp32"]),
            ("inter-node dispatch+combine, fp32 part.", f["dispatch_inter_bytes_per_token"] + f["combine_inter_bytes_per_token"],
             h["dispatch_inter_bytes_per_token"] + h["combine_inter_bytes_per_token_fp32"]),
            ("inter-node dispatch+combine, bf16 part.", f["dispatch_inter_bytes_per_token"] + f["combine_inter_bytes_per_token"],
             h["dispatch_inter_bytes_per_token"] + h["combine_inter_bytes_per_token_native"]),
            ("intra-node dispatch bytes, FP8 (mean)", f["dispatch_intra_bytes_per_token"], h["dispatch_intra_bytes_per_token"])]
    for name, a_, b_ in rows:
        print(f"{name:38s} {a_:12.1f} {b_:14.1f}")
    ratio = h["dispatch_inter_rows"] / max(f["dispatch_inter_rows"], 1)
    print(f"hierarchical / flat inter-node dispatch bytes: {ratio:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rep, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
