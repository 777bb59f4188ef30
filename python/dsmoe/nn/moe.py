"""DeepSeekMoE: dense MLP, the sigmoid gate with ``e_score_correction_bias``, grouped routed experts,
shared experts, auxiliary-loss-free bias update and the complementary sequence-wise balance loss.

Routed experts run in the contiguous grouped-GEMM layout: ``ops.moe_route`` picks experts,
``ops.moe_permute`` groups the (token, expert) rows by expert (segments aligned to 128 rows, which is
also what makes the Wgrad's 1x128 token-dim quantization stay inside one expert),
``ops.m_grouped_fp8_gemm_nt_contiguous`` runs the expert GEMMs in FP8 and ``ops.moe_unpermute`` sums the
weighted outputs back per token. Without FP8 the same layout runs through ``torch.nn.functional.grouped_mm``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .fp8 import FP8Linear, _STATE, ceil_to, pad_to

__all__ = ["MLP", "MoEGate", "GroupedExperts", "MoE"]

_BLOCK = 128
_FP8 = torch.float8_e4m3fn


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with FP8 linears (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int, *, fp8: bool = True, dtype=None):
        super().__init__()
        self.gate_proj = FP8Linear(hidden, intermediate, fp8=fp8, dtype=dtype)
        self.up_proj = FP8Linear(hidden, intermediate, fp8=fp8, dtype=dtype)
        self.down_proj = FP8Linear(intermediate, hidden, fp8=fp8, dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router weight ``[E, H]`` (kept high precision, never FP8) and the selection-only bias (fp32)."""

    def __init__(self, hidden: int, num_experts: int, *, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype or torch.float32))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2.float(), self.weight.float())   # fp32 router logits


# ----------------------------------------------------------------------------- grouped expert GEMMs
def _quant_experts(w: torch.Tensor):
    """Per-expert 128x128 block quantization of ``w [E, N, K]`` (padded to multiples of 128)."""
    E = w.shape[0]
    wp = pad_to(pad_to(w, 1, _BLOCK), 2, _BLOCK)
    Np, Kp = wp.shape[1], wp.shape[2]
    q, s = ops.per_block_quant_fp8(wp.reshape(E * Np, Kp).contiguous(), (_BLOCK, _BLOCK))
    return q.view(E, Np, Kp), s.view(E, Np // _BLOCK, Kp // _BLOCK)


class _GroupedLinearFn(torch.autograd.Function):
    """``y[r] = x[r] @ W[m_indices[r]]^T`` over the contiguous layout; rows with m_indices = -1 give 0.

    NOTE: the layouts come from ops.moe_permute, valid by construction, so the GEMMs run with
    ``validate=False``: their eager check reads m_indices / group_sizes back to the host, a sync per
    GEMM (four per MoE layer and step) on a GPU.
    The activations are quantized with ``column_major_scales=True``: the MN-major, TMA-aligned scales the
    grouped GEMM loads directly (row-major scales would be re-laid out by a copy on every call).
    """

    @staticmethod
    def forward(ctx, x, weight, m_indices, group_sizes, use_fp8: bool):
        E, N, K = weight.shape
        valid = (m_indices >= 0).unsqueeze(1)
        if use_fp8:
            wq, ws = _quant_experts(weight)
            xq, xs = ops.per_token_group_quant_fp8(pad_to(x, 1, _BLOCK).contiguous(), _BLOCK, column_major_scales=True)
            y = ops.m_grouped_fp8_gemm_nt_contiguous(xq, xs, wq, ws, m_indices, validate=False)[:, :N]
            y = torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(x.dtype)
            ctx.save_for_backward(x, m_indices, group_sizes, wq, ws)
        else:
            offs = torch.cumsum(group_sizes, 0).to(torch.int32)
            y = F.grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=offs)
            y = torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device))
            ctx.save_for_backward(x, m_indices, group_sizes, weight)
        ctx.meta = (E, N, K, use_fp8, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        E, N, K, use_fp8, wdt = ctx.meta
        valid = (ctx.saved_tensors[1] >= 0).unsqueeze(1)
        gy = torch.where(valid, gy, torch.zeros((), dtype=gy.dtype, device=gy.device))
        dx = dw = None
        if use_fp8:
            x, m_indices, group_sizes, wq, ws = ctx.saved_tensors
            gp = pad_to(gy.to(x.dtype), 1, _BLOCK).contiguous()
            if ctx.needs_input_grad[0]:
                gq, gs = ops.per_token_group_quant_fp8(gp, _BLOCK, column_major_scales=True)
                wt = wq.transpose(1, 2).contiguous()          # 128x128 block scales transpose exactly
                st = ws.transpose(1, 2).contiguous()
                dx = ops.m_grouped_fp8_gemm_nt_contiguous(gq, gs, wt, st, m_indices, validate=False)[:, :K]
                dx = torch.where(valid, dx, torch.zeros((), dtype=dx.dtype, device=dx.device)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                # Wgrad: dY and X re-quantized 1x128 along tokens; expert segments are 128-aligned, so
                # no quantization group straddles two experts.
                aq, a_s = ops.per_token_group_quant_fp8_transposed(gp)                          # [Np, R]
                bq, b_s = ops.per_token_group_quant_fp8_transposed(pad_to(x, 1, _BLOCK).contiguous())  # [Kp, R]
                dw = ops.k_grouped_fp8_gemm_tn_contiguous(aq, a_s, bq, b_s, group_sizes, validate=False)[:, :N, :K].to(wdt)
        else:
            x, m_indices, group_sizes, weight = ctx.saved_tensors
            offs = torch.cumsum(group_sizes, 0).to(torch.int32)
            if ctx.needs_input_grad[0]:
                dx = F.grouped_mm(gy, weight.to(gy.dtype), offs=offs)
            if ctx.needs_input_grad[1]:
                dw = F.grouped_mm(gy.t().contiguous(), x.to(gy.dtype), offs=offs).to(wdt)
        return dx, dw, None, None, None


def _grouped_serving(x, wq, ws, m_indices, group_sizes, use_fp8: bool):
    E, N, K = wq.shape
    if use_fp8 and N % _BLOCK == 0 and K % _BLOCK == 0:
        xq, xs = ops.per_token_group_quant_fp8(x.contiguous(), _BLOCK, column_major_scales=True)
        y = ops.m_grouped_fp8_gemm_nt_contiguous(xq, xs, wq, ws, m_indices, validate=False).to(x.dtype)
    else:
        w = torch.stack([ops.per_block_dequant_fp8(wq[e], ws[e], (_BLOCK, _BLOCK), out_dtype=x.dtype) for e in range(E)])
        y = F.grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(group_sizes, 0).to(torch.int32))
    return torch.where((m_indices >= 0).unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))


