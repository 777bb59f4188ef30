"""tools/gpu_check.py (the budgeted GPU verification script): its time plan, its stage cut-off, and an end
to end run in CPU mode (the stages that need no GPU and no build), all within a few seconds."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _source_tree_env(**kw):
    # NOTE: these subprocesses import dsmoe from the checkout's python/ (no build there); CI's
    # DSMOE_REQUIRE_NATIVE=1 is about the installed package and would refuse that import.
    env = {k: v for k, v in os.environ.items() if k != "DSMOE_REQUIRE_NATIVE"}
    return dict(env, PYTHONPATH=str(ROOT / "python"), **kw)
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
spec.loader.exec_module(gc)


@pytest.mark.parametrize("budget", [60, 300, 540, 2000])
def test_plan_fits_the_budget(budget):
    todo = [s for s, *_ in gc.STAGES]
    left, total = float(budget), 0.0
    for i, s in enumerate(todo):
        sl = gc.plan_slice(s, left, todo[i:])
        cap = {n: c for n, _, _, c in gc.STAGES}[s]
        assert 0 <= sl <= min(cap, left) + 1e-9
        left -= sl
        total += sl
    assert total <= budget + 1e-9
    if budget >= 540:  # every stage gets at least its minimum at the GPU budget
        left = float(budget)
        for i, s in enumerate(todo):
            sl = gc.plan_slice(s, left, todo[i:])
            assert sl >= {n: m for n, _, m, _ in gc.STAGES}[s]
            left -= sl


def test_smoke_and_tier_selections_exist():
    """Every node id the script names must be collectable (a renamed test would silently drop a check)."""
    ids = sorted({t for ts in gc.SMOKE.values() for t in ts} | set(gc.SANITIZE))
    env = _source_tree_env(DSMOE_TEST_GPU_ON_CPU="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    collected = {ln.strip() for ln in r.stdout.splitlines() if "::" in ln}
    assert set(ids) <= collected, set(ids) - collected


def test_stage_command_cut_at_its_slice(tmp_path):
    c = gc.Check.__new__(gc.Check)
    c.env = dict(os.environ)
    t0 = time.monotonic()
    rc, secs, timed_out = c.run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", 1.5)
    assert timed_out and time.monotonic() - t0 < 15
    assert "killed after" in (tmp_path / "log").read_text()


def test_cpu_mode_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), str(out), "--cpu", "--budget", "90",
                        "--stages", "env,build,sanitize,bench"], capture_output=True, text=True, timeout=150,
                       env=_source_tree_env())
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "junit.xml", "logs.tar.gz", "summary.json", "summary.txt"]
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["env", "build", "sanitize", "bench"]
    assert summary["stages"][0]["status"] == "ok"
    assert all(s["status"] == "skipped" for s in summary["stages"][1:])
    assert "NEXT:" in r.stdout
    with tarfile.open(out / "logs.tar.gz") as t:
        assert "logs/env.log" in t.getnames()
