"""CPU tests of the host-side decisions in dsmoe._native: DSMOE_DISABLE_KERNELS (kernel vs reference per
op family), the CUDA driver check for the statically linked runtime, and the sm_90a build check."""
from __future__ import annotations

import types

import pytest
import torch

import dsmoe.ops as ops
from dsmoe import _native
from dsmoe.info import collect

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- DSMOE_DISABLE_KERNELS
@pytest.mark.parametrize("value,expected", [
    ("", set()),
    ("gemm", {"gemm"}),
    (" GEMM , mla,", {"gemm", "mla"}),
    ("moe,quant,ep", {"moe", "quant", "ep"}),
    ("all", set(_native.KERNEL_FAMILIES)),
    ("gemm,all", set(_native.KERNEL_FAMILIES)),
])
def test_parse_disabled_kernels(value, expected):
    assert _native.parse_disabled_kernels(value) == frozenset(expected)


@pytest.mark.parametrize("value", ["gem", "gemm,attention", "mla;moe", "none"])
def test_parse_disabled_kernels_unknown_names(value):
    with pytest.raises(ValueError) as e:
        _native.parse_disabled_kernels(value)
    msg = str(e.value)
    assert "DSMOE_DISABLE_KERNELS" in msg and "unknown op family" in msg
    for fam in (*_native.KERNEL_FAMILIES, "all"):
        assert fam in msg, f"the message must list {fam!r}: {msg}"


def test_dispatch_decision(monkeypatch):
    monkeypatch.delenv("DSMOE_DISABLE_KERNELS", raising=False)
    for fam in _native.KERNEL_FAMILIES:
        assert _native.dispatch(fam, CUDA) == "kernel"
        assert _native.dispatch(fam, CPU) == "reference"
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "gemm,ep")
    assert _native.dispatch("gemm", CUDA) == "reference"
    assert _native.dispatch("ep", CUDA) == "reference"
    assert _native.dispatch("mla", CUDA) == "kernel"
    assert _native.dispatch("moe", CUDA) == "kernel"
    # read per call: a change takes effect at the next op
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "all")
    assert {_native.dispatch(f, CUDA) for f in _native.KERNEL_FAMILIES} == {"reference"}
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "")
    assert _native.dispatch("gemm", CUDA) == "kernel"
    assert _native.use_kernel("gemm", torch.zeros(1)) is False  # CPU tensor


def test_dispatch_errors(monkeypatch):
    monkeypatch.delenv("DSMOE_DISABLE_KERNELS", raising=False)
    with pytest.raises(ValueError, match="unknown op family 'attention'.*gemm, mla, moe, quant, ep"):
        _native.dispatch("attention", CUDA)
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "gem")
    # a misspelt value fails on every device, not only where a kernel would have run
    for dev in (CUDA, CPU):
        with pytest.raises(ValueError, match="valid names are gemm, mla, moe, quant, ep or all"):
            _native.dispatch("gemm", dev)
    with pytest.raises(ValueError, match="DSMOE_DISABLE_KERNELS"):
        ops.per_token_group_quant_fp8(torch.randn(2, 128), 128)


