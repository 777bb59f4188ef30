#!/usr/bin/env python3
"""One budgeted command that builds dsmoe on a GPU machine and verifies it in priority order.

    tools/gpu_check.sh OUT [--budget 540] [--stages env,build,smoke,tier,sanitize,bench] [--cpu] [--plan]

Stages, in priority order (each gets a slice of the time left and is killed when it overruns it; what a
stage does not use flows to the later ones):
  env       nvidia-smi, torch's view of the device, compute-sanitizer presence
  build     `pip install --no-build-isolation --no-deps --target WORK/site .` on all cores; ptxas report
  smoke     one process per kernel family (quant bit identity, one GEMM per kind, the MLA one-hot and
            append tests, permute + route): a fault or hang in one family cannot hide the others
  tier      the whole GPU test tier, one process per test file, --maxfail, a per-test timeout
  sanitize  compute-sanitizer memcheck on a small subset (refused on some machines: recorded, not fatal)
  bench     the headline benchmarks (`dsmoe bench headline`), with their baselines in the same run

What comes back (at most 8 files, each well under 16 MB, directly in OUT): summary.txt, summary.json,
junit.xml (every pytest run merged), bench.json (the headline suite), logs.tar.gz (every log, per-run
junit, the ptxas report, info.json). The summary is rewritten after every stage, so a run cut short by
the caller still returns what it had.

CPU mode (--cpu, or automatically when torch sees no CUDA): the build is skipped unless --build-cpu is
given (then a CPU-only module is built), smoke and tier run the GPU tier against the references
(DSMOE_TEST_GPU_ON_CPU=1, see tests/util.py), sanitize and bench are skipped. It exercises the planning,
time slicing, timeouts, junit merging and packaging end to end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (stage, weight, minimum seconds worth starting with, cap seconds). A stage's slice is
# weight / (sum of weights of it and the stages after it) of the time left, at least its minimum when
# that much is left, at most its cap.
STAGES = [
    ("env", 1, 30, 45),
    ("build", 30, 60, 300),
    ("smoke", 15, 40, 180),
    ("tier", 40, 60, 360),
    ("sanitize", 6, 30, 90),
    ("bench", 16, 40, 180),
]

# Kernel families isolated by the smoke stage: one pytest process each, smallest decisive cases.
SMOKE = {
    "quant": ["tests/test_quant.py::test_gpu_token_group_bit_identical[False-True-129-128-dtype1]",
              "tests/test_quant.py::test_gpu_block_bit_identical[False-257-135-dtype1]",
              "tests/test_quant.py::test_gpu_outputs_fully_written_and_deterministic"],
    "gemm": ["tests/test_gemm_gpu.py::test_fp8_gemm_nt[2112-7168-129]",
             "tests/test_gemm_gpu.py::test_m_grouped_contiguous[192-256]",
             "tests/test_gemm_gpu.py::test_m_grouped_masked[7-4]",
             "tests/test_gemm_gpu.py::test_fp8_gemm_tn[192-320]",
             "tests/test_gemm_gpu.py::test_k_grouped_tn"],
    "mla": ["tests/test_mla_gpu.py::test_decode_one_hot_rows_exact[132-1-64-False-False]",
            "tests/test_mla_gpu.py::test_decode_one_hot_rows_exact[132-2-32-True-True]",
            "tests/test_mla_gpu.py::test_append_unfused_special_values_bit_exact[False-False]",
            "tests/test_mla_gpu.py::test_append_matches_reference[True-True-False]"],
    "moe": ["tests/test_moe_gpu.py::test_permute_unpermute_match_reference[dtype0-37-3-7-16-40]",
            "tests/test_moe_gpu.py::test_route_generic_logits_and_deciding_bias[sigmoid]"],
}
# GPU tier files in priority order (the rest of tests/ follows with -m gpu), with their share of the
# tier's time.
TIER = [("tests/test_quant.py", 1), ("tests/test_gemm_gpu.py", 3), ("tests/test_mla_gpu.py", 4),
        ("tests/test_moe_gpu.py", 1), ("tests/test_gpu_fixes.py", 1), ("tests/test_nn_gpu.py", 1),
        ("tests/test_ep_gpu.py", 2), ("OTHERS", 1)]
SANITIZE = [SMOKE["quant"][0], SMOKE["gemm"][0], SMOKE["moe"][0],
            "tests/test_mla_gpu.py::test_decode_one_hot_rows_exact[1-4-3-True-False]"]
MAX_LOG_BYTES = 3 * 2**20  # per log inside logs.tar.gz (the tail is kept): the tarball stays far under 16 MB


def plan_slice(stage: str, remaining: float, todo: list[str]) -> float:
    """Seconds granted to ``stage`` when ``remaining`` seconds are left and ``todo`` (starting with
    ``stage``) are still to run."""
    w = {s: (wt, mn, cap) for s, wt, mn, cap in STAGES}
    wt, mn, cap = w[stage]
    total = sum(w[s][0] for s in todo)
    share = remaining * wt / total
    return max(0.0, min(cap, remaining, max(share, mn)))


@dataclass
class Result:
    stage: str
    status: str  # ok, fail, timeout, skipped, refused
    seconds: float
    detail: str = ""
    extra: dict = field(default_factory=dict)


class Check:
    def __init__(self, out: Path, budget: float, cpu: bool, build_cpu: bool, python: str, stages: list[str],
                 maxfail: int, test_timeout: int):
        self.out, self.budget, self.cpu, self.build_cpu = out, budget, cpu, build_cpu
        self.py, self.stages, self.maxfail, self.test_timeout = python, stages, maxfail, test_timeout
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="dsmoe_gpu_check_"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.results: list[Result] = []
        self.log_failures: list[str] = []
        self.junits: list[Path] = []
        # the device machine's copy of the tree may lack .git: the caller can pass DSMOE_COMMIT
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        DSMOE_COMMIT=os.environ.get("DSMOE_COMMIT") or _git("rev-parse", "HEAD"))
        self.env["PYTHONPATH"] = str(ROOT / "python")  # until a build replaces it
        self.env["DSMOE_TEST_RECORD_ERRORS"] = str(self.logs / "gemm_errors.jsonl")  # calibrates the GEMM bounds
        if cpu:
            self.env["DSMOE_TEST_GPU_ON_CPU"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.has_timeout_plugin = subprocess.run([python, "-c", "import pytest_timeout"], capture_output=True).returncode == 0

    # ------------------------------------------------------------------ plumbing
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, cmd: list[str], log: Path, timeout: float, env=None) -> tuple[int, float, bool]:
        """Runs cmd in its own process group, output to ``log``; kills the group at ``timeout``."""
        start = time.monotonic()
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)\n".encode())
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env or self.env,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(1.0, timeout))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                rc = p.returncode if p.returncode is not None else -9
                f.write(f"\n[gpu_check] killed after {timeout:.0f} s (stage slice exhausted)\n".encode())
        return rc, time.monotonic() - start, timed_out

    def pytest(self, name: str, targets: list[str], timeout: float, extra: list[str] = ()) -> dict:
        junit = self.logs / f"junit-{name}.xml"
        # -v: one line per test in the log, which is all there is when the run is killed before junit is written
        cmd = [self.py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
        if self.has_timeout_plugin:
            # thread method: a kernel hung inside a CUDA call never returns to Python for a signal handler
            cmd += [f"--timeout={min(self.test_timeout, max(10, int(timeout)))}", "--timeout-method=thread"]
        log = self.logs / f"pytest-{name}.log"
        rc, secs, timed_out = self.run(cmd + list(targets), log, timeout)
        counts = _junit_counts(junit)
        if junit.exists():
            self.junits.append(junit)
        else:
            counts, failed = _log_counts(log)
            if failed:
                self.log_failures += [f"[{name}] {t}  (from the log; the run was cut)" for t in failed]
        finished = bool(re.search(r"^(=+ )?(\d+ (passed|failed|skipped|deselected|errors?)[, ]*)+.* in [\d.]+s",
                                  log.read_text(errors="replace"), re.M))
        if timed_out and finished:  # killed while the interpreter was exiting: the results are complete
            timed_out = False
            rc = 1 if counts["failed"] or counts["errors"] else 0
        return {"rc": rc, "seconds": round(secs, 1), "timed_out": timed_out, **counts,
                "last_line": _last_line(log)}

    def record(self, r: Result) -> None:
        self.results.append(r)
        self.write_outputs()

    # ------------------------------------------------------------------ stages
    def stage_env(self, limit: float) -> Result:
        log = self.logs / "env.log"
        start = time.monotonic()
        if shutil.which("nvidia-smi"):
            self.run(["nvidia-smi"], log, min(limit, 15))
        code = ("import torch, json; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'available': c, 'device': torch.cuda.get_device_name(0) if c else 'cpu', "
                "'count': torch.cuda.device_count()}))")
        try:
            p = subprocess.run([self.py, "-c", code], capture_output=True, text=True, timeout=max(20, limit), env=self.env)
            info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-500:]}
        except subprocess.TimeoutExpired:
            info = {"error": f"importing torch took over {max(20, limit):.0f} s"}
        info["nproc"] = os.cpu_count()
        info["compute_sanitizer"] = shutil.which("compute-sanitizer") or ""
        info["nvcc"] = shutil.which("nvcc") or ""
        log.open("a").write(json.dumps(info) + "\n")
        if not self.cpu and not info.get("available"):
            return Result("env", "fail", time.monotonic() - start, "torch sees no CUDA device (use --cpu to test the "
                                                                       "script without one)", info)
        return Result("env", "ok", time.monotonic() - start, f"{info.get('device')} x{info.get('count', 0)}, "
                                                             f"torch {info.get('torch')}, {os.cpu_count()} cores", info)

    def stage_build(self, limit: float) -> Result:
        if self.cpu and not self.build_cpu:
            return Result("build", "skipped", 0.0, "CPU mode: tests import dsmoe from the source tree (python/)")
        site = self.work / "site"
        log = self.logs / "build.log"
        env = dict(self.env, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        if self.cpu:
            env["SKBUILD_CMAKE_DEFINE"] = "DSMOE_CUDA=OFF"
        cmd = [self.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v",
               "--target", str(site), "."]
        rc, secs, timed_out = self.run(cmd, log, limit, env)
        text = log.read_text(errors="replace")
        ptxas = [ln for ln in text.splitlines() if re.search(r"ptxas.*(spill|stack|lmem|local memory)|Used \d+ registers", ln)]
        (self.logs / "ptxas.txt").write_text("\n".join(ptxas) + "\n")
        spills = [ln for ln in ptxas if re.search(r"[1-9]\d* bytes spill|warning", ln)]
        if rc != 0 or timed_out:
            return Result("build", "timeout" if timed_out else "fail", secs,
                          "build " + ("cut at the slice limit" if timed_out else f"rc={rc}") + "; tail of build.log:\n"
                          + "\n".join(text.splitlines()[-25:]))
        self.env["PYTHONPATH"] = str(site)
        p = subprocess.run([self.py, "-m", "dsmoe", "info", "--json"], capture_output=True, text=True, env=self.env,
                           cwd="/tmp", timeout=60)
        (self.logs / "info.json").write_text(p.stdout + p.stderr)
        detail = f"built in {secs:.0f} s on {os.cpu_count()} cores"
        if spills:
            detail += f"; ptxas spill/local-memory warnings: {len(spills)} (see ptxas.txt)"
        return Result("build", "ok", secs, detail, {"ptxas_warnings": spills[:20]})

    def stage_smoke(self, limit: float) -> Result:
        start = time.monotonic()
        fams, details, status, extra = list(SMOKE), [], "ok", {}
        for i, fam in enumerate(fams):
            sl = (limit - (time.monotonic() - start)) / (len(fams) - i)
            if sl < 5:
                details.append(f"{fam}: not run (time)")
                status = "timeout"
                continue
            r = self.pytest(f"smoke-{fam}", SMOKE[fam], sl)
            extra[fam] = r
            failed = bool(r["failed"] or r["errors"] or (r["rc"] != 0 and not r["timed_out"]))
            verdict = "FAIL" if failed else ("CUT" if r["timed_out"] else "PASS")
            r["verdict"] = verdict
            if failed:
                status = "fail"
            elif r["timed_out"] and status == "ok":
                status = "timeout"
            details.append(f"{fam}: {verdict} ({r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                           f"{r['skipped']} skipped{', cut at its time limit' if r['timed_out'] else ''})")
        return Result("smoke", status, time.monotonic() - start, "; ".join(details), extra)

    def stage_tier(self, limit: float) -> Result:
        start = time.monotonic()
        files = [(f, w) for f, w in TIER if f == "OTHERS" or (ROOT / f).exists()]
        named = {f for f, _ in files}
        others = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                        if str(p.relative_to(ROOT)) not in named)
        status, details, extra = "ok", [], {}
        for i, (f, w) in enumerate(files):
            left = limit - (time.monotonic() - start)
            sl = left * w / sum(wt for _, wt in files[i:])
            name = "others" if f == "OTHERS" else Path(f).stem
            if sl < 5:
                details.append(f"{name}: not run (time)")
                status = "timeout"
                continue
            targets = others if f == "OTHERS" else [f]
            r = self.pytest(f"tier-{name}", targets, sl, ["-m", "gpu", f"--maxfail={self.maxfail}"])
            extra[name] = r
            bad = r["failed"] + r["errors"]
            if bad or (r["rc"] not in (0, 5) and not r["timed_out"]):  # 5: nothing collected
                status = "fail"
            elif r["timed_out"] and status == "ok":
                status = "timeout"
            details.append(f"{name}: {r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                           f"{r['skipped']} skipped{' CUT at its time limit' if r['timed_out'] else ''} ({r['seconds']:.0f} s)")
        return Result("tier", status, time.monotonic() - start, "; ".join(details), extra)

    def stage_sanitize(self, limit: float) -> Result:
        if self.cpu:
            return Result("sanitize", "skipped", 0.0, "CPU mode: needs CUDA")
        tool = shutil.which("compute-sanitizer")
        if not tool:
            return Result("sanitize", "skipped", 0.0, "compute-sanitizer not on PATH")
        log = self.logs / "sanitizer.log"
        cmd = [tool, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "50", self.py, "-m", "pytest",
               "-q", "-p", "no:cacheprovider", *SANITIZE]
        rc, secs, timed_out = self.run(cmd, log, limit)
        text = log.read_text(errors="replace")
        if re.search(r"Device not supported|Unable to find injection|error 999|not supported on this", text):
            return Result("sanitize", "refused", secs, "compute-sanitizer refused the device (recorded; not a dsmoe result)")
        errs = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        if timed_out:
            return Result("sanitize", "timeout", secs, f"cut at {limit:.0f} s; errors so far: {errs}")
        st = "ok" if rc == 0 else "fail"
        return Result("sanitize", st, secs, f"rc={rc}, memcheck error summary {errs or 'none printed'}; {_last_line(log)}")

    def stage_bench(self, limit: float) -> Result:
        if self.cpu:
            (self.out / "bench.json").write_text(json.dumps({"suite": "headline", "skipped": "CPU mode: needs CUDA"}) + "\n")
            return Result("bench", "skipped", 0.0, "CPU mode: needs CUDA")
        res = self.work / "results"
        log = self.logs / "bench.log"
        env = dict(self.env, DSMOE_BENCH_DEADLINE=str(time.time() + limit - 15))
        rc, secs, timed_out = self.run([self.py, "-m", "dsmoe", "bench", "headline", "--out", str(res)], log, limit, env)
        found = sorted(res.glob("*/headline.json"))
        if found:
            shutil.copy(found[0], self.out / "bench.json")
            doc = json.loads(found[0].read_text())
            n = len(doc.get("cases", []))
            detail = f"{n} cases -> bench.json" + (f"; cut short: {doc['cut_short']}" if doc.get("cut_short") else "")
        else:
            detail = "no JSON written; " + _last_line(log)
        st = "timeout" if timed_out else ("ok" if rc == 0 and found else "fail")
        return Result("bench", st, secs, detail)

    # ------------------------------------------------------------------ outputs
    def write_outputs(self) -> None:
        lines = [f"dsmoe gpu_check  commit {self.env['DSMOE_COMMIT']}  {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
                 f"  budget {self.budget:.0f} s  used {time.monotonic() - self.t0:.0f} s  mode {'cpu' if self.cpu else 'gpu'}"]
        for r in self.results:
            lines.append(f"{r.stage:9s} {r.status.upper():8s} {r.seconds:6.0f} s  {r.detail}")
        failed = _failed_tests(self.junits) + self.log_failures
        if failed:
            lines.append(f"failed tests ({len(failed)}):")
            lines += [f"  {t}" for t in failed[:40]]
        lines.append("NEXT: " + self.next_step(failed))
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        (self.out / "summary.json").write_text(json.dumps({
            "commit": self.env["DSMOE_COMMIT"], "budget_s": self.budget, "mode": "cpu" if self.cpu else "gpu",
            "used_s": round(time.monotonic() - self.t0, 1), "stages": [r.__dict__ for r in self.results],
            "failed_tests": failed}, indent=1, default=str) + "\n")
        _merge_junit(self.junits, self.out / "junit.xml")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(self.logs.iterdir()):
                if p.stat().st_size > MAX_LOG_BYTES:
                    trimmed = self.work / f"tail-{p.name}"
                    with open(p, "rb") as src:
                        src.seek(-MAX_LOG_BYTES, os.SEEK_END)
                        trimmed.write_bytes(b"[trimmed: last bytes only]\n" + src.read())
                    tar.add(trimmed, arcname=f"logs/{p.name}")
                else:
                    tar.add(p, arcname=f"logs/{p.name}")

    def next_step(self, failed: list[str]) -> str:
        by = {r.stage: r for r in self.results}
        if "env" in by and by["env"].status == "fail":
            return f"the environment check failed ({by['env'].detail}): is this the GPU machine's python3 with CUDA torch?"
        if "build" in by and by["build"].status in ("fail", "timeout"):
            return "the build failed: fix it from the build.log tail above (logs.tar.gz: logs/build.log), then rerun."
        sm = by.get("smoke")
        bad = [f for f, r in (sm.extra.items() if sm else ()) if r.get("verdict") == "FAIL"]
        cut = [f for f, r in (sm.extra.items() if sm else ()) if r.get("verdict") == "CUT"]
        if bad:
            return (f"kernel families failing their smoke tests: {bad}. Read logs/pytest-smoke-<family>.log; bisect with "
                    f"DSMOE_DISABLE_KERNELS={','.join(bad)} (references instead of kernels). Fix those first; the tier "
                    "results of other families stand.")
        if cut:
            return (f"smoke tests of {cut} were cut by their time slice (a hang, or too small a budget): read their logs "
                    "(pytest-timeout prints the stuck test's stack); rerun with --stages env,build,smoke and a larger budget.")
        if failed:
            return ("smoke tests pass but the tier has failures (listed above): fix them, or, for a tolerance, compare "
                    "with the emulation notes in the failing test's docstring before loosening anything.")
        if self.cpu:
            return "CPU mode finished: the plumbing works; on a GPU machine run `tools/gpu_check.sh $OUT --budget 540`."
        return ("all stages passed: commit bench.json as bench/results/<device>/headline.json and fill in the README's "
                "'verified on GPU' column for the families whose tests passed.")

    def main(self) -> int:
        todo = [s for s, *_ in STAGES if s in self.stages]
        for i, stage in enumerate(todo):
            left = self.left()
            limit = plan_slice(stage, left, todo[i:])
            if limit < 3:
                self.record(Result(stage, "skipped", 0.0, f"no time left ({left:.0f} s)"))
                continue
            try:
                r = getattr(self, f"stage_{stage}")(limit)
            except Exception as e:  # noqa: BLE001 - a broken stage must not lose the summary
                r = Result(stage, "fail", 0.0, f"gpu_check internal error: {type(e).__name__}: {e}")
            self.record(r)
            if stage == "env" and r.status == "fail" or stage == "build" and r.status in ("fail", "timeout"):
                for later in todo[i + 1:]:
                    self.results.append(Result(later, "skipped", 0.0, f"{stage} failed"))
                break
        self.write_outputs()
        print((self.out / "summary.txt").read_text(), end="")
        print(f"files in {self.out}: {', '.join(sorted(p.name for p in self.out.iterdir()))}")
        shutil.rmtree(self.work, ignore_errors=True)
        bad = [r for r in self.results if r.status in ("fail", "timeout")]
        return 1 if bad else 0


def _git(*args) -> str:
    try:
        p = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10)
        return p.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def _junit_counts(path: Path) -> dict:
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not path.exists():
        return c
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return c
    for tc in root.iter("testcase"):
        kinds = {ch.tag for ch in tc}
        if "failure" in kinds:
            c["failed"] += 1
        elif "error" in kinds:
            c["errors"] += 1
        elif "skipped" in kinds:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return c


def _log_counts(log: Path) -> tuple[dict, list[str]]:
    """Per-test outcomes from a ``pytest -v`` log (for runs killed before writing their junit file)."""
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return c, failed
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
        k = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m.group(2), "skipped")
        c[k] += 1
        if k in ("failed", "errors"):
            failed.append(m.group(1))
    return c, failed


def _failed_tests(junits: list[Path]) -> list[str]:
    out = []
    for j in junits:
        try:
            root = ET.parse(j).getroot()
        except (ET.ParseError, OSError):
            continue
        for tc in root.iter("testcase"):
            for ch in tc:
                if ch.tag in ("failure", "error"):
                    msg = (ch.get("message") or "").splitlines()[0][:140] if ch.get("message") else ""
                    out.append(f"[{j.stem.removeprefix('junit-')}] {tc.get('classname')}::{tc.get('name')}  {msg}")
    return out


def _merge_junit(junits: list[Path], dest: Path) -> None:
    root = ET.Element("testsuites")
    for j in junits:
        try:
            r = ET.parse(j).getroot()
        except (ET.ParseError, OSError):
            continue
        for ts in ([r] if r.tag == "testsuite" else list(r)):
            ts.set("name", j.stem.removeprefix("junit-"))
            root.append(ts)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (created; only the summary files land here)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    ap.add_argument("--stages", default=",".join(s for s, *_ in STAGES))
    ap.add_argument("--cpu", action="store_true", help="CPU mode (automatic when torch sees no CUDA)")
    ap.add_argument("--build-cpu", action="store_true", help="in CPU mode, build a CPU-only module too")
    ap.add_argument("--maxfail", type=int, default=10, help="per test file in the tier stage")
    ap.add_argument("--test-timeout", type=int, default=120, help="per-test limit (pytest-timeout), seconds")
    ap.add_argument("--plan", action="store_true", help="print the time slices for this budget and exit")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - {s for s, *_ in STAGES}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}")
    if a.plan:
        left, todo = a.budget, [s for s, *_ in STAGES if s in stages]
        for i, s in enumerate(todo):
            sl = plan_slice(s, left, todo[i:])
            print(f"{s:9s} up to {sl:5.0f} s (if every earlier stage used its whole slice)")
            left -= sl
        return 0
    py = os.environ.get("PYTHON", sys.executable)
    cpu = a.cpu
    if not cpu:
        p = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
        cpu = p.stdout.strip() != "True"
        if cpu:
            print("gpu_check: torch sees no CUDA device: CPU mode", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return Check(out, a.budget, cpu, a.build_cpu, py, stages, a.maxfail, a.test_timeout).main()


if __name__ == "__main__":
    sys.exit(main())
