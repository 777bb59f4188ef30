"""Runs benchmark suites and writes their JSON; each suite is a module with `run(harness, quick)`."""
from __future__ import annotations

import importlib
import os

from .._cli import UNAVAILABLE, CLIError, check_out_dir, cuda_problem
from .harness import Harness, device_slug, print_table, write_results

# The one list of suites: name -> module (relative to dsmoe.bench).
SUITES = {
    "quant": ".quant",
    "gemm": ".gemm",
    "mla": ".mla",
    "moe": ".moe",
    "ep": ".ep",
    "layer": ".layer",
    "headline": ".headline",  # a few cases of each suite above, for a budgeted GPU check
    "serve": ".serve",  # needs a checkpoint (DSMOE_SERVE_CHECKPOINT or runs/tiny/checkpoint)
}


def _import(name: str):
    return importlib.import_module(SUITES[name], __package__)


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _say_what_was_averaged(h, cases, extra) -> None:
    reps = sorted({c["reps"] for c in cases if "reps" in c})
    if reps:
        print(f"median_ms: median of {' or '.join(map(str, reps))} timed runs per case (CUDA events, "
              f"after {h.warmup} warm-up runs, L2 flushed before each)")
    if extra and extra.get("timing"):
        print(f"timing: {extra['timing']}")


def list_suites() -> int:
    """Prints each suite with `ok` or why its module does not import; 1 when any does not."""
    broken = []
    for name in SUITES:
        try:
            _import(name)
        except Exception as e:  # noqa: BLE001 - any failure to import makes the suite unusable; say which
            broken.append(name)
            print(f"{name:8s} BROKEN ({_why(e)})")
        else:
            print(f"{name:8s} ok")
    if broken:
        raise CLIError(f"suite(s) {', '.join(broken)} failed to import", UNAVAILABLE)
    return 0


# suites that also run without a GPU (their timings are wall clock of whole runs, no Harness)
CPU_SUITES = ("serve",)


def main(suites, *, out: str = "bench/results", quick: bool = False, list_only: bool = False) -> int:
    """Raises ``dsmoe._cli.CLIError`` for a user error, before any suite runs or any file is written."""
    if list_only:
        return list_suites()
    if suites == ["all"]:
        suites = [s for s in SUITES if s not in ("headline", "serve")]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise CLIError(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)} or all")
    check_out_dir(out, "--out")
    gpu = [s for s in suites if s not in CPU_SUITES]
    problem = cuda_problem() if gpu else None
    if problem is not None:
        raise CLIError(f"benchmarks run on a CUDA GPU: {problem}", UNAVAILABLE)
    mods = {}
    for s in suites:
        try:
            mods[s] = _import(s)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"suite {s!r} failed to import ({_why(e)})", UNAVAILABLE) from None
    slug_dir = os.path.join(out, device_slug())
    for s in suites:
        if os.path.isdir(os.path.join(slug_dir, f"{s}.json")):
            raise CLIError(f"--out {out}: {os.path.join(slug_dir, s + '.json')} is a folder where results go")
    if os.path.exists(slug_dir) and not os.path.isdir(slug_dir):
        raise CLIError(f"--out {out}: {slug_dir} is a file where results go")
    h = Harness(reps=20 if quick else 50) if gpu else None
    for s in suites:
        cases, columns, extra = mods[s].run(h, quick)
        path = write_results(s, cases, out, extra)
        print_table(s, cases, columns)
        _say_what_was_averaged(h, cases, extra)
        print(f"-> {path}")
    return 0
