"""FP8 quantization: references against the V3 formulas (CPU), ops and kernels (GPU), bad input."""
import math

import numpy as np
import pytest
import torch

import dsmoe
from dsmoe import ops, ref
from util import DEV, full_storage, poison, poisoned_empty, same_bits_nan_aware

FP8 = torch.float8_e4m3fn


def _e4m3_table():
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(FP8).float().numpy().astype(np.float64)
    return codes.numpy(), vals


def _nearest_e4m3_codes(y: np.ndarray) -> np.ndarray:
    """Independent RNE-with-saturation model of fp32 -> e4m3: nearest finite code, ties to even mantissa."""
    codes, vals = _e4m3_table()
    finite = ~np.isnan(vals)
    fc, fv = codes[finite], vals[finite]
    # drop -0 so that 0 maps to +0 unless y is -0 / negative tiny
    out = np.empty(y.shape, dtype=np.uint8)
    flat, res = y.reshape(-1).astype(np.float64), out.reshape(-1)
    for i, v in enumerate(flat):
        if np.isnan(v):
            res[i] = 0x7F
            continue
        v = min(max(v, -448.0), 448.0)
        d = np.abs(fv - v)
        best = np.flatnonzero(d == d.min())
        cands = fc[best]
        if len(cands) > 1:  # tie (or +-0): prefer even mantissa, then the sign of v
            even = [c for c in cands if (c & 1) == 0]
            cands = even or list(cands)
            if len(cands) > 1:
                neg = np.signbit(v)
                cands = [c for c in cands if bool(c & 0x80) == neg] or cands
        res[i] = cands[0]
    return out


