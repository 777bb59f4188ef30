"""FP8 GEMMs: the references (the specification) and the ops' CPU path, argument checks, custom-op
registration (opcheck, torch.compile). The GPU kernels are tested in test_gemm_gpu.py."""
import pytest
import torch

from dsmoe import ops, ref
from util import calc_diff, digest, poison, rel_err

FP8 = torch.float8_e4m3fn


def quant_a(x, column_major=False):
    return ops.per_token_group_quant_fp8(x, 128, column_major_scales=column_major)


def deq_a(q, s):
    return q.double() * s.double().repeat_interleave(128, dim=-1)


def deq_b(q, s):
    N, K = q.shape[-2:]
    e = s.double().repeat_interleave(128, dim=-2)[..., :N, :].repeat_interleave(128, dim=-1)
    return q.double() * e


def literal_nt(qa, sa, qb, sb_rows):
    """The definition, one K block at a time in fp32: acc += (A_blk @ B_blk^T) * sa[m] * sb[n]."""
    M, K = qa.shape
    acc = torch.zeros(M, qb.shape[0])
    for j in range(K // 128):
        blk = qa[:, j * 128:(j + 1) * 128].float() @ qb[:, j * 128:(j + 1) * 128].float().t()
        acc += blk * (sa[:, j, None].float() * sb_rows[None, :, j].float())
    return acc


@pytest.mark.parametrize("M", [1, 7, 129])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_nt_matches_fp64(M, column_major, out_dtype):
    N, K = 192, 640
    qa, sa = quant_a(torch.randn(M, K), column_major)
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K))
    want = deq_a(qa, sa) @ deq_b(qb, sb).t()
    d = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=out_dtype)
    assert d.dtype == out_dtype and d.shape == (M, N)
    tol = 1e-5 if out_dtype == torch.bfloat16 else 1e-10
    assert calc_diff(d, want) < tol
    assert rel_err(d, want) < (4e-3 if out_dtype == torch.bfloat16 else 1e-6)
    # the reference is the literal per-block promotion formula
    lit = literal_nt(qa, sa, qb, sb.repeat_interleave(128, 0)[:N])
    assert torch.allclose(d.float(), lit.to(out_dtype).float(), rtol=1e-5, atol=1e-5)


def test_fp8_gemm_nt_out_and_N_not_multiple_of_128():
    M, N, K = 5, 64 * 3, 256
    qa, sa = quant_a(torch.randn(M, K))
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K))
    out = poison((M, N), torch.float32, "cpu")
    r = ops.fp8_gemm_nt(qa, sa, qb, sb, out=out)
    assert r is out and not torch.isnan(out).any()
    assert calc_diff(out, deq_a(qa, sa) @ deq_b(qb, sb).t()) < 1e-10


def test_fp8_gemm_nt_empty():
    qa, sa = quant_a(torch.randn(0, 256))
    qb, sb = ops.per_block_quant_fp8(torch.randn(128, 256))
    assert ops.fp8_gemm_nt(qa, sa, qb, sb).shape == (0, 128)


