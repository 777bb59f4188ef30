"""``dsmoe train``: trains a small DeepSeek-V3 (MLA + grouped MoE + MTP + FP8 linears) on the synthetic
permuted-copy task (``dsmoe.data``), then writes a loss curve, an expert-load plot and an HF-format
checkpoint, and prints a greedy sample and the task accuracy.

    dsmoe train --preset tiny                 # FP8 linears (CPU: references, GPU: kernels)
    dsmoe train --preset tiny --bf16          # same without FP8
    dsmoe train --preset tiny --compare       # FP8 and BF16 runs from the same seed; relative loss gap
    torchrun --nproc-per-node 4 -m dsmoe train --preset tiny --pp 4     # DualPipe over 4 processes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

__all__ = ["main", "PRESETS", "preset_config", "train", "make_optimizer"]

PRESETS = {
    # ~0.6M parameters; a couple of minutes on a 2-core CPU.
    # NOTE: bias_update_speed 1e-2, not V3's 1e-3: V3's gamma is tuned for a run of ~10^5 steps; in a 150-step
    # demo 1e-3 moves a bias by at most 0.15 and the load stays ~1.9x its mean (measured), while 1e-2
    # brings it to ~1.3x with the same final loss and accuracy.
    "tiny": dict(model=dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                            n_group=2, topk_group=2, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=64,
                            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=1,
                            max_position_embeddings=64, routed_scaling_factor=2.5, bias_update_speed=1e-2,
                            aux_loss_alpha=1e-4, mtp_loss_weight=0.3),
                 task=dict(num_symbols=32, length=12), steps=150, batch=32, lr=3e-3, warmup=15),
    # for quick checks and tests
    "micro": dict(model=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                             n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=1,
                             max_position_embeddings=64),
                  task=dict(num_symbols=8, length=4), steps=40, batch=16, lr=3e-3, warmup=5),
}


def preset_config(name: str, vocab_size: int):
    from .models import DeepseekV3Config
    return DeepseekV3Config(vocab_size=vocab_size, **PRESETS[name]["model"])


def _lr(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr: float, weight_decay: float = 0.01):
    """AdamW (betas 0.9/0.95) with weight decay on the matrices only (not embeddings, norms, biases); shared
    by ``dsmoe train`` and ``dsmoe.rl``."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def train(preset: str = "tiny", *, fp8: bool = True, steps: int | None = None, device: str = "cpu", seed: int = 0,
          progress: bool = True, batch: int | None = None, lr: float | None = None, label: str = ""):
    """Trains one model; returns ``(model, task, history)`` with per-step losses and expert loads."""
    from .data import PermutedCopyTask
    from .models import DeepseekV3ForCausalLM

    P = PRESETS[preset]
    steps = P["steps"] if steps is None else steps
    batch = P["batch"] if batch is None else batch
    lr = P["lr"] if lr is None else lr
    task = PermutedCopyTask(**P["task"], seed=seed)
    torch.manual_seed(seed)
    cfg = preset_config(preset, task.vocab_size)
    dev = torch.device(device)
    model = DeepseekV3ForCausalLM(cfg, fp8=fp8).to(dev).train()
    opt = make_optimizer(model, lr)
    gen = torch.Generator().manual_seed(seed + 1)
    hist = {"loss": [], "lm_loss": [], "mtp_loss": [], "aux_loss": [], "load": [], "fp8": fp8}
    it = range(steps)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(it, desc=f"train {preset}{label} ({'fp8' if fp8 else 'bf16'})", dynamic_ncols=True)
        it = bar
    for step in it:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, P["warmup"])
        x, y = task.batch(batch, gen)
        out = model(x.to(dev), labels=y.to(dev))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loads = model.update_expert_bias()          # aux-loss-free balancing, once per step
        hist["loss"].append(out.loss.item())
        hist["lm_loss"].append(out.lm_loss.item())
        hist["mtp_loss"].append(out.mtp_loss.item() if out.mtp_loss is not None else float("nan"))
        hist["aux_loss"].append(out.aux_loss.item() if out.aux_loss is not None else 0.0)
        hist["load"].append(loads.cpu().tolist())
        if bar is not None:
            bar.set_postfix(loss=f"{out.lm_loss.item():.3f}", floor=f"{task.loss_floor:.3f}")
    return model.eval(), task, hist