def _formula_quant(x: torch.Tensor, g: int, ue8m0: bool):
    """The DeepSeek-V3 formula written out with numpy float32 arithmetic, one group at a time."""
    xf = x.float().numpy().reshape(-1, x.shape[-1] // g, g)
    q = np.empty(xf.shape, dtype=np.uint8)
    s_all = np.empty(xf.shape[:2], dtype=np.float32)
    for r in range(xf.shape[0]):
        for j in range(xf.shape[1]):
            grp = xf[r, j]
            amax = np.float32(np.max(np.abs(grp))) if not np.isnan(grp).any() else np.float32("nan")
            amax = amax if (np.isnan(amax) or amax >= np.float32(1e-4)) else np.float32(1e-4)
            s = np.float32(amax / np.float32(448.0))
            if ue8m0 and np.isfinite(s):
                s = np.float32(2.0 ** math.ceil(math.log2(float(s))))  # float64 log2 of an fp32 is exact enough
            s_all[r, j] = s
            with np.errstate(invalid="ignore", divide="ignore"):
                q[r, j] = _nearest_e4m3_codes((grp / s).astype(np.float32))
    return q.reshape(x.shape), s_all.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_token_group_matches_v3_formula(dtype, ue8m0):
    rows, K = 7, 3 * 128
    x = torch.randn(rows, K, dtype=torch.float32) * torch.logspace(-3, 3, rows)[:, None]
    x[1] = 0.0                                     # all-zero row -> clamped scale
    x[2, :128] = 1e-38                             # subnormal-ish group
    x[3, 128:256] = 3e4 if dtype == torch.float16 else 1e30  # huge group
    x[4, 5] = 448.0 * 1e-4 / 448.0 * 0.5          # tiny value next to the floor
    x = x.to(dtype)
    q, s = ref.per_token_group_quant_fp8(x, 128, scale_ue8m0=ue8m0)
    q_exp, s_exp = _formula_quant(x, 128, ue8m0)
    assert np.array_equal(q.view(torch.uint8).numpy(), q_exp)
    assert np.array_equal(s.numpy().view(np.int32), s_exp.view(np.int32))
    assert float(s[1, 0]) == pytest.approx(1e-4 / 448, rel=0) or ue8m0


def test_ref_special_values():
    x = torch.randn(4, 256)
    x[0, 3] = float("nan")
    x[1, 130] = float("inf")
    x[2] = 0.0
    x[3, :128] = 1e6
    q, s = ref.per_token_group_quant_fp8(x, 128)
    qb = q.view(torch.uint8)
    # NaN poisons its own group only: NaN scale, all bytes 0x7f
    assert torch.isnan(s[0, 0]) and torch.all(qb[0, :128] == 0x7F)
    assert torch.isfinite(s[0, 1]) and not torch.any(qb[0, 128:] == 0x7F)
    # inf: scale inf, inf element NaN, finite ones +-0
    assert torch.isinf(s[1, 1]) and qb[1, 130] == 0x7F
    others = torch.cat([qb[1, 128:130], qb[1, 131:256]])
    assert torch.all((others == 0) | (others == 0x80))
    # zeros: clamped scale, zero bytes, no NaN
    assert torch.all(s[2] == torch.tensor(1e-4, dtype=torch.float32) / 448) and torch.all(qb[2] == 0)
    # saturation at the group max: exactly 448
    assert torch.all(q[3, :128].float() == 448.0)


def test_ref_saturates_and_roundtrip_error():
    x = torch.randn(33, 512, dtype=torch.bfloat16)
    q, s = ref.per_token_group_quant_fp8(x, 128)
    assert q.float().abs().max() <= 448
    y = ref.per_token_group_dequant_fp8(q, s, 128, torch.float32)
    # e4m3 keeps 3 mantissa bits: element error <= half an ulp of the element's binade (2^-4 relative) + subnormal floor
    err = (y - x.float()).abs()
    bound = x.float().abs() * 2.0**-4 + s.repeat_interleave(128, -1) * 2.0**-9
    assert torch.all(err <= bound * 1.0001)


def test_ue8m0_exact():
    s = torch.tensor([1.0, 0.75, 2.0**-20, 3.0 * 2.0**-22, 1.0000001, float("inf")], dtype=torch.float32)
    out = ref.ue8m0_round_up(s)
    assert out.tolist()[:5] == [1.0, 1.0, 2.0**-20, 2.0**-20, 2.0]
    assert math.isinf(out[5])


@pytest.mark.parametrize("shape", [(1, 128), (5, 384), (2, 3, 256), (0, 128), (4, 0)])
def test_op_cpu_token_group_shapes(shape):
    x = torch.randn(shape, dtype=torch.bfloat16)
    q, s = ops.per_token_group_quant_fp8(x)
    assert q.shape == x.shape and q.dtype == FP8
    assert s.shape == (*shape[:-1], shape[-1] // 128)
    q2, s2 = ref.per_token_group_quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.parametrize("shape", [(5, 256), (130, 128), (3, 9, 256), (2, 1, 128)])
def test_column_major_scales_layout(shape):
    x = torch.randn(shape)
    _, s_row = ops.per_token_group_quant_fp8(x)
    _, s = ops.per_token_group_quant_fp8(x, column_major_scales=True)
    M = shape[-2]
    m_pad = (M + 3) // 4 * 4
    assert torch.equal(s, s_row)
    assert s.stride(-2) == 1 and s.stride(-1) == m_pad
    if len(shape) == 3:
        assert s.stride(0) == m_pad * (shape[-1] // 128)
    # padding entries are zero
    storage = torch.as_strided(s, (*shape[:-2], shape[-1] // 128, m_pad), (*s.stride()[:-2], m_pad, 1))
    assert torch.all(storage[..., M:] == 0)


@pytest.mark.parametrize("N,K", [(128, 128), (300, 200), (1, 7), (257, 129), (0, 5)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_block_quant(N, K, ue8m0):
    w = torch.randn(N, K) * 0.02
    q, s = ops.per_block_quant_fp8(w, scale_ue8m0=ue8m0)
    assert q.shape == (N, K) and s.shape == (-(-N // 128), -(-K // 128))
    # each block equals the token-group formula applied to the zero-padded flattened block
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = torch.zeros(128, 128)
            part = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            blk[: part.shape[0], : part.shape[1]] = part
            qb, sb = _formula_quant(blk.reshape(1, -1), blk.numel(), ue8m0)
            assert np.float32(s[bi, bj]).view(np.int32) == sb.view(np.int32)[0, 0]
            got = q[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].view(torch.uint8).numpy()
            assert np.array_equal(got, qb.reshape(128, 128)[: part.shape[0], : part.shape[1]])
    if N and K:
        y = ops.per_block_dequant_fp8(q, s, out_dtype=torch.float32)
        assert (y - w).abs().max() <= w.abs().max() * 2.0**-4 * 1.0001


def test_bad_inputs():
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match=r"argument 'x'.*dtype.*int32"):
        ops.per_token_group_quant_fp8(x.int())
    with pytest.raises(ValueError, match=r"K \(last dim\)=200 must be a multiple of 128"):
        ops.per_token_group_quant_fp8(torch.randn(4, 200))
    with pytest.raises(ValueError, match=r"'group_size' must be a positive int, got 0"):
        ops.per_token_group_quant_fp8(x, 0)
    with pytest.raises(ValueError, match=r"contiguous last dim"):
        ops.per_token_group_quant_fp8(torch.randn(256, 4).t())
    with pytest.raises(ValueError, match=r"2D or 3D.*shape \(2, 2, 2, 128\)"):
        ops.per_token_group_quant_fp8(torch.randn(2, 2, 2, 128), column_major_scales=True)
    with pytest.raises(ValueError, match=r"cannot be flattened"):
        ops.per_token_group_quant_fp8(torch.randn(6, 4, 256).transpose(0, 1))
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        ops.per_token_group_quant_fp8([1.0] * 128)
    with pytest.raises(ValueError, match=r"'w' must have 2 dims, got shape \(4,\)"):
        ops.per_block_quant_fp8(torch.randn(4))
    with pytest.raises(ValueError, match=r"'block_size' must be two positive ints"):
        ops.per_block_quant_fp8(torch.randn(4, 4), (128, 0))
    q, s = ops.per_block_quant_fp8(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"'scale_inv' must have shape \(2, 3\), got \(2, 2\)"):
        ops.per_block_dequant_fp8(q, s[:, :2])
    q, s = ops.per_token_group_quant_fp8(x)
    with pytest.raises(ValueError, match=r"'scales' must have shape \(4, 2\)"):
        ops.per_token_group_dequant_fp8(q, s[:3])


def test_opcheck_and_compile():
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dsmoe.per_token_group_quant_fp8.default, (x, 128, False, False))
    torch.library.opcheck(torch.ops.dsmoe.per_token_group_quant_fp8.default, (x, 128, True, True))
    torch.library.opcheck(torch.ops.dsmoe.per_block_quant_fp8.default, (torch.randn(200, 130), 128, 128, False))

    def f(t):
        q, s = ops.per_token_group_quant_fp8(t, column_major_scales=True)
        return ops.per_token_group_dequant_fp8(q, s, out_dtype=torch.float32)

    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, f(x))


def test_info_lists_ops():
    from dsmoe.info import collect

    info = collect()
    assert "per_token_group_quant_fp8" in info["ops"] and info["dsmoe"] == dsmoe.__version__


# ----------------------------------------------------------------------------------------- GPU tier
def _rand_special(shape, dtype, device):
    x = torch.randn(shape, device=device) * torch.logspace(-4, 4, shape[0], device=device)[:, None]
    if shape[0] > 4 and shape[1] >= 256:
        x[1] = 0
        x[2, :128] = 1e-39
        x[3, 5] = float("nan")
        x[4, 200] = float("inf")
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 7, 129, 4095])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_gpu_token_group_bit_identical(dtype, group_size, M, column_major, ue8m0):
    x = _rand_special((M, 7 * 128), dtype, DEV)
    with poisoned_empty():
        q, s = ops.per_token_group_quant_fp8(x, group_size, scale_ue8m0=ue8m0, column_major_scales=column_major)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu(), group_size, scale_ue8m0=ue8m0, column_major_scales=column_major)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))
    assert same_bits_nan_aware(s, s_ref) and s.stride() == s_ref.stride()
    # the whole storage: the column-major M padding must hold the documented zeros, not kernel writes
    assert same_bits_nan_aware(full_storage(s), full_storage(s_ref))


@pytest.mark.gpu
def test_gpu_token_group_3d_strided_and_empty():
    base = torch.randn(3, 17, 512, device=DEV, dtype=torch.bfloat16)
    x = base[:, :, :256]  # row stride 512 elements: no copy needed
    q, s = ops.per_token_group_quant_fp8(x)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu())
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    with poisoned_empty():
        q, s = ops.per_token_group_quant_fp8(base.contiguous(), column_major_scales=True)
    q_ref, s_ref = ref.per_token_group_quant_fp8(base.cpu(), column_major_scales=True)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(full_storage(s), full_storage(s_ref)), "column-major padding (M=17 -> 20) must stay zero"
    q, s = ops.per_token_group_quant_fp8(torch.zeros(0, 256, device=DEV))
    assert q.shape == (0, 256) and s.shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(128, 128), (7168, 2112), (300, 200), (1, 7), (257, 135)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_gpu_block_bit_identical(dtype, N, K, ue8m0):
    w = _rand_special((N, K), dtype, DEV)
    q, s = ops.per_block_quant_fp8(w, scale_ue8m0=ue8m0)
    q_ref, s_ref = ref.per_block_quant_fp8(w.cpu(), scale_ue8m0=ue8m0)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))
    assert same_bits_nan_aware(s, s_ref)