def make_contiguous(sizes, K, N, align=128):
    G = len(sizes)
    padded = [(-(-s // align)) * align for s in sizes]
    M = sum(padded)
    idx = torch.full((M,), -1, dtype=torch.int32)
    r = 0
    for g, (s, p) in enumerate(zip(sizes, padded)):
        idx[r:r + s] = g
        r += p
    qa, sa = quant_a(torch.randn(M, K))
    qb, sb = zip(*[ops.per_block_quant_fp8(torch.randn(N, K)) for _ in range(G)])
    return qa, sa, torch.stack(qb), torch.stack(sb), idx


def test_m_grouped_contiguous_empty_and_single_row_groups():
    sizes = [3, 0, 1, 130, 0]
    N, K = 128, 384
    qa, sa, qb, sb, idx = make_contiguous(sizes, K, N)
    out = poison((qa.shape[0], N), torch.bfloat16, "cpu")
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out)
    pad = idx < 0
    assert torch.isnan(out[pad]).all(), "padding rows must be untouched"
    assert not torch.isnan(out[~pad]).any()
    for g in range(len(sizes)):
        rows = (idx == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        want = deq_a(qa[rows], sa[rows]) @ deq_b(qb[g], sb[g]).t()
        assert calc_diff(out[rows], want) < 1e-5


def test_m_grouped_masked():
    G, M_max, N, K = 4, 9, 192, 256
    qa, sa = quant_a(torch.randn(G, M_max, K))
    qb, sb = zip(*[ops.per_block_quant_fp8(torch.randn(N, K)) for _ in range(G)])
    qb, sb = torch.stack(qb), torch.stack(sb)
    masked_m = torch.tensor([0, 1, 9, 4], dtype=torch.int32)
    out = poison((G, M_max, N), torch.bfloat16, "cpu")
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, 4, out=out)
    for g, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[g, m:]).all()
        if m:
            want = deq_a(qa[g, :m], sa[g, :m]) @ deq_b(qb[g], sb[g]).t()
            assert calc_diff(out[g, :m], want) < 1e-5


def test_transposed_quant_layout_and_values():
    T, K = 200, 72
    x = torch.randn(T, K, dtype=torch.bfloat16)
    q, s = ops.per_token_group_quant_fp8_transposed(x)
    assert q.shape == (K, 256) and q.dtype == FP8
    assert s.shape == (K, 2) and s.stride() == (1, 72)
    assert (q[:, T:].float() == 0).all()
    xt = torch.zeros(K, 256)
    xt[:, :T] = x.float().t()
    q2, s2 = ref.per_token_group_quant_fp8(xt, 128)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    assert rel_err(deq_a(q, s)[:, :T], x.double().t()) < 0.05
    k_pad = ops.per_token_group_quant_fp8_transposed(torch.randn(128, 5))[1]
    assert k_pad.stride() == (1, 8)


def test_fp8_gemm_tn_and_accumulate():
    T, M, N = 384, 96, 128
    dy, x = torch.randn(T, M), torch.randn(T, N)
    qa, sa = ops.per_token_group_quant_fp8_transposed(dy)
    qb, sb = ops.per_token_group_quant_fp8_transposed(x)
    want = deq_a(qa, sa) @ deq_a(qb, sb).t()
    d = ops.fp8_gemm_tn(qa, sa, qb, sb)
    assert d.dtype == torch.float32 and calc_diff(d, want) < 1e-10
    assert rel_err(d, dy.double().t() @ x.double()) < 0.06
    base = torch.randn(M, N)
    out = base.clone()
    ops.fp8_gemm_tn(qa, sa, qb, sb, out=out, accumulate=True)
    assert torch.allclose(out.double(), base.double() + want, rtol=1e-5, atol=1e-4)


def test_k_grouped_tn_contiguous():
    sizes = [128, 0, 256, 128]
    T, M, N = sum(sizes), 64, 192
    dy, x = torch.randn(T, M), torch.randn(T, N)
    qa, sa = ops.per_token_group_quant_fp8_transposed(dy)
    qb, sb = ops.per_token_group_quant_fp8_transposed(x)
    gs = torch.tensor(sizes, dtype=torch.int32)
    out = ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs)
    A, B = deq_a(qa, sa), deq_a(qb, sb)
    t0 = 0
    for g, tg in enumerate(sizes):
        want = A[:, t0:t0 + tg] @ B[:, t0:t0 + tg].t()
        if tg == 0:
            assert (out[g] == 0).all()
        else:
            assert calc_diff(out[g], want) < 1e-10
        t0 += tg
    acc = torch.ones(len(sizes), M, N)
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs, out=acc, accumulate=True)
    assert torch.allclose(acc, out + 1, rtol=1e-5, atol=1e-4)


def test_alignment():
    assert ops.get_m_alignment_for_contiguous_layout() == 128


# ----------------------------------------------------------------------------- bad inputs
def _nt_inputs(M=8, N=128, K=256):
    qa, sa = quant_a(torch.randn(M, K))
    qb, sb = ops.per_block_quant_fp8(torch.randn(N, K))
    return qa, sa, qb, sb