def _ops_by_family():
    """One small call per op with a kernel, grouped by family (CPU tensors)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g)
    xq, xs = ops.per_token_group_quant_fp8(x, 128)
    wq, ws = ops.per_block_quant_fp8(torch.randn(128, 256, generator=g))
    logits = torch.randn(5, 8, generator=g)
    idx, w = ops.moe_route(logits, None, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    seqlens = torch.tensor([70], dtype=torch.int32)
    md, ns = ops.get_mla_metadata(seqlens, 1)
    q = torch.randn(1, 1, 1, 576, generator=g).bfloat16()
    kv = torch.randn(2, 64, 1, 576, generator=g).bfloat16()
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    return {
        "quant": [lambda: ops.per_token_group_quant_fp8(x, 128), lambda: ops.per_block_quant_fp8(x[:, :128].T.contiguous())],
        "gemm": [lambda: ops.fp8_gemm_nt(xq, xs, wq, ws), lambda: ops.per_token_group_quant_fp8_transposed(x)],
        "moe": [lambda: ops.moe_route(logits, None, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0),
                lambda: ops.moe_unpermute(*ops.moe_permute(x, idx, 8)[::3], w)],
        "mla": [lambda: ops.get_mla_metadata(seqlens, 1),
                lambda: ops.mla_decode_with_kvcache(q, kv, bt, seqlens, 512, md, ns, 0.1)],
    }


def test_every_op_dispatches_through_native(monkeypatch):
    """The ops ask dsmoe._native for the decision (the one place DSMOE_DISABLE_KERNELS is read), with their
    own family: each family's ops are recorded asking for that family."""
    calls = []
    real = _native.use_kernel

    def spy(family, t):
        calls.append(family)
        return real(family, t)

    monkeypatch.setattr(_native, "use_kernel", spy)
    for fam, fns in _ops_by_family().items():
        for fn in fns:
            calls.clear()
            fn()
            assert calls and set(calls) == {fam}, (fam, calls)


# ----------------------------------------------------------------------------- driver check
@pytest.mark.parametrize("runtime,need,branch", [
    (13000, 13000, "R580+"), (13020, 13000, "R580+"), (12080, 12000, "R525+"), (11080, 11000, "R450+"),
])
def test_min_driver_for_runtime(runtime, need, branch):
    assert _native.min_driver_for_runtime(runtime) == (need, branch)


def test_min_driver_for_unknown_major():
    need, branch = _native.min_driver_for_runtime(14000)
    assert need == 14000 and "14.0" in branch
    with pytest.raises(ValueError, match="runtime version"):
        _native.min_driver_for_runtime(13)


def test_driver_problem():
    assert _native.driver_problem(13000, 13000) is None
    assert _native.driver_problem(13000, 13010) is None
    msg = _native.driver_problem(13000, 12080)  # an R570 driver
    assert msg is not None and "R580+" in msg and "13.0" in msg and "12.8" in msg
    msg = _native.driver_problem(13000, 0)
    assert msg is not None and "no CUDA driver" in msg and "R580+" in msg


def _fake_native(runtime: int, driver: int):
    return types.SimpleNamespace(build_info={"cuda_compiled": True, "cudart_version": runtime},
                                 cuda_driver_version=lambda: driver, some_kernel=lambda *a: "launched")


def test_require_kernel_checks_driver_once(monkeypatch):
    monkeypatch.setattr(_native, "_C", _fake_native(13000, 12080))
    monkeypatch.setattr(_native, "_RUNTIME_OK", [])
    with pytest.raises(RuntimeError, match=r"dsmoe.my_op: .*R580\+"):
        _native.require_kernel("my_op", "some_kernel")
    monkeypatch.setattr(_native, "_C", _fake_native(13000, 13000))
    monkeypatch.setattr(_native, "_RUNTIME_OK", [])
    assert _native.require_kernel("my_op", "some_kernel")() == "launched"


def test_require_kernel_makes_the_tensors_device_current(monkeypatch):
    """The launchers query and launch on the current device: a launcher asked for a tensor on another
    device must run with that device current (and without a switch when it already is)."""
    current, seen = [0], []

    class _Guard:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    fake = _fake_native(13000, 13000)
    fake.some_kernel = lambda *a: seen.append((current[0], a))
    monkeypatch.setattr(_native, "_C", fake)
    monkeypatch.setattr(_native, "_RUNTIME_OK", [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    _native.require_kernel("my_op", "some_kernel", torch.device("cuda", 1))(7, 8)
    _native.require_kernel("my_op", "some_kernel", torch.device("cuda", 0))(9)
    with _native.on_device(torch.device("cuda", 2)):
        inside = current[0]
    assert seen == [(1, (7, 8)), (0, (9,))] and inside == 2 and current[0] == 0


# ----------------------------------------------------------------------------- sm_90a build check
def test_sm90a_problem():
    good = {"cuda_compiled": True, "sm90a": True, "cuda_archs": "90a"}
    assert _native.sm90a_problem(good, (9, 0)) is None
    assert _native.sm90a_problem(good, None) is None
    msg = _native.sm90a_problem({"cuda_compiled": True, "sm90a": False, "cuda_archs": "90"}, (9, 0))
    assert msg is not None and "'90'" in msg and "DSMOE_CUDA_ARCHS=90a" in msg
    msg = _native.sm90a_problem(good, (10, 0))
    assert msg is not None and "sm_100" in msg
    assert "without CUDA" in _native.sm90a_problem({"cuda_compiled": False}, None)


def test_info_reports_disabled_kernels(monkeypatch):
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "mla")
    info = collect()
    assert info["disabled_kernels"] == ["mla"] and info["disabled_kernels_error"] is None
    assert info["ops"]["mla_decode_with_kvcache"]["disabled"] and not info["ops"]["fp8_gemm_nt"]["disabled"]
    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "mlaa")
    info = collect()
    assert "unknown op family 'mlaa'" in info["disabled_kernels_error"]


