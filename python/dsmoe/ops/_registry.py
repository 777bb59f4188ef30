"""The list of public ops and the CUDA launchers behind them (what `dsmoe info` reports)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .._native import has_kernel


@dataclass(frozen=True)
class OpInfo:
    name: str
    family: str
    kernels: tuple = field(default_factory=tuple)  # launcher names in dsmoe._C; empty: torch on every device
    note: str = ""

    def cuda_kernel_available(self) -> bool:
        return bool(self.kernels) and all(has_kernel(k) for k in self.kernels)


OPS: dict[str, OpInfo] = {}


def register(name: str, family: str, kernels=(), note: str = "") -> None:
    OPS[name] = OpInfo(name, family, tuple(kernels), note)
