"""Metrics and helpers shared by the tests."""
from __future__ import annotations

import contextlib
import hashlib
import os

import torch

# DSMOE_TEST_GPU_ON_CPU=1 runs the @pytest.mark.gpu tier on the CPU, where every op is its reference:
# it proves a GPU test's logic (setup, expected values, tolerances) without a GPU, and with
# DSMOE_TEST_MUTATION (tests/mutations.py) that the test fails when the op's result is wrong. GPU tests
# create their tensors on DEV; what needs a real GPU (graphs, IPC, streams) is marked cuda_only.
GPU_ON_CPU = os.environ.get("DSMOE_TEST_GPU_ON_CPU") == "1"
DEV = "cpu" if GPU_ON_CPU else "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine-style difference ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in fp64 (0 when equal)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return (1 - 2 * (x * y).sum() / denom).item()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64."""
    x, ref = x.double(), ref.double()
    n = ref.norm()
    return ((x - ref).norm() / n).item() if n > 0 else (x - ref).norm().item()


def poison(shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN (or 0xff bytes for integer/fp8 types): shows any element a kernel did not write."""
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype, device=device)
    t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.fill_(-1)
    return t


def digest(*ts: torch.Tensor) -> str:
    """Hash of the bytes of tensors (determinism checks)."""
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_bits_nan_aware(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp32 tensors where any NaN equals any NaN."""
    a, b = a.float().cpu(), b.float().cpu()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def full_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``t`` as a 1-D CPU tensor of its dtype: padding a strided view hides
    (e.g. the M padding of column-major scales) is compared too."""
    flat = torch.empty(0, dtype=t.dtype, device=t.device)
    flat.set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),), (1,))
    return flat.cpu().clone()


@contextlib.contextmanager
def poisoned_empty():
    """Within the block every ``torch.empty`` result (an op's outputs and workspaces) starts NaN / 0xff
    poisoned, so an element the kernel does not write (or a workspace it reads before writing) shows."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        if t.numel():
            if t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
                t.fill_(float("nan"))
            else:
                t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.fill_(-1)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real