@pytest.mark.gpu
def test_gpu_outputs_fully_written_and_deterministic():
    """q and s are allocated poisoned (0xff = e4m3 NaN, NaN scales): x has no NaN, so any NaN byte or scale
    left is an element the kernel did not write. Validated with the quant_row_unwritten mutation."""
    x = torch.randn(333, 1024, device=DEV, dtype=torch.bfloat16)
    outs = []
    for column_major in (False, True, False):
        with poisoned_empty():
            q, s = ops.per_token_group_quant_fp8(x, column_major_scales=column_major)
        qb = q.view(torch.uint8)
        assert not torch.isnan(s).any() and not ((qb & 0x7F) == 0x7F).any(), "an output element was not written"
        if column_major:  # M = 333 pads to 336: the padding is documented zero (the op zeroes it, the kernel must not write)
            st = full_storage(s).view(s.shape[1], -1)
            assert st.shape[1] == 336 and (st[:, 333:] == 0).all()
        s = s.contiguous()
        outs.append((q.view(torch.uint8).clone(), s.clone()))
    assert all(torch.equal(a[0], outs[0][0]) and torch.equal(a[1], outs[0][1]) for a in outs)


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_cuda_graph_and_compile():
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    ops.per_token_group_quant_fp8(x)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, s = ops.per_token_group_quant_fp8(x, column_major_scales=True)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu(), column_major_scales=True)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    f = torch.compile(lambda t: ops.per_token_group_quant_fp8(t), fullgraph=True)
    q2, s2 = f(x)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    torch.library.opcheck(torch.ops.dsmoe.per_token_group_quant_fp8.default, (x, 128, False, True))


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_bad_alignment_and_group_size():
    buf = torch.randn(4 * 256 + 1, device="cuda", dtype=torch.bfloat16)
    x = buf[1:].view(4, 256)  # 2-byte offset
    with pytest.raises(ValueError, match=r"16-byte aligned"):
        ops.per_token_group_quant_fp8(x)
    with pytest.raises(ValueError, match=r"'group_size': the CUDA kernel supports"):
        ops.per_token_group_quant_fp8(torch.randn(4, 96 * 2, device="cuda"), 96)
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        q, s = ops.per_token_group_quant_fp8(torch.randn(4, 256, device="cuda"))
        ops.per_token_group_dequant_fp8(q, s.cpu())


