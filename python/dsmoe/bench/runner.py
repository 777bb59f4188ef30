"""Runs benchmark suites and writes their JSON; each suite is a module with `run(harness, quick)`."""
from __future__ import annotations

import importlib

from .harness import Harness, print_table, write_results

# The one list of suites: name -> module (relative to dsmoe.bench).
SUITES = {
    "quant": ".quant",
    "gemm": ".gemm",
    "mla": ".mla",
    "moe": ".moe",
    "ep": ".ep",
    "layer": ".layer",
    "headline": ".headline",  # a few cases of each suite above, for a budgeted GPU check
}


def main(suites, *, out: str = "bench/results", quick: bool = False, list_only: bool = False) -> int:
    if list_only:
        for name, mod in SUITES.items():
            try:
                importlib.import_module(mod, __package__)
                print(name)
            except ImportError:
                print(f"{name} (not available in this build)")
        return 0
    if suites == ["all"]:
        suites = [s for s in SUITES if s != "headline"]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"dsmoe bench: unknown suite(s) {unknown}; choose from {list(SUITES)} or 'all'")
    h = Harness(reps=20 if quick else 50)
    for s in suites:
        mod = importlib.import_module(SUITES[s], __package__)
        cases, columns, extra = mod.run(h, quick)
        path = write_results(s, cases, out, extra)
        print_table(s, cases, columns)
        print(f"-> {path}")
    return 0
