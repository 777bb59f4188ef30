"""The `dsmoe` command line dispatches each subcommand (its own work is tested elsewhere)."""
import pytest

from dsmoe.__main__ import main


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


def test_bench_list_and_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"quant", "gemm", "mla", "moe", "ep", "layer"} <= set(listed)
    with pytest.raises(SystemExit, match="unknown suite"):
        main(["bench", "nosuch"])


def test_demo_quant(capsys):
    assert main(["demo", "quant", "--device", "cpu"]) == 0
    assert "round-trip rel. error" in capsys.readouterr().out
