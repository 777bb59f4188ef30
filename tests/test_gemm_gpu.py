"""FP8 GEMM kernels on the GPU against fp64 products of the dequantized operands.

Metrics: cosine diff ``1 - 2Σxy/Σ(x²+y²)`` < 1e-5; bf16 outputs against the fp64 product rounded to
bf16 (the rounding alone is 1.7e-3 norm-relative, so an unrounded comparison at 2e-3 failed ~0.1-0.5% of
correct draws) with norm-relative error <= 1e-3; fp32 outputs against the fp64 product at 5e-4 (the
old 2e-3 bf16 bound let a 1e-3 error through). Each measured error is appended to the file named by
DSMOE_TEST_RECORD_ERRORS (tools/gpu_check.py sets it) so the first GPU run calibrates these bounds. Outputs poisoned with NaN before each run; padding / masked
rows must stay NaN; bitwise-identical reruns; CUDA-graph capture with device-side sizes changed between
replays; M = 0; validate=False with out-of-range m_indices (padding, per docs/gemm.md) and masked_m >
M_max (clamped).

Validated without a GPU (DSMOE_TEST_GPU_ON_CPU=1 + tools/mutation_check.py, table in docs/gpu.md):
gemm_out_scale (fp32 8e-4, bf16 1%), gemm_drop_row, gemm_contiguous_writes_padding,
gemm_masked_ignores_mask and gemm_k_grouped_scale each fail the tests listed there.
"""
import faulthandler
import json
import os

import pytest
import torch

import dsmoe.ops.gemm as gemm_ops
from dsmoe import ops, ref
from dsmoe.gemm_config import GemmConfig, smem_bytes
from util import DEV, GPU_ON_CPU, calc_diff, digest, poison, rel_err, same_bits_nan_aware, sync

pytestmark = pytest.mark.gpu
FP32_REL = 5e-4  # fp32 outputs: FP8 tensor-core sums (~14-bit accumulation) promoted every 128 of K: ~1e-4-2e-4
BF16_REL = 1e-3  # bf16 outputs vs the rounded reference: accumulation + rare 1-step rounding flips


def q_act(x, column_major=True):
    return ops.per_token_group_quant_fp8(x, 128, column_major_scales=column_major)


def deq_a(q, s):
    return q.double() * s.double().repeat_interleave(128, dim=-1)


def deq_b(q, s):
    N = q.shape[-2]
    return q.double() * s.double().repeat_interleave(128, dim=-2)[..., :N, :].repeat_interleave(128, dim=-1)


def _require_transpose_kernel():
    """The op falls back to a transpose copy + the 1x128 quantizer when the build lacks the fused kernel; the
    bit-identity tests below would then pass without running it."""
    from dsmoe import _native
    if GPU_ON_CPU:
        pytest.skip("bit identity of the fused kernel: nothing to check against the reference itself")
    assert _native.has_kernel("transpose_quant_fp8"), "this build of dsmoe._C lacks the transpose_quant_fp8 kernel"


def weights(G, N, K):
    w = torch.randn(G, N, K, device=DEV)
    qs = [ops.per_block_quant_fp8(w[g]) for g in range(G)]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


@pytest.fixture(autouse=True)
def _hang_guard():
    """A barrier-phase or schedule mismatch between the producer and the consumers hangs the kernel:
    turn that into a failure (traceback, process exit) instead of a stuck run."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _record(d, want):
    path = os.environ.get("DSMOE_TEST_RECORD_ERRORS")
    if path and d.numel():
        w = want.to(torch.bfloat16) if d.dtype == torch.bfloat16 else want
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "dtype": str(d.dtype),
                                "shape": list(d.shape), "rel_err": rel_err(d, w), "calc_diff": calc_diff(d, want)}) + "\n")


def check(d, want):
    """d: the kernel's output (bf16 or fp32); want: the fp64 product of the dequantized operands."""
    assert not torch.isnan(d).any(), "a valid output element was not written"
    _record(d, want)
    assert calc_diff(d, want) < 1e-5, calc_diff(d, want)
    if d.dtype == torch.bfloat16:
        assert rel_err(d, want.to(torch.bfloat16)) <= BF16_REL, rel_err(d, want.to(torch.bfloat16))
    else:
        assert rel_err(d, want) <= FP32_REL, rel_err(d, want)