def train_pipeline(preset: str = "tiny", *, pp: int, schedule: str = "dualpipe", num_chunks: int | None = None,
                   fp8: bool = True, steps: int | None = None, seed: int = 0, progress: bool = True,
                   batch: int | None = None, lr: float | None = None, ep: int = 1):
    """``train`` with the model cut into pipeline stages over the ``pp`` processes of the default group
    (torchrun; gloo on CPU). Every rank draws the same batches and builds the same model; each runs its
    stages' compute, the gradients are summed over the ranks (:func:`dsmoe.parallel.pipeline.model.sync_grads`)
    and the optimizer step is replicated, so every rank ends with the model the single-process run
    would have (up to the order of floating-point sums). ``ep > 1``: ``pp * ep`` processes, global rank
    ``e * pp + p`` is pipeline rank p of replica e; each replica takes ``1/ep`` of the batch and the
    routed experts of the main layers are split over the replicas (the MTP module's are not).
    Returns ``(model, task, history)`` on every rank."""
    import torch.distributed as dist

    from .data import PermutedCopyTask
    from .models import DeepseekV3ForCausalLM
    from .parallel import pipeline as pl
    from .parallel.pipeline.model import lm_criterion, split_stages, sync_grads

    P = PRESETS[preset]
    steps = P["steps"] if steps is None else steps
    batch = P["batch"] if batch is None else batch
    lr = P["lr"] if lr is None else lr
    n_chunks = num_chunks or 2 * pp
    grank = dist.get_rank()
    if dist.get_world_size() != pp * ep:
        raise ValueError(f"train_pipeline: --pp {pp} --ep {ep} needs {pp * ep} processes, torchrun started "
                         f"{dist.get_world_size()}")
    if batch % (n_chunks * ep):
        raise ValueError(f"train_pipeline: --batch {batch} must be a multiple of micro-batches x expert-parallel "
                         f"replicas = {n_chunks} x {ep}")
    e_rank, rank = divmod(grank, pp)
    pipe_group = ep_group = None
    if ep > 1:
        # every process creates every group, in the same order
        pipe_groups = [dist.new_group([r * pp + q for q in range(pp)]) for r in range(ep)]
        ep_groups = [dist.new_group([r * pp + q for r in range(ep)]) for q in range(pp)]
        pipe_group, ep_group = pipe_groups[e_rank], ep_groups[rank]
    task = PermutedCopyTask(**P["task"], seed=seed)
    torch.manual_seed(seed)
    cfg = preset_config(preset, task.vocab_size)
    model = DeepseekV3ForCausalLM(cfg, fp8=fp8).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    n_stages = 2 * pp if schedule == "dualpipev" else pp
    held = {"dualpipe": (rank, pp - 1 - rank), "dualpipev": (rank, 2 * pp - 1 - rank), "1f1b": (rank,)}[schedule]
    links = moes = ()
    if ep > 1:
        stages, links, moes = split_stages(model, n_stages, aux_scale=1.0 / (n_chunks * ep), ep_group=ep_group,
                                           held=held, fp8=fp8)
    else:
        stages = split_stages(model, n_stages, aux_scale=1.0 / n_chunks)
    mods = tuple(stages[s] for s in held)
    if schedule == "dualpipe":
        pipe = pl.DualPipe(mods, process_group=pipe_group)
    elif schedule == "dualpipev":
        pipe = pl.DualPipeV(mods, process_group=pipe_group)
    else:
        pipe = pl.OneFOneB(mods[0], process_group=pipe_group)
    mb = batch // (n_chunks * ep)
    pl.set_p2p_tensor_shapes([(mb, task.seq_len, cfg.hidden_size), (mb, task.seq_len)])
    pl.set_p2p_tensor_dtype(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    hist = {"loss": [], "lm_loss": [], "mtp_loss": [], "aux_loss": [], "load": [], "fp8": fp8}
    it = range(steps)
    bar = None
    if progress and grank == 0:
        from tqdm import tqdm
        bar = tqdm(it, desc=f"train {preset} pp={pp} ep={ep} {schedule} ({'fp8' if fp8 else 'bf16'})", dynamic_ncols=True)
        it = bar
    first, last = rank == 0, rank == pp - 1
    for step in it:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, P["warmup"])
        x, y = task.batch(batch, gen)
        if ep > 1:                            # this replica's share of the batch
            x, y = x.chunk(ep)[e_rank], y.chunk(ep)[e_rank]
        xf = x.float()
        record = []
        crit = lm_criterion(cfg, n_chunks * ep, record)
        for s in stages:
            s.aux_total = 0.0
            if s.head is not None:
                s.head.aux_total = 0.0
        opt.zero_grad(set_to_none=True)
        if schedule == "dualpipe":
            half = x.shape[0] // 2
            inp = (xf[:half],) if first else (xf[half:],) if last else ()
            lab = (y[half:],) if first else (y[:half],) if last else ()
        elif schedule == "dualpipev":
            inp, lab = ((xf,), (y,)) if first else ((), ())
        else:
            inp, lab = ((xf,) if first else ()), ((y,) if last else ())
        pipe.step(*inp, num_chunks=n_chunks, criterion=crit, labels=lab)
        sync_grads(model, links=links, moes=moes)
        aux = sum(s.aux_total for s in set(pipe.module)) + sum(s.head.aux_total for s in set(pipe.module) if s.head is not None)
        sums = torch.tensor([sum(r[0] for r in record), sum(r[1] for r in record), aux, len(record)], dtype=torch.float64)
        dist.all_reduce(sums)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loads = model.update_expert_bias()
        lm_l, mtp_l, aux_l = (sums[0] / sums[3]).item(), (sums[1] / sums[3]).item(), sums[2].item()
        hist["loss"].append(lm_l + cfg.mtp_loss_weight * mtp_l + aux_l)
        hist["lm_loss"].append(lm_l)
        hist["mtp_loss"].append(mtp_l)
        hist["aux_loss"].append(aux_l)
        hist["load"].append(loads.cpu().tolist())
        if bar is not None:
            bar.set_postfix(loss=f"{lm_l:.3f}", floor=f"{task.loss_floor:.3f}")
    return model.eval(), task, hist


