"""Builders shared by the MLA tests: paged caches with NaN-filled unused pages and slots, random
non-contiguous block tables whose unused entries hold a huge block id."""
from __future__ import annotations

import torch

from dsmoe import ref

HUGE_BLOCK_ID = 2**30


def make_paged_cache(seqlens, *, extra_blocks: int = 3, device="cpu", fp8: bool = False, gen=None,
                     scale: float = 1.0):
    """Returns ``(kv_cache, block_table, cache_seqlens, kv_bf16)``.

    kv_bf16 ``[num_blocks, 64, 1, 576]`` holds the values (NaN in unused pages and in slots past each
    sequence's length); kv_cache is kv_bf16 or its FP8 (656-byte) quantization (unused bytes 0x7f = NaN)."""
    seqlens = [int(s) for s in seqlens]
    B = len(seqlens)
    nblk = [-(-s // 64) for s in seqlens]
    max_blocks = max(nblk + [1]) + 1                         # one always-unused column
    used = sum(nblk)
    num_blocks = used + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    bt = torch.full((B, max_blocks), HUGE_BLOCK_ID, dtype=torch.int32)
    kv = torch.full((num_blocks, 64, 1, 576), float("nan"), dtype=torch.bfloat16)
    k = 0
    for b in range(B):
        for j in range(nblk[b]):
            pid = int(perm[k])
            k += 1
            bt[b, j] = pid
            n = min(64, seqlens[b] - 64 * j)
            kv[pid, :n] = (torch.randn(n, 1, 576, generator=gen) * scale).bfloat16()
    if fp8:
        q = ref.quantize_mla_kvcache_fp8(torch.nan_to_num(kv.float(), nan=0.0).bfloat16())
        qb = q.view(torch.uint8)
        nan_slots = torch.isnan(kv.float()).any(-1)          # [nb, 64, 1]
        qb[nan_slots] = 0x7F
        cache = q
    else:
        cache = kv
    cs = torch.tensor(seqlens, dtype=torch.int32)
    return cache.to(device), bt.to(device), cs.to(device), kv.to(device)


def dense_attention(q, kv_rows, seqlens, scale, causal):
    """Independent spec check: per sequence, contiguous K (fp32) and a plain masked softmax in fp64.

    q ``[B, s_q, H, 576]``; kv_rows: list of ``[n_b, 576]`` fp32 tensors. Returns fp64 (out, lse)."""
    B, s_q, H, _ = q.shape
    out = torch.zeros(B, s_q, H, 512, dtype=torch.float64)
    lse = torch.full((B, H, s_q), float("inf"), dtype=torch.float64)
    for b in range(B):
        n = int(seqlens[b])
        k = kv_rows[b].double()
        for i in range(s_q):
            lim = n - s_q + i + 1 if causal else n
            lim = max(0, min(lim, n))
            if lim == 0:
                continue
            s = q[b, i].double() @ k[:lim].T * scale          # [H, lim]
            m = s.max(-1, keepdim=True).values
            e = torch.exp(s - m)
            tot = e.sum(-1, keepdim=True)
            out[b, i] = (e / tot) @ k[:lim, :512]
            lse[b, :, i] = (m + torch.log(tot)).squeeze(-1)
    return out, lse


def gather_rows(kv_bf16, block_table, seqlens):
    rows = []
    for b, n in enumerate(seqlens):
        n = int(n)
        nb = -(-n // 64)
        pages = kv_bf16[block_table[b, :nb].long()].reshape(-1, 576)[:n]
        rows.append(pages.float().cpu())
    return rows


def lse_close(a, b, rtol):
    """True when both are +inf in the same places and elsewhere ``|a - b| <= rtol * max(|b|, 1)`` (an lse
    near 0, e.g. of one visible token, has no meaningful relative error)."""
    a, b = a.double().cpu(), b.double().cpu()
    ia, ib = torch.isinf(a), torch.isinf(b)
    if not torch.equal(ia, ib) or not torch.equal(a[ia], b[ib]):
        return False
    if (~ia).sum() == 0:
        return True
    return bool(((a[~ia] - b[~ib]).abs() <= rtol * b[~ib].abs().clamp(min=1.0)).all())
