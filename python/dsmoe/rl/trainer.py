"""``GRPOTrainer``: GRPO over a :class:`DeepseekV3ForCausalLM`, with rollouts from the serving engine.

One :meth:`GRPOTrainer.step`: sample ``group_size`` completions per prompt with :class:`dsmoe.serve.LLM`
(temperature 1 by default), score them with the reward functions, turn the rewards into group-relative
advantages, compute the old-policy and reference log-probabilities with the training forward, run
``num_iterations`` optimizer steps of :func:`grpo_loss` (FP8 linears when the model has them, as in ``dsmoe
train``), each followed by the auxiliary-loss-free expert-bias update.

The engine wraps the policy module itself (no copy): every rollout reads the weights and expert biases of
the last optimizer step. Its prefix cache is off, because cached latent blocks would hold activations of
older weights; its KV pool is allocated once and reused (requests free their blocks when they finish).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from .loss import LOSS_TYPES, group_advantages, grpo_loss

__all__ = ["GRPOTrainer", "Rollouts", "completion_logprobs"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Rollouts:
    """Completions of one rollout, ``group_size`` consecutive ones per prompt."""
    prompts: list                     # what the reward functions saw (text or token ids), repeated per completion
    prompt_ids: list                  # list[list[int]]
    completion_ids: list              # list[list[int]] (a stop token, EOS included, is kept)
    completions: list                 # text when the prompt was text, else the ids
    rewards: torch.Tensor             # [N] float32, the sum over the reward functions
    reward_parts: dict = field(default_factory=dict)   # function name -> [N] float32


def completion_logprobs(model, prompt_ids, completion_ids, *, temperature: float = 1.0, width: int | None = None):
    """Log-probabilities of each completion token under ``model``'s full forward: ``(logprobs [N, W] float32,
    mask [N, W] bool)`` with ``W`` = ``width`` or the longest completion; prompt + completion rows are right-padded
    (causal attention: padding after a row's end changes none of its logits). Logits are divided by
    ``temperature``, the distribution the sampler drew from."""
    N = len(prompt_ids)
    if len(completion_ids) != N:
        raise ValueError(f"completion_logprobs: argument 'completion_ids' must have one completion per prompt "
                         f"({N}), got {len(completion_ids)}")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        # the first completion token needs the logits of a prompt position: without one it has no prediction
        raise ValueError(f"completion_logprobs: argument 'prompt_ids' must hold non-empty prompts, got an empty "
                         f"prompt at index {empty[0]}")
    longest = max((len(c) for c in completion_ids), default=0)
    W = longest if width is None else width
    if not _is_int(W) or W < longest:
        raise ValueError(f"completion_logprobs: argument 'width' must be an int >= the longest completion "
                         f"({longest}), got {width!r}")
    dev = model.lm_head.weight.device
    if N == 0 or W == 0:
        return torch.zeros(N, W, device=dev), torch.zeros(N, W, dtype=torch.bool, device=dev)
    lens = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    L = max(lens)
    ids = torch.zeros(N, L, dtype=torch.long)
    tgt = torch.zeros(N, W, dtype=torch.long)
    mask = torch.zeros(N, W, dtype=torch.bool)
    start = torch.tensor([len(p) - 1 for p in prompt_ids])
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : lens[i]] = torch.tensor(p + c)
        tgt[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = True
    ids, tgt, mask = ids.to(dev), tgt.to(dev), mask.to(dev)
    logits = model(ids).logits                                     # [N, L, V]
    # completion token j of row i sits at len(p_i) + j and is predicted by the logits one position earlier
    pos = (start.to(dev)[:, None] + torch.arange(W, device=dev)[None]).clamp(max=L - 1)
    V = logits.shape[-1]
    lg = logits.gather(1, pos[..., None].expand(N, W, V)).float()
    if temperature != 1.0:
        lg = lg / temperature
    lp = torch.log_softmax(lg, -1).gather(-1, tgt[..., None]).squeeze(-1)
    return lp, mask


class GRPOTrainer:
    """GRPO on ``model`` (a :class:`DeepseekV3ForCausalLM`, trained in place).

    ``reward_funcs``: a callable ``(prompt, completion) -> float`` or a list of them (summed). Prompts are what
    :meth:`step` gets: text (then completions are decoded text; needs ``tokenizer`` or a model with one) or
    token-id lists (then completions are token-id lists, EOS included when it ended them).

    Options: ``group_size`` completions per prompt (G >= 2); ``num_iterations`` optimizer steps per rollout
    (> 1 makes the policy drift from the sampler, which the clipped ratio bounds); ``beta`` weight of the k3 KL
    to a frozen copy of the starting model (0: no reference model is kept); ``clip_eps`` / ``clip_eps_high``
    (DAPO's asymmetric "clip-higher"); ``loss_type`` "grpo" / "dapo" / "dr_grpo"; ``scale_rewards`` (False: Dr.
    GRPO's unscaled advantages); ``max_tokens`` per completion; ``temperature`` of the rollouts; AdamW with ``lr``,
    ``weight_decay`` and gradient-norm clipping at ``max_grad_norm``; ``seed`` fixes every rollout draw.
    """

    def __init__(self, model, reward_funcs, *, group_size: int = 8, num_iterations: int = 1, beta: float = 0.04,
                 clip_eps: float = 0.2, clip_eps_high: float | None = None, loss_type: str = "grpo",
                 scale_rewards: bool = True, max_tokens: int = 16, temperature: float = 1.0, lr: float = 1e-4,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, seed: int = 0, tokenizer=None,
                 ref_model=None, stop_token_ids=None, max_num_seqs: int = 64):
        from ..models import DeepseekV3ForCausalLM
        from ..serve import LLM

        if not isinstance(model, DeepseekV3ForCausalLM):
            raise TypeError(f"GRPOTrainer: argument 'model' must be a DeepseekV3ForCausalLM, got {type(model).__name__}")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs or not all(callable(f) for f in funcs):
            raise ValueError(f"GRPOTrainer: argument 'reward_funcs' must be a callable (prompt, completion) -> float "
                             f"or a non-empty list of them, got {reward_funcs!r}")
        for name, v, lo in (("group_size", group_size, 2), ("num_iterations", num_iterations, 1),
                            ("max_tokens", max_tokens, 1), ("max_num_seqs", max_num_seqs, 1)):
            if not _is_int(v) or v < lo:
                raise ValueError(f"GRPOTrainer: argument '{name}' must be an int >= {lo}, got {v!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOTrainer: argument 'loss_type' must be one of {', '.join(map(repr, LOSS_TYPES))}, "
                             f"got {loss_type!r}")
        for name, v in (("beta", beta), ("clip_eps", clip_eps), ("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"GRPOTrainer: argument '{name}' must be a finite float >= 0, got {v!r}")
        for name, v in (("clip_eps_high", clip_eps_high), ("max_grad_norm", max_grad_norm)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise ValueError(f"GRPOTrainer: argument '{name}' must be None or a finite float >= 0, got {v!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:
            raise ValueError(f"GRPOTrainer: argument 'temperature' must be a finite float > 0 (GRPO samples), "
                             f"got {temperature!r}")
        self.model = model
        self.reward_funcs = funcs
        self.G, self.num_iterations, self.beta = group_size, num_iterations, float(beta)
        self.clip_eps, self.clip_eps_high, self.loss_type = clip_eps, clip_eps_high, loss_type
        self.scale_rewards, self.max_tokens, self.temperature = scale_rewards, max_tokens, float(temperature)
        self.max_grad_norm = max_grad_norm
        self.stop_token_ids = stop_token_ids
        if beta > 0:
            if ref_model is None:
                for m in model.moe_layers():
                    m.aux_loss = None      # the last training forward's graph: not part of the weights, not copyable
                ref_model = copy.deepcopy(model)
            ref_model.eval().requires_grad_(False)
        else:
            ref_model = None               # beta 0: the KL term is skipped, so no second model is kept
        self.ref_model = ref_model
        self.engine = LLM(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, enable_prefix_caching=False,
                          seed=seed)
        self.tokenizer = self.engine.tokenizer
        self._gen = torch.Generator().manual_seed(seed)
        from ..train import make_optimizer
        self.optimizer = make_optimizer(model, lr, weight_decay=weight_decay)
        self.history: list[dict] = []

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, prompts, *, n: int | None = None, temperature: float | None = None,
                seed: int | None = None) -> Rollouts:
        """``n`` (default ``group_size``) completions of each prompt from the engine over the current weights,
        with their rewards. ``seed`` fixes the draws of this call (default: the trainer's running generator);
        ``temperature`` 0 is greedy."""
        from ..serve import SamplingParams

        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"GRPOTrainer.rollout: argument 'prompts' must be a non-empty list of prompts (text or "
                             f"token-id lists), got {type(prompts).__name__}"
                             + (" of length 0" if isinstance(prompts, (list, tuple)) else ""))
        n = self.G if n is None else n
        if not _is_int(n) or n < 1:
            raise ValueError(f"GRPOTrainer.rollout: argument 'n' must be an int >= 1, got {n!r}")
        t = self.temperature if temperature is None else temperature
        gen = self._gen if seed is None else torch.Generator().manual_seed(seed)
        rep = [p for p in prompts for _ in range(n)]
        seeds = torch.randint(0, 2**62, (len(rep),), generator=gen).tolist()
        params = [SamplingParams(max_tokens=self.max_tokens, temperature=t, seed=s,
                                 stop_token_ids=self.stop_token_ids) for s in seeds]
        was = self.model.training
        self.model.eval()       # eval: the rollouts neither count expert load nor record a balance loss
        try:
            outs = self.engine.generate(rep, params)
        finally:
            self.model.train(was)
        prompt_ids = [o.prompt_token_ids for o in outs]
        completion_ids = [o.outputs[0].token_ids for o in outs]
        texts = [isinstance(p, str) for p in rep]
        completions = [o.outputs[0].text if is_text else list(c) for o, c, is_text in zip(outs, completion_ids, texts)]
        parts = {}
        total = torch.zeros(len(rep), dtype=torch.float32)
        for f in self.reward_funcs:
            name = getattr(f, "__name__", type(f).__name__)
            vals = []
            for p, c in zip(rep, completions):
                r = f(p, c)
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                    raise ValueError(f"GRPOTrainer: reward function {name!r} must return a finite float, "
                                     f"got {r!r}")
                vals.append(float(r))
            v = torch.tensor(vals, dtype=torch.float32)
            parts[name] = v
            total += v
        return Rollouts(rep, prompt_ids, completion_ids, completions, total, parts)

    def evaluate(self, prompts, *, n: int = 1, temperature: float | None = None, seed: int = 0) -> float:
        """Mean reward of ``n`` completions per prompt (``temperature`` 0: greedy, n = 1), with fixed seeds."""
        return float(self.rollout(prompts, n=n, temperature=temperature, seed=seed).rewards.mean())

    # ------------------------------------------------------------------ one GRPO step
    def step(self, prompts) -> dict:
        """One rollout and ``num_iterations`` optimizer steps; returns (and appends to ``history``) its log."""
        t0 = time.time()
        ro = self.rollout(prompts)
        t_roll = time.time() - t0
        adv = group_advantages(ro.rewards, self.G, scale=self.scale_rewards)
        model = self.model
        dev = model.lm_head.weight.device
        adv = adv.to(dev)
        W = max(len(c) for c in ro.completion_ids)
        old = ref = None
        with torch.no_grad():
            if self.num_iterations > 1:
                model.eval()
                old, _ = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, temperature=self.temperature,
                                             width=W)
            if self.ref_model is not None:
                ref, _ = completion_logprobs(self.ref_model, ro.prompt_ids, ro.completion_ids,
                                             temperature=self.temperature, width=W)
        model.train()
        logs = []
        for _ in range(self.num_iterations):
            lp, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, temperature=self.temperature,
                                           width=W)
            # one iteration: the sampler's policy is the current one, so its log-probabilities are these,
            # detached (ratio 1); the training forward rather than the engine's bf16-cache numbers
            loss, st = grpo_loss(lp, lp.detach() if old is None else old, ref, adv, mask, clip_eps=self.clip_eps,
                                 clip_eps_high=self.clip_eps_high, beta=self.beta, loss_type=self.loss_type,
                                 max_completion_length=self.max_tokens)
            aux = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
            total = loss + torch.stack(aux).sum() if aux else loss
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            gnorm = None
            if self.max_grad_norm is not None:
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm))
            self.optimizer.step()
            model.update_expert_bias()     # aux-loss-free balancing, once per optimizer step as in `dsmoe train`
            logs.append(dict(loss=float(loss.detach()), grad_norm=gnorm, **st))
        model.eval()
        g = ro.rewards.view(-1, self.G)
        last = logs[-1]
        log = {"step": len(self.history), "reward": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
               "zero_std_groups": float((g.std(1) == 0).float().mean()),
               "kl": last["kl"], "clip_fraction": sum(x["clip_fraction"] for x in logs) / len(logs),
               "ratio_mean": last["ratio_mean"], "loss": sum(x["loss"] for x in logs) / len(logs),
               "grad_norm": last["grad_norm"],
               "completion_length": sum(len(c) for c in ro.completion_ids) / len(ro.completion_ids),
               "rollout_s": round(t_roll, 3), "step_s": round(time.time() - t0, 3)}
        for k, v in ro.reward_parts.items():
            if len(ro.reward_parts) > 1:
                log[f"reward/{k}"] = float(v.mean())
        self.history.append(log)
        return log

    def train(self, prompt_fn, steps: int, *, progress: bool = True, desc: str = "grpo") -> list[dict]:
        """``steps`` calls of :meth:`step` on ``prompt_fn(step_index)`` (a list of prompts); a tqdm bar shows the
        reward and KL."""
        if not _is_int(steps) or steps < 0:
            raise ValueError(f"GRPOTrainer.train: argument 'steps' must be an int >= 0, got {steps!r}")
        bar = None
        it = range(steps)
        if progress:
            from tqdm import tqdm
            bar = tqdm(it, desc=desc, dynamic_ncols=True)
            it = bar
        out = []
        for i in it:
            log = self.step(prompt_fn(i))
            out.append(log)
            if bar is not None:
                bar.set_postfix(reward=f"{log['reward']:.3f}",
                                kl="n/a" if log["kl"] is None else f"{log['kl']:.4f}",
                                len=f"{log['completion_length']:.1f}")
        return out
