"""Multi-head latent attention (DeepSeek-V3).

Training / prefill (:meth:`MLA.forward`): the un-absorbed form, like Hugging Face —
``q = q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)``), ``[c | k_rope] = kv_a_proj_with_mqa(x)``,
``c = kv_a_layernorm(c)``, ``[k_nope | v] = kv_b_proj(c)`` per head, RoPE on q_rope and the single shared
k_rope head, causal softmax attention with the YaRN-corrected ``softmax_scale``, then ``o_proj``.
All projections are :class:`FP8Linear`; the attention math stays in the activation dtype (fp32 softmax).

Decode (:meth:`MLA.decode`): the absorbed form over the paged latent cache
``[kv_a_layernorm(c) (kv_lora_rank) | rope(k_rope) (qk_rope_head_dim)]`` per token (V3: 512 + 64):
``q_abs = W_UK^T q_nope``, MQA over the cache with ``ops.mla_decode_with_kvcache`` (the sm_90a kernel
for V3's sizes on GPU, the reference otherwise), head outputs ``W_UV o``, ``o_proj``.
The rope dims are stored in the same de-interleaved order as the prefill path rotates them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .fp8 import FP8Linear
from .norm import RMSNorm
from .rope import apply_rope

__all__ = ["MLA", "MLAKVCache"]


class MLAKVCache:
    """Paged latent cache for all layers: ``kv [layers][num_blocks, 64, 1, kv_lora + rope]`` bf16, one
    contiguous run of blocks per sequence (``block_table [B, max_blocks]``), ``seqlens int32 [B]`` and the
    capacity ``max_len`` tokens per sequence.

    ``len_bound`` is a host-side upper bound of ``seqlens.max()`` kept by the writers, so that a capacity
    check costs no device sync unless the bound says the cache may be full."""

    BLOCK = 64

    def __init__(self, num_layers: int, batch: int, max_len: int, dim: int, device=None, dtype=torch.bfloat16):
        nb = -(-max_len // self.BLOCK)
        self.kv = [torch.zeros(batch * nb, self.BLOCK, 1, dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_table = torch.arange(batch * nb, dtype=torch.int32, device=device).view(batch, nb)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len = max_len
        self.len_bound = 0

    @classmethod
    def view(cls, kv: list, block_table: torch.Tensor, seqlens: torch.Tensor) -> "MLAKVCache":
        """A cache over a shared block pool (``kv`` per layer ``[num_blocks, 64, 1, dim]``): this batch's
        ``block_table [B, max_blocks]`` and ``seqlens int32 [B]``, capacity ``max_blocks * 64``. The
        serving engine builds one per step; the blocks themselves are its block manager's."""
        self = cls.__new__(cls)
        self.kv, self.block_table, self.seqlens = kv, block_table, seqlens
        self.max_len = block_table.shape[1] * cls.BLOCK
        self.len_bound = int(seqlens.max()) if seqlens.numel() else 0
        return self


