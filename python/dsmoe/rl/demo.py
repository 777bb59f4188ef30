"""``dsmoe rl``: GRPO on a partly trained model of the permuted-copy task (``dsmoe.data``), R1-Zero style.

The starting point is the ``dsmoe train`` preset stopped early (``--sft-steps``; R1-Zero starts from a base
model, not from a solved task) or a checkpoint (``--from``). The verifiable reward is 1 when the completion
is exactly the permuted source followed by EOS, else 0. The run reports the mean reward on held-out prompts
before and after (sampled at temperature 1, the quantity GRPO maximizes, and greedy), and writes
``reward.png`` (reward and KL per step), ``checkpoint/`` and ``summary.json``.

    dsmoe rl --preset tiny                     # supervised warm start in-process, then GRPO
    dsmoe rl --preset tiny --from runs/tiny/checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["RL_PRESETS", "exact_answer_reward", "main", "run_demo"]

RL_PRESETS = {
    # SFT stopped early: the tiny model then answers some held-out prompts exactly, not most (measured in docs/rl.md)
    "tiny": dict(sft_preset="tiny", sft_steps=90, steps=40, prompts=8, group_size=8, lr=4e-4, beta=0.04,
                 eval_prompts=64, eval_samples=4),
    "micro": dict(sft_preset="micro", sft_steps=15, steps=4, prompts=4, group_size=4, lr=1e-3, beta=0.04,
                  eval_prompts=8, eval_samples=2),
}

TASK_FILE = "dsmoe_task.json"
OUT_FILES = ("reward.png", "summary.json")
OUT_DIRS = ("checkpoint",)


def exact_answer_reward(task):
    """``(prompt ids, completion ids) -> 1.0`` when the completion is the permuted source then EOS, else 0.0."""
    from ..data import _FIRST, EOS

    perm = task.perm.tolist()

    def exact_answer(prompt, completion) -> float:
        src = prompt[1: 1 + task.length]
        want = [perm[t - _FIRST] + _FIRST for t in src] + [EOS]
        return float(list(completion) == want)
    return exact_answer


def _prompts(task, n, gen, exclude=None):
    """``n`` prompts of ``task``; none of them in ``exclude`` (a set of tuples), so that a held-out prompt never
    reaches training even where the task has few distinct sources (the micro preset: 8^4)."""
    if exclude and len(exclude) >= task.num_symbols ** task.length:
        raise ValueError(f"the {len(exclude)} held-out prompts cover all {task.num_symbols}^{task.length} sources of "
                         f"the task: none is left to train on (fewer --eval-prompts)")
    out = []
    while len(out) < n:
        out += [p for p in (s[: task.prompt_len()].tolist() for s in task.sample(n - len(out), gen))
                if exclude is None or tuple(p) not in exclude]
    return out


def _load_task(path, preset, seed):
    from ..data import PermutedCopyTask
    from ..train import PRESETS

    p = os.path.join(path, TASK_FILE)
    if os.path.exists(p):
        with open(p) as f:
            d = json.load(f)
        return PermutedCopyTask(num_symbols=d["num_symbols"], length=d["length"], seed=d["seed"])
    # a `dsmoe train` checkpoint: its task is the preset's, its permutation comes from the training seed
    t = PRESETS[preset]["task"]
    return PermutedCopyTask(num_symbols=t["num_symbols"], length=t["length"], seed=seed)


def run_demo(preset="tiny", *, from_checkpoint=None, sft_steps=None, steps=None, prompts=None, group_size=None,
             lr=None, beta=None, loss_type="grpo", num_iterations=1, clip_eps=0.2, clip_eps_high=None,
             scale_rewards=True, seed=0, device="cpu", fp8=True, progress=True, eval_prompts=None):
    """The demo without the file output; returns ``(trainer, task, summary)``."""
    from ..models import DeepseekV3ForCausalLM
    from ..train import train
    from .trainer import GRPOTrainer

    P = dict(RL_PRESETS[preset])
    for k, v in (("sft_steps", sft_steps), ("steps", steps), ("prompts", prompts), ("group_size", group_size),
                 ("lr", lr), ("beta", beta), ("eval_prompts", eval_prompts)):
        if v is not None:
            P[k] = v
    t0 = time.time()
    if from_checkpoint is not None:
        task = _load_task(from_checkpoint, P["sft_preset"], seed)
        model = DeepseekV3ForCausalLM.from_pretrained(from_checkpoint, fp8=fp8, device=device)
        if model.config.vocab_size != task.vocab_size:
            from .._cli import CLIError
            raise CLIError(f"--from {from_checkpoint}: vocab_size {model.config.vocab_size} is not the permuted-copy "
                           f"task's {task.vocab_size} ({task.num_symbols} symbols + 3); dsmoe rl trains checkpoints "
                           f"of `dsmoe train` / `dsmoe rl`")
        sft_s = 0.0
    else:
        model, task, _ = train(P["sft_preset"], fp8=fp8, steps=P["sft_steps"], device=device, seed=seed,
                               progress=progress, label=" [warm start]")
        sft_s = time.time() - t0
    model.eval()
    reward = exact_answer_reward(task)
    tr = GRPOTrainer(model, reward, group_size=P["group_size"], beta=P["beta"], lr=P["lr"], loss_type=loss_type,
                     num_iterations=num_iterations, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                     scale_rewards=scale_rewards, max_tokens=task.length + 1, seed=seed,
                     max_num_seqs=max(P["prompts"] * P["group_size"], P["eval_prompts"] * P["eval_samples"]))
    # held-out prompts from their own generator; training prompts from another, the held-out ones excluded
    held = _prompts(task, P["eval_prompts"], torch.Generator().manual_seed(10_000 + seed))
    held_set = {tuple(p) for p in held}
    if len(held_set) >= task.num_symbols ** task.length:
        from .._cli import CLIError
        raise CLIError(f"--eval-prompts {P['eval_prompts']}: the held-out prompts cover all {task.num_symbols}^"
                       f"{task.length} sources of the task, none is left to train on")
    gen = torch.Generator().manual_seed(20_000 + seed)

    def evaluate():
        return (tr.evaluate(held, n=P["eval_samples"], temperature=1.0, seed=30_000 + seed),
                tr.evaluate(held, n=1, temperature=0.0))
    before, before_greedy = evaluate()
    t1 = time.time()
    seen = set()

    def train_prompts(i):
        ps = _prompts(task, P["prompts"], gen, exclude=held_set)
        seen.update(tuple(p) for p in ps)
        return ps
    hist = tr.train(train_prompts, P["steps"], progress=progress,
                    desc=f"grpo {preset} ({'fp8' if fp8 else 'bf16'})")
    rl_s = time.time() - t1
    after, after_greedy = evaluate()
    summary = {"preset": preset, "device": str(device), "fp8": fp8, "from": from_checkpoint,
               "sft_steps": None if from_checkpoint else P["sft_steps"], "steps": len(hist),
               "prompts_per_step": P["prompts"], "group_size": P["group_size"], "lr": P["lr"], "beta": P["beta"],
               "loss_type": loss_type, "num_iterations": num_iterations, "clip_eps": clip_eps,
               "clip_eps_high": clip_eps_high, "scale_rewards": scale_rewards, "seed": seed,
               "task": {"name": "permuted_copy", "num_symbols": task.num_symbols, "length": task.length,
                        "seed": task.seed},
               "reward": "exact_answer (1 if the completion is the permuted source then EOS, else 0)",
               "eval_prompts": P["eval_prompts"], "eval_samples_per_prompt": P["eval_samples"],
               "train_prompts_distinct": len(seen), "train_prompts_held_out_overlap": len(seen & held_set),
               "reward_before": before, "reward_after": after,
               "reward_before_greedy": before_greedy, "reward_after_greedy": after_greedy,
               "sft_s": round(sft_s, 1), "rl_s": round(rl_s, 1), "history": hist}
    return tr, task, summary


def _plot(summary, path):
    try:
        import matplotlib
    except ImportError:
        print("dsmoe rl: warning: matplotlib is not installed (pip install 'dsmoe[rl]'): no reward.png",
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    h = summary["history"]
    x = [r["step"] for r in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(x, [r["reward"] for r in h], lw=1, label="rollout reward (mean of the step's completions)")
    n = summary["steps"]
    a.scatter([0, max(n - 1, 0)], [summary["reward_before"], summary["reward_after"]], color="k", zorder=3,
              label=f"held-out reward, T=1 ({summary['reward_before']:.3f} -> {summary['reward_after']:.3f})")
    a.set_ylim(0, 1.02), a.set_xlabel("GRPO step"), a.set_ylabel("reward"), a.legend(fontsize=8)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_title("dsmoe rl: exact-answer reward")
    kl = [r["kl"] for r in h]
    if any(k is not None for k in kl):
        b.plot(x, [float("nan") if k is None else k for k in kl], lw=1, color="C1")
        b.set_title(f"KL to the reference (k3, beta={summary['beta']})")
    else:
        b.set_title("KL: no reference (beta = 0)")
    b.set_xlabel("GRPO step"), b.set_ylabel("mean per-token KL")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _parser():
    from .._cli import ArgumentParser, positive_float, positive_int, seed_int
    from .loss import LOSS_TYPES

    def nonneg_float(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
        if not (v >= 0 and v != float("inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
        return v

    def group(s):
        v = positive_int(s)
        if v < 2:
            raise argparse.ArgumentTypeError(f"expected an integer >= 2 (a group compares completions), got {v}")
        return v

    p = ArgumentParser(prog="dsmoe rl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(RL_PRESETS))
    p.add_argument("--from", dest="from_checkpoint", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint (of `dsmoe train` or `dsmoe rl`) instead of the warm-start run")
    p.add_argument("--sft-steps", type=positive_int, default=None, help="warm-start (supervised) steps (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None, help="GRPO steps (default: the preset's)")
    p.add_argument("--prompts", type=positive_int, default=None, help="prompts per GRPO step (default: the preset's)")
    p.add_argument("--group-size", type=group, default=None, help="completions per prompt, G (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate (default: the preset's)")
    p.add_argument("--beta", type=nonneg_float, default=None, help="KL weight; 0 keeps no reference model")
    p.add_argument("--loss-type", default="grpo", choices=LOSS_TYPES)
    p.add_argument("--num-iterations", type=positive_int, default=1, help="optimizer steps per rollout (default 1)")
    p.add_argument("--clip-eps", type=nonneg_float, default=0.2)
    p.add_argument("--clip-eps-high", type=nonneg_float, default=None, help="upper clip (default: --clip-eps)")
    p.add_argument("--no-scale-rewards", action="store_true", help="advantages r - mean (Dr. GRPO), no std division")
    p.add_argument("--eval-prompts", type=positive_int, default=None, help="held-out prompts (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a usable GPU, else cpu)")
    p.add_argument("--out", default=None, help="output folder (default: runs/rl-<preset>); written when the run ends")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--bf16", "--no-fp8", dest="bf16", action="store_true", help="train without FP8 linears")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """`dsmoe rl`: a user error is one line on stderr and exit status 2 (1: the device is unusable here)."""
    from .._cli import run

    return run("dsmoe rl", _main, argv)


def _main(argv):
    from .._cli import UNAVAILABLE, CLIError, check_out_dir, resolve_device

    a = _parser().parse_args(argv)
    if a.from_checkpoint is not None and not os.path.isfile(os.path.join(a.from_checkpoint, "config.json")):
        raise CLIError(f"--from {a.from_checkpoint}: not a checkpoint folder (no config.json there)")
    if a.from_checkpoint is not None and a.sft_steps is not None:
        raise CLIError("--sft-steps: the warm start is skipped with --from; give one of them")
    dev = str(resolve_device(a.device, "dsmoe rl"))
    out_dir = check_out_dir(a.out if a.out is not None else os.path.join("runs", f"rl-{a.preset}"), "--out",
                            files=OUT_FILES, dirs=OUT_DIRS)
    if "OMP_NUM_THREADS" not in os.environ and dev == "cpu":
        # NOTE: one thread unless the user says otherwise: the tiny model's matrices are too small to gain from
        # intra-op threads, and on a shared 2-core machine 2 threads made a warm-start step 5-17x slower
        # (10-33 s vs 1.9-6 s, measured) as each op waits for a descheduled peer thread
        torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    tr, task, s = run_demo(a.preset, from_checkpoint=a.from_checkpoint, sft_steps=a.sft_steps, steps=a.steps,
                           prompts=a.prompts, group_size=a.group_size, lr=a.lr, beta=a.beta, loss_type=a.loss_type,
                           num_iterations=a.num_iterations, clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high,
                           scale_rewards=not a.no_scale_rewards, seed=a.seed, device=dev, fp8=not a.bf16,
                           progress=not a.no_progress, eval_prompts=a.eval_prompts)
    try:
        os.makedirs(out_dir, exist_ok=True)
        ck = os.path.join(out_dir, "checkpoint")
        tr.model.save_pretrained(ck)
        from ..tokenizer import save_task_tokenizer
        save_task_tokenizer(task, ck)
        with open(os.path.join(ck, TASK_FILE), "w") as f:
            json.dump(s["task"], f)
        plotted = _plot(s, os.path.join(out_dir, "reward.png"))
        s["wall_s"] = round(time.time() - t0, 1)
        # CPU seconds of this process (all threads): on a shared machine, the wall time of an idle one
        # with a single thread is close to this
        s["cpu_s"] = round(time.process_time() - c0, 1)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(s, f)
    except OSError as e:
        raise CLIError(f"--out {out_dir}: writing the results failed ({e})", UNAVAILABLE) from None
    n, k = s["eval_prompts"], s["eval_samples_per_prompt"]
    print(f"task: permuted copy, {task.num_symbols} symbols, length {task.length}; reward 1 for the exact answer + EOS")
    start = f"--from {a.from_checkpoint}" if a.from_checkpoint else f"{s['sft_steps']} supervised steps ({s['sft_s']} s)"
    print(f"start: {start}; GRPO: {s['steps']} steps x {s['prompts_per_step']} prompts x G={s['group_size']} "
          f"({s['rl_s']} s), loss {s['loss_type']}, beta {s['beta']}")
    print(f"held-out reward ({n} prompts x {k} samples, T=1): {s['reward_before']:.3f} -> {s['reward_after']:.3f}")
    print(f"held-out reward ({n} prompts, greedy)        : {s['reward_before_greedy']:.3f} -> {s['reward_after_greedy']:.3f}")
    last = s["history"][-1] if s["history"] else {}
    if last.get("kl") is not None:
        print(f"final KL to the reference: {last['kl']:.4f}")
    wrote = ([f"{out_dir}/reward.png"] if plotted else []) + [f"{out_dir}/checkpoint/", f"{out_dir}/summary.json"]
    print(f"wrote {', '.join(wrote)} [{s['wall_s']} s wall, {s['cpu_s']} s CPU]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
