"""The `dsmoe` command line dispatches each subcommand (its own work is tested elsewhere); every user error is
one line on stderr, a non-zero exit (2: bad argument, 1: this machine cannot do it), no traceback, no files."""
import os
import subprocess
import sys

import pytest
import torch

import dsmoe
from dsmoe import _native
from dsmoe.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fails(capsys, argv):
    """Runs the CLI in-process on a user error: returns (exit status, the one stderr line)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    cap = capsys.readouterr()
    assert code not in (0, None), (argv, cap)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert cap.out == "", cap.out
    return code, lines[0]


def _tree(path):
    return sorted((os.path.relpath(os.path.join(d, n), path) for d, ds, fs in os.walk(path) for n in ds + fs))


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "per_token_group_quant_fp8" in out and "CUDA kernel" in out


def test_info_json(capsys):
    import json

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"dsmoe", "build", "torch", "gpus", "ops"} <= set(info)


def test_train_options_reach_the_trainer(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--help"])
    assert e.value.code == 0 and "--compare" in capsys.readouterr().out


def _listing(text):
    return dict(line.split(None, 1) for line in text.strip().splitlines())


def test_bench_list_and_unknown(capsys, tmp_path):
    assert main(["bench", "--list"]) == 0
    from dsmoe.bench.runner import SUITES

    listed = _listing(capsys.readouterr().out)
    assert {"quant", "gemm", "mla", "moe", "ep", "layer"} <= set(SUITES)
    assert listed == {s: "ok" for s in SUITES}
    out = tmp_path / "results"
    code, err = _fails(capsys, ["bench", "nosuch", "--out", str(out)])
    assert code == 2 and "unknown suite(s) 'nosuch'" in err and not out.exists()


def test_bench_list_reports_a_suite_that_does_not_import(capsys, monkeypatch, tmp_path):
    from dsmoe.bench import runner

    (tmp_path / "dsmoe_test_broken_suite.py").write_text("raise RuntimeError('kernel table out of date')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(runner.SUITES, "gemm", ".no_such_module")              # ImportError
    monkeypatch.setitem(runner.SUITES, "layer", "dsmoe_test_broken_suite")      # any other exception
    assert main(["bench", "--list"]) == 1
    cap = capsys.readouterr()
    listed = _listing(cap.out)
    assert listed["quant"] == "ok" and listed["mla"] == "ok"
    assert listed["gemm"].startswith("BROKEN (ModuleNotFoundError: No module named 'dsmoe.bench.no_such_module'")
    assert listed["layer"] == "BROKEN (RuntimeError: kernel table out of date)"
    assert cap.err.strip() == "dsmoe bench: error: suite(s) gemm, layer failed to import"
    # running a broken suite is refused the same way, before any results are written
    monkeypatch.setattr(runner, "cuda_problem", lambda *a: None)               # as if on a GPU machine
    out = tmp_path / "results"
    code, err = _fails(capsys, ["bench", "quant", "layer", "--out", str(out)])
    assert code == 1 and "suite 'layer' failed to import (RuntimeError: kernel table out of date)" in err
    assert not out.exists()


def test_demo_quant(capsys):
    assert main(["demo", "quant", "--device", "cpu"]) == 0
    assert "round-trip rel. error" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"dsmoe {dsmoe.__version__}\n"
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert dsmoe.__version__ == tomllib.load(f)["project"]["version"]


def test_package_version_is_the_running_copys(monkeypatch):
    from importlib import metadata

    from dsmoe import info

    class Dist:
        version = "9.8.7"

        def __init__(self, root):
            self.root = root

        def locate_file(self, p):
            return os.path.join(self.root, p)

    ours = os.path.dirname(os.path.dirname(os.path.abspath(dsmoe.__file__)))
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(ours))
    assert info.package_version() == "9.8.7"                     # installed: the metadata's version
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist("/elsewhere"))
    assert info.package_version() == dsmoe.__version__           # a source tree shadowing an install

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert info.package_version() == dsmoe.__version__           # not installed


def test_usage_errors_are_one_line(capsys):
    code, err = _fails(capsys, [])
    assert code == 2 and err.startswith("dsmoe: error: the following arguments are required")
    code, err = _fails(capsys, ["info", "--bogus"])
    assert code == 2 and "unrecognized arguments: --bogus" in err
    code, err = _fails(capsys, ["demo", "quant", "--device", "tpu"])
    assert code == 2 and err == "dsmoe demo: error: --device: expected cpu, cuda or cuda:N, got 'tpu'"
    code, err = _fails(capsys, ["train", "--preset", "huge"])
    assert code == 2 and "--preset: invalid choice: 'huge'" in err


@pytest.mark.parametrize("args, msg", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--steps", "-5"], "argument --steps: expected a positive integer, got -5"),
    (["--steps", "1.5"], "argument --steps: expected a positive integer, got '1.5'"),
    (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (["--lr", "0"], "argument --lr: expected a positive finite number, got 0"),
    (["--lr=-1e-3"], "argument --lr: expected a positive finite number, got -1e-3"),
    (["--lr", "nan"], "argument --lr: expected a positive finite number, got nan"),
    (["--lr", "inf"], "argument --lr: expected a positive finite number, got inf"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got -1"),
    (["--seed", str(2**63)], f"argument --seed: expected an integer in [0, 2**63), got {2**63}"),
    (["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--device", "meta"], "--device: expected cpu, cuda or cuda:N, got 'meta'"),
])
def test_train_rejects_bad_arguments_before_creating_anything(capsys, monkeypatch, tmp_path, args, msg):
    monkeypatch.chdir(tmp_path)                      # the default --out is runs/<preset>
    code, err = _fails(capsys, ["train", "--preset", "micro", *args])
    assert code == 2 and err.startswith(f"dsmoe train: error: {msg}"), err
    assert _tree(tmp_path) == []


def test_train_out_that_cannot_be_the_output_folder(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", str(f)])
    assert code == 2 and err == f"dsmoe train: error: --out {f}: exists and is not a folder"
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", str(f / "run")])
    assert code == 2 and err == f"dsmoe train: error: --out {f / 'run'}: {f} is a file, not a folder"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").write_text("x")
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", str(run)])
    assert code == 2 and f"{run / 'checkpoint'} is a file where this command writes a folder" in err
    (run / "checkpoint").unlink()
    (run / "summary.json").mkdir()
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", str(run)])
    assert code == 2 and f"{run / 'summary.json'} is a folder where this command writes a file" in err
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", ""])
    assert code == 2 and "--out: expected a folder path, got an empty string" in err
    assert _tree(tmp_path) == ["notes.txt", "run", "run/summary.json"] and f.read_text() == "keep me"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_train_out_where_no_folder_can_be_created(capsys):
    # /proc refuses new entries even to root, so this holds wherever the suite runs
    code, err = _fails(capsys, ["train", "--preset", "micro", "--out", "/proc/dsmoe-run/x"])
    assert code == 2 and err.startswith("dsmoe train: error: --out /proc/dsmoe-run/x: cannot create files in /proc (")
    assert not os.path.exists("/proc/dsmoe-run")


def test_train_out_in_a_read_only_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    os.chmod(ro / "run", 0o500)
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        for out, where in ((ro / "new", ro), (ro / "run", ro / "run")):
            code, err = _fails(capsys, ["train", "--preset", "micro", "--out", str(out)])
            assert code == 2 and f"cannot create files in {where} (Permission denied)" in err, err
        assert _tree(ro) == ["run"]
    finally:
        os.chmod(ro, 0o700)
        os.chmod(ro / "run", 0o700)


def _no_cuda_torch(mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(torch.version, "cuda", None)


def _cuda_torch_without_device(mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(torch.version, "cuda", "12.8")


def _gpu(mp, native=True, cuda_compiled=True, count=1, cap=(9, 0), archs="90a"):
    class C:
        build_info = {"cuda_compiled": cuda_compiled, "cuda_archs": archs}

    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: count)
    mp.setattr(torch.cuda, "current_device", lambda: 0)
    mp.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    mp.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB" if cap != (9, 0) else "NVIDIA H100")
    mp.setattr(_native, "native", lambda: C if native else None)
    mp.setattr(_native, "cuda_compiled", lambda: native and cuda_compiled)


CUDA_SITUATIONS = [
    ("cuda", _no_cuda_torch, "this torch ({}) is built without CUDA".format(torch.__version__)),
    ("cuda", _cuda_torch_without_device, "no CUDA device is visible to torch"),
    ("cuda", lambda mp: _gpu(mp, native=False), "the compiled module dsmoe._C is missing"),
    ("cuda", lambda mp: _gpu(mp, cuda_compiled=False), "dsmoe._C was built without CUDA kernels"),
    ("cuda:3", lambda mp: _gpu(mp, count=2), "device index 3 does not exist (2 CUDA devices visible)"),
    ("cuda", lambda mp: _gpu(mp, cap=(8, 0)), "NVIDIA A100-SXM4-80GB is sm_80; this build has kernels for sm_90"),
]


@pytest.mark.parametrize("cmd", ["train", "demo"])
@pytest.mark.parametrize("device, situation, msg", CUDA_SITUATIONS)
def test_device_cuda_that_cannot_run_here(capsys, monkeypatch, tmp_path, cmd, device, situation, msg):
    situation(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "micro"] if cmd == "train" else ["demo", "quant"]
    code, err = _fails(capsys, [*argv, "--device", device])
    assert code == 1 and err.startswith(f"dsmoe {cmd}: error: --device {device}: {msg}"), err
    assert _tree(tmp_path) == []


def test_default_device_skips_an_unusable_gpu(capsys, monkeypatch):
    from dsmoe._cli import resolve_device

    _gpu(monkeypatch, cuda_compiled=False)
    assert resolve_device(None, "dsmoe demo") == torch.device("cpu")
    assert capsys.readouterr().err == ("dsmoe demo: note: not using the GPU: dsmoe._C was built without CUDA kernels "
                                       "(no nvcc at build time); rebuild with nvcc; running on the CPU\n")
    _gpu(monkeypatch)
    assert resolve_device(None, "dsmoe demo") == torch.device("cuda")


@pytest.mark.parametrize("device, situation, msg", [s for s in CUDA_SITUATIONS if s[0] == "cuda"])
def test_bench_without_a_usable_gpu(capsys, monkeypatch, tmp_path, device, situation, msg):
    situation(monkeypatch)
    out = tmp_path / "results"
    code, err = _fails(capsys, ["bench", "quant", "--out", str(out)])
    assert code == 1 and err.startswith(f"dsmoe bench: error: benchmarks run on a CUDA GPU: {msg}"), err
    assert not out.exists()
    f = tmp_path / "file"
    f.write_text("")
    code, err = _fails(capsys, ["bench", "--out", str(f)])
    assert code == 2 and err == f"dsmoe bench: error: --out {f}: exists and is not a folder"


def _cli_subprocess(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(dsmoe.__file__))))
    return subprocess.run([sys.executable, "-m", "dsmoe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_errors_as_a_user_sees_them(tmp_path):
    # the real entry point in a fresh process: exit status, one stderr line, no traceback, nothing written
    r = _cli_subprocess(["train", "--steps", "0"], tmp_path)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == ("dsmoe train: error: argument --steps: expected a positive integer, got 0 "
                        "(see `dsmoe train --help`)\n")
    r = _cli_subprocess(["train", "--preset", "micro", "--device", "cuda:99"], tmp_path)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r
    assert r.stderr.startswith("dsmoe train: error: --device cuda:99: ") and "Traceback" not in r.stderr
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(dsmoe.__file__))))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "nosuch"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r
    from dsmoe.bench.runner import SUITES

    assert r.stderr == f"dsmoe bench: error: unknown suite(s) 'nosuch'; choose from {', '.join(SUITES)} or all\n"
    assert _tree(tmp_path) == []


def test_bench_tables_say_what_their_medians_are_over(capsys):
    from types import SimpleNamespace

    from dsmoe.bench import runner

    runner._say_what_was_averaged(SimpleNamespace(warmup=5), [{"reps": 50}, {"reps": 20}, {}], {"timing": "slowest rank"})
    assert capsys.readouterr().out == ("median_ms: median of 20 or 50 timed runs per case (CUDA events, after 5 warm-up "
                                       "runs, L2 flushed before each)\ntiming: slowest rank\n")
    runner._say_what_was_averaged(SimpleNamespace(warmup=5), [{}], {})
    assert capsys.readouterr().out == ""