class MLA(nn.Module):
    def __init__(self, cfg, layer_idx: int = 0, *, fp8: bool = True, dtype=None):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        self.nh, self.d_nope, self.d_rope, self.d_v = nh, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        qk = self.d_nope + self.d_rope
        kw = dict(fp8=fp8, dtype=dtype)
        if cfg.q_lora_rank is None:
            self.q_proj = FP8Linear(H, nh * qk, **kw)
        else:
            self.q_a_proj = FP8Linear(H, cfg.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = FP8Linear(cfg.q_lora_rank, nh * qk, **kw)
        self.kv_a_proj_with_mqa = FP8Linear(H, self.kv_lora + self.d_rope, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, cfg.rms_norm_eps)
        self.kv_b_proj = FP8Linear(self.kv_lora, nh * (self.d_nope + self.d_v), **kw)
        self.o_proj = FP8Linear(nh * self.d_v, H, **kw)
        self.scale = cfg.softmax_scale

    def _q(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.nh, self.d_nope + self.d_rope)
        return q[..., : self.d_nope], q[..., self.d_nope:]

    def _latent(self, x):
        kv = self.kv_a_proj_with_mqa(x)
        c, k_rope = kv[..., : self.kv_lora], kv[..., self.kv_lora:]
        return self.kv_a_layernorm(c), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over ``x [B, T, H]``; cos/sin ``[B or 1, T, rope/2]``; ``attention_mask``
        (bool ``[B, T]``, False = padding) hides padded keys."""
        B, T, _ = x.shape
        q_nope, q_rope = self._q(x)
        c, k_rope = self._latent(x)
        il = self.cfg.rope_interleave
        q_rope = apply_rope(q_rope, cos, sin, il)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, il)                  # [B, T, 1, rope]
        kv = self.kv_b_proj(c).view(B, T, self.nh, self.d_nope + self.d_v)
        k_nope, v = kv[..., : self.d_nope], kv[..., self.d_nope:]
        q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)                     # [B, nh, T, qk]
        k = torch.cat([k_nope, k_rope.expand(B, T, self.nh, self.d_rope)], -1).transpose(1, 2)
        if attention_mask is None:
            o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            # a padded query still sees itself: its row stays finite (no all -inf softmax, no NaN in the
            # residual stream) and it is never a key of a real token
            allowed = causal & (attention_mask[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=x.device))
            o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=allowed, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.d_v))

    # ------------------------------------------------------------------ decode over the latent cache
    @torch.no_grad()
    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: MLAKVCache,
               positions: torch.Tensor) -> torch.Tensor:
        """``x [B, s_q, H]`` new tokens at ``positions [B, s_q]`` (the cache holds positions before them; -1 =
        a left-padding slot, not stored).

        Appends their latents to ``cache.kv[layer]`` then attends (causal among the new tokens) with the
        absorbed weights. ``cache.seqlens`` must already count the new (non-padding) tokens: with the
        real tokens at the right end of the s_q slots, the op's causal rule (query i sees positions
        ``< seqlen - s_q + i + 1``) is exactly each real token's own prefix."""
        B, s_q, _ = x.shape
        if B == 0 or s_q == 0:
            # nothing to append or attend with (the decode op needs s_q, H >= 1); the cache stays as it is
            return self.o_proj(x.new_zeros(B, s_q, self.nh * self.d_v))
        q_nope, q_rope = self._q(x)
        c, k_rope = self._latent(x)
        il = self.cfg.rope_interleave
        q_rope = apply_rope(q_rope, cos, sin, il)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, il).squeeze(2)
        kv = cache.kv[self.layer_idx]
        bids = torch.arange(B, device=x.device).repeat_interleave(s_q)
        ops.mla_kvcache_append(kv, cache.block_table, bids.to(torch.int32), positions.reshape(-1).to(torch.int32),
                                      c.reshape(B * s_q, -1).to(torch.bfloat16), k_rope.reshape(B * s_q, -1).to(torch.bfloat16))
        w = self.kv_b_proj.dequantized_weight(torch.float32).view(self.nh, self.d_nope + self.d_v, self.kv_lora)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]
        q_abs = torch.einsum("bshn,hnc->bshc", q_nope.float(), w_uk)
        # bf16 in, whatever the cache holds: the ops quantize into (and read back from) an FP8 (656-byte) cache
        qf = torch.cat([q_abs, q_rope.float()], -1).to(torch.bfloat16)        # [B, s_q, nh, kv_lora + rope]
        md, ns = ops.get_mla_metadata(cache.seqlens, s_q * self.nh, 1)
        o, _ = ops.mla_decode_with_kvcache(qf, kv, cache.block_table, cache.seqlens, self.kv_lora, md, ns,
                                           self.scale, causal=True)
        out = torch.einsum("bshc,hvc->bshv", o.float(), w_uv).to(x.dtype)
        return self.o_proj(out.reshape(B, s_q, self.nh * self.d_v))
