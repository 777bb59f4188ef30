"""Hugging Face-layout checkpoints (safetensors, sharded with ``model.safetensors.index.json``).

Names are exactly V3's (see docs/model.md): routed experts per expert
(``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), the gate's fp32
``e_score_correction_bias``, MTP modules at layer index ``num_hidden_layers + k`` with their copies of the
embedding (``embed_tokens.weight``) and head (``shared_head.head.weight``). FP8 checkpoints store each FP8
linear's e4m3 weight with ``<name>.weight_scale_inv`` (fp32, 128x128 blocks) and a ``quantization_config``.

Loading is strict: missing keys, unexpected keys and shape mismatches raise :class:`CheckpointError`
naming every offending key; unreadable, truncated or missing shard files raise it naming the file.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .. import ops
from ..nn.fp8 import FP8Linear
from ..nn.moe import GroupedExperts
from .config import DeepseekV3Config

__all__ = ["CheckpointError", "hf_state_dict", "load_hf_state_dict", "save_pretrained", "load_pretrained",
           "read_checkpoint"]

_FP8 = torch.float8_e4m3fn
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_PROJS = ("gate_proj", "up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint does not match the model (keys, shapes, dtypes) or a file cannot be read."""


def _mtp_copies(model) -> dict[str, str]:
    """Checkpoint keys that duplicate shared tensors: {ckpt key: our key}."""
    L = model.config.num_hidden_layers
    out = {}
    for k in range(model.config.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{L + k}.shared_head.head.weight"] = "lm_head.weight"
    return out


def _fp8_prefixes(model):
    lin = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    exp = {n for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    return lin, exp


def hf_state_dict(model, *, quantize_fp8: bool = False, dtype=None) -> dict[str, torch.Tensor]:
    """The model's tensors under HF checkpoint names. ``quantize_fp8`` writes every FP8 linear (and routed
    expert) as e4m3 + ``weight_scale_inv`` (per_block_quant_fp8, 128x128); ``dtype`` casts the rest
    (the gate bias stays fp32)."""
    lin, exp = _fp8_prefixes(model)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}

    def cast(k, t):
        if t.dtype == _FP8 or k.endswith("weight_scale_inv") or k.endswith("e_score_correction_bias"):
            return t
        return t.to(dtype) if dtype is not None else t

    for k, t in sd.items():
        if t is None:
            continue
        prefix, _, leaf = k.rpartition(".")
        if prefix in exp:
            if leaf.endswith("_scale_inv"):
                continue  # written with its weight
            scale = sd.get(f"{prefix}.{leaf}_scale_inv")
            for e in range(t.shape[0]):
                base = f"{prefix}.{e}.{leaf}"
                if t.dtype == _FP8:
                    out[base + ".weight"], out[base + ".weight_scale_inv"] = t[e], scale[e]
                elif quantize_fp8:
                    q, s = ops.per_block_quant_fp8(t[e].detach().contiguous(), (128, 128))
                    out[base + ".weight"], out[base + ".weight_scale_inv"] = q, s
                else:
                    out[base + ".weight"] = cast(k, t[e])
            continue
        if prefix in lin and leaf == "weight" and quantize_fp8 and t.dtype != _FP8:
            q, s = ops.per_block_quant_fp8(t.detach().contiguous(), (128, 128))
            out[k], out[prefix + ".weight_scale_inv"] = q, s
            continue
        out[k] = cast(k, t)
    for ck, ours in _mtp_copies(model).items():
        out[ck] = cast(ours, sd[ours]).clone()  # a copy: safetensors refuses shared storage
    return {k: v.detach().contiguous() for k, v in out.items()}


def _expected(model, fp8_ckpt_keys: set[str]) -> dict[str, tuple]:
    """Expected checkpoint keys -> (shape, kind) for this model; FP8 weights add their scale keys."""
    hf = hf_state_dict(model)
    exp = {k: tuple(v.shape) for k, v in hf.items() if not k.endswith("weight_scale_inv")}
    lin, exps = _fp8_prefixes(model)
    fp8able = set()
    for k in exp:
        prefix = k[: -len(".weight")] if k.endswith(".weight") else None
        m = _EXPERT_RE.match(k)
        if prefix in lin or (m and m.group(1) in exps):
            fp8able.add(k)
    return exp, fp8able


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], DeepseekV3Config]:
    """Reads every tensor of a checkpoint directory (single file or sharded with an index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    cfg = DeepseekV3Config.from_pretrained(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(wm.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        wm, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors.index.json and no model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for fn in files:
        fp = os.path.join(path, fn)
        if not os.path.exists(fp):
            raise CheckpointError(f"shard {fp} listed in the index does not exist")
        try:
            part = load_file(fp)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read shard {fp} (truncated or corrupt?): {e}") from None
        if wm is not None:
            listed = {k for k, v in wm.items() if v == fn}
            missing = sorted(listed - part.keys())
            if missing:
                raise CheckpointError(f"shard {fp} lacks tensors its index lists: {missing[:10]}")
        tensors.update(part)
    return tensors, cfg


def load_hf_state_dict(model, tensors: dict[str, torch.Tensor], *, dequantize_fp8: bool = False) -> None:
    """Copies HF-named tensors into the model, strictly. FP8 weights (with ``weight_scale_inv``) put the
    layer in serving mode, or are dequantized into the master weight with ``dequantize_fp8``."""
    exp, fp8able = _expected(model, set())
    copies = _mtp_copies(model)
    got = set(tensors)
    scale_keys = {k for k in got if k.endswith(".weight_scale_inv")}
    missing = sorted(k for k in exp if k not in got and k not in copies)
    unexpected = sorted(k for k in got - scale_keys if k not in exp)
    orphan_scales = sorted(k for k in scale_keys if k[: -len("_scale_inv")] not in fp8able
                           or k[: -len("_scale_inv")] not in got)
    errs = []
    if missing:
        errs.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected or orphan_scales:
        errs.append(f"unexpected keys ({len(unexpected) + len(orphan_scales)}): {(unexpected + orphan_scales)[:20]}")
    for k in sorted(got & exp.keys()):
        t = tensors[k]
        if tuple(t.shape) != exp[k]:
            errs.append(f"shape mismatch for {k}: checkpoint {tuple(t.shape)}, model {exp[k]}")
        if t.dtype == _FP8:
            if k not in fp8able:
                errs.append(f"{k} is float8 but its module is not an FP8 linear")
            elif k + "_scale_inv" not in got:
                errs.append(f"{k} is float8 but {k}_scale_inv is missing")
            else:
                s = tensors[k + "_scale_inv"]
                se = (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
                if tuple(s.shape) != se:
                    errs.append(f"shape mismatch for {k}_scale_inv: checkpoint {tuple(s.shape)}, expected {se}")
    if errs:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(errs))

    def deq(k):
        t = tensors[k]
        if t.dtype == _FP8:
            return ops.per_block_dequant_fp8(t, tensors[k + "_scale_inv"].float(), (128, 128), out_dtype=torch.float32)
        return t

    mods = dict(model.named_modules())
    with torch.no_grad():
        # routed experts: stack per-expert tensors
        exp_groups: dict[tuple[str, str], dict[int, str]] = {}
        for k in exp:
            m = _EXPERT_RE.match(k)
            if m:
                exp_groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = k
        for (prefix, proj), by_e in exp_groups.items():
            mod: GroupedExperts = mods[prefix]
            keys = [by_e[e] for e in range(mod.num_experts)]
            fp8 = tensors[keys[0]].dtype == _FP8
            if fp8 and not dequantize_fp8:
                w = torch.stack([tensors[k] for k in keys])
                s = torch.stack([tensors[k + "_scale_inv"].float() for k in keys])
                setattr(mod, proj, torch.nn.Parameter(w.to(getattr(mod, proj).device), requires_grad=False))
                setattr(mod, proj + "_scale_inv", s.to(w.device))
            else:
                p = getattr(mod, proj)
                if p.dtype == _FP8:
                    raise CheckpointError(f"{prefix}.{proj}: cannot load a non-FP8 weight into an FP8 (serving) model")
                p.copy_(torch.stack([deq(k) for k in keys]).to(p.dtype))
        for k in exp:
            if _EXPERT_RE.match(k) or k in copies:
                continue
            prefix, _, leaf = k.rpartition(".")
            mod = mods[prefix]
            t = tensors[k]
            if t.dtype == _FP8 and not dequantize_fp8:
                mod.load_fp8(t, tensors[k + "_scale_inv"].float())
                continue
            cur = getattr(mod, leaf)
            if getattr(cur, "dtype", None) == _FP8:
                raise CheckpointError(f"{k}: cannot load a non-FP8 weight into an FP8 (serving) layer")
            cur.copy_(deq(k).to(cur.dtype))


def save_pretrained(model, path, *, max_shard_size: int = 2 << 30, quantize_fp8: bool = False, dtype=None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = hf_state_dict(model, quantize_fp8=quantize_fp8, dtype=dtype)
    cfg = model.config
    has_fp8 = any(v.dtype == _FP8 for v in sd.values())
    qc = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
          if has_fp8 else None)
    dts = {v.dtype for k, v in sd.items() if v.dtype != _FP8 and not k.endswith(("_scale_inv", "correction_bias"))}
    tdt = str(next(iter(dts))).replace("torch.", "") if len(dts) == 1 else "bfloat16"
    cfg.replace(quantization_config=qc, torch_dtype=tdt).save(path)
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and size + n > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = sd[k].cpu()
        size += n
    shards.append(cur)
    wm, total = {}, 0
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(path, fn), metadata={"format": "pt"})
        for k, v in sh.items():
            wm[k] = fn
            total += v.numel() * v.element_size()
    # NOTE: shards of an earlier save into this directory (another shard count, or a single file) are not in
    # the new index: remove them so the directory holds exactly one checkpoint.
    shard_re = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
    for stale in os.listdir(path):
        if (stale == "model.safetensors" or shard_re.fullmatch(stale)) and stale not in wm.values():
            os.remove(os.path.join(path, stale))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)


_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                "fp16": torch.float16}


def _resolve_dtype(dtype, cfg: DeepseekV3Config) -> torch.dtype:
    """``dtype`` of from_pretrained: a floating torch.dtype, a name ("bfloat16", "torch.float32", ...), or
    None / "auto" for the checkpoint's ``torch_dtype`` (bfloat16 when it names none we know)."""
    if dtype is None or dtype == "auto":
        return _DTYPE_NAMES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.bfloat16)
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"from_pretrained: argument 'dtype' must be a torch dtype, 'auto' or one of "
                             f"{sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"from_pretrained: argument 'dtype' must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def load_pretrained(cls, path, *, dtype=None, device=None, fp8: bool = True, dequantize_fp8: bool = False):
    tensors, cfg = read_checkpoint(path)
    dtype = _resolve_dtype(dtype, cfg)
    model = cls(cfg.replace(quantization_config=None), fp8=fp8, dtype=dtype)
    load_hf_state_dict(model, tensors, dequantize_fp8=dequantize_fp8)
    if device is not None:
        model = model.to(device)
    return model.eval()
