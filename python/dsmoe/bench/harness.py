"""Shared timing helper for every benchmark suite.

Times the kernel, not Python: CUDA events around each call, the L2 flushed before each timed call
(a write of a buffer larger than L2), warm-up first, the median of many runs. Each suite also measures
its baseline in the same process, so ratios compare like with like.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "reps": self.reps}


class Harness:
    def __init__(self, *, warmup: int = 5, reps: int = 50, flush_l2: bool = True):
        if not torch.cuda.is_available():
            raise RuntimeError("dsmoe benchmarks need a CUDA GPU; none is visible to torch")
        self.warmup, self.reps, self.flush_l2 = warmup, reps, flush_l2
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        self._flush_buf = torch.empty(max(2 * l2, 256 * 2**20) // 4, dtype=torch.int32, device="cuda")
        self._copy_gbps: float | None = None

    def time(self, fn: Callable[[], object], *, reps: int | None = None, warmup: int | None = None) -> Timing:
        """Median kernel time of ``fn()`` in ms over ``reps`` runs, each after an L2 flush."""
        reps = reps or self.reps
        for _ in range(warmup if warmup is not None else self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if self.flush_l2:
                self._flush_buf.fill_(i)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        return Timing(statistics.median(ts), ts[0], q(0.2), q(0.8), reps)

    def copy_bandwidth(self, nbytes: int = 2 * 2**30) -> float:
        """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), measured once per run."""
        if self._copy_gbps is None:
            src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
            dst = torch.empty_like(src)
            t = self.time(lambda: dst.copy_(src))
            self._copy_gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
            del src, dst
        return self._copy_gbps


def git_commit() -> str:
    if os.environ.get("DSMOE_COMMIT"):
        return os.environ["DSMOE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment() -> dict:
    from .. import __version__, _native

    C = _native.native()
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "device": torch.cuda.get_device_name(0) if props else "cpu",
        "sms": props.multi_processor_count if props else 0,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dsmoe": __version__,
        "dsmoe_build": dict(C.build_info) if C is not None else None,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def write_results(suite: str, cases: list[dict], out_root: str | os.PathLike, extra: dict | None = None) -> Path:
    out_dir = Path(out_root) / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    doc = {"suite": suite, "environment": environment(), **(extra or {}), "cases": cases}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def print_table(suite: str, cases: list[dict], columns: list[str]) -> None:
    print(f"\n== {suite} ==")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in cases)) if cases else len(c) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cases:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
