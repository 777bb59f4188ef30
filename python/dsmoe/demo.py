"""`dsmoe demo quant`: quantizes an activation and a weight, prints the formats and the round-trip error."""
from __future__ import annotations

import torch

from . import ops
from ._cli import resolve_device


def quant_demo(device: str | None = None) -> int:
    """Runs the demo on ``device`` (cpu, cuda, cuda:N; default: a usable GPU, else the CPU); a device this
    machine cannot serve raises ``dsmoe._cli.CLIError`` before any work."""
    dev = resolve_device(device, "dsmoe demo")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, 7168, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(2112, 7168, generator=g) * 0.02).to(dev, torch.bfloat16)
    xq, xs = ops.per_token_group_quant_fp8(x)
    wq, ws = ops.per_block_quant_fp8(w)
    xd = ops.per_token_group_dequant_fp8(xq, xs, out_dtype=torch.float32)
    wd = ops.per_block_dequant_fp8(wq, ws, out_dtype=torch.float32)
    rel = lambda a, b: ((a - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"device: {dev}")
    print(f"activation {tuple(x.shape)} bf16 -> e4m3 {tuple(xq.shape)} + scales {tuple(xs.shape)} (1x128); "
          f"round-trip rel. error {rel(xd, x):.3e}")
    print(f"weight {tuple(w.shape)} bf16 -> e4m3 {tuple(wq.shape)} + weight_scale_inv {tuple(ws.shape)} (128x128); "
          f"round-trip rel. error {rel(wd, w):.3e}")
    y_ref = x.float() @ w.float().T
    y_fp8 = xd @ wd.T
    print(f"x @ w.T from the FP8 operands vs bf16 operands: rel. error {rel(y_fp8, y_ref):.3e}")
    return 0
