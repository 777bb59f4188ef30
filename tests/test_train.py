"""The training demo: task definition (loss floor from an oracle), and `dsmoe train` end to end (micro)."""
from __future__ import annotations

import json
import math
import os

import torch

from dsmoe.data import PermutedCopyTask
from dsmoe.models import DeepseekV3ForCausalLM


def _oracle_logprobs(task: PermutedCopyTask, seqs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the Bayes-optimal predictor for each next token."""
    B, N = seqs.shape
    L, S = task.length, task.num_symbols
    lp = torch.zeros(B, N - 1, dtype=torch.float64)
    for t in range(N - 1):            # predicting seqs[:, t + 1]
        if 1 <= t + 1 <= L:
            lp[:, t] = -math.log(S)   # uniform source symbol
        else:
            lp[:, t] = 0.0            # determined: SEP, mapped symbols, EOS
    return lp


def test_task_structure_and_loss_floor():
    task = PermutedCopyTask(num_symbols=11, length=5, seed=3)
    s = task.sample(64, torch.Generator().manual_seed(0))
    assert s.shape == (64, task.seq_len) and s.max() < task.vocab_size
    src, dst = s[:, 1:6] - 3, s[:, 7:12] - 3
    assert torch.equal(task.perm[src], dst) and (s[:, 6] == 2).all() and (s[:, -1] == 1).all()
    assert sorted(task.perm.tolist()) == list(range(11))
    floor = -_oracle_logprobs(task, s).mean().item()
    assert abs(floor - task.loss_floor) < 1e-9
    gen = s.clone()
    assert task.accuracy(gen, s) == (1.0, 1.0)
    gen[0, task.prompt_len()] = 0
    acc, exact = task.accuracy(gen, s)
    assert exact == 63 / 64 and abs(acc - (1 - 1 / (64 * 5))) < 1e-6


def test_dsmoe_train_cli_micro_end_to_end(tmp_path, capsys):
    from dsmoe.train import main
    out = tmp_path / "run"
    assert main(["--preset", "micro", "--steps", "4", "--batch", "4", "--out", str(out), "--no-progress", "--compare"]) == 0
    text = capsys.readouterr().out
    assert "task accuracy" in text and "relative gap" in text and "greedy sample" in text
    for f in ("loss.png", "expert_load.png", "summary.json", "checkpoint/config.json",
              "checkpoint/model.safetensors.index.json"):
        assert os.path.exists(out / f), f
    assert open(out / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summ = json.load(open(out / "summary.json"))
    assert summ["steps"] == 4 and "fp8_vs_bf16_relative_loss_gap" in summ and 0 <= summ["accuracy"] <= 1
    m = DeepseekV3ForCausalLM.from_pretrained(out / "checkpoint", dtype=torch.float32)
    assert m.config.num_nextn_predict_layers == 1
