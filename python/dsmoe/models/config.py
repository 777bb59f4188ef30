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
    # None (transformers' default): from_pretrained uses the dtype of the checkpoint's weights
    torch_dtype: str | None = None
    # Training knobs (dsmoe only; written to config.json under these names, ignored by other loaders).
    aux_loss_alpha: float = 1e-4          # complementary sequence-wise balance loss weight
    bias_update_speed: float = 1e-3       # gamma of the auxiliary-loss-free bias update
    mtp_loss_weight: float = 0.3          # lambda of the MTP loss
    extra: dict = field(default_factory=dict)  # unknown config.json keys, written back unchanged

    def __post_init__(self):
        self.validate()
        rs = self.rope_scaling
        if rs is not None and self.rope_type == "yarn" and rs.get("original_max_position_embeddings") is None:
            # transformers' default: the pre-YaRN context is max_position_embeddings (the ramp then depends on it)
            self.rope_scaling = {**rs, "original_max_position_embeddings": self.max_position_embeddings}

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

    _FLOATS = ("routed_scaling_factor", "initializer_range", "rms_norm_eps", "rope_theta", "aux_loss_alpha",
               "bias_update_speed", "mtp_loss_weight")
    _BOOLS = ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings")
    _STRS = ("scoring_func", "hidden_act")
    _TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

    def validate(self) -> "DeepseekV3Config":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"DeepseekV3Config: {msg}")
        # NOTE: bool is an int subclass in Python (and JSON true would pass an isinstance(int) check), so every
        # numeric check excludes it explicitly.
        for name in self._POSITIVE + self._NON_NEGATIVE + ("max_position_embeddings",) + (
                ("q_lora_rank",) if self.q_lora_rank is not None else ()):
            v = getattr(self, name)
            low = 0 if name in self._NON_NEGATIVE else 1
            need(_is_int(v) and v >= low, f"{name} must be an int >= {low}, got {_show(v)}")
        for name in self._FLOATS:
            v = getattr(self, name)
            need(_is_num(v) and math.isfinite(v), f"{name} must be a number, got {_show(v)}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta!r}")
        need(self.rms_norm_eps >= 0, f"rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")
        for name in self._BOOLS:
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name} must be a boolean, got {_show(v)}")
        for name in self._STRS:
            v = getattr(self, name)
            need(isinstance(v, str), f"{name} must be a string, got {_show(v)}")
        for name in self._TOKEN_IDS:
            v = getattr(self, name)
            need(v is None or (_is_int(v) and v >= 0), f"{name} must be an int >= 0 or null, got {_show(v)}")
        need(self.torch_dtype is None or isinstance(self.torch_dtype, str),
             f"torch_dtype must be a string or null, got {_show(self.torch_dtype)}")
        need(isinstance(self.extra, dict), f"extra must be a dict, got {_show(self.extra)}")
        self._validate_rope_scaling(need)
        self._validate_quantization_config(need)
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

    def _validate_rope_scaling(self, need) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        need(isinstance(rs, dict), f"rope_scaling must be an object or null, got {_show(rs)}")
        t = rs.get("rope_type", rs.get("type", "default"))
        need(t in (None, "default", "yarn"), f"rope_scaling: rope type {t!r} is not supported (yarn or default)")
        if t in (None, "default"):
            return
        need("factor" in rs and rs["factor"] is not None,
             f"rope_scaling: YaRN needs 'factor' (the context extension ratio), got keys {sorted(rs)}")
        need(_is_num(rs["factor"]) and rs["factor"] > 0, f"rope_scaling.factor must be a number > 0, got {_show(rs['factor'])}")
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = rs.get(k)
            need(v is None or (_is_num(v) and math.isfinite(v)), f"rope_scaling.{k} must be a number, got {_show(v)}")
        v = rs.get("original_max_position_embeddings")
        need(v is None or (_is_int(v) and v >= 1),
             f"rope_scaling.original_max_position_embeddings must be an int >= 1, got {_show(v)}")
        v = rs.get("truncate", True)
        need(isinstance(v, bool), f"rope_scaling.truncate must be a boolean, got {_show(v)}")

    def _validate_quantization_config(self, need) -> None:
        q = self.quantization_config
        if q is None:
            return
        need(isinstance(q, dict), f"quantization_config must be an object or null, got {_show(q)}")
        need(q.get("quant_method") == "fp8",
             f"quantization_config.quant_method must be 'fp8' (the only scheme supported), got {_show(q.get('quant_method'))}")
        fmt = q.get("fmt", "e4m3")
        need(fmt == "e4m3", f"quantization_config.fmt must be 'e4m3', got {_show(fmt)}")
        act = q.get("activation_scheme", "dynamic")
        need(act == "dynamic", f"quantization_config.activation_scheme must be 'dynamic', got {_show(act)}")
        bs = q.get("weight_block_size", [128, 128])
        need(isinstance(bs, (list, tuple)) and len(bs) == 2 and all(_is_int(b) and b >= 1 for b in bs),
             f"quantization_config.weight_block_size must be two ints >= 1, got {_show(bs)}")

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

    # Fields a config.json must state: the sizes (a default here is the 671B model: the checkpoint would only
    # be rejected after comparing shapes) and the sizes tensors cannot tell apart (kv_b_proj holds
    # heads x (nope + v), q_b_proj heads x (nope + rope); the top-k of the routing is in no tensor). Every
    # other field falls back to transformers' DeepseekV3Config default (V3's value), as transformers does.
    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                "qk_nope_head_dim", "v_head_dim")
    # null in config.json means "the default" for these (transformers types them Optional); n_group/topk_group
    # null means no group-limited routing (DeepSeek-V2-Lite style configs).
    _NULL_IS_DEFAULT = ("first_k_dense_replace", "norm_topk_prob", "rope_interleave")
    _NULLABLE = ("q_lora_rank", "pad_token_id", "bos_token_id", "eos_token_id", "quantization_config", "torch_dtype")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "DeepseekV3Config":
        """From a config.json's object. Raises ``ValueError`` naming the field for a missing required field,
        a value of the wrong JSON type, or an unsupported setting."""
        if not isinstance(d, dict):
            raise ValueError(f"DeepseekV3Config: {source} must be a JSON object, got {_show(d)}")
        d = dict(d)
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if d.get("torch_dtype") is None and d.get("dtype") is not None:
            d["torch_dtype"] = d["dtype"]
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"DeepseekV3Config: {source} lacks required field(s) {missing} (a DeepSeek-V3 "
                             f"config.json states them; only the other fields have defaults)")
        kw: dict[str, Any] = {}
        for k in cls._HF_KEYS:
            if k not in d:
                continue
            v = d[k]
            if v is None and k in ("n_group", "topk_group"):
                v = 1
            elif v is None and k in cls._NULL_IS_DEFAULT:
                continue
            elif v is None and k not in cls._NULLABLE:
                raise ValueError(f"DeepseekV3Config: {source} field {k!r} must not be null")
            kw[k] = v
        # RoPE: HF v4 `rope_scaling` + `rope_theta`, transformers v5 `rope_parameters` (which holds rope_theta).
        rp, rs, theta = d.get("rope_parameters"), d.get("rope_scaling"), d.get("rope_theta")
        for name, v in (("rope_parameters", rp), ("rope_scaling", rs)):
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"DeepseekV3Config: {source} field {name!r} must be an object or null, got {_show(v)}")
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
            if not _is_num(theta):
                raise ValueError(f"DeepseekV3Config: rope_theta must be a number, got {_show(theta)}")
            kw["rope_theta"] = float(theta)
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):
            kw["eos_token_id"] = eos[0] if eos else None
        kw["extra"] = {k: v for k, v in d.items() if k not in cls._HF_KEYS and k not in cls._DROP}
        return cls(**kw).validate()

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DeepseekV3Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepseekV3Config: {path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"DeepseekV3Config: {path} is not UTF-8 text: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"DeepseekV3Config: {path} must hold a JSON object, got {_show(d)}")
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
            raise ValueError(f"DeepseekV3Config: {path} has model_type={d.get('model_type')!r}, expected 'deepseek_v3'")
        return cls.from_dict(d, source=str(path))

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v) -> str:
    """A value with its JSON type, for error messages (``True`` alone would not say it was a boolean)."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)
    return f"{v!r} ({kind})"


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