def test_bad_inputs_dense():
    qa, sa, qb, sb = _nt_inputs()
    with pytest.raises(TypeError, match=r"fp8_gemm_nt: argument 'a' must have dtype float8_e4m3fn"):
        ops.fp8_gemm_nt(qa.float(), sa, qb, sb)
    with pytest.raises(ValueError, match=r"argument 'b' must have K=256"):
        ops.fp8_gemm_nt(qa, sa, qb[:, :128].contiguous(), sb)
    with pytest.raises(ValueError, match=r"K=200 must be a multiple of 128"):
        q = torch.zeros(8, 200, dtype=FP8)
        ops.fp8_gemm_nt(q, sa, torch.zeros(128, 200, dtype=FP8), sb)
    qb96, sb96 = ops.per_block_quant_fp8(torch.randn(96, 256))
    with pytest.raises(ValueError, match=r"N=96 must be a multiple of 64"):
        ops.fp8_gemm_nt(qa, sa, qb96, sb96)
    with pytest.raises(ValueError, match=r"argument 'a_scales' must have shape \(8, 2\), got \(8, 3\)"):
        ops.fp8_gemm_nt(qa, torch.ones(8, 3), qb, sb)
    with pytest.raises(ValueError, match=r"argument 'b_scales' must have shape \(1, 2\)"):
        ops.fp8_gemm_nt(qa, sa, qb, torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"argument 'a_scales' must have dtype float32"):
        ops.fp8_gemm_nt(qa, sa.double(), qb, sb)
    with pytest.raises(ValueError, match=r"argument 'a' must be contiguous"):
        big = torch.zeros(8, 512, dtype=FP8)
        ops.fp8_gemm_nt(big[:, :256], sa, qb, sb)
    with pytest.raises(ValueError, match=r"argument 'out' must have shape \(8, 128\)"):
        ops.fp8_gemm_nt(qa, sa, qb, sb, out=torch.empty(8, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"argument 'out' must have dtype bfloat16 or float32"):
        ops.fp8_gemm_nt(qa, sa, qb, sb, out=torch.empty(8, 128, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"argument 'out_dtype'"):
        ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float16)


def test_bad_inputs_contiguous():
    qa, sa, qb, sb, idx = make_contiguous([3, 5], 256, 128)
    f = ops.m_grouped_fp8_gemm_nt_contiguous
    bad = idx.clone()
    bad[0] = 2
    with pytest.raises(ValueError, match=r"'m_indices': values must be in \[-1, 2\).*got 2"):
        f(qa, sa, qb, sb, bad)
    bad = idx.clone()
    bad[1] = -1  # a hole inside a group: padding must only follow a group's rows
    with pytest.raises(ValueError, match=r"'m_indices': each aligned block of 128 rows"):
        f(qa, sa, qb, sb, bad)
    bad = idx.clone()
    bad[2] = 1  # two groups in one aligned block
    with pytest.raises(ValueError, match=r"'m_indices': each aligned block"):
        f(qa, sa, qb, sb, bad)
    with pytest.raises(TypeError, match=r"'m_indices' must have dtype int32"):
        f(qa, sa, qb, sb, idx.long())
    with pytest.raises(ValueError, match=r"'m_indices' must have shape \(256,\)"):
        f(qa, sa, qb, sb, idx[:128])
    with pytest.raises(ValueError, match=r"M_sum \(rows\)=200 must be a multiple of 128"):
        f(qa[:200].contiguous(), sa[:200], qb, sb, idx[:200])
    with pytest.raises(ValueError, match=r"'b_scales' must have shape \(2, 1, 2\)"):
        f(qa, sa, qb, sb[:, :, :1], idx)
    with pytest.raises(ValueError, match=r"'b' must have 3 dims"):
        f(qa, sa, qb[0], sb, idx)
    # validate=False skips the value checks (the kernel treats bad entries as padding)
    f(qa, sa, qb, sb, idx, validate=False)


def test_bad_inputs_masked():
    G, M_max, N, K = 2, 4, 128, 256
    qa, sa = quant_a(torch.randn(G, M_max, K))
    qb = torch.zeros(G, N, K, dtype=FP8)
    sb = torch.ones(G, 1, 2)
    f = ops.m_grouped_fp8_gemm_nt_masked
    with pytest.raises(ValueError, match=r"'masked_m': values must be in \[0, M_max=4\], got 5"):
        f(qa, sa, qb, sb, torch.tensor([1, 5], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"'masked_m' must have shape \(2,\)"):
        f(qa, sa, qb, sb, torch.tensor([1, 2, 3], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"argument 'b' must have shape \(2, N, 256\)"):
        f(qa, sa, qb[:1], sb[:1], torch.tensor([1, 2], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"'expected_m' must be a non-negative int"):
        f(qa, sa, qb, sb, torch.tensor([1, 2], dtype=torch.int32), -1)


def test_bad_inputs_tn():
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 64))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 128))
    with pytest.raises(ValueError, match=r"'out' is required with accumulate=True"):
        ops.fp8_gemm_tn(qa, sa, qb, sb, accumulate=True)
    with pytest.raises(TypeError, match=r"argument 'out' must have dtype float32"):
        ops.fp8_gemm_tn(qa, sa, qb, sb, out=torch.empty(64, 128, dtype=torch.bfloat16))
    gs = torch.tensor([128, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'group_sizes': each must be a non-negative multiple of 128, got 64"):
        ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs)
    with pytest.raises(ValueError, match=r"'group_sizes': must sum to T=256.*got 128"):
        ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, torch.tensor([128], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"argument 'b' must have T=256 columns"):
        ops.fp8_gemm_tn(qa, sa, qb[:, :128].contiguous(), sb[:, :1])
    with pytest.raises(ValueError, match=r"argument 'x' must have 2 dims"):
        ops.per_token_group_quant_fp8_transposed(torch.randn(2, 3, 4))


# ----------------------------------------------------------------------------- custom-op registration
def opcheck(op, args):
    """torch.library.opcheck without its schema test (it compares fp8 tensors with ops that CPU torch
    lacks for float8), plus our own check of the schema's claim: only ``out`` is mutated."""
    before = {i: digest(a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    op(*args)
    mutable = {i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i not in mutable:
            assert digest(a) == before[i], f"argument {i} of {op} was mutated"


def test_opcheck_all_ops():
    qa, sa, qb, sb = _nt_inputs(M=5, N=128, K=256)
    opcheck(torch.ops.dsmoe.fp8_gemm_nt.default, (qa, sa, qb, sb, torch.empty(5, 128, dtype=torch.bfloat16)))
    qa2, sa2, qb2, sb2, idx = make_contiguous([2, 1], 256, 64)
    opcheck(torch.ops.dsmoe.m_grouped_fp8_gemm_nt_contiguous.default,
            (qa2, sa2, qb2, sb2, idx, torch.zeros(256, 64, dtype=torch.bfloat16)))
    qa3, sa3 = quant_a(torch.randn(2, 3, 256))
    opcheck(torch.ops.dsmoe.m_grouped_fp8_gemm_nt_masked.default,
            (qa3, sa3, qb2, sb2, torch.tensor([1, 3], dtype=torch.int32), 2, torch.zeros(2, 3, 64, dtype=torch.bfloat16)))
    ta, tsa = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 64))
    tb, tsb = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 64))
    opcheck(torch.ops.dsmoe.k_grouped_fp8_gemm_tn_contiguous.default,
            (ta, tsa, tb, tsb, torch.tensor([128, 128], dtype=torch.int32), True, torch.zeros(2, 64, 64)))
    opcheck(torch.ops.dsmoe.k_grouped_fp8_gemm_tn_contiguous.default, (ta, tsa, tb, tsb, None, False, torch.zeros(64, 64)))
    opcheck(torch.ops.dsmoe.per_token_group_quant_fp8_transposed.default, (torch.randn(130, 64), False))


