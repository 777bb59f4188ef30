"""Ops broken on purpose, to show that a GPU-tier test fails on a wrong kernel.

``DSMOE_TEST_MUTATION=<name>`` (conftest.py) wraps one public op in ``dsmoe.ops`` so that it returns a
slightly wrong result, the kind of defect a kernel bug produces. Run with DSMOE_TEST_GPU_ON_CPU=1 the
wrapped op is the reference, so a test that still passes cannot tell a right kernel from this wrong
one. tools/mutation_check.py runs each mutation against the tests expected to catch it; docs/gpu.md
records the outcome. On a GPU the same switch breaks the kernel's output instead of the reference's.
"""
from __future__ import annotations

import torch

import dsmoe.ops as ops


def _wrap(monkeypatch, name, after=None, before=None):
    orig = getattr(ops, name)

    def wrapped(*args, **kw):
        if before is not None:
            args, kw = before(args, kw)
        out = orig(*args, **kw)
        if after is not None:
            after(out, args, kw)
        return out

    monkeypatch.setattr(ops, name, wrapped)


def _bf16_step(t: torch.Tensor) -> None:
    """Scales a bf16/fp32 tensor by 1.01 (about two and a half bf16 steps)."""
    t.mul_(1.01)


# ----------------------------------------------------------------------------- MLA
def _append_rope_sign(mp):
    def before(args, kw):
        if kw.get("sin") is not None:
            kw = dict(kw, sin=-kw["sin"])
        return args, kw
    _wrap(mp, "mla_kvcache_append", before=before)


def _append_ignore_ue8m0(mp):
    _wrap(mp, "mla_kvcache_append", before=lambda a, kw: (a, dict(kw, scale_ue8m0=False)))


def _append_stray_write(mp):
    def after(out, args, kw):
        cache = args[0].view(torch.uint8)
        cache[-1, 63, 0, 3] ^= 0x01  # a slot no token was appended to (last page, last slot)
    _wrap(mp, "mla_kvcache_append", after=after)