@pytest.mark.parametrize("M", [1, 7, 64, 129, 4095])
@pytest.mark.parametrize("N,K", [(2112, 7168), (576, 16384), (4096, 512), (192, 128)])
def test_fp8_gemm_nt(M, N, K):
    qa, sa = q_act(torch.randn(M, K, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K, device=DEV))
    want = deq_a(qa, sa) @ deq_b(qb, sb).t()
    out = poison((M, N), torch.bfloat16, DEV)
    ops.fp8_gemm_nt(qa, sa, qb, sb, out=out)
    check(out, want)
    out32 = poison((M, N), torch.float32, DEV)
    ops.fp8_gemm_nt(qa, sa, qb, sb, out=out32)
    check(out32, want)
    # row-major scales (re-laid by the op) give the same bits as the MN-major ones
    assert torch.equal(ops.fp8_gemm_nt(qa, sa.contiguous(), qb, sb), ops.fp8_gemm_nt(qa, sa, qb, sb))


def test_promotion_keeps_error_flat():
    """With FP32 promotion every 128 of K the error does not grow with K (the FP8 tensor-core
    accumulator alone would reach ~2% at K=4096)."""
    M, N = 256, 512
    errs = []
    for K in (512, 2048, 8192, 16384):
        qa, sa = q_act(torch.randn(M, K, device=DEV))
        qb, sb = ops.per_block_quant_fp8(torch.randn(N, K, device=DEV))
        d = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32)
        errs.append(rel_err(d, deq_a(qa, sa) @ deq_b(qb, sb).t()))
    assert max(errs) < 1e-3, errs
    assert errs[-1] <= 2.0 * errs[0] + 1e-6, f"error grows with K: {errs}"


def test_bitwise_reruns():
    M, N, K = 1000, 2112, 7168
    qa, sa = q_act(torch.randn(M, K, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K, device=DEV))
    h = {digest(ops.fp8_gemm_nt(qa, sa, qb, sb)) for _ in range(5)}
    assert len(h) == 1