def test_torch_compile_fullgraph():
    qa, sa, qb, sb = _nt_inputs(M=3, N=128, K=256)
    x = torch.randn(256, 64)
    tb, tsb = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 128))

    def f(qa, sa, qb, sb, x):
        d = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32)
        ta, tsa = ops.per_token_group_quant_fp8_transposed(x)
        w = ops.fp8_gemm_tn(ta, tsa, tb, tsb)
        return d * 2, w

    eager = f(qa, sa, qb, sb, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(qa, sa, qb, sb, x)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ----------------------------------------------------------------------------- validate=False: the kernels' rule
def _bad_m_indices(idx, G):
    """Layout violations that validate=False lets through, one per aligned block where possible."""
    bad = idx.clone()
    bad[2] = G + 5       # an id past the groups inside group 0's block
    bad[4] = -7          # an id below -1
    bad[6] = 1 % G       # another group's row inside group 0's block (G >= 2: group 1)
    bad[1] = -1          # a hole inside the group
    bad[128] = -1        # block 1: its first row is padding, later rows are group 1's
    bad[300] = 0         # block 2 (all padding): a stray group-0 row
    return bad


def _kernel_rule_rows(idx, G):
    """For each row, the group it is computed with (-1: not written), from the kernels' rule as the
    spec states it: a 128-row block's group is its first row's id; rows equal to it (in [0, G)) only."""
    out = []
    for r, v in enumerate(idx.tolist()):
        first = int(idx[r // 128 * 128])
        out.append(v if v == first and 0 <= first < G else -1)
    return torch.tensor(out)


def test_contiguous_unvalidated_bad_m_indices_follow_the_kernel_rule():
    qa, sa, qb, sb, idx = make_contiguous([100, 120, 0], 256, 128)
    G = 3
    bad = _bad_m_indices(torch.cat([idx, torch.full((128,), -1, dtype=torch.int32)]), G)
    qa2, sa2 = quant_a(torch.randn(bad.numel(), 256))
    out = poison((bad.numel(), 128), torch.bfloat16, "cpu")
    ops.m_grouped_fp8_gemm_nt_contiguous(qa2, sa2, qb, sb, bad, out=out, validate=False)
    rows_g = _kernel_rule_rows(bad, G)
    assert rows_g[[1, 2, 4, 6, 128, 129, 300]].tolist() == [-1] * 7 and rows_g[[0, 3, 5]].tolist() == [0] * 3
    assert torch.isnan(out[rows_g < 0]).all()
    for g in range(G):
        rows = (rows_g == g).nonzero().squeeze(1)
        if rows.numel():
            want = deq_a(qa2[rows], sa2[rows]) @ deq_b(qb[g], sb[g]).t()
            assert not torch.isnan(out[rows]).any() and calc_diff(out[rows], want) < 1e-5


@pytest.mark.parametrize("sizes", [[128, 64, 256], [-128, 384], [256, 256], [128], [0, 0, 0], [1000, 128]])
def test_k_grouped_unvalidated_bad_sizes_follow_the_kernel_rule(sizes):
    """max(size, 0) // 128 blocks per group, cut where T ends; every group written; tokens past the
    last group unused."""
    T, M, N = 384, 64, 128
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(T, M))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(T, N))
    gs = torch.tensor(sizes, dtype=torch.int32)
    out = poison((len(sizes), M, N), torch.float32, "cpu")
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs, out=out, validate=False)
    A, B = deq_a(qa, sa), deq_a(qb, sb)
    blk = 0
    for g, s in enumerate(sizes):
        n = min(max(s, 0) // 128, T // 128 - blk)
        want = A[:, blk * 128:(blk + n) * 128] @ B[:, blk * 128:(blk + n) * 128].t()
        if n == 0:
            assert (out[g] == 0).all()
        else:
            assert calc_diff(out[g], want) < 1e-10
        blk += n
    acc = torch.ones(len(sizes), M, N)
    ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, gs, out=acc, accumulate=True, validate=False)
    assert torch.allclose(acc, out + 1, rtol=1e-5, atol=1e-4)