# ----------------------------------------------------------------------------- the built module (CI)
_C = _native.native()
needs_cuda_build = pytest.mark.skipif(not _native.cuda_compiled(), reason="dsmoe._C not imported or built without CUDA")


@needs_cuda_build
def test_build_info_archs_and_runtime():
    info = _C.build_info
    archs = [a.split("-")[0] for a in info["cuda_archs"].split(",")]
    assert info["sm90a"] is ("90a" in archs)
    major, minor = (int(v) for v in info["cuda_version"].split(".")[:2])
    assert info["cudart_version"] == 1000 * major + 10 * minor
    assert isinstance(_C.cuda_driver_version(), int)


@needs_cuda_build
@pytest.mark.skipif(_C is not None and hasattr(_C, "cuda_driver_version") and _C.cuda_driver_version() > 0,
                    reason="a CUDA driver is present: the launchers would really launch")
def test_launchers_refuse_cleanly_without_driver_or_sm90a():
    """On a machine without a driver (CI), the GEMM and MLA decode launchers get past their argument
    checks and must stop at the build/driver check with a RuntimeError that says why (a build without
    sm_90a code is refused before any CUDA call)."""
    want = "without 90a" if not _C.build_info["sm90a"] else "no CUDA driver was found"
    with pytest.raises(RuntimeError, match=want):
        _C.fp8_gemm_nt(1024, 1024, 1024, 1024, 1024, 128, 128, 128, 128, 1, False, 128, 128, 4, 1, 1, 0)
    with pytest.raises(RuntimeError, match=want):
        _C.mla_decode(*([1024] * 10), 1, 1, 1, 4, 1, 1, 576, 576, 576, 1, 64 * 576 * 2, False, 0.1, False, 0)


def test_disable_ep_makes_nvlink_buffer_collective(monkeypatch):
    """DSMOE_DISABLE_KERNELS=ep: EPBuffer(backend="nvlink") runs the collective backend (its reference),
    and graph_safe=True, whose worst-case layout has no reference, is refused with a clear error."""
    import torch.distributed as dist

    from dsmoe.parallel import EPBuffer

    monkeypatch.setenv("DSMOE_DISABLE_KERNELS", "ep")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        buf = EPBuffer(None, 4, 16, backend="nvlink", max_tokens_per_rank=8)
        assert buf.backend == "collective" and buf._nvlink is None
        x = torch.randn(3, 16)
        idx = torch.tensor([[0, 2], [1, -1], [3, 0]])
        w = torch.rand(3, 2)
        rx, ridx, rw, cnt, h = buf.dispatch(x, idx, w)
        assert torch.equal(rx, x)  # one rank: every token comes back once
        torch.testing.assert_close(buf.combine(rx, h), x)
        buf.close()
        with pytest.raises(RuntimeError, match="DSMOE_DISABLE_KERNELS.*graph_safe=False"):
            EPBuffer(None, 4, 16, backend="nvlink", max_tokens_per_rank=8, graph_safe=True)
    finally:
        if own:
            dist.destroy_process_group()