@torch.no_grad()
def evaluate(model, task, n: int = 128, seed: int = 12345):
    dev = model.lm_head.weight.device
    seqs = task.sample(n, torch.Generator().manual_seed(seed)).to(dev)
    out = model(seqs, labels=seqs)          # labels unshifted: the model shifts (HF convention)
    gen = model.generate(seqs[:, : task.prompt_len()], task.length, use_cache=False)
    acc, exact = task.accuracy(gen.cpu(), seqs.cpu())
    return {"eval_lm_loss": out.lm_loss.item(), "eval_mtp_loss": out.mtp_loss.item() if out.mtp_loss is not None else None,
            "accuracy": acc, "exact_match": exact, "sample": task.decode(gen[0].cpu()),
            "sample_target": task.decode(seqs[0, : task.prompt_len() + task.length].cpu())}


def _plots(hist, task, out_dir, other=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(hist["lm_loss"], label=f"LM loss ({'FP8' if hist['fp8'] else 'BF16'})", lw=1)
    if not all(math.isnan(v) for v in hist["mtp_loss"]):
        ax.plot(hist["mtp_loss"], label="MTP loss (depth 1)", lw=1, alpha=0.7)
    if other is not None:
        ax.plot(other["lm_loss"], label=f"LM loss ({'FP8' if other['fp8'] else 'BF16'})", lw=1, alpha=0.7)
    ax.axhline(task.loss_floor, color="k", ls="--", lw=1, label=f"LM loss floor {task.loss_floor:.3f}")
    ax.axhline(task.mtp_loss_floor, color="gray", ls=":", lw=1, label=f"MTP loss floor {task.mtp_loss_floor:.3f}")
    ax.set_xlabel("step"), ax.set_ylabel("cross entropy (nats)"), ax.set_ylim(0, None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(), ax.set_title("dsmoe train: permuted-copy task")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)

    load = torch.tensor(hist["load"])              # [steps, moe_layers, E]
    if load.numel():
        frac = load / load.sum(-1, keepdim=True).clamp(min=1)
        L = frac.shape[1]
        fig, axes = plt.subplots(1, L + 1, figsize=(5 * (L + 1), 3.6))
        axes = list(axes) if L + 1 > 1 else [axes]
        for i in range(L):
            im = axes[i].imshow(frac[:, i].T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            axes[i].set_title(f"MoE layer {i}: token share per expert"), axes[i].set_xlabel("step")
            axes[i].set_ylabel("expert")
            axes[i].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[i].yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=axes[i])
        E = frac.shape[-1]
        imb = (load.max(-1).values / load.float().mean(-1).clamp(min=1e-9))   # max/mean per step and layer
        for i in range(L):
            axes[L].plot(imb[:, i].numpy(), label=f"layer {i}", lw=1)
        axes[L].axhline(1.0, color="k", ls="--", lw=1)
        axes[L].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[L].set_title(f"max/mean expert load ({E} experts)"), axes[L].set_xlabel("step"), axes[L].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=120)
        plt.close(fig)