def make_contiguous(sizes, K):
    al = ops.get_m_alignment_for_contiguous_layout()
    padded = [-(-s // al) * al for s in sizes]
    idx = torch.full((sum(padded),), -1, dtype=torch.int32)
    r = 0
    for g, (s, p) in enumerate(zip(sizes, padded)):
        idx[r:r + s] = g
        r += p
    qa, sa = q_act(torch.randn(idx.numel(), K, device=DEV))
    return qa, sa, idx.to(DEV)


@pytest.mark.parametrize("N,K", [(4096, 7168), (7168, 2048), (192, 256)])
def test_m_grouped_contiguous(N, K):
    sizes = [1, 0, 300, 128, 7, 0, 1]
    G = len(sizes)
    qa, sa, idx = make_contiguous(sizes, K)
    qb, sb = weights(G, N, K)
    out = poison((qa.shape[0], N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out)
    assert torch.isnan(out[idx < 0]).all(), "padding rows must be untouched"
    A = deq_a(qa, sa)
    for g in range(G):
        rows = (idx == g).nonzero().squeeze(1)
        if rows.numel():
            check(out[rows], A[rows] @ deq_b(qb[g], sb[g]).t())
    again = poison((qa.shape[0], N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=again)
    assert digest(out) == digest(again)


@pytest.mark.parametrize("M_max,expected_m", [(1, 1), (7, 4), (129, 64), (256, 200)])
def test_m_grouped_masked(M_max, expected_m):
    G, N, K = 16, 4096, 7168 if M_max < 200 else 1024
    qa, sa = q_act(torch.randn(G, M_max, K, device=DEV))
    qb, sb = weights(G, N, K)
    masked = torch.randint(0, M_max + 1, (G,), dtype=torch.int32)
    masked[0], masked[1], masked[2] = 0, 1, M_max
    masked = masked.to(DEV)
    out = poison((G, M_max, N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, expected_m, out=out)
    for g, m in enumerate(masked.tolist()):
        assert torch.isnan(out[g, m:]).all(), "rows past masked_m must be untouched"
        if m:
            check(out[g, :m], deq_a(qa[g, :m], sa[g, :m]) @ deq_b(qb[g], sb[g]).t())


@pytest.mark.cuda_only
def test_masked_cuda_graph_replay_reads_masked_m_on_device():
    G, M_max, N, K = 8, 64, 1024, 1024
    qa, sa = q_act(torch.randn(G, M_max, K, device=DEV))
    qb, sb = weights(G, N, K)
    masked = torch.full((G,), 5, dtype=torch.int32, device=DEV)
    out = torch.zeros(G, M_max, N, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, 32, out=out)  # warm-up outside capture
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, 32, out=out)
    for trial in range(2):
        new = torch.randint(0, M_max + 1, (G,), dtype=torch.int32, device=DEV)
        masked.copy_(new)
        out.fill_(float("nan"))
        graph.replay()
        sync()
        for g, m in enumerate(new.tolist()):
            assert torch.isnan(out[g, m:]).all()
            if m:
                check(out[g, :m], deq_a(qa[g, :m], sa[g, :m]) @ deq_b(qb[g], sb[g]).t())


@pytest.mark.parametrize("M,N", [(7168, 2048), (192, 320), (100, 128)])
def test_fp8_gemm_tn(M, N):
    T = 4096 + 77
    dy, x = torch.randn(T, M, device=DEV), torch.randn(T, N, device=DEV)
    qa, sa = ops.per_token_group_quant_fp8_transposed(dy)
    qb, sb = ops.per_token_group_quant_fp8_transposed(x)
    want = deq_a(qa, sa) @ deq_a(qb, sb).t()
    out = poison((M, N), torch.float32, DEV)
    ops.fp8_gemm_tn(qa, sa, qb, sb, out=out)
    check(out, want)
    base = torch.randn(M, N, device=DEV)
    acc = base.clone()
    ops.fp8_gemm_tn(qa, sa, qb, sb, out=acc, accumulate=True)
    check(acc, want + base.double())


def test_k_grouped_tn():
    sizes = [128, 0, 384, 4096, 128]
    M, N = 2048, 1024
    T = sum(sizes)
    dy, x = torch.randn(T, M, device=DEV), torch.randn(T, N, device=DEV)
    qa, sa = ops.per_token_group_quant_fp8_transposed(dy)
    qb, sb = ops.per_token_group_quant_fp8_transposed(x)
    gs = torch.tensor(sizes, dtype=torch.int32, device=DEV)
    out = poison((len(sizes), M, N), torch.float32, DEV)
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs, out=out)
    A, B = deq_a(qa, sa), deq_a(qb, sb)
    t0 = 0
    for g, tg in enumerate(sizes):
        if tg == 0:
            assert (out[g] == 0).all()
        else:
            check(out[g], A[:, t0:t0 + tg] @ B[:, t0:t0 + tg].t())
        t0 += tg
    acc = out.clone()
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs, out=acc, accumulate=True)
    assert torch.allclose(acc, 2 * out, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("T,K", [(1, 64), (200, 7168), (4096, 130)])
def test_transposed_quant_bit_identical_to_reference(T, K):
    _require_transpose_kernel()
    x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16) * 3
    x[0, 0] = float("nan") if T > 1 else x[0, 0]
    q, s = ops.per_token_group_quant_fp8_transposed(x)
    rq, rs = ref.per_token_group_quant_fp8_transposed(x.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    assert same_bits_nan_aware(s, rs)
    assert s.stride() == rs.stride()


@pytest.mark.cuda_only
def test_bad_launch_inputs_raise_before_launch():
    qa, sa = q_act(torch.randn(4, 256, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(128, 256, device=DEV))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.fp8_gemm_nt(qa, sa.cpu(), qb, sb)
    idx = torch.zeros(128, dtype=torch.int32, device=DEV)
    idx[5] = 9
    qa2, sa2 = q_act(torch.randn(128, 256, device=DEV))
    with pytest.raises(ValueError, match=r"'m_indices': values must be in \[-1, 1\)"):
        ops.m_grouped_fp8_gemm_nt_contiguous(qa2, sa2, qb[None], sb[None], idx)


@pytest.mark.cuda_only
def test_torch_compile_cuda():
    qa, sa = q_act(torch.randn(33, 512, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(256, 512, device=DEV))
    f = torch.compile(lambda a, s: ops.fp8_gemm_nt(a, s, qb, sb).float() * 2, fullgraph=True)
    assert torch.equal(f(qa, sa), ops.fp8_gemm_nt(qa, sa, qb, sb).float() * 2)


def test_zero_rows():
    """M = 0 (and empty groups) launch nothing and return empty results of the right shapes."""
    qa, sa = q_act(torch.randn(0, 256, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(128, 256, device=DEV))
    assert ops.fp8_gemm_nt(qa, sa, qb, sb).shape == (0, 128)
    assert ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32).shape == (0, 128)
    qw, sw = weights(2, 128, 256)
    d = ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qw, sw, torch.empty(0, dtype=torch.int32, device=DEV))
    assert d.shape == (0, 128)
    qm, sm = q_act(torch.randn(2, 0, 256, device=DEV))
    assert ops.m_grouped_fp8_gemm_nt_masked(qm, sm, qw, sw, torch.zeros(2, dtype=torch.int32, device=DEV), 0).shape == (2, 0, 128)


def test_contiguous_unvalidated_bad_indices_are_padding():
    """validate=False: docs/gemm.md says any m_indices value outside [0, G) is padding: those rows are
    never written (they keep out's content) and the valid rows are still right."""
    sizes, K, N = [130, 7, 64], 256, 192
    qa, sa, idx = make_contiguous(sizes, K)
    G = len(sizes)
    qb, sb = weights(G, N, K)
    idx = idx.clone()
    pad = (idx < 0).nonzero().squeeze(1)
    idx[pad[::3]] = -7                      # other negative values inside padding runs
    bad_rows = idx < 0
    if not GPU_ON_CPU:  # the reference indexes b[g] and cannot take g >= G (docs: padding on the GPU)
        al = ops.get_m_alignment_for_contiguous_layout()
        idx = torch.cat([idx, torch.full((al,), G + 5, dtype=torch.int32, device=DEV)])
        qa2, sa2 = q_act(torch.randn(al, K, device=DEV))
        qa, sa = torch.cat([qa, qa2]), torch.cat([sa.contiguous(), sa2.contiguous()])
        bad_rows = (idx < 0) | (idx >= G)
    out = poison((qa.shape[0], N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out, validate=False)
    assert torch.isnan(out[bad_rows]).all(), "rows with out-of-range indices must not be written"
    A = deq_a(qa, sa)
    for g in range(G):
        rows = (idx == g).nonzero().squeeze(1)
        check(out[rows], A[rows] @ deq_b(qb[g], sb[g]).t())


def test_masked_m_above_m_max_is_clamped():
    """validate=False with masked_m > M_max: the kernel clamps to M_max (every row written, nothing past
    the tensor), and negative values to 0."""
    G, M_max, N, K = 4, 70, 256, 384
    qa, sa = q_act(torch.randn(G, M_max, K, device=DEV))
    qb, sb = weights(G, N, K)
    masked = torch.tensor([M_max + 1, 1 << 20, -3, 5], dtype=torch.int32, device=DEV)
    out = poison((G, M_max, N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, 64, out=out, validate=False)
    for g, m in enumerate([M_max, M_max, 0, 5]):
        assert torch.isnan(out[g, m:]).all()
        if m:
            check(out[g, :m], deq_a(qa[g, :m], sa[g, :m]) @ deq_b(qb[g], sb[g]).t())


@pytest.mark.cuda_only
def test_contiguous_and_k_grouped_cuda_graph_and_compile():
    """The contiguous and k-grouped kinds under CUDA-graph capture (m_indices / group_sizes changed on
    the device between replays) and torch.compile(fullgraph=True)."""
    K, N = 256, 192
    qa, sa, idx = make_contiguous([130, 7, 64], K)
    qb, sb = weights(3, N, K)
    out = poison((qa.shape[0], N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out, validate=False)  # warm-up
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out)
    idx2 = idx.clone()
    idx2[idx2 >= 0] = (idx2[idx2 >= 0] + 1) % 3  # same layout, other experts
    idx.copy_(idx2)
    out.fill_(float("nan"))
    g.replay()
    sync()
    A = deq_a(qa, sa)
    for e in range(3):
        rows = (idx == e).nonzero().squeeze(1)
        check(out[rows], A[rows] @ deq_b(qb[e], sb[e]).t())
    assert torch.isnan(out[idx < 0]).all()
    f = torch.compile(lambda: ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx), fullgraph=True)
    assert torch.equal(f()[idx >= 0], out[idx >= 0])
    # k-grouped
    gsz = torch.tensor([128, 0, 256], dtype=torch.int32, device=DEV)
    T, M = 384, 200
    ka, ksa = ops.per_token_group_quant_fp8_transposed(torch.randn(T, M, device=DEV))
    kb, ksb = ops.per_token_group_quant_fp8_transposed(torch.randn(T, N, device=DEV))
    kout = torch.zeros(3, M, N, device=DEV)
    ops.k_grouped_fp8_gemm_tn_contiguous(ka, ksa, kb, ksb, gsz, out=kout, validate=False)
    sync()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        ops.k_grouped_fp8_gemm_tn_contiguous(ka, ksa, kb, ksb, gsz, out=kout)
    gsz.copy_(torch.tensor([256, 128, 0], dtype=torch.int32))
    kout.fill_(float("nan"))
    g2.replay()
    sync()
    Aq, Bq = deq_a(ka, ksa), deq_a(kb, ksb)
    check(kout[0], Aq[:, :256] @ Bq[:, :256].t())
    check(kout[1], Aq[:, 256:] @ Bq[:, 256:].t())
    assert (kout[2] == 0).all()
    fk = torch.compile(lambda: ops.k_grouped_fp8_gemm_tn_contiguous(ka, ksa, kb, ksb, gsz), fullgraph=True)
    assert torch.equal(fk(), kout)


def force_config(monkeypatch, block_m, num_stages, num_ctas, raster_group_n):
    """Makes every GEMM op run with this configuration instead of the heuristic's."""
    def cfg(kind, M, N, K, device):
        return GemmConfig(kind, block_m, 128, num_stages, num_ctas, raster_group_n,
                          smem_bytes(kind, block_m, 128, num_stages))
    monkeypatch.setattr(gemm_ops, "_cfg", cfg)


# (num_ctas, raster_group_n, num_stages): one CTA walking every tile; grids that do not divide the tile
# count; raster groups of 1, 3 (not dividing the n-blocks) and 8 (wider than them); the smallest stage
# rings, so the ring wraps inside a tile (9 K blocks) and the barrier parities flip many times per CTA.
SCHEDULES = [(1, 1, 2), (3, 3, 3), (5, 8, 2), (2, 2, 5)]


@pytest.mark.parametrize("num_ctas,raster,stages", SCHEDULES)
@pytest.mark.parametrize("block_m", [64, 128])
def test_dense_any_schedule(monkeypatch, num_ctas, raster, stages, block_m):
    """Producer and consumers walk the persistent schedule independently: any grid size, raster width
    and stage count must give the same correct result (a mismatch hangs or corrupts tiles)."""
    M, N, K = 300, 640, 9 * 128
    qa, sa = q_act(torch.randn(M, K, device=DEV))
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K, device=DEV))
    want = deq_a(qa, sa) @ deq_b(qb, sb).t()
    force_config(monkeypatch, block_m, stages, num_ctas, raster)
    out = poison((M, N), torch.float32, DEV)
    ops.fp8_gemm_nt(qa, sa, qb, sb, out=out)
    check(out, want)


@pytest.mark.parametrize("num_ctas,raster,stages", SCHEDULES)
def test_grouped_any_schedule(monkeypatch, num_ctas, raster, stages):
    """The grouped walks (contiguous: skipped padding blocks; masked: per-group m-blocks with empty
    groups; k-grouped: per-group K ranges with empty groups) under small grids and stage rings. N = 192
    makes the last n-block of a group read the next group's B rows (never written out)."""
    N, K = 192, 9 * 128
    force_config(monkeypatch, 128, stages, num_ctas, raster)
    # contiguous
    sizes = [0, 129, 1, 0, 256, 5]
    qa, sa, idx = make_contiguous(sizes, K)
    qb, sb = weights(len(sizes), N, K)
    out = poison((qa.shape[0], N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out)
    assert torch.isnan(out[idx < 0]).all()
    A = deq_a(qa, sa)
    for g in range(len(sizes)):
        rows = (idx == g).nonzero().squeeze(1)
        if rows.numel():
            check(out[rows], A[rows] @ deq_b(qb[g], sb[g]).t())
    # masked
    G, M_max = 6, 200
    qa, sa = q_act(torch.randn(G, M_max, K, device=DEV))
    qb, sb = weights(G, N, K)
    masked = torch.tensor([0, 200, 1, 129, 0, 64], dtype=torch.int32, device=DEV)
    out = poison((G, M_max, N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked, 100, out=out)
    for g, m in enumerate(masked.tolist()):
        assert torch.isnan(out[g, m:]).all()
        if m:
            check(out[g, :m], deq_a(qa[g, :m], sa[g, :m]) @ deq_b(qb[g], sb[g]).t())
    # k-grouped
    gsz = [0, 384, 128, 0, 640]
    T, M = sum(gsz), 200
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(T, M, device=DEV))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(T, N, device=DEV))
    out = poison((len(gsz), M, N), torch.float32, DEV)
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, torch.tensor(gsz, dtype=torch.int32, device=DEV), out=out)
    Aq, Bq = deq_a(qa, sa), deq_a(qb, sb)
    t0 = 0
    for g, tg in enumerate(gsz):
        if tg:
            check(out[g], Aq[:, t0:t0 + tg] @ Bq[:, t0:t0 + tg].t())
        else:
            assert (out[g] == 0).all()
        t0 += tg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_transposed_quant_special_values_bit_identical(dtype, ue8m0):
    """Every input dtype and scale format, with the special cases of the specification in distinct
    128-token groups of distinct columns: NaN (scale NaN, bytes 0x7f), +-inf (scale inf, inf -> 0x7f,
    finite -> +-0), an all-zero group (floor scale, zero bytes), tiny negative values (fp32: subnormal inputs,
    quantized to -0 unless flushed), a tail group
    padded with zero tokens (T = 300) and K not a multiple of 4 or 64."""
    _require_transpose_kernel()
    T, K = 300, 67
    x = (torch.randn(T, K, device=DEV) * 5).to(dtype)
    x[3, 0] = float("nan")
    x[130, 1] = float("inf")
    x[131, 1] = -float("inf")
    x[257, 2] = -float("inf")
    x[:128, 3] = 0
    tiny = torch.finfo(dtype).tiny / (8 if dtype == torch.float32 else 1)
    x[128:256, 4] = -tiny * torch.arange(1, 129, device=DEV).to(dtype)
    x[:, 5] = -x[:, 5].abs()
    q, s = ops.per_token_group_quant_fp8_transposed(x, scale_ue8m0=ue8m0)
    rq, rs = ref.per_token_group_quant_fp8_transposed(x.cpu(), scale_ue8m0=ue8m0)
    assert q.shape == (K, 384) and s.shape == (K, 3)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    assert same_bits_nan_aware(s, rs)
    assert (q[:, T:].view(torch.uint8) == 0).all(), "padding tokens must quantize to zero bytes"


def test_contiguous_unvalidated_bad_m_indices_agree_with_cpu():
    """validate=False with layout violations: the kernel writes exactly the rows the CPU path writes
    (the rule in dsmoe.ref.gemm), with the same values."""
    sizes, N, K = [100, 120, 0], 256, 512
    G = len(sizes)
    qa, sa, idx = make_contiguous(sizes + [0], K)
    idx = torch.cat([idx.cpu(), torch.full((128,), -1, dtype=torch.int32)])
    bad = idx.clone()
    bad[2], bad[4], bad[6], bad[1], bad[128], bad[300] = G + 5, -7, 1, -1, -1, 0
    qa, sa = q_act(torch.randn(bad.numel(), K, device=DEV))
    qb, sb = weights(G, N, K)
    out = poison((bad.numel(), N), torch.bfloat16, DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, bad.to(DEV), out=out, validate=False)
    cpu = poison((bad.numel(), N), torch.bfloat16, "cpu")
    ops.m_grouped_fp8_gemm_nt_contiguous(qa.cpu(), sa.cpu(), qb.cpu(), sb.cpu(), bad, out=cpu, validate=False)
    written = ~torch.isnan(cpu).any(1)
    assert written.sum() > 0 and (~written).sum() > 0
    assert torch.equal(torch.isnan(out.cpu()).all(1), ~written)
    check(out.cpu()[written].double(), cpu[written].double())


@pytest.mark.parametrize("sizes", [[128, 64, 256], [-128, 384], [256, 256], [128], [1000, 128]])
def test_k_grouped_unvalidated_bad_sizes_agree_with_cpu(sizes):
    T, M, N = 384, 256, 384
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(T, M, device=DEV))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(T, N, device=DEV))
    gs = torch.tensor(sizes, dtype=torch.int32)
    out = poison((len(sizes), M, N), torch.float32, DEV)
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs.to(DEV), out=out, validate=False)
    cpu = ops.k_grouped_fp8_gemm_tn_contiguous(qa.cpu(), sa.cpu(), qb.cpu(), sb.cpu(), gs, validate=False)
    for g in range(len(sizes)):
        if (cpu[g] == 0).all():
            assert (out[g] == 0).all()
        else:
            check(out[g].cpu().double(), cpu[g].double())