@pytest.mark.gpu
@pytest.mark.cuda_only
def test_gpu_cuda_error_names_the_kernel():
    # A fault inside a kernel must come back as a Python exception naming it (DSMOE_SYNC_CHECK=1
    # synchronizes after each launch). Run in a subprocess: the fault poisons its CUDA context.
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, dsmoe
        from dsmoe import _native
        C = _native.native()
        x = torch.randn(4, 256, device="cuda")
        s = torch.empty(4, 2, device="cuda")
        try:
            # q points at an unmapped address: the kernel faults on its first store
            C.token_group_quant(x.data_ptr(), 0, 1 << 40, s.data_ptr(), 4, 256, 256, 256, 4, 0, 2, 1, 128, False,
                                torch.cuda.current_stream().cuda_stream)
        except RuntimeError as e:
            print("RAISED", e)
    """)
    env = dict(os.environ, DSMOE_SYNC_CHECK="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "RAISED" in r.stdout and "token_group_quant_kernel" in r.stdout, r.stdout + r.stderr


def test_dequant_argument_checks():
    q, s = ops.per_token_group_quant_fp8(torch.randn(3, 256))
    with pytest.raises(ValueError, match=r"dsmoe\.per_token_group_dequant_fp8: argument 'group_size' must be a positive int, got 0"):
        ops.per_token_group_dequant_fp8(q, s, 0)
    with pytest.raises(ValueError, match=r"argument 'group_size' must be a positive int, got 128.0"):
        ops.per_token_group_dequant_fp8(q, s, 128.0)
    with pytest.raises(TypeError, match=r"dsmoe\.per_token_group_dequant_fp8: argument 'out_dtype' must be a floating-point"):
        ops.per_token_group_dequant_fp8(q, s, out_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"argument 'out_dtype' must be a floating-point"):
        ops.per_token_group_dequant_fp8(q, s, out_dtype=FP8)
    w, ws = ops.per_block_quant_fp8(torch.randn(130, 130))
    with pytest.raises(TypeError, match=r"dsmoe\.per_block_dequant_fp8: argument 'out_dtype' must be a floating-point"):
        ops.per_block_dequant_fp8(w, ws, out_dtype=torch.int8)
    # column-major scales (the GEMM layout) dequantize like row-major ones
    qc, sc = ops.per_token_group_quant_fp8(torch.randn(5, 256), column_major_scales=True)
    want = qc.float().view(5, 2, 128) * sc.contiguous().unsqueeze(-1)
    assert torch.equal(ops.per_token_group_dequant_fp8(qc, sc, out_dtype=torch.float32), want.view(5, 256))