def loss_gap(h_fp8, h_bf16, last: int) -> float:
    """Relative gap of the mean LM loss over the last ``last`` steps: ``(L_fp8 - L_bf16) / L_bf16``."""
    a = sum(h_fp8["lm_loss"][-last:]) / last
    b = sum(h_bf16["lm_loss"][-last:]) / last
    return (a - b) / b


# what main() writes into --out (checked before training, written after it)
OUT_FILES = ("loss.png", "expert_load.png", "summary.json")
OUT_DIRS = ("checkpoint",)
EVAL_SEQUENCES = 128
FINAL_WINDOW = 20


def _parser():
    from ._cli import ArgumentParser, positive_float, positive_int, seed_int

    p = ArgumentParser(prog="dsmoe train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch", type=positive_int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a usable GPU, else cpu)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>); created when the run ends")
    p.add_argument("--seed", type=seed_int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bf16", "--no-fp8", dest="bf16", action="store_true", help="train without FP8 linears")
    g.add_argument("--compare", action="store_true", help="train FP8 and BF16 from the same seed and report the loss gap")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pp", type=positive_int, default=1,
                   help="pipeline-parallel processes (launch with torchrun --nproc-per-node PP); see docs/pipeline.md")
    p.add_argument("--pp-schedule", default="dualpipe", choices=["dualpipe", "dualpipev", "1f1b"])
    p.add_argument("--chunks", type=positive_int, default=None, help="micro-batches per step with --pp (default 2*PP)")
    p.add_argument("--ep", type=positive_int, default=1,
                   help="with --pp: expert-parallel replicas (torchrun starts PP*EP processes)")
    return p


def _mean_last(values, n: int) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> int:
    """`dsmoe train`: a user error is one line on stderr and exit status 2 (1: the device is unusable here);
    every argument, the device and --out are checked before training, and --out is written only at the end."""
    from ._cli import run

    return run("dsmoe train", _main, argv)