class GroupedExperts(nn.Module):
    """E routed experts stored stacked: ``gate_proj``/``up_proj`` ``[E, I, H]``, ``down_proj`` ``[E, H, I]``.

    Checkpoints name them per expert (``experts.{e}.gate_proj.weight``); the loader stacks/unstacks.
    Serving mode holds e4m3 weights with ``*_scale_inv`` ``[E, ceil(N/128), ceil(K/128)]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, fp8: bool = True, dtype=None):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.fp8 = fp8
        dt = dtype or torch.float32
        self.gate_proj = nn.Parameter(torch.randn(num_experts, intermediate, hidden, dtype=dt) * 0.02)
        self.up_proj = nn.Parameter(torch.randn(num_experts, intermediate, hidden, dtype=dt) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, intermediate, dtype=dt) * 0.02)
        for n in ("gate_proj", "up_proj", "down_proj"):
            self.register_buffer(n + "_scale_inv", None)

    @property
    def is_fp8_weight(self) -> bool:
        return self.gate_proj.dtype == _FP8

    def _lin(self, name: str, x, m_indices, group_sizes):
        w = getattr(self, name)
        use = self.fp8 and _STATE["enabled"]
        if w.dtype == _FP8:
            return _grouped_serving(x, w, getattr(self, name + "_scale_inv"), m_indices, group_sizes, use)
        return _GroupedLinearFn.apply(x, w, m_indices, group_sizes, use)

    def forward(self, x_perm: torch.Tensor, m_indices: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x_perm [R, H]`` in the contiguous layout of ``ops.moe_permute(..., alignment=128)`` (exact size:
        segment e has ``ceil(tokens_per_expert[e] / 128) * 128`` rows)."""
        gs = ((tokens_per_expert + _BLOCK - 1) // _BLOCK * _BLOCK).to(torch.int32)
        # rows past the real layout (fixed-size layouts) are zero padding: count them in the last group
        tail = torch.zeros_like(gs)
        tail[-1:] = x_perm.shape[0] - gs.sum()
        gs = gs + tail
        h = F.silu(self._lin("gate_proj", x_perm, m_indices, gs)) * self._lin("up_proj", x_perm, m_indices, gs)
        return self._lin("down_proj", h, m_indices, gs)


class MoE(nn.Module):
    """Routed experts (top-k of n_routed) + shared experts, V3 gate.

    Training side effects: ``self.aux_loss`` (sequence-wise balance loss, differentiable) and
    ``self.load`` (tokens per expert accumulated over forward passes since the last
    :meth:`update_bias`)."""

    def __init__(self, cfg, *, fp8: bool = True, dtype=None, ep_group=None):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.n_routed_experts, cfg.hidden_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.gate = MoEGate(H, E, dtype=dtype)
        self.ep_group, self._ep = ep_group, None
        local = E
        if ep_group is not None:
            # expert parallelism: this rank holds experts [rank * L, (rank + 1) * L) (dsmoe.parallel layout);
            # the gate and shared experts are replicated.
            import torch.distributed as dist

            from ..parallel import EPBuffer
            W = dist.get_world_size(ep_group)
            if E % W:
                raise ValueError(f"MoE: n_routed_experts={E} must be divisible by the expert-parallel world size {W}")
            self._ep = EPBuffer(ep_group, E, H)
            local = E // W
            self.ep_rank, self.ep_world = dist.get_rank(ep_group), W
        self.experts = GroupedExperts(local, H, cfg.moe_intermediate_size, fp8=fp8, dtype=dtype)
        self.shared_experts = (MLP(H, cfg.moe_intermediate_size * cfg.n_shared_experts, fp8=fp8, dtype=dtype)
                               if cfg.n_shared_experts else None)
        self.register_buffer("load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def reset_non_persistent_buffers(self) -> None:
        """Zeroes the load counter (no checkpoint holds it), e.g. after ``to_empty``."""
        self.load = torch.zeros_like(self.load)

    def route(self, x2: torch.Tensor):
        """Returns ``(topk_idx int32 [T, k], topk_weights fp32 [T, k] (differentiable), scores fp32 [T, E])``."""
        cfg = self.cfg
        logits = self.gate(x2)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        idx, _ = ops.moe_route(logits.detach(), self.gate.e_score_correction_bias, top_k=self.top_k,
                                      n_group=cfg.n_group, topk_group=cfg.topk_group,
                                      routed_scaling_factor=cfg.routed_scaling_factor,
                                      norm_topk_prob=cfg.norm_topk_prob, score_func=cfg.scoring_func)
        w = scores.gather(1, idx.long())
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor, scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        H = shape[-1]
        x2 = x.reshape(-1, H)
        idx, w, scores = self.route(x2)
        if self.training:
            S = shape[-2] if x.dim() >= 2 else x2.shape[0]
            # NOTE: the sequence count from the shape, not view(-1, ...): -1 is ambiguous when S = 0
            B = math.prod(shape[:-2]) if x.dim() > 2 else 1
            self.aux_loss = ops.sequence_balance_loss(
                scores.view(B, S, self.num_experts), idx.view(B, S, self.top_k), alpha=self.cfg.aux_loss_alpha)
            with torch.no_grad():
                self.load += ops.expert_load(idx, self.num_experts).to(self.load.dtype)
        y = self.routed(x2, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        return y.view(shape)

    def routed(self, x2, idx, w):
        if self._ep is not None:
            # dispatch one copy per destination rank, run the local experts on the received rows (weights
            # of the local slots applied there), combine the partial sums back in rank order.
            recv_x, ridx, rw, _cnt, handle = self._ep.dispatch(x2, idx, w.to(torch.float32))
            y_local = self._local_experts(recv_x, ridx, rw, self.experts.num_experts)
            return self._ep.combine(y_local.to(recv_x.dtype), handle).to(x2.dtype)
        return self._local_experts(x2, idx, w.to(torch.float32), self.num_experts).to(x2.dtype)

    def _local_experts(self, x2, idx, w, num_experts):
        max_rows = None
        if torch.compiler.is_compiling():
            # a fixed (worst-case) row count keeps shapes static for torch.compile / CUDA graphs
            from ..ref.moe import moe_permute_max_rows
            max_rows = moe_permute_max_rows(x2.shape[0], self.top_k, num_experts, _BLOCK)
        out = ops.moe_permute(x2, idx, num_experts, alignment=_BLOCK, max_rows=max_rows)
        x_perm, m_indices, tpe, row_map = out
        y_perm = self.experts(x_perm, m_indices, tpe)
        return ops.moe_unpermute(y_perm, row_map, w)

    @torch.no_grad()
    def update_bias(self, gamma: float | None = None) -> torch.Tensor:
        """Auxiliary-loss-free balancing step from the load accumulated since the last call; returns it."""
        g = self.cfg.bias_update_speed if gamma is None else gamma
        load = self.load.clone()
        if self.ep_group is not None:
            import torch.distributed as dist
            dist.all_reduce(load, group=self.ep_group)
        # NOTE: no `load.sum() > 0` guard: an all-zero load is a no-op step, and the guard hid a NaN load
        ops.update_expert_bias(self.gate.e_score_correction_bias, load, g)
        self.load.zero_()
        return load
