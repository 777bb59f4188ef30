"""DeepSeek-V3 decoder and causal LM with multi-token prediction (MTP), trainable in FP8.

Module names follow the Hugging Face checkpoint layout (see ``dsmoe.models.checkpoint``), so
``state_dict``-level conversion is a renaming of the routed experts (stacked here, per expert on disk)
plus the MTP modules' shared embedding/head copies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.fp8 import FP8Linear, set_fp8
from ..nn.mla import MLA, MLAKVCache
from ..nn.moe import MLP, MoE
from ..nn.norm import RMSNorm
from ..nn.rope import RotaryEmbedding
from .config import DeepseekV3Config

__all__ = ["DecoderLayer", "MTPModule", "DeepseekV3Model", "DeepseekV3ForCausalLM", "CausalLMOutput"]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    mtp_logits: list | None = None        # D tensors [B, T - k, V], k = 1..D
    loss: torch.Tensor | None = None      # main CE + lambda/D * sum MTP CE + balance losses
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def resolve_fp8(fp8, cfg: DeepseekV3Config, where: str) -> bool:
    """``fp8=None`` follows the config: FP8 linears exactly when it describes an FP8 checkpoint
    (``quantization_config.quant_method == "fp8"``), as loading follows the checkpoint; True/False wins."""
    if fp8 is None:
        return cfg.is_fp8_checkpoint
    if not isinstance(fp8, bool):
        raise TypeError(f"{where}: argument 'fp8' must be None, True or False, got {fp8!r}")
    return fp8


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, *, fp8: bool | None = None, dtype=None):
        super().__init__()
        fp8 = resolve_fp8(fp8, cfg, type(self).__name__)
        self.layer_idx = layer_idx
        self.self_attn = MLA(cfg, layer_idx, fp8=fp8, dtype=dtype)
        if layer_idx >= cfg.first_k_dense_replace:
            self.mlp = MoE(cfg, fp8=fp8, dtype=dtype)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fp8=fp8, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, h, cos, sin, cache, positions):
        h = h + self.self_attn.decode(self.input_layernorm(h), cos, sin, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class _SharedHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    """Depth-k MTP module: ``h' = eh_proj([enorm(emb(t_{i+k})) ; hnorm(h_i)])``, one decoder block,
    ``shared_head.norm``, then the model's (shared) embedding and output head."""

    def __init__(self, cfg, layer_idx, *, fp8: bool | None = None, dtype=None):
        fp8 = resolve_fp8(fp8, cfg, "MTPModule")
        super().__init__(cfg, layer_idx, fp8=fp8, dtype=dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = FP8Linear(2 * cfg.hidden_size, cfg.hidden_size, fp8=fp8, dtype=dtype)
        self.shared_head = _SharedHead(cfg)

    def mtp_forward(self, h_prev, emb_next, cos, sin):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], -1))
        return DecoderLayer.forward(self, h, cos, sin)


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, *, fp8: bool | None = None, dtype=None):
        super().__init__()
        fp8 = resolve_fp8(fp8, cfg, "DeepseekV3Model")
        self.cfg = cfg
        dt = dtype or torch.float32
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dt)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.initializer_range)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, fp8=fp8, dtype=dtype) for i in range(L)] +
                                    [MTPModule(cfg, L + k, fp8=fp8, dtype=dtype) for k in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)


