"""GPU checks of the bring-up fixes (issue 11): the MLA lse with the fp32 row sum, launches on a tensor's
device when another one is current, DSMOE_DISABLE_KERNELS on CUDA tensors, and the build/driver checks.
Skip cleanly without CUDA (the CPU sides are tests/test_mla_rowsum_emulation.py and tests/test_dispatch.py)."""
from __future__ import annotations

import pytest
import torch

from dsmoe import _native, ops, ref
from test_mla_util import gather_rows, make_paged_cache

pytestmark = pytest.mark.gpu
SCALE = 0.135234

needs_kernels = pytest.mark.skipif(not _native.cuda_compiled(), reason="dsmoe._C built without CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@needs_kernels
def test_build_and_driver_checks_pass():
    info = _native.native().build_info
    cap = torch.cuda.get_device_capability()
    assert _native.sm90a_problem(dict(info), cap) is None, _native.sm90a_problem(dict(info), cap)
    assert _native.driver_problem(int(info["cudart_version"]), _native.native().cuda_driver_version()) is None


@needs_kernels
@pytest.mark.parametrize("seqlen", [2, 7, 64, 65, 200])
def test_mla_lse_sharp_softmax_short_lengths(seqlen):
    """N(0, 1) q and cache with V3's scale: a sharp softmax, where a row sum of bf16-rounded P missed
    logsumexp by ~1e-3; the fp32 row sum is within fp32 rounding."""
    H = 64
    cache, bt, cs, kv = make_paged_cache([seqlen, seqlen + 1], device="cuda")
    q = torch.randn(2, 1, H, 576, device="cuda").bfloat16()
    md, ns = ops.get_mla_metadata(cs, H, 1)
    _, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, False)
    for b in range(2):
        n = int(cs[b])
        rows = gather_rows(kv, bt, cs)[b][:n].double().cpu()  # [n, 576]
        s = q[b, 0].double().cpu() @ rows.T * SCALE  # [H, n]
        want = torch.logsumexp(s, dim=1)
        err = (lse[b, :, 0].double().cpu() - want).abs() / want.abs().clamp(min=1)
        assert err.max().item() <= 1e-5, (n, err.max().item())


@needs_kernels
@two_gpus
def test_ops_launch_on_the_tensors_device():
    """Current device 0, tensors on device 1: every family's launcher must query and launch on device 1."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    x = torch.randn(130, 256, device=dev)
    xq, xs = ops.per_token_group_quant_fp8(x, 128)
    rq, rs = ref.per_token_group_quant_fp8(x.cpu(), 128)
    assert torch.equal(xq.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(xs.cpu(), rs)
    wq, ws = ops.per_block_quant_fp8(torch.randn(256, 256, device=dev))
    out = ops.fp8_gemm_nt(xq, xs, wq, ws, out_dtype=torch.float32)
    want = ref.fp8_gemm_nt(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-3)
    logits = torch.randn(33, 16, device=dev)
    idx, w = ops.moe_route(logits, None, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ridx, rw = ref.moe_route(logits.cpu(), None, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    assert torch.equal(idx.cpu().long(), ridx.long())
    cache, bt, cs, kv = make_paged_cache([100, 3], device=dev)
    q = torch.randn(2, 1, 16, 576, device=dev).bfloat16()
    md, ns = ops.get_mla_metadata(cs, 16, 1)
    out, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, False)
    r_out, r_lse = ref.mla_decode_with_kvcache(q.cpu(), cache.cpu(), bt.cpu(), cs.cpu(), 512, SCALE, False)
    torch.testing.assert_close(lse.cpu(), r_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu().float(), r_out.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0


@needs_kernels
def test_disable_kernels_runs_references_on_cuda(monkeypatch):
    """DSMOE_DISABLE_KERNELS=all: no launcher is even looked up, results are the references'."""
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "all")

    def no_kernel(op, name):
        raise AssertionError(f"{op} looked up kernel {name} although its family is disabled")

    monkeypatch.setattr(_native, "_require_kernel", no_kernel)
    x = torch.randn(70, 256, device="cuda")
    xq, xs = ops.per_token_group_quant_fp8(x, 128)
    rq, rs = ref.per_token_group_quant_fp8(x.cpu(), 128)
    assert torch.equal(xq.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(xs.cpu(), rs)
    wq, ws = ops.per_block_quant_fp8(torch.randn(128, 256, device="cuda"))
    out = ops.fp8_gemm_nt(xq, xs, wq, ws)
    want = ref.fp8_gemm_nt(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu())
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)
    idx, w = ops.moe_route(torch.randn(9, 8, device="cuda"), None, top_k=2, n_group=1, topk_group=1,
                           routed_scaling_factor=1.0)
    assert idx.is_cuda and idx.shape == (9, 2)
    cache, bt, cs, _ = make_paged_cache([70], device="cuda")
    q = torch.randn(1, 1, 8, 576, device="cuda").bfloat16()
    md, ns = ops.get_mla_metadata(cs, 8, 1)
    o, lse = ops.mla_decode_with_kvcache(q, cache, bt, cs, 512, md, ns, SCALE, False)
    r_o, r_lse = ref.mla_decode_with_kvcache(q.cpu(), cache.cpu(), bt.cpu(), cs.cpu(), 512, SCALE, False)
    torch.testing.assert_close(lse.cpu(), r_lse, rtol=1e-5, atol=1e-5)
    assert o.is_cuda and torch.isfinite(o).all()