def test_k_grouped_no_group_must_cover_T():
    qa, sa = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 64))
    qb, sb = ops.per_token_group_quant_fp8_transposed(torch.randn(256, 128))
    none = torch.empty(0, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'group_sizes': must sum to T=256.*got 0 \(no group\)"):
        ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, none)
    assert ops.k_grouped_fp8_gemm_tn_contiguous(qa, sa, qb, sb, none, validate=False).shape == (0, 64, 128)
    qa0, sa0 = ops.per_token_group_quant_fp8_transposed(torch.randn(0, 64))
    qb0, sb0 = ops.per_token_group_quant_fp8_transposed(torch.randn(0, 128))
    assert ops.k_grouped_fp8_gemm_tn_contiguous(qa0, sa0, qb0, sb0, none).shape == (0, 64, 128)


def test_fp8_gemm_nt_out_dtype_and_out_must_agree():
    qa, sa = quant_a(torch.randn(5, 256))
    qb, sb = ops.per_block_quant_fp8(torch.randn(128, 256))
    out = torch.empty(5, 128)
    assert ops.fp8_gemm_nt(qa, sa, qb, sb, out=out, out_dtype=torch.float32) is out  # consistent: fine
    assert ops.fp8_gemm_nt(qa, sa, qb, sb).dtype == torch.bfloat16                    # the default
    with pytest.raises(TypeError, match=r"'out_dtype'=torch\.bfloat16 disagrees with argument 'out' of dtype torch\.float32"):
        ops.fp8_gemm_nt(qa, sa, qb, sb, out=out, out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"argument 'out_dtype' must be bfloat16 or float32"):
        ops.fp8_gemm_nt(qa, sa, qb, sb, out=out, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="disagrees"):
        ref.fp8_gemm_nt(qa, sa, qb, sb, out=torch.empty(5, 128, dtype=torch.bfloat16), out_dtype=torch.float32)