class DeepseekV3ForCausalLM(nn.Module):
    """DeepSeek-V3 causal LM. ``model(input_ids)`` returns a :class:`CausalLMOutput` with ``.logits [B, T, V]``;
    ``return_mtp=True`` adds the MTP logits; ``labels`` (next-token targets aligned with input_ids, i.e.
    ``labels[:, t]`` is the token after position t; -100 ignored) adds the losses."""

    def __init__(self, cfg: DeepseekV3Config, *, fp8: bool | None = None, dtype=None):
        super().__init__()
        self.config = cfg.validate()
        # fp8=None: FP8 linears exactly when cfg describes an FP8 checkpoint (quantization_config), so a model
        # built from a BF16/FP32 config computes what transformers computes; True/False forces it.
        fp8 = resolve_fp8(fp8, cfg, "DeepseekV3ForCausalLM")
        self.model = DeepseekV3Model(cfg, fp8=fp8, dtype=dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype or torch.float32)
        nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range)

    # ------------------------------------------------------------------ helpers
    @property
    def main_layers(self):
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self):
        return self.model.layers[self.config.num_hidden_layers:]

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_fp8(self, enabled: bool):
        return set_fp8(self, enabled)

    @torch.no_grad()
    def update_expert_bias(self, gamma: float | None = None) -> torch.Tensor:
        """Auxiliary-loss-free bias step in every MoE layer; returns the loads ``[n_moe_layers, E]``."""
        loads = [m.update_bias(gamma) for m in self.moe_layers()]
        return torch.stack(loads) if loads else torch.zeros(0)

    def _rope(self, T, device, positions=None):
        pos = torch.arange(T, device=device).unsqueeze(0) if positions is None else positions
        return self.model.rotary_emb(pos)

    # ------------------------------------------------------------------ forward
    def _check_ids(self, where: str, arg: str, ids) -> None:
        """Token ids: an integer tensor ``[B, T]`` with values in ``[0, vocab_size)`` (the values are checked
        for CPU tensors outside torch.compile only: on a GPU that would cost a host sync per call)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            got = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"DeepseekV3ForCausalLM.{where}: argument '{arg}' must be an int64/int32 tensor [B, T], got {got}")
        if ids.numel() and ids.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument '{arg}': token ids must be in "
                                 f"[0, vocab_size={self.config.vocab_size}), got range [{lo}, {hi}]")

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, return_mtp: bool = False,
                positions: torch.Tensor | None = None) -> CausalLMOutput:
        cfg = self.config
        self._check_ids("forward", "input_ids", input_ids)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"DeepseekV3ForCausalLM.forward: argument 'labels' must have the shape of input_ids "
                             f"{tuple(input_ids.shape)} (next tokens, -100 = ignored), got {got}")
        B, T = input_ids.shape
        emb = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(T, input_ids.device, positions)
        h = emb
        for layer in self.main_layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.model.norm(h))
        out = CausalLMOutput(logits=logits, hidden_states=h)
        want_mtp = (return_mtp or labels is not None) and len(self.mtp_layers) > 0
        if want_mtp:
            out.mtp_logits = []
            hk = h
            for k, mtp in enumerate(self.mtp_layers, start=1):
                if T - k <= 0:
                    break
                hk = mtp.mtp_forward(hk[:, :-1] if k > 1 else hk[:, : T - k], emb[:, k:], cos[:, : T - k], sin[:, : T - k])
                out.mtp_logits.append(self.lm_head(mtp.shared_head.norm(hk)))
        if labels is not None:
            V = cfg.vocab_size
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
            loss = out.lm_loss
            if out.mtp_logits:
                # depth k at position i predicts token i + k + 1 = labels[:, i + k]
                ces = [F.cross_entropy(ml.float().reshape(-1, V), labels[:, k:].reshape(-1), ignore_index=-100)
                       for k, ml in enumerate(out.mtp_logits, start=1)]
                out.mtp_loss = torch.stack(ces).mean()
                loss = loss + cfg.mtp_loss_weight * out.mtp_loss
            if self.training:
                aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
                if aux:
                    out.aux_loss = torch.stack(aux).sum()
                    loss = loss + out.aux_loss
            out.loss = loss
        return out

    # ------------------------------------------------------------------ generation
    def supports_latent_cache(self) -> bool:
        """True when the config has the sizes of the MLA decode ops (``kv_lora_rank`` 512,
        ``qk_rope_head_dim`` 64: DeepSeek-V3's), which the cached decode path needs."""
        return self.config.kv_lora_rank == 512 and self.config.qk_rope_head_dim == 64

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool | None = None) -> torch.Tensor:
        """Greedy decoding of ``max_new_tokens`` tokens after ``input_ids [B, T]``; returns ``[B, T + max_new_tokens]``.

        ``use_cache=True``: prefill then token-by-token decode over the MLA latent cache (needs
        ``supports_latent_cache()``); ``False``: the full forward pass per new token; ``None`` (default):
        the cache when the config supports it."""
        self._check_ids("generate", "input_ids", input_ids)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"DeepseekV3ForCausalLM.generate: argument 'max_new_tokens' must be an int >= 0, "
                             f"got {max_new_tokens!r}")
        if use_cache is None:
            use_cache = self.supports_latent_cache()
        ids = input_ids
        if max_new_tokens == 0:
            return ids
        if not use_cache:
            for _ in range(max_new_tokens):
                nxt = self(ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
            return ids
        B, T = ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self.prefill_with_cache(ids, cache)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if ids.shape[1] == T + max_new_tokens:
                break
            logits = self.decode_step(nxt, cache)
        return ids

    def new_cache(self, batch: int, max_len: int) -> MLAKVCache:
        cfg = self.config
        if not self.supports_latent_cache():
            raise ValueError(f"DeepseekV3ForCausalLM: the latent-cache decode path (generate(use_cache=True), "
                             f"new_cache, decode_step) needs kv_lora_rank=512 and qk_rope_head_dim=64 (the MLA "
                             f"decode ops' sizes), this config has kv_lora_rank={cfg.kv_lora_rank} and "
                             f"qk_rope_head_dim={cfg.qk_rope_head_dim}; use generate(use_cache=False)")
        return MLAKVCache(cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                          device=self.lm_head.weight.device)

    @torch.no_grad()
    def prefill_with_cache(self, input_ids, cache: MLAKVCache):
        """Runs the prompt token by token? No: feeds the whole prompt through the decode path (s_q = T,
        causal), which fills the cache; returns logits [B, T, V]."""
        return self.decode_step(input_ids, cache)

    @torch.no_grad()
    def decode_step(self, new_ids: torch.Tensor, cache: MLAKVCache) -> torch.Tensor:
        B, s = new_ids.shape
        start = cache.seqlens.long()
        positions = start.unsqueeze(1) + torch.arange(s, device=new_ids.device).unsqueeze(0)
        cache.seqlens += s
        cos, sin = self.model.rotary_emb(positions)
        h = self.model.embed_tokens(new_ids)
        for layer in self.main_layers:
            h = layer.decode(h, cos, sin, cache, positions)
        return self.lm_head(self.model.norm(h))

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, fp8: bool | None = None, dequantize_fp8: bool = False):
        """Loads a Hugging Face-layout checkpoint; see ``dsmoe.models.checkpoint.load_pretrained`` for the rules
        (``fp8=None`` follows the checkpoint, absent MTP weights drop the MTP modules)."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, fp8=fp8, dequantize_fp8=dequantize_fp8)

    def save_pretrained(self, path, *, max_shard_size: int | str = 2 << 30, quantize_fp8: bool = False,
                        dtype=None) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size, quantize_fp8=quantize_fp8, dtype=dtype)


def config_replace(cfg: DeepseekV3Config, **kw) -> DeepseekV3Config:
    return dataclasses.replace(cfg, **kw)