def _main(argv):
    from ._cli import UNAVAILABLE, CLIError, check_out_dir, resolve_device

    a = _parser().parse_args(argv)
    dev = str(resolve_device(a.device, "dsmoe train"))
    out_dir = check_out_dir(a.out if a.out is not None else os.path.join("runs", a.preset), "--out",
                            files=OUT_FILES, dirs=OUT_DIRS)
    if "OMP_NUM_THREADS" not in os.environ:  # the user's (or a shared machine's) thread limit wins
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    kw = dict(steps=a.steps, device=dev, seed=a.seed, progress=not a.no_progress, batch=a.batch, lr=a.lr)
    if a.pp > 1 or a.ep > 1:
        return _main_pipeline(a, out_dir, t0)
    model, task, hist = train(a.preset, fp8=not a.bf16, **kw)
    other = None
    n_steps = len(hist["lm_loss"])
    final_window = min(FINAL_WINDOW, n_steps)
    summary = {"preset": a.preset, "device": dev, "fp8": not a.bf16, "steps": n_steps,
               "loss_floor": task.loss_floor, "mtp_loss_floor": task.mtp_loss_floor,
               "final_lm_loss_mean": _mean_last(hist["lm_loss"], final_window),
               "final_lm_loss_window_steps": final_window}
    if a.compare:
        _, _, other = train(a.preset, fp8=False, **kw, label=" [compare]")
        last = max(1, min(50, n_steps // 5))
        gap = loss_gap(hist, other, last)
        summary.update(fp8_final_lm_loss_mean=_mean_last(hist["lm_loss"], last),
                       bf16_final_lm_loss_mean=_mean_last(other["lm_loss"], last), gap_window_steps=last,
                       fp8_vs_bf16_relative_loss_gap=gap)
    ev = evaluate(model, task, n=EVAL_SEQUENCES)
    summary.update({k: v for k, v in ev.items()})
    summary["eval_sequences"] = EVAL_SEQUENCES
    try:  # --out was checked before training; this catches what changed since (disk full, permissions)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(os.path.join(out_dir, "checkpoint"))
        from .tokenizer import save_task_tokenizer
        save_task_tokenizer(task, os.path.join(out_dir, "checkpoint"))   # AutoTokenizer / text prompts for `dsmoe generate`
        _plots(hist, task, out_dir, other)
        summary["wall_s"] = round(time.time() - t0, 1)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({**summary, "history": {k: v for k, v in hist.items() if k != "load"}}, f)
    except OSError as e:
        raise CLIError(f"--out {out_dir}: writing the results failed ({e})", UNAVAILABLE) from None
    n, w = EVAL_SEQUENCES, final_window
    print(f"task: permuted copy, {task.num_symbols} symbols, length {task.length}; loss floor {task.loss_floor:.4f} nats "
          f"(MTP: {task.mtp_loss_floor:.4f})")
    eval_mtp = "n/a" if ev["eval_mtp_loss"] is None else f"{ev['eval_mtp_loss']:.4f}"
    print(f"final train LM loss (mean of the last {w} step{'s' if w != 1 else ''}): {summary['final_lm_loss_mean']:.4f}; "
          f"on {n} held-out sequences: LM loss {ev['eval_lm_loss']:.4f}, MTP loss {eval_mtp}")
    print(f"greedy sample : {ev['sample']}")
    print(f"target        : {ev['sample_target']}")
    print(f"task accuracy : {100 * ev['accuracy']:.1f}% of mapped symbols, {100 * ev['exact_match']:.1f}% exact sequences "
          f"({n} held-out prompts, greedy)")
    if a.compare:
        print(f"FP8 vs BF16: mean LM loss over the last {summary['gap_window_steps']} steps "
              f"{summary['fp8_final_lm_loss_mean']:.5f} vs {summary['bf16_final_lm_loss_mean']:.5f}: "
              f"relative gap {100 * summary['fp8_vs_bf16_relative_loss_gap']:+.3f}%")
    print(f"wrote {out_dir}/loss.png, {out_dir}/expert_load.png, {out_dir}/checkpoint/ (HF format), {out_dir}/summary.json "
          f"[{summary['wall_s']} s]")
    return 0


def _main_pipeline(a, out_dir, t0):
    """`dsmoe train --pp N` under torchrun: trains with the pipeline; rank 0 evaluates and writes --out."""
    import torch.distributed as dist

    from ._cli import CLIError
    if a.compare:
        raise CLIError("--compare: not with --pp (run the two precisions separately)")
    if a.device not in (None, "cpu"):
        raise CLIError(f"--device {a.device}: --pp runs on the CPU (gloo) here; the NCCL path is not wired into the CLI yet")
    n = a.pp * a.ep
    if a.pp < 2:
        raise CLIError(f"--ep {a.ep}: only with --pp >= 2 (expert parallelism inside the pipeline)")
    if a.pp_schedule == "dualpipe" and a.pp % 2:
        raise CLIError(f"--pp {a.pp}: DualPipe needs an even number of ranks (--pp-schedule dualpipev takes any)")
    chunks = a.chunks or 2 * a.pp
    batch = a.batch or PRESETS[a.preset]["batch"]
    if a.pp_schedule != "1f1b" and (chunks < 2 * a.pp or (a.pp_schedule == "dualpipe" and chunks % 2)):
        raise CLIError(f"--chunks {chunks}: {a.pp_schedule} needs at least 2 * PP = {2 * a.pp} micro-batches"
                       + (", an even number" if a.pp_schedule == "dualpipe" else ""))
    if batch % (chunks * a.ep):
        raise CLIError(f"--batch {batch}: must split into --chunks {chunks} micro-batches on each of --ep {a.ep} replicas"
                       f" (a multiple of {chunks * a.ep})")
    if "WORLD_SIZE" not in os.environ:
        raise CLIError(f"--pp {a.pp}: launch with torchrun --nproc-per-node {n} -m dsmoe train ...")
    if int(os.environ["WORLD_SIZE"]) != n:
        raise CLIError(f"--pp {a.pp} --ep {a.ep}: needs {n} processes, torchrun started {os.environ['WORLD_SIZE']}")
    dist.init_process_group("gloo")
    try:
        model, task, hist = train_pipeline(a.preset, pp=a.pp, schedule=a.pp_schedule, num_chunks=a.chunks,
                                           fp8=not a.bf16, steps=a.steps, seed=a.seed, progress=not a.no_progress,
                                           batch=a.batch, lr=a.lr, ep=a.ep)
        if dist.get_rank() != 0:
            return 0
        n_steps = len(hist["lm_loss"])
        w = min(FINAL_WINDOW, n_steps)
        ev = evaluate(model, task, n=EVAL_SEQUENCES)
        summary = {"preset": a.preset, "device": "cpu", "fp8": not a.bf16, "steps": n_steps, "pp": a.pp, "ep": a.ep,
                   "pp_schedule": a.pp_schedule, "loss_floor": task.loss_floor, "mtp_loss_floor": task.mtp_loss_floor,
                   "final_lm_loss_mean": _mean_last(hist["lm_loss"], w), "final_lm_loss_window_steps": w, **ev,
                   "eval_sequences": EVAL_SEQUENCES}
        try:
            os.makedirs(out_dir, exist_ok=True)
            model.save_pretrained(os.path.join(out_dir, "checkpoint"))
            from .tokenizer import save_task_tokenizer
            save_task_tokenizer(task, os.path.join(out_dir, "checkpoint"))
            _plots(hist, task, out_dir)
            summary["wall_s"] = round(time.time() - t0, 1)
            with open(os.path.join(out_dir, "summary.json"), "w") as f:
                json.dump({**summary, "history": {k: v for k, v in hist.items() if k != "load"}}, f)
        except OSError as e:
            raise CLIError(f"--out {out_dir}: writing the results failed ({e})", 1) from None
        print(f"pipeline: {a.pp} ranks x {a.ep} expert-parallel, {a.pp_schedule}; final train LM loss (mean of the last {w} steps): "
              f"{summary['final_lm_loss_mean']:.4f} (floor {task.loss_floor:.4f}); held-out LM loss {ev['eval_lm_loss']:.4f}; "
              f"task accuracy {100 * ev['accuracy']:.1f}%")
        print(f"wrote {out_dir}/loss.png, {out_dir}/expert_load.png, {out_dir}/checkpoint/ (HF format), "
              f"{out_dir}/summary.json [{summary['wall_s']} s]")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    sys.exit(main())