def _append_latent_ulp(mp):
    def after(out, args, kw):
        cache, bt, bids, pos = args[:4]
        b, p = int(bids[0]), int(pos[0])
        row = cache[int(bt[b, p // 64]), p % 64, 0]
        if cache.dtype == torch.bfloat16:
            row[:8] = (row[:8].float() * (1 + 2 ** -6)).bfloat16()  # 2+ bf16 steps
        else:
            row.view(torch.uint8)[:8] ^= 0x02  # two e4m3 steps
    _wrap(mp, "mla_kvcache_append", after=after)


def _decode_lse_off(mp):
    _wrap(mp, "mla_decode_with_kvcache", after=lambda out, a, kw: out[1].mul_(1 + 3e-5))


def _decode_drop_row(mp):
    def after(out, a, kw):
        o = out[0]
        if o.numel():
            o.view(-1, o.shape[-1])[o.shape[0] * o.shape[1] * o.shape[2] // 2].zero_()
    _wrap(mp, "mla_decode_with_kvcache", after=after)


def _decode_out_scale(mp):
    _wrap(mp, "mla_decode_with_kvcache", after=lambda out, a, kw: _bf16_step(out[0]))


def _decode_unwritten_lse(mp):
    def after(out, a, kw):
        if out[1].numel():
            out[1].view(-1)[-1] = float("nan")  # what a never-written, NaN-poisoned element reads back as
    _wrap(mp, "mla_decode_with_kvcache", after=after)


def _emulated_decode(bf16_row_sum: bool):
    """The kernel's arithmetic in torch: fp32 scores, running max, P = exp(s - m) rounded to bf16 for the
    P @ V product (as the tensor cores take it), row sum of the fp32 P (FlashMLA's order) or, with
    ``bf16_row_sum``, of the rounded P (the defect the outside review found)."""
    from dsmoe.ref import mla as rm

    def decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, md, ns, softmax_scale, causal=False):
        B, s_q, H, _ = q.shape
        out = torch.zeros(B, s_q, H, head_dim_v)
        lse = torch.full((B, H, s_q), float("inf"))
        for b, n in enumerate(cache_seqlens.tolist()):
            if n <= 0:
                continue
            k = rm._gather_seq(kv_cache.cpu(), block_table.cpu(), b, n)
            lim = rm._limits(n, s_q, causal, "cpu")
            sc = torch.einsum("qhd,nd->qhn", q[b].float().cpu(), k) * softmax_scale
            sc = sc.masked_fill(~(torch.arange(n).view(1, 1, n) < lim.view(-1, 1, 1)), float("-inf"))
            m = sc.amax(-1, keepdim=True)
            seen = torch.isfinite(m)
            p = torch.exp(sc - torch.where(seen, m, 0.0))
            pb = p.bfloat16().float()
            rs = (pb if bf16_row_sum else p).sum(-1, keepdim=True)
            o = torch.einsum("qhn,nd->qhd", pb, k[:, :head_dim_v]) / torch.where(seen, rs, 1.0)
            out[b] = torch.where(seen, o, 0.0)
            lse[b] = torch.where(seen, m + torch.log(rs), float("inf")).squeeze(-1).transpose(0, 1)
        return out.to(q.dtype).to(q.device), lse.to(q.device)
    return decode


def _decode_emulated_ok(mp):
    mp.setattr(ops, "mla_decode_with_kvcache", _emulated_decode(False))


def _decode_emulated_bf16_rowsum(mp):
    mp.setattr(ops, "mla_decode_with_kvcache", _emulated_decode(True))


# ----------------------------------------------------------------------------- GEMM
def _gemm_out_scale(mp):
    """Output 1.0008x too large in fp32 (inside the old 2e-3 bound, outside the fp32 one), 1% in bf16."""
    _wrap(mp, "fp8_gemm_nt", after=lambda out, a, kw: out.mul_(1 + 8e-4) if out.dtype == torch.float32 else _bf16_step(out))


def _gemm_drop_row(mp):
    def after(out, a, kw):
        if out.numel():
            out[out.shape[0] // 2].zero_()
    _wrap(mp, "fp8_gemm_nt", after=after)


def _contiguous_writes_padding(mp):
    def after(out, args, kw):
        idx = args[4] if len(args) > 4 else kw["m_indices"]
        out[idx.to(out.device) < 0] = 0
    _wrap(mp, "m_grouped_fp8_gemm_nt_contiguous", after=after)


def _masked_ignores_mask(mp):
    """Writes every row of every group (as if masked_m were M_max) with the zeros of an unread tile."""
    def after(out, args, kw):
        masked = (args[4] if len(args) > 4 else kw["masked_m"]).tolist()
        for g, m in enumerate(masked):
            out[g, max(0, min(m, out.shape[1])):] = 0
    _wrap(mp, "m_grouped_fp8_gemm_nt_masked", after=after)


def _k_grouped_scale(mp):
    _wrap(mp, "k_grouped_fp8_gemm_tn_contiguous", after=lambda out, a, kw: out.mul_(1 + 8e-4))


# ----------------------------------------------------------------------------- quant
def _quant_scale_padding(mp):
    def after(out, args, kw):
        q, s = out
        if s.dim() >= 2 and s.stride(-2) == 1 and s.stride(-1) > s.shape[-2]:  # column-major with padding
            st = torch.empty(0, dtype=s.dtype, device=s.device)
            st.set_(s.untyped_storage(), 0, (s.untyped_storage().nbytes() // 4,), (1,))
            st.view(-1, s.stride(-1))[:, s.shape[-2]:] = 1.0
    _wrap(mp, "per_token_group_quant_fp8", after=after)


def _quant_row_unwritten(mp):
    def after(out, args, kw):
        q, s = out
        if q.numel():
            q.view(-1, q.shape[-1])[-1].view(torch.uint8).fill_(0xFF)  # poison bytes left in place
            s[(-1,) * s.dim()] = float("nan")
    _wrap(mp, "per_token_group_quant_fp8", after=after)


def _quant_scale_off(mp):
    def after(out, args, kw):
        out[1].mul_(1 + 2 ** -20)
    _wrap(mp, "per_token_group_quant_fp8", after=after)


# ----------------------------------------------------------------------------- MoE routing
def _route_nan_rows_last(mp):
    """Softmax rows holding NaN/inf get indices in some other order (the spec defines theirs)."""
    def after(out, args, kw):
        idx, w = out
        logits = args[0]
        bad = ~torch.isfinite(logits.float()).all(-1)
        if bad.any():
            idx[bad] = idx[bad].flip(-1)
            w[bad] = w[bad].flip(-1)
    _wrap(mp, "moe_route", after=after)


def _route_ignore_bias(mp):
    _wrap(mp, "moe_route", before=lambda a, kw: ((a[0], None, *a[2:]), kw))


MUTATIONS = {
    "mla_append_rope_sign": (_append_rope_sign, "fused append rotates k_rope the wrong way (sin sign flipped)"),
    "mla_append_ignore_ue8m0": (_append_ignore_ue8m0, "FP8 append ignores scale_ue8m0 (fp32 scales instead of powers of 2)"),
    "mla_append_stray_write": (_append_stray_write, "append flips a bit in a slot no token targets"),
    "mla_append_latent_ulp": (_append_latent_ulp, "8 latent values of one appended row 2 steps off"),
    "mla_decode_lse_off": (_decode_lse_off, "lse 3e-5 relative too large"),
    "mla_decode_drop_row": (_decode_drop_row, "one (b, i_q, h) output row left at zero"),
    "mla_decode_out_scale": (_decode_out_scale, "every output 1% too large"),
    "mla_decode_unwritten_lse": (_decode_unwritten_lse, "one lse element never written (reads back the poison)"),
    "mla_decode_emulated_ok": (_decode_emulated_ok, "CONTROL (must pass): a correct kernel's arithmetic, bf16 P"),
    "mla_decode_emulated_bf16_rowsum": (_decode_emulated_bf16_rowsum, "the kernel's arithmetic with the row sum over bf16 P"),
    "gemm_out_scale": (_gemm_out_scale, "dense GEMM output 8e-4 (fp32) / 1% (bf16) too large"),
    "gemm_drop_row": (_gemm_drop_row, "dense GEMM leaves one output row zero"),
    "gemm_contiguous_writes_padding": (_contiguous_writes_padding, "contiguous grouped GEMM zeroes padding rows"),
    "gemm_masked_ignores_mask": (_masked_ignores_mask, "masked grouped GEMM writes rows >= masked_m"),
    "gemm_k_grouped_scale": (_k_grouped_scale, "k-grouped TN GEMM 8e-4 too large (fp32 output)"),
    "quant_scale_padding": (_quant_scale_padding, "column-major scales: the kernel writes into the M padding"),
    "quant_row_unwritten": (_quant_row_unwritten, "the last row of q and one scale left unwritten"),
    "quant_scale_off": (_quant_scale_off, "scales 1 ulp-ish (2^-20) off"),
    "route_nan_rows_order": (_route_nan_rows_last, "softmax rows with NaN/inf logits get another order"),
    "route_ignore_bias": (_route_ignore_bias, "routing ignores the selection bias"),
}


def apply(name: str, monkeypatch) -> None:
    if name not in MUTATIONS:
        raise ValueError(f"DSMOE_TEST_MUTATION={name!r}: unknown; choose from {sorted(MUTATIONS)}")
    MUTATIONS[name][0](monkeypatch)
