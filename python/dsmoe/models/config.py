"""`DeepseekV3Config`: the model hyper-parameters, read from and written to a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeepseekV3Config"]


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN etc.: {"rope_type"/"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim"}; None = plain RoPE.
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quantization_config: dict | None = None
    torch_dtype: str | None = "bfloat16"
    # Training knobs (dsmoe only; written to config.json under these names, ignored by other loaders).
    aux_loss_alpha: float = 1e-4          # complementary sequence-wise balance loss weight
    bias_update_speed: float = 1e-3       # gamma of the auxiliary-loss-free bias update
    mtp_loss_weight: float = 0.3          # lambda of the MTP loss
    extra: dict = field(default_factory=dict)  # unknown config.json keys, written back unchanged

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default")) or "default"

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times ``mscale**2`` under YaRN with ``mscale_all_dim`` (V3: 0.135234)."""
        s = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if self.rope_type != "default" and rs.get("mscale_all_dim", 0):
            m = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            s = s * m * m
        return s

    @property
    def is_fp8_checkpoint(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    @property
    def weight_block_size(self) -> tuple[int, int]:
        q = self.quantization_config or {}
        return tuple(q.get("weight_block_size", (128, 128)))  # type: ignore[return-value]

    _POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                 "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok")
    _NON_NEGATIVE = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")

    def validate(self) -> "DeepseekV3Config":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"DeepseekV3Config: {msg}")
        for name in self._POSITIVE + self._NON_NEGATIVE + (("q_lora_rank",) if self.q_lora_rank is not None else ()):
            v = getattr(self, name)
            low = 0 if name in self._NON_NEGATIVE else 1
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                 f"{name} must be an int >= {low}, got {v!r}")
        need(self.n_routed_experts % max(self.n_group, 1) == 0,
             f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
        need(1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group} groups")
        need(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2,
             "grouped routing needs at least 2 experts per group (group score = sum of the top-2)")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(self.scoring_func in ("sigmoid", "softmax"), f"scoring_func must be sigmoid or softmax, got {self.scoring_func!r}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias=True is not supported (DeepSeek-V3 has no attention biases)")
        need(not self.tie_word_embeddings, "tie_word_embeddings=True is not supported (DeepSeek-V3 unties the head)")
        return self

    # ------------------------------------------------------------------ HF config.json
    _HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "scoring_func",
                "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_interleave",
                "attention_bias", "tie_word_embeddings", "num_nextn_predict_layers", "bos_token_id", "eos_token_id",
                "pad_token_id", "quantization_config", "torch_dtype", "aux_loss_alpha", "bias_update_speed",
                "mtp_loss_weight")
    _DROP = ("architectures", "model_type", "auto_map", "transformers_version", "num_key_value_heads", "rope_scaling",
             "rope_parameters", "rope_theta", "dtype", "num_mtp_layers", "seq_aux", "topk_method", "moe_layer_freq",
             "ep_size", "pretraining_tp", "use_cache", "attention_dropout", "output_router_logits", "head_dim",
             "qk_head_dim", "aux_loss_alpha")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepseekV3Config":
        d = dict(d)
        kw: dict[str, Any] = {}
        for k in cls._HF_KEYS:
            if k in d and d[k] is not None or k in ("q_lora_rank", "pad_token_id", "quantization_config") and k in d:
                kw[k] = d[k]
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if "torch_dtype" not in d and "dtype" in d:
            kw["torch_dtype"] = d["dtype"]
        # RoPE: HF v4 `rope_scaling` + `rope_theta`, transformers v5 `rope_parameters` (which holds rope_theta).
        rp = d.get("rope_parameters") or None
        rs = d.get("rope_scaling") or None
        theta = d.get("rope_theta")
        if rp:
            rp = dict(rp)
            theta = rp.pop("rope_theta", theta)
            if rp.get("rope_type", rp.get("type", "default")) not in (None, "default"):
                rs = rp
        if rs is not None:
            rs = dict(rs)
            t = rs.get("rope_type", rs.get("type"))
            if t not in ("yarn", "default", None):
                raise ValueError(f"DeepseekV3Config: rope type {t!r} is not supported (yarn or default)")
            if t == "default" or t is None:
                rs = None
        kw["rope_scaling"] = rs
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        extra = {k: v for k, v in d.items() if k not in cls._HF_KEYS and k not in cls._DROP}
        kw["extra"] = extra
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        return cls(**kw).validate()

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DeepseekV3Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepseekV3Config: {path} is not valid JSON: {e}") from None
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
            raise ValueError(f"DeepseekV3Config: {path} has model_type={d.get('model_type')!r}, expected 'deepseek_v3'")
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DeepseekV3Config":
        p = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(p):
            raise FileNotFoundError(f"DeepseekV3Config: no config.json at {p}")
        return cls.from_json_file(p)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "rope_theta"):
                continue
            v = getattr(self, f.name)
            if f.name == "quantization_config" and v is None:
                continue
            d[f.name] = v
        d["num_key_value_heads"] = self.num_attention_heads
        d["topk_method"] = "noaux_tc"
        # Both spellings: v4 readers look at rope_scaling/rope_theta, v5 readers at rope_parameters.
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        rp = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rp = dict(self.rope_scaling)
            rp.setdefault("rope_type", rp.pop("type", "yarn"))
            rp["rope_theta"] = self.rope_theta
        d["rope_parameters"] = rp
        d.update(self.extra)
        return d

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def replace(self, **kw) -> "DeepseekV3Config":
        return dataclasses.replace(self, **kw).validate()


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
