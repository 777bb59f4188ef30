"""DeepSeek-V3 decoder and causal LM with multi-token prediction (MTP), trainable in FP8.

Module names follow the Hugging Face checkpoint layout (see ``dsmoe.models.checkpoint``), so
``state_dict``-level conversion is a renaming of the routed experts (stacked here, per expert on disk)
plus the MTP modules' shared embedding/head copies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
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
    mtp_logits: list | None = None        # D tensors [B, T - k, V], k = 1..D; position i predicts token i + k + 1
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

    def forward(self, h, cos, sin, attention_mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attention_mask)
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

    def mtp_forward(self, h_prev, emb_next, cos, sin, attention_mask=None):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], -1))
        return DecoderLayer.forward(self, h, cos, sin, attention_mask)


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
    ``return_mtp=True`` adds the MTP logits; ``labels`` adds the losses. Labels follow the Hugging Face
    convention: the shape of input_ids, shifted inside (position t is scored against ``labels[:, t + 1]``,
    the depth-k MTP module at position t against ``labels[:, t + 1 + k]``), -100 ignored; so
    ``labels=input_ids`` trains next-token prediction."""

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

    def _check_mask(self, where: str, mask, ids, *, left_padded: bool, nonempty: bool = False) -> torch.Tensor | None:
        """``attention_mask``: None or a bool/integer tensor of ids' shape holding 0/1 (1 = a real token);
        returned as bool. ``left_padded``: every row is zeros then ones (the cached decode path and
        generation need the real tokens at the right end); ``nonempty``: and at least one 1. Values are
        checked as for ids."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex() \
                or tuple(mask.shape) != tuple(ids.shape):
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'attention_mask' must be a bool or integer tensor "
                             f"of the shape of the ids {tuple(ids.shape)} (1 = token, 0 = padding), got {got}")
        if mask.numel() and mask.device.type == "cpu" and not torch.compiler.is_compiling():
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'attention_mask' must hold only 0 and 1, "
                                 f"got values {torch.unique(mask).tolist()[:8]}")
            m = mask.bool()
            if left_padded:
                bad = (m[:, :-1] & ~m[:, 1:]).any(1)
                if bool(bad.any()):
                    b = int(bad.nonzero()[0, 0])
                    raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'attention_mask' must be left-padded "
                                     f"(each row: zeros, then ones), row {b} is {m[b].int().tolist()}")
            if nonempty and not bool(m[:, -1].all()):
                b = int((~m[:, -1]).nonzero()[0, 0])
                raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'attention_mask': row {b} has no tokens "
                                 f"(nothing to continue)")
        return mask.bool()

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, return_mtp: bool = False,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """``attention_mask [B, T]`` (1 = token, 0 = padding) hides padded keys, as in transformers; the
        positions stay ``0..T-1`` unless ``positions [B, T]`` is given (:meth:`generate` derives them
        from the mask)."""
        cfg = self.config
        self._check_ids("forward", "input_ids", input_ids)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"DeepseekV3ForCausalLM.forward: argument 'labels' must have the shape of input_ids "
                             f"{tuple(input_ids.shape)} (the model shifts them: position t predicts labels[:, t + 1]; "
                             f"-100 = ignored), got {got}")
        mask = self._check_mask("forward", attention_mask, input_ids, left_padded=False)
        B, T = input_ids.shape
        emb = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(T, input_ids.device, positions)
        h = emb
        for layer in self.main_layers:
            h = layer(h, cos, sin, mask)
        logits = self.lm_head(self.model.norm(h))
        out = CausalLMOutput(logits=logits, hidden_states=h)
        want_mtp = (return_mtp or labels is not None) and len(self.mtp_layers) > 0
        if want_mtp:
            out.mtp_logits = []
            hk = h
            for k, mtp in enumerate(self.mtp_layers, start=1):
                if T - k <= 0:
                    break
                hk = mtp.mtp_forward(hk[:, :-1] if k > 1 else hk[:, : T - k], emb[:, k:], cos[:, : T - k], sin[:, : T - k],
                                     None if mask is None else mask[:, : T - k])
                out.mtp_logits.append(self.lm_head(mtp.shared_head.norm(hk)))
        if labels is not None:
            V = cfg.vocab_size
            labels = labels.long()
            # position t predicts labels[:, t + 1] (HF's shift); the last position has no target
            out.lm_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
            loss = out.lm_loss
            # depth k at position i (its logits' row i) predicts token i + k + 1 = labels[:, i + k + 1]; a depth
            # whose rows all lack a target (T <= k + 1) adds no term
            ces = [F.cross_entropy(ml[:, : T - k - 1].float().reshape(-1, V), labels[:, k + 1:].reshape(-1),
                                   ignore_index=-100)
                   for k, ml in enumerate(out.mtp_logits or [], start=1) if T - k - 1 > 0]
            if ces:
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
        """True: the MLA decode ops take any ``kv_lora_rank``/``qk_rope_head_dim``/head count (V3's 512/64
        run the sm_90a kernel on a GPU, other sizes the reference), so every config has the cached path."""
        return True

    def _token_list(self, where: str, arg: str, v) -> list[int] | None:
        if v is None:
            return None
        vals = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if isinstance(vals, torch.Tensor):
            vals = vals.reshape(-1).tolist()
        ok = isinstance(vals, (list, tuple)) and len(vals) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.config.vocab_size for t in vals)
        if not ok:
            raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument '{arg}' must be a token id (or a non-empty list "
                             f"of them) in [0, vocab_size={self.config.vocab_size}), got {v!r}")
        return list(vals)

    def _warn_length(self, length: int) -> None:
        mpe = self.config.max_position_embeddings
        warnings.warn(f"DeepseekV3ForCausalLM.generate: the sequence length {length} exceeds the model's "
                      f"max_position_embeddings ({mpe}); positions past it were not trained (RoPE/YaRN extrapolate), "
                      f"expect degraded output", UserWarning, stacklevel=3)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, use_cache: bool | None = None) -> torch.Tensor:
        """Greedy decoding of up to ``max_new_tokens`` tokens after ``input_ids [B, T]``; returns
        ``[B, T + n]``, n <= max_new_tokens, in input_ids' dtype.

        ``attention_mask [B, T]`` (1 = token, 0 = padding) for left-padded batches: positions come from the
        mask and padded keys are hidden, so each row gets the tokens it would get alone. ``eos_token_id``
        (an id or a list of ids): a row that produced one is finished and continues with ``pad_token_id``
        (default: the (first) eos id, as transformers does); generation stops early once every row has
        finished. ``use_cache=True`` or ``None`` (default): prefill then token-by-token decode over the MLA
        latent cache (bf16, the kernels' format); ``False``: the full forward pass (model dtype) per token.
        An empty batch or an empty prompt (B = 0 or T = 0) returns ``input_ids`` unchanged (nothing to
        continue). Runs in eval mode (no MoE load statistics or balance losses are recorded) and restores
        every module's train/eval mode afterwards. Warns (``UserWarning``) once the length passes
        ``max_position_embeddings``."""
        self._check_ids("generate", "input_ids", input_ids)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"DeepseekV3ForCausalLM.generate: argument 'max_new_tokens' must be an int >= 0, "
                             f"got {max_new_tokens!r}")
        if use_cache is not None and not isinstance(use_cache, bool):
            raise ValueError(f"DeepseekV3ForCausalLM.generate: argument 'use_cache' must be None or a bool, got {use_cache!r}")
        mask = self._check_mask("generate", attention_mask, input_ids, left_padded=True, nonempty=True)
        eos = self._token_list("generate", "eos_token_id", eos_token_id)
        pad = self._token_list("generate", "pad_token_id", pad_token_id)
        if pad is not None and len(pad) != 1:
            raise ValueError(f"DeepseekV3ForCausalLM.generate: argument 'pad_token_id' must be one token id, got {pad_token_id!r}")
        pad_id = pad[0] if pad is not None else (eos[0] if eos is not None else None)
        B, T = input_ids.shape
        if B == 0 or T == 0 or max_new_tokens == 0:
            return input_ids.clone()
        use_cache = True if use_cache is None else use_cache
        with self._inference_mode():
            return self._greedy(input_ids, max_new_tokens, mask, eos, pad_id, use_cache)

    @contextlib.contextmanager
    def _inference_mode(self):
        """Eval mode inside (a MoE layer in train mode counts its load for the next bias update and records
        a balance loss); every module's own flag restored on exit, errors included."""
        modes = [(m, m.training) for m in self.modules() if m.training]
        for m, _ in modes:
            m.training = False
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _greedy(self, ids, max_new_tokens, mask, eos, pad_id, use_cache):
        B, T = ids.shape
        dev = ids.device
        mpe = self.config.max_position_embeddings
        warned = T > mpe
        if warned:
            self._warn_length(T)
        eos_t = torch.tensor(eos, device=dev) if eos is not None else None
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        m = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        if use_cache:
            cache = self.new_cache(B, T + max_new_tokens)
            logits = self.prefill_with_cache(ids, cache, attention_mask=mask)[:, -1]
        for step in range(max_new_tokens):
            if not use_cache:
                pos = None if mask is None else (m.long().cumsum(1) - 1).clamp(min=0)
                logits = self(ids, attention_mask=None if mask is None else m, positions=pos).logits[:, -1]
            nxt = logits.argmax(-1).to(ids.dtype)
            if eos_t is not None:
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
                unfinished = unfinished & ~torch.isin(nxt, eos_t)
            ids = torch.cat([ids, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
            if not warned and ids.shape[1] > mpe:
                warned = True
                self._warn_length(ids.shape[1])
            if step + 1 == max_new_tokens or (eos_t is not None and not bool(unfinished.any())):
                break
            if use_cache:
                logits = self.decode_step(nxt[:, None], cache)[:, -1]
        return ids

    def new_cache(self, batch: int, max_len: int) -> MLAKVCache:
        """An empty latent cache for ``batch`` sequences of up to ``max_len`` tokens (all layers; bf16)."""
        cfg = self.config
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DeepseekV3ForCausalLM.new_cache: argument '{name}' must be an int >= 0, got {v!r}")
        return MLAKVCache(cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                          device=self.lm_head.weight.device)

    @torch.no_grad()
    def prefill_with_cache(self, input_ids, cache: MLAKVCache, *, attention_mask: torch.Tensor | None = None):
        """Feeds the whole (left-padded) prompt through the decode path at once (s_q = T, causal), which
        fills the cache; returns logits ``[B, T, V]`` (rows of padding slots are meaningless)."""
        return self.decode_step(input_ids, cache, attention_mask=attention_mask)

    @torch.no_grad()
    def decode_step(self, new_ids: torch.Tensor, cache: MLAKVCache, *,
                    attention_mask: torch.Tensor | None = None, return_hidden: bool = False):
        """Appends ``new_ids [B, s]`` after what ``cache`` holds and returns their logits ``[B, s, V]``
        (``return_hidden=True``: ``(logits, h)``, h the last layer's output before the final norm, which
        the MTP modules take).

        ``attention_mask [B, s]`` (left-padded: zeros then ones) marks padding slots, which take no cache
        space. Raises before touching the cache when a row would pass ``cache.max_len``, or when the
        cache does not fit this model or batch; a failure inside the layers leaves ``seqlens`` as it was.
        Runs the layers in eval mode (no MoE load counted), whatever the model's mode."""
        def body(ids, cos, sin, positions):
            h = self.model.embed_tokens(ids)
            for layer in self.main_layers:
                h = layer.decode(h, cos, sin, cache, positions)
            return h, self.lm_head(self.model.norm(h))

        h, logits = self._cached_run("decode_step", new_ids, cache, attention_mask, body)
        return (logits, h) if return_hidden else logits

    @torch.no_grad()
    def mtp_decode_step(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: MLAKVCache, *,
                        attention_mask: torch.Tensor | None = None):
        """One MTP module over the latent cache (speculative drafting): at each new position i it combines
        ``h_prev [B, s, H]`` (the main model's, or the previous draft step's, hidden state at i) with the
        embedding of ``next_ids [B, s]`` (the token at i + 1), like :meth:`forward`'s MTP branch, and returns
        ``(h, logits)``; the logits at i predict the token at i + 2. ``depth`` counts from 0; a depth past
        the last module reuses the last one. ``cache`` must hold the MTP layers (``len(cache.kv)`` = layers +
        MTP modules) and its own ``seqlens`` (positions with an MTP entry)."""
        D = len(self.mtp_layers)
        if D == 0:
            raise ValueError("DeepseekV3ForCausalLM.mtp_decode_step: this model has no MTP module "
                             "(num_nextn_predict_layers=0)")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"DeepseekV3ForCausalLM.mtp_decode_step: argument 'depth' must be an int >= 0, got {depth!r}")
        mtp = self.mtp_layers[min(depth, D - 1)]
        if not isinstance(h_prev, torch.Tensor) or tuple(h_prev.shape) != (*next_ids.shape, self.config.hidden_size):
            got = tuple(h_prev.shape) if isinstance(h_prev, torch.Tensor) else type(h_prev).__name__
            raise ValueError(f"DeepseekV3ForCausalLM.mtp_decode_step: argument 'h_prev' must have shape "
                             f"{(*next_ids.shape, self.config.hidden_size)}, got {got}")
        if len(cache.kv) <= mtp.layer_idx:
            raise ValueError(f"DeepseekV3ForCausalLM.mtp_decode_step: argument 'cache' has {len(cache.kv)} layers, "
                             f"the MTP module needs layer {mtp.layer_idx}")

        def body(ids, cos, sin, positions):
            x = mtp.eh_proj(torch.cat([mtp.enorm(self.model.embed_tokens(ids)), mtp.hnorm(h_prev)], -1))
            h = DecoderLayer.decode(mtp, x, cos, sin, cache, positions)
            return h, self.lm_head(mtp.shared_head.norm(h))

        return self._cached_run("mtp_decode_step", next_ids, cache, attention_mask, body)

    def _cached_run(self, where, new_ids, cache, attention_mask, body):
        """Shared by the cached paths: checks, positions after ``cache.seqlens``, capacity, and
        ``seqlens`` advanced only when ``body`` succeeds."""
        cfg = self.config
        self._check_ids(where, "new_ids" if where == "decode_step" else "next_ids", new_ids)
        B, s = new_ids.shape
        dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        L, D = cfg.num_hidden_layers, len(self.mtp_layers)
        if not isinstance(cache, MLAKVCache) or not L <= len(cache.kv) <= L + D or \
                (cache.kv and cache.kv[0].shape[-1] != dim and not _fp8_cache_fits(cache.kv[0], dim)):
            got = (f"{len(cache.kv)} layers of {tuple(cache.kv[0].shape[-1:]) if cache.kv else ()} values"
                   if isinstance(cache, MLAKVCache) else type(cache).__name__)
            raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'cache' must be this model's new_cache(): "
                             f"{cfg.num_hidden_layers} layers of {dim} values per token, got {got}")
        if cache.seqlens.shape[0] != B:
            raise ValueError(f"DeepseekV3ForCausalLM.{where}: argument 'new_ids' has {B} rows, the cache holds "
                             f"{cache.seqlens.shape[0]} sequences")
        mask = self._check_mask(where, attention_mask, new_ids, left_padded=True)
        dev = new_ids.device
        n_new = torch.full((B,), s, dtype=torch.int32, device=dev) if mask is None else mask.sum(1, dtype=torch.int32)
        new_bound = cache.len_bound + s
        if B and new_bound > cache.max_len:
            # the host bound says the cache may be full: check exactly (one device sync)
            after = cache.seqlens.long() + n_new.long()
            if bool((after > cache.max_len).any()):
                b = int(after.argmax())
                raise ValueError(f"DeepseekV3ForCausalLM.{where}: the cache is full: sequence {b} holds "
                                 f"{int(cache.seqlens[b])} of max_len={cache.max_len} tokens and {int(n_new[b])} more "
                                 f"were given (make the cache with new_cache(batch, max_len) large enough)")
            new_bound = int(after.max())
        start = cache.seqlens.long()
        if mask is None:
            positions = start.unsqueeze(1) + torch.arange(s, device=dev).unsqueeze(0)
        else:
            positions = torch.where(mask, start.unsqueeze(1) + mask.long().cumsum(1) - 1, -1)
        cos, sin = self.model.rotary_emb(positions.clamp(min=0))
        old = cache.seqlens.clone()
        cache.seqlens += n_new
        try:
            with self._inference_mode():
                out = body(new_ids, cos, sin, positions)
        except BaseException:
            cache.seqlens.copy_(old)
            raise
        cache.len_bound = new_bound
        return out

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


def _fp8_cache_fits(kv: torch.Tensor, dim: int) -> bool:
    """The FP8 latent cache (656 bytes per token) holds V3's 512 + 64 values."""
    return dim == 576 and kv.shape[-1] == 656 and kv.dtype in (torch.float8_e4m3fn, torch.uint8)


def config_replace(cfg: DeepseekV3Config, **kw) -> DeepseekV3Config:
    return dataclasses.replace(cfg, **kw)