def test_grouped_k0_launcher_branch_writes_what_the_reference_writes(monkeypatch):
    """K = 0 is an empty sum: the launcher's no-launch branch (taken on CUDA) must zero exactly the rows
    the reference writes (contiguous: valid aligned blocks, -1 rows untouched; masked: rows < masked_m)
    and keep every other row. The branch is reached on CPU by declaring the kernel family usable: it
    returns before any launch."""
    import dsmoe._native as native

    g = torch.Generator().manual_seed(5)
    al = ops.get_m_alignment_for_contiguous_layout()
    G, N = 3, 64
    idx = torch.full((3 * al,), -1, dtype=torch.int32)
    idx[:al - 5] = 0
    idx[2 * al:2 * al + 9] = 2
    qa = torch.zeros(3 * al, 0, dtype=torch.float8_e4m3fn)
    sa = torch.zeros(3 * al, 0)
    qb = torch.zeros(G, N, 0, dtype=torch.float8_e4m3fn)
    sb = torch.zeros(G, 1, 0)
    qm = torch.zeros(G, 11, 0, dtype=torch.float8_e4m3fn)
    sm = torch.zeros(G, 11, 0)
    masked_m = torch.tensor([0, 4, 11], dtype=torch.int32)

    def both():
        d = torch.randn(3 * al, N, generator=g).to(torch.bfloat16)
        d[-1] = float("nan")
        e = torch.randn(G, 11, N, generator=g).to(torch.bfloat16)
        e[0, 0] = float("nan")
        out_c, out_m = d.clone(), e.clone()
        ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, idx, out=out_c)
        ops.m_grouped_fp8_gemm_nt_masked(qm, sm, qb, sb, masked_m, 4, out=out_m)
        return d, e, out_c, out_m

    d, e, ref_c, ref_m = both()
    rows = torch.arange(3 * al)
    written = ((rows < al - 5) | ((rows >= 2 * al) & (rows < 2 * al + 9)))
    assert (ref_c[written] == 0).all() and torch.equal(ref_c[~written].view(torch.int16), d[~written].view(torch.int16))
    assert (ref_m[1, :4] == 0).all() and (ref_m[2] == 0).all()
    assert torch.equal(ref_m[0].view(torch.int16), e[0].view(torch.int16))
    assert torch.equal(ref_m[1, 4:].view(torch.int16), e[1, 4:].view(torch.int16))

    monkeypatch.setattr(native, "use_kernel", lambda family, t: True)
    d2, e2, out_c, out_m = both()
    assert torch.equal(out_c[written], ref_c[written])
    assert torch.equal(out_c[~written].view(torch.int16), d2[~written].view(torch.int16))
    assert torch.equal(out_m[1, :4], ref_m[1, :4]) and torch.equal(out_m[2], ref_m[2])
    assert torch.equal(out_m[0].view(torch.int16), e2[0].view(torch.int16))
    assert torch.equal(out_m[1, 4:].view(torch.int16), e2[1, 4:].view(torch.int16))
