"""dsmoe.rl: the GRPO objective against an independent float64 implementation of its formulas (values and
gradients), argument checks, rollout reproducibility, a GRPO run that learns, and `dsmoe rl` errors."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dsmoe.rl import GRPOTrainer, completion_logprobs, group_advantages, grpo_loss


# ---------------------------------------------------------------------------------------------------------
# independent implementation of the formulas (plain loops over sequences and tokens, float64)

def _adv_ref(rewards, G, scale, eps):
    r = [float(x) for x in rewards]
    out = []
    for k in range(0, len(r), G):
        g = r[k: k + G]
        mu = sum(g) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in g) / (G - 1))
        out += [x - mu if not scale else ((x - mu) / (sd + eps) if sd + eps else float("nan")) for x in g]
    return torch.tensor(out, dtype=torch.float64)


def _loss_ref(lp, old, ref, adv, mask, clip_eps, clip_high, beta, loss_type, max_len):
    """``lp`` float64 with requires_grad; per-token terms written out one by one."""
    B, T = lp.shape
    hi = clip_eps if clip_high is None else clip_high
    per_seq, tot, n_tok = [], lp.new_zeros(()), 0
    kl_sum, clip_n, ratio_sum = 0.0, 0, 0.0
    for b in range(B):
        s, n = lp.new_zeros(()), 0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(lp[b, t] - float(old[b, t]))
            A = float(adv[b])
            unclipped = ratio * A
            clipped = torch.clamp(ratio, 1 - clip_eps, 1 + hi) * A
            surr = unclipped if unclipped <= clipped else clipped
            term = -surr
            if ref is not None:
                d = float(ref[b, t]) - lp[b, t]
                kl = torch.exp(d) - d - 1
                kl_sum += float(kl.detach())
                if beta > 0:
                    term = term + beta * kl
            r = float(ratio.detach())
            clip_n += int((r < 1 - clip_eps and A < 0) or (r > 1 + hi and A > 0))
            ratio_sum += r
            s, n = s + term, n + 1
        per_seq.append(s / n if n else s)
        tot, n_tok = tot + s, n_tok + n
    if loss_type == "grpo":
        loss = sum(per_seq) / B
    elif loss_type == "dapo":
        loss = tot / max(n_tok, 1)
    else:
        loss = tot / (B * max_len)
    d = max(n_tok, 1)
    stats = {"kl": None if ref is None else kl_sum / d, "clip_fraction": clip_n / d, "ratio_mean": ratio_sum / d,
             "tokens": n_tok}
    return loss, stats


def _inputs(g, B, T, *, empty_rows=(), spread=0.5):
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * spread   # ratios across both clip edges
    ref = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    for r in empty_rows:
        mask[r] = False
    return lp, old, ref, adv, mask


# ---------------------------------------------------------------------------------------------------------
# group_advantages

@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_match_the_formula(scale, G):
    g = torch.Generator().manual_seed(1000 + G)
    rewards = torch.rand(5 * G, generator=g)
    rewards[:G] = 0.5                   # a group with equal rewards: advantage 0, no division blow-up
    for eps in (1e-4, 0.0, 0.3):
        got = group_advantages(rewards, G, scale=scale, eps=eps)
        want = _adv_ref(rewards, G, scale, eps)
        if eps == 0.0 and scale:
            assert torch.isnan(got[:G]).all()       # 0 / 0, as the formula says
            got, want = got[G:], want[G:]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # integer rewards become float; float64 stays float64
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    assert group_advantages(rewards.double(), G).dtype == torch.float64
    assert group_advantages(torch.zeros(0), G).shape == (0,)


@pytest.mark.parametrize("args, msg", [
    ((torch.zeros(6), 4), "'group_size'=4 does not divide the number of rewards 6"),
    ((torch.zeros(6), 1), "'group_size' must be an int >= 2"),
    ((torch.zeros(6), 2.0), "'group_size' must be an int >= 2"),
    ((torch.zeros(2, 3), 3), "'rewards' must be a 1-D tensor"),
    (([1.0, 0.0], 2), "'rewards' must be a 1-D tensor"),
])
def test_group_advantages_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        group_advantages(*args)
    with pytest.raises(ValueError, match="'eps' must be a finite float >= 0"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


# ---------------------------------------------------------------------------------------------------------
# grpo_loss

CASES = [(lt, beta, ch) for lt in ("grpo", "dapo", "dr_grpo") for beta in (0.0, 0.04, 0.5) for ch in (None, 0.28)]


@pytest.mark.parametrize("loss_type, beta, clip_high", CASES)
def test_grpo_loss_value_stats_and_gradient_match_the_formulas(loss_type, beta, clip_high):
    g = torch.Generator().manual_seed(hash((loss_type, beta, clip_high)) % 2**31)
    B, T = 7, 9
    lp, old, ref, adv, mask = _inputs(g, B, T, empty_rows=(2,), spread=0.8)
    max_len = 11 if loss_type == "dr_grpo" else None
    # the tested function in float32 (what training uses), NaN-poisoned padding in every input
    poison = lambda x: torch.where(mask, x, torch.full_like(x, float("nan")))  # noqa: E731
    x = poison(lp).float().requires_grad_(True)
    loss, st = grpo_loss(x, poison(old).float(), poison(ref).float(), adv.float(), mask, clip_eps=0.2,
                         clip_eps_high=clip_high, beta=beta, loss_type=loss_type, max_completion_length=max_len)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    want, wst = _loss_ref(y, old, ref, adv, mask, 0.2, clip_high, beta, loss_type, max_len or T)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)
    assert (x.grad[~mask] == 0).all()
    assert st["tokens"] == wst["tokens"] == int(mask.sum())
    for k in ("kl", "clip_fraction", "ratio_mean"):
        assert st[k] == pytest.approx(wst[k], rel=1e-5, abs=1e-6), k
    assert 0 < st["clip_fraction"] < 1           # the inputs do reach the clip edges


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_without_reference_and_edge_cases(loss_type):
    g = torch.Generator().manual_seed(7)
    lp, old, ref, adv, mask = _inputs(g, 4, 5)
    a, sa = grpo_loss(lp, old, None, adv, mask, beta=0.0, loss_type=loss_type)
    b, sb = grpo_loss(lp, old, ref, adv, mask, beta=0.0, loss_type=loss_type)
    assert sa["kl"] is None and sb["kl"] is not None and sb["kl"] > 0
    torch.testing.assert_close(a, b)                         # beta 0: the reference does not enter the loss
    # on-policy (old == logprobs): ratio 1, nothing clipped, and the gradient is -A / normalizer per token
    x = lp.clone().requires_grad_(True)
    loss, st = grpo_loss(x, lp, None, adv, mask, beta=0.0, loss_type=loss_type)
    loss.backward()
    assert st["ratio_mean"] == pytest.approx(1.0) and st["clip_fraction"] == 0.0
    m = mask.double()
    norm = {"grpo": m.sum(1, keepdim=True) * 4, "dapo": m.sum(), "dr_grpo": torch.tensor(4.0 * 5)}[loss_type]
    torch.testing.assert_close(x.grad, -adv[:, None] * m / norm)
    # every row empty: loss 0, zero gradient, no NaN
    z = torch.zeros_like(mask)
    x = lp.clone().requires_grad_(True)
    loss, st = grpo_loss(x, old, ref, adv, z, loss_type=loss_type)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (x.grad == 0).all() and st["tokens"] == 0 and st["kl"] == 0.0
    # empty batch
    e = torch.zeros(0, 3)
    loss, _ = grpo_loss(e, e, e, torch.zeros(0), torch.zeros(0, 3, dtype=torch.bool), loss_type=loss_type)
    assert float(loss) == 0.0


def test_grpo_loss_bad_arguments():
    lp = torch.zeros(2, 3)
    adv, mask = torch.zeros(2), torch.ones(2, 3)
    cases = [
        (dict(old_logprobs=torch.zeros(2, 4)), "'old_logprobs' must have the shape of 'logprobs' (2, 3), got (2, 4)"),
        (dict(ref_logprobs=torch.zeros(3, 3)), "'ref_logprobs' must have the shape of 'logprobs' (2, 3), got (3, 3)"),
        (dict(advantages=torch.zeros(3)), "'advantages' must be a tensor [B] = (2,), got shape (3,)"),
        (dict(mask=torch.ones(2, 2)), "'mask' must be a tensor [B, T] = (2, 3), got shape (2, 2)"),
        (dict(mask=torch.full((2, 3), 2.0)), "'mask' must hold only 0 and 1"),
        (dict(logprobs=torch.zeros(2, 3, dtype=torch.long)), "'logprobs' must be a floating-point tensor [B, T]"),
        (dict(logprobs=torch.zeros(6)), "'logprobs' must be a floating-point tensor [B, T]"),
        (dict(ref_logprobs=None), "'ref_logprobs' is None but beta=0.04 > 0"),
        (dict(loss_type="ppo"), "'loss_type' must be one of 'grpo', 'dapo', 'dr_grpo', got 'ppo'"),
        (dict(beta=-0.1), "'beta' must be a finite float >= 0, got -0.1"),
        (dict(clip_eps=float("nan")), "'clip_eps' must be a finite float >= 0"),
        (dict(clip_eps_high=-1), "'clip_eps_high' must be None or a finite float >= 0"),
        (dict(loss_type="dr_grpo", max_completion_length=2), "'max_completion_length' must be an int >= T=3"),
    ]
    for kw, msg in cases:
        args = dict(logprobs=lp, old_logprobs=lp, ref_logprobs=lp, advantages=adv, mask=mask)
        args.update(kw)
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            grpo_loss(**args)


# ---------------------------------------------------------------------------------------------------------
# the trainer (micro model, no SFT)

def _micro(seed=0, fp8=True):
    from dsmoe.models import DeepseekV3ForCausalLM
    from dsmoe.train import preset_config

    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(preset_config("micro", 12), fp8=fp8)


def test_completion_logprobs_match_the_forward_pass():
    model = _micro().eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 12, (n,), generator=g).tolist() for n in (3, 5, 1)]
    comps = [torch.randint(0, 12, (n,), generator=g).tolist() for n in (4, 0, 2)]
    with torch.no_grad():
        lp, mask = completion_logprobs(model, prompts, comps, temperature=0.7)
        assert lp.shape == mask.shape == (3, 4) and mask.sum(1).tolist() == [4, 0, 2]
        for i, (p, c) in enumerate(zip(prompts, comps)):
            if not c:
                continue
            logits = model(torch.tensor([p + c])).logits[0].double() / 0.7
            want = torch.log_softmax(logits, -1)[len(p) - 1: len(p) - 1 + len(c)].gather(1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(lp[i, : len(c)].double(), want, rtol=1e-4, atol=1e-4)


def test_rollouts_with_a_fixed_seed_are_reproducible():
    model = _micro()
    calls = []
    reward = lambda p, c: calls.append(1) or float(len(c))   # noqa: E731
    tr = GRPOTrainer(model, reward, group_size=4, max_tokens=6, beta=0.0, seed=5)
    prompts = [[0, 3, 4], [0, 5, 6, 7]]
    a = tr.rollout(prompts, seed=11)
    b = tr.rollout(prompts[::-1], seed=11)                      # other batch order: same draws per position
    c = tr.rollout(prompts, seed=11)
    d = tr.rollout(prompts, seed=12)
    assert a.completion_ids == c.completion_ids and torch.equal(a.rewards, c.rewards)
    assert a.completion_ids != d.completion_ids
    assert len(a.completion_ids) == 8 and a.prompt_ids[:4] == [[0, 3, 4]] * 4 and a.prompt_ids[4] == [0, 5, 6, 7]
    assert b.prompt_ids[0] == [0, 5, 6, 7]
    # a trainer rebuilt from the same seed draws the same rollouts step after step
    tr2 = GRPOTrainer(_micro(), reward, group_size=4, max_tokens=6, beta=0.0, seed=5)
    tr3 = GRPOTrainer(_micro(), reward, group_size=4, max_tokens=6, beta=0.0, seed=5)
    assert tr2.rollout(prompts).completion_ids == tr3.rollout(prompts).completion_ids


def test_rollouts_see_the_updated_weights():
    model = _micro(fp8=False)
    tr = GRPOTrainer(model, lambda p, c: 0.0, group_size=2, max_tokens=4, beta=0.0, seed=0)
    before = tr.rollout([[0, 3]], temperature=0).completion_ids
    with torch.no_grad():
        # the final norm's weight 0: every logit is 0 and greedy picks token 0 at each step, if the engine
        # reads the module's current weights
        model.model.norm.weight.zero_()
    after = tr.rollout([[0, 3]], temperature=0).completion_ids
    assert after == [[0] * 4] * 2 and before != after


def test_grpo_trainer_learns_a_trivial_reward():
    """Reward: the fraction of completion tokens equal to 7. A few GRPO steps on the micro model (FP8 linears,
    reference KL on) must raise the mean reward well above chance (1/12)."""
    model = _micro(seed=1)
    reward = lambda p, c: sum(t == 7 for t in c) / 4   # noqa: E731
    tr = GRPOTrainer(model, reward, group_size=8, max_tokens=4, beta=0.04, lr=3e-3, seed=0, stop_token_ids=None)
    g = torch.Generator().manual_seed(2)
    held = [[0] + torch.randint(3, 12, (3,), generator=g).tolist() for _ in range(8)]
    before = tr.evaluate(held, n=4, seed=99)
    logs = tr.train(lambda i: [[0] + torch.randint(3, 12, (3,), generator=g).tolist() for _ in range(4)], 12,
                    progress=False)
    after = tr.evaluate(held, n=4, seed=99)
    assert len(logs) == 12 and all(math.isfinite(l["loss"]) for l in logs)
    assert logs[-1]["kl"] is not None and logs[-1]["kl"] > 0
    assert before < 0.25 and after > 0.5, (before, after)     # measured: 0.09 -> 0.80 (seed 1), 0.06 -> 0.72 (seed 2)


def test_grpo_trainer_num_iterations_clips_and_bad_arguments():
    model = _micro()
    reward = lambda p, c: float(c[0] == 5)   # noqa: E731
    tr = GRPOTrainer(model, reward, group_size=4, max_tokens=3, beta=0.0, lr=3e-2, num_iterations=3,
                     clip_eps=0.05, clip_eps_high=0.1, seed=0)
    assert tr.ref_model is None
    log = tr.step([[0, 3], [0, 4]])
    assert log["kl"] is None and math.isfinite(log["loss"])
    for kw, msg in [(dict(group_size=1), "'group_size' must be an int >= 2"),
                    (dict(loss_type="x"), "'loss_type' must be one of"),
                    (dict(beta=-1), "'beta' must be a finite float >= 0"),
                    (dict(temperature=0), "'temperature' must be a finite float > 0"),
                    (dict(num_iterations=0), "'num_iterations' must be an int >= 1")]:
        with pytest.raises(ValueError, match=msg):
            GRPOTrainer(model, reward, **kw)
    with pytest.raises(ValueError, match="'reward_funcs' must be a callable"):
        GRPOTrainer(model, [])
    with pytest.raises(TypeError, match="'model' must be a DeepseekV3ForCausalLM"):
        GRPOTrainer(torch.nn.Linear(2, 2), reward)
    bad = GRPOTrainer(model, lambda p, c: float("nan"), group_size=2, max_tokens=2, beta=0.0)
    with pytest.raises(ValueError, match="reward function '<lambda>' must return a finite float, got nan"):
        bad.rollout([[0, 3]])
    with pytest.raises(ValueError, match="'prompts' must be a non-empty list"):
        bad.rollout([])


# ---------------------------------------------------------------------------------------------------------
# `dsmoe rl`

def test_exact_answer_reward():
    from dsmoe.data import PermutedCopyTask
    from dsmoe.rl.demo import exact_answer_reward

    task = PermutedCopyTask(num_symbols=8, length=4, seed=3)
    s = task.sample(3, torch.Generator().manual_seed(0))
    r = exact_answer_reward(task)
    P = task.prompt_len()
    for row in s.tolist():
        assert r(row[:P], row[P:]) == 1.0                  # the answer then EOS
        assert r(row[:P], row[P:-1]) == 0.0                # no EOS
        assert r(row[:P], row[P:] + [1]) == 0.0            # something after EOS
        bad = list(row[P:])
        bad[1] = 3 + (bad[1] - 3 + 1) % 8
        assert r(row[:P], bad) == 0.0


@pytest.mark.timeout(600)
def test_dsmoe_rl_cli_micro_end_to_end(tmp_path, capsys):
    from dsmoe.__main__ import main

    out = tmp_path / "run"
    assert main(["rl", "--preset", "micro", "--steps", "2", "--sft-steps", "6", "--eval-prompts", "4", "--out", str(out),
                 "--no-progress", "--clip-eps-high", "0.28"]) == 0
    text = capsys.readouterr().out
    assert "held-out reward" in text and "wrote" in text
    s = json.load(open(out / "summary.json"))
    assert s["steps"] == 2 and len(s["history"]) == 2 and s["clip_eps_high"] == 0.28
    for k in ("reward_before", "reward_after", "reward_before_greedy", "reward_after_greedy"):
        assert 0.0 <= s[k] <= 1.0
    assert s["history"][0]["kl"] is not None
    assert s["train_prompts_distinct"] >= 1 and s["train_prompts_held_out_overlap"] == 0
    assert (out / "reward.png").stat().st_size > 1000
    ck = out / "checkpoint"
    assert (ck / "config.json").exists() and (ck / "dsmoe_task.json").exists() and (ck / "tokenizer.json").exists()
    # the checkpoint is the trained policy and starts a second run (no reference: beta 0)
    out2 = tmp_path / "run2"
    assert main(["rl", "--preset", "micro", "--from", str(ck), "--steps", "1", "--beta", "0", "--eval-prompts", "2",
                 "--out", str(out2), "--no-progress", "--loss-type", "dr_grpo", "--no-scale-rewards"]) == 0
    s2 = json.load(open(out2 / "summary.json"))
    assert s2["from"] == str(ck) and s2["sft_steps"] is None and s2["history"][0]["kl"] is None
    assert s2["task"] == s["task"]


@pytest.mark.parametrize("args, msg", [
    (["--group-size", "1"], "argument --group-size: expected an integer >= 2"),
    (["--loss-type", "ppo"], "argument --loss-type: invalid choice: 'ppo'"),
    (["--beta", "-1"], "argument --beta: expected a finite number >= 0, got -1"),
    (["--beta", "nan"], "argument --beta: expected a finite number >= 0, got nan"),
    (["--clip-eps-high", "x"], "argument --clip-eps-high: expected a number >= 0, got 'x'"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--from", "/nonexistent/ck"], "--from /nonexistent/ck: not a checkpoint folder (no config.json there)"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_dsmoe_rl_errors_are_one_line(capsys, tmp_path, args, msg):
    out = tmp_path / "o"
    assert _code(["rl", "--preset", "micro", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsmoe rl: error: ") and msg in err, err
    assert not out.exists()


def _code(argv) -> int:
    """`dsmoe` as a shell runs it: argparse's errors exit, the rest return a status."""
    from dsmoe.__main__ import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_dsmoe_rl_refuses_an_out_file_and_from_with_sft_steps(capsys, tmp_path):
    main = _code
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["rl", "--preset", "micro", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a folder" in err
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    assert main(["rl", "--preset", "micro", "--from", str(ck), "--sft-steps", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sft-steps: the warm start is skipped with --from" in err


# ---------------------------------------------------------------------------------------------------------
# what one trainer step feeds the loss

def test_completion_logprobs_align_with_the_engine_and_check_arguments():
    """The sampler's own per-token log-probabilities (the engine's decode path, temperature 1) are what the
    training forward assigns to the same tokens: a shift by one position would give unrelated numbers."""
    from dsmoe.serve import LLM, SamplingParams

    model = _micro(seed=4, fp8=False).eval()
    eng = LLM(model, max_num_seqs=4, enable_prefix_caching=False, seed=0)
    prompts = [[0, 3, 4], [0, 5, 6, 7, 8], [2]]
    outs = eng.generate(prompts, [SamplingParams(max_tokens=6, temperature=1.0, seed=s, logprobs=0, ignore_eos=True)
                                  for s in (1, 2, 3)])
    comps = [o.outputs[0].token_ids for o in outs]
    want = [[e[0] for e in o.outputs[0].logprobs] for o in outs]
    with torch.no_grad():
        lp, mask = completion_logprobs(model, prompts, comps)
    for i, c in enumerate(comps):
        assert len(c) == 6 and mask[i].all()
        torch.testing.assert_close(lp[i].double(), torch.tensor(want[i], dtype=torch.float64), rtol=0, atol=3e-2)
    with pytest.raises(ValueError, match="'prompt_ids' must hold non-empty prompts, got an empty prompt at index 1"):
        completion_logprobs(model, [[0], []], [[1], [2]])
    with pytest.raises(ValueError, match=r"'completion_ids' must have one completion per prompt \(2\), got 1"):
        completion_logprobs(model, [[0], [1]], [[1]])
    with pytest.raises(ValueError, match=r"'width' must be an int >= the longest completion \(2\), got 1"):
        completion_logprobs(model, [[0]], [[1, 2]], width=1)


def test_step_fixes_old_and_reference_logprobs_once_per_rollout(monkeypatch):
    """num_iterations > 1: the old log-probabilities are those of the sampling weights, computed once before the
    first update (so the first ratio is 1 and later ones move); the reference is the frozen starting model; the
    sampling temperature is the one the log-probabilities use; the expert bias moves every optimizer step."""
    import copy

    import dsmoe.rl.trainer as T

    model = _micro(seed=3)
    start = copy.deepcopy(model).eval()
    reward = lambda p, c: float(sum(t == 5 for t in c))   # noqa: E731
    tr = GRPOTrainer(model, reward, group_size=4, max_tokens=4, beta=0.1, lr=1e-2, num_iterations=3, seed=1,
                     temperature=0.7, stop_token_ids=None)
    calls, rollouts = [], []
    real_loss, real_rollout = T.grpo_loss, tr.rollout

    def spy_loss(lp, old, ref, adv, mask, **kw):
        out = real_loss(lp, old, ref, adv, mask, **kw)
        calls.append((lp.detach().clone(), old.clone(), ref.clone(), adv.clone(), mask.clone(), out[1]))
        return out

    def spy_rollout(*a, **kw):
        ro = real_rollout(*a, **kw)
        rollouts.append(ro)
        return ro

    monkeypatch.setattr(T, "grpo_loss", spy_loss)
    monkeypatch.setattr(tr, "rollout", spy_rollout)
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    ref_params = [p.detach().clone() for p in tr.ref_model.parameters()]
    tr.step([[0, 3, 4], [0, 6]])
    assert len(calls) == 3 and len(rollouts) == 1
    ro = rollouts[0]
    assert ro.rewards.std() > 0          # seeded: the rollout has a reward signal, so the policy moves
    with torch.no_grad():
        want, mask = completion_logprobs(start, ro.prompt_ids, ro.completion_ids, temperature=0.7)
    for lp, old, ref, adv, m, _ in calls:
        assert torch.equal(m, mask)
        torch.testing.assert_close(old, want, rtol=0, atol=1e-5)           # the sampling weights, at T = 0.7
        torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)           # the frozen start
        torch.testing.assert_close(adv, group_advantages(ro.rewards, 4))
    torch.testing.assert_close(calls[0][0], calls[0][1], rtol=0, atol=1e-5)
    assert calls[0][5]["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and calls[0][5]["clip_fraction"] == 0.0
    assert (calls[2][0] - calls[2][1])[mask].abs().max() > 1e-3             # the policy moved off the sampler
    assert all(torch.equal(a, b) for a, b in zip(ref_params, tr.ref_model.parameters()))
    assert not any(p.requires_grad for p in tr.ref_model.parameters())
    assert any(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(biases, model.moe_layers()))


def test_demo_training_prompts_never_include_held_out_ones():
    from dsmoe.data import PermutedCopyTask
    from dsmoe.rl.demo import _prompts

    task = PermutedCopyTask(num_symbols=2, length=3, seed=0)          # 8 distinct prompts in all
    held = _prompts(task, 6, torch.Generator().manual_seed(0))
    held_set = {tuple(p) for p in held}
    assert 1 < len(held_set) < 8
    got = _prompts(task, 50, torch.Generator().manual_seed(1), exclude=held_set)
    assert len(got) == 50 and all(len(p) == task.prompt_len() for p in got)
    assert not {tuple(p) for p in got} & held_set
    everything = {tuple(p) for p in _prompts(task, 400, torch.Generator().manual_seed(2))}
    assert len(everything) == 8
    with pytest.raises(ValueError, match="held-out prompts cover all 2\\^3 sources"):
        _prompts(task, 1, torch.Generator().manual_seed(3), exclude=everything)
