"""Hugging Face-layout checkpoints (safetensors, sharded with ``model.safetensors.index.json``).

Names are exactly V3's (see docs/model.md): routed experts per expert
(``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), the gate's fp32
``e_score_correction_bias``, MTP modules at layer index ``num_hidden_layers + k`` with their copies of the
embedding (``embed_tokens.weight``) and head (``shared_head.head.weight``). FP8 checkpoints store each FP8
linear's e4m3 weight with ``<name>.weight_scale_inv`` (fp32, 128x128 blocks) and a ``quantization_config``.

Loading follows the checkpoint (:func:`load_pretrained`) and is strict: missing keys, unexpected keys, shape
and dtype mismatches and every ``weight_scale_inv`` not beside a float8_e4m3fn weight of matching block shape
raise :class:`CheckpointError` naming every offending key, from the shards' headers before any tensor is
allocated; unreadable, truncated or missing shard files and a bad config.json or index raise it naming the file.
"""
from __future__ import annotations

import json
import os
import re
import warnings

import torch
from torch import nn

from .. import ops
from ..nn.fp8 import FP8Linear
from ..nn.moe import GroupedExperts
from .config import DeepseekV3Config

__all__ = ["CheckpointError", "hf_state_dict", "load_hf_state_dict", "save_pretrained", "load_pretrained",
           "read_checkpoint"]

_FP8 = torch.float8_e4m3fn
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_PROJS = ("gate_proj", "up_proj", "down_proj")
_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


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
    dtype = _save_dtype(dtype)
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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_HIGH = (torch.float32, torch.bfloat16, torch.float16, torch.float64)   # accepted for high-precision tensors
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_MAX_LISTED = 20


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{keys[:_MAX_LISTED]}{more}"


# ----------------------------------------------------------------------------- expected keys of a model
class _Slot:
    """Where one checkpoint tensor goes: ``module.leaf`` (``expert`` indexes a stacked GroupedExperts tensor)."""
    __slots__ = ("shape", "module", "leaf", "expert", "fp8able")

    def __init__(self, shape, module, leaf, expert=None, fp8able=False):
        self.shape, self.module, self.leaf, self.expert, self.fp8able = tuple(shape), module, leaf, expert, fp8able


def _slots(model) -> dict[str, _Slot]:
    """Checkpoint key -> slot for every persistent tensor of ``model`` (works on the meta device: shapes only).
    Routed experts are listed per expert; FP8-capable weights (FP8Linear, routed experts) are marked."""
    out: dict[str, _Slot] = {}
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(mod, GroupedExperts):
            for proj in _PROJS:
                t = getattr(mod, proj)
                for e in range(mod.num_experts):
                    out[f"{pre}{e}.{proj}.weight"] = _Slot(t.shape[1:], mod, proj, e, True)
            continue
        for leaf, t in list(mod.named_parameters(recurse=False)) + [
                (n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]:
            if t is None or leaf.endswith("_scale_inv"):
                continue
            out[pre + leaf] = _Slot(t.shape, mod, leaf, None, isinstance(mod, FP8Linear) and leaf == "weight")
    return out


# ----------------------------------------------------------------------------- reading a checkpoint directory
def _read_config(path) -> DeepseekV3Config:
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        raise CheckpointError(f"{path}: no config.json (a Hugging Face-layout checkpoint needs one)")
    try:
        return DeepseekV3Config.from_json_file(p)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise CheckpointError(msg if p in msg else f"{p}: {msg}") from None


def _shard_files(path) -> tuple[list[str], dict | None]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                doc = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (must be a JSON object, got "
                                  f"{type(doc).__name__})")
        wm = doc.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must be an object of "
                                  f"tensor name -> file name, got {type(wm).__name__})")
        bad = sorted({v for v in wm.values() if os.path.basename(v) != v})
        if bad:
            raise CheckpointError(f"{index}: shard names must be plain file names in the checkpoint directory, got {bad[:5]}")
        return sorted(set(wm.values())), wm
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"], None
    raise CheckpointError(f"{path}: no model.safetensors.index.json and no model.safetensors")


class _Reader:
    """The checkpoint's shards opened lazily (``safe_open``): headers (shape, dtype) without reading data,
    and single tensors on demand."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open

        files, wm = _shard_files(path)
        self.path, self.where, self.meta, self._open = path, {}, {}, {}
        for fn in files:
            fp = os.path.join(path, fn)
            if not os.path.exists(fp):
                raise CheckpointError(f"shard {fp} listed in the index does not exist")
            try:
                h = safe_open(fp, "pt", device="cpu")
                keys = list(h.keys())
                for k in keys:
                    sl = h.get_slice(k)
                    dt = sl.get_dtype()
                    if k in self.where:
                        raise CheckpointError(f"tensor {k} is stored twice: in {self.where[k]} and {fn}")
                    self.where[k] = fn
                    self.meta[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(dt, dt))
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"cannot read shard {fp} (truncated or corrupt?): {e}") from None
            self._open[fn] = h
            if wm is not None:
                missing = sorted(k for k, v in wm.items() if v == fn and k not in keys)
                if missing:
                    raise CheckpointError(f"shard {fp} lacks tensors its index lists: {_names(missing)}")

    def get(self, key: str) -> torch.Tensor:
        fn = self.where[key]
        try:
            return self._open[fn].get_tensor(key)
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
            raise CheckpointError(f"cannot read tensor {key} from shard {os.path.join(self.path, fn)}: {e}") from None


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], DeepseekV3Config]:
    """Reads every tensor of a checkpoint directory (single file or sharded with an index)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    cfg = _read_config(path)
    r = _Reader(path)
    return {k: r.get(k) for k in r.meta}, cfg


# ----------------------------------------------------------------------------- checking
def _block(cfg: DeepseekV3Config | None) -> tuple[int, int]:
    return cfg.weight_block_size if cfg is not None and cfg.quantization_config else (128, 128)


def _check(model, meta: dict[str, tuple], block: tuple[int, int], dequantize_fp8: bool) -> dict[str, _Slot]:
    """Every checkpoint tensor (``meta``: key -> (shape, dtype)) against the model's slots; raises
    :class:`CheckpointError` naming every offending key. Returns the slots."""
    slots = _slots(model)
    copies = _mtp_copies(model)
    got = set(meta)
    scale_keys = {k for k in got if k.endswith(".weight_scale_inv")}
    errs = []
    missing = sorted(k for k in slots if k not in got)
    if missing:
        L = model.config.num_hidden_layers
        mtp = [k for k in missing if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= L]
        note = (f" ({len(mtp)} of them MTP weights: the checkpoint has some of the MTP modules' tensors but not "
                f"all that num_nextn_predict_layers={model.config.num_nextn_predict_layers} needs)" if mtp else "")
        errs.append(f"missing keys ({len(missing)}){note}: {_names(missing)}")
    unexpected = sorted(k for k in got - scale_keys if k not in slots and k not in copies)
    if unexpected:
        errs.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
    bad_shape, bad_dtype = [], []
    for k in sorted(got - scale_keys):
        shape, dt = meta[k]
        want = slots[k].shape if k in slots else (slots[copies[k]].shape if k in copies else None)
        if want is not None and shape != want:
            bad_shape.append(f"shape mismatch for {k}: checkpoint {shape}, model {want}")
        fp8able = k in slots and slots[k].fp8able
        if dt == _FP8 and not fp8able and (k in slots or k in copies):
            bad_dtype.append(f"{k} is float8_e4m3fn but its module is not an FP8 linear (only FP8Linear weights and "
                             f"routed experts may be FP8)")
        elif dt != _FP8 and dt not in _HIGH and (k in slots or k in copies):
            bad_dtype.append(f"{k} has dtype {dt}, expected float32, bfloat16 or float16"
                             + (" (or float8_e4m3fn with a weight_scale_inv)" if fp8able else ""))
    if bad_shape:
        errs.extend(bad_shape[:_MAX_LISTED] + ([f"... and {len(bad_shape) - _MAX_LISTED} more shape mismatches"]
                                               if len(bad_shape) > _MAX_LISTED else []))
    if bad_dtype:
        errs.append(f"unsupported dtype ({len(bad_dtype)}): " + "; ".join(bad_dtype[:_MAX_LISTED]))
    # weight_scale_inv: valid only beside a float8_e4m3fn weight, with one scale per block
    pairing = []
    for sk in sorted(scale_keys):
        wk = sk[: -len("_scale_inv")]
        if wk not in meta:
            pairing.append(f"{sk} has no weight {wk}")
            continue
        wshape, wdt = meta[wk]
        if wdt != _FP8:
            pairing.append(f"{sk} is beside {wk} of dtype {wdt} (a scale belongs to a float8_e4m3fn weight only)")
            continue
        sshape, sdt = meta[sk]
        if len(wshape) == 2:
            want = (-(-wshape[0] // block[0]), -(-wshape[1] // block[1]))
            if sshape != want:
                pairing.append(f"{sk} has shape {sshape}, expected {want} for weight {wk} {wshape} in "
                               f"{block[0]}x{block[1]} blocks")
        if sdt not in (torch.float32, torch.bfloat16):
            pairing.append(f"{sk} has dtype {sdt}, expected float32 (or bfloat16)")
    for k in sorted(got - scale_keys):
        if meta[k][1] == _FP8 and k + "_scale_inv" not in got:
            pairing.append(f"{k} is float8_e4m3fn but {k}_scale_inv is missing")
    if pairing:
        errs.append(f"weight_scale_inv pairing ({len(pairing)}): " + "; ".join(pairing[:_MAX_LISTED]))
    # one dtype per layer's routed experts (they run as one stacked tensor per projection)
    by_layer: dict[str, dict] = {}
    for k, sl in slots.items():
        if sl.expert is not None and k in meta:
            by_layer.setdefault(k[: k.index(".experts.") + len(".experts")], {}).setdefault(meta[k][1], []).append(k)
    for prefix, by_dt in sorted(by_layer.items()):
        if len(by_dt) > 1:
            parts = ", ".join(f"{dt}: {_names(ks)[:300]}" for dt, ks in by_dt.items())
            errs.append(f"mixed dtypes among the routed experts of {prefix} (one dtype per layer: all e4m3 or "
                        f"all high precision): {parts}")
    has_fp8 = any(dt == _FP8 for _, dt in meta.values())
    if has_fp8 and not dequantize_fp8 and tuple(block) != (128, 128):
        errs.append(f"quantization_config.weight_block_size {list(block)} is not supported by the FP8 layers "
                    f"(128x128); load with dequantize_fp8=True")
    if errs:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(errs))
    return slots


def _precheck(cfg: DeepseekV3Config, meta: dict[str, tuple]) -> None:
    """A few shapes the config alone implies, checked before the model is built: a config that does not
    describe the checkpoint (another model's sizes, the 671B defaults) fails in milliseconds, naming fields."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    fk, E = cfg.first_k_dense_replace, cfg.n_routed_experts
    want = {"model.embed_tokens.weight": ((V, H), "vocab_size, hidden_size"),
            "lm_head.weight": ((V, H), "vocab_size, hidden_size"),
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight":
                ((cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), "kv_lora_rank + qk_rope_head_dim, hidden_size"),
            "model.layers.0.mlp.gate_proj.weight": ((cfg.intermediate_size, H), "intermediate_size, hidden_size"),
            f"model.layers.{fk}.mlp.experts.0.gate_proj.weight":
                ((cfg.moe_intermediate_size, H), "moe_intermediate_size, hidden_size"),
            f"model.layers.{fk}.mlp.gate.weight": ((E, H), "n_routed_experts, hidden_size")}
    errs = [f"{k} has shape {meta[k][0]}, the config ({fields}) implies {shape}"
            for k, (shape, fields) in want.items() if k in meta and meta[k][0] != shape]
    layers = {int(m.group(1)) for k in meta if (m := _LAYER_RE.match(k))}
    if layers and max(layers) + 1 < L:
        errs.append(f"num_hidden_layers={L} but the checkpoint's layers end at model.layers.{max(layers)}")
    if errs:
        raise CheckpointError("config.json does not describe this checkpoint: " + "; ".join(errs))


# ----------------------------------------------------------------------------- copying
def _prepare_fp8_slots(model, slots, meta, dequantize_fp8: bool) -> None:
    """Turns the layers whose checkpoint weights are FP8 into serving mode (e4m3 weight + fp32 scales) before
    materialization, so that no master weight is allocated for them."""
    if dequantize_fp8:
        return
    done = set()
    for k, sl in slots.items():
        if meta[k][1] != _FP8 or (id(sl.module), sl.leaf) in done:
            continue
        done.add((id(sl.module), sl.leaf))
        mod, cur = sl.module, getattr(sl.module, sl.leaf)
        scale_shape = meta[k + "_scale_inv"][0]
        if sl.expert is not None:
            scale_shape = (cur.shape[0], *scale_shape)
        setattr(mod, sl.leaf, nn.Parameter(torch.empty(cur.shape, dtype=_FP8, device=cur.device), requires_grad=False))
        setattr(mod, sl.leaf + "_scale_inv", torch.empty(scale_shape, dtype=torch.float32, device=cur.device))


def _copy_in(model, slots, meta, get, block, dequantize_fp8: bool) -> None:
    with torch.no_grad():
        for k, sl in slots.items():
            t = get(k)
            dest = getattr(sl.module, sl.leaf)
            if t.dtype == _FP8:
                s = get(k + "_scale_inv").float()
                if dest.dtype == _FP8:
                    sdest = getattr(sl.module, sl.leaf + "_scale_inv")
                    if sl.expert is None:
                        dest.copy_(t), sdest.copy_(s)
                    else:
                        dest[sl.expert].copy_(t), sdest[sl.expert].copy_(s)
                    continue
                t = ops.per_block_dequant_fp8(t, s, block, out_dtype=torch.float32)
            elif dest.dtype == _FP8:
                raise CheckpointError(f"{k}: cannot load a non-FP8 weight into an FP8 (serving) layer")
            (dest if sl.expert is None else dest[sl.expert]).copy_(t)


def _reset_non_persistent(model) -> None:
    """Buffers that no checkpoint holds, recomputed after materialization from the meta device by the
    modules that own them (``reset_non_persistent_buffers``)."""
    for m in model.modules():
        if hasattr(m, "reset_non_persistent_buffers"):
            m.reset_non_persistent_buffers()
        elif m._non_persistent_buffers_set:
            raise RuntimeError(f"checkpoint loading does not know how to initialize {type(m).__name__}'s "
                               f"non-persistent buffers {sorted(m._non_persistent_buffers_set)}: give it a "
                               f"reset_non_persistent_buffers() method")


def load_hf_state_dict(model, tensors: dict[str, torch.Tensor], *, dequantize_fp8: bool = False) -> None:
    """Copies HF-named tensors into the model, strictly. FP8 weights (with ``weight_scale_inv``) put the
    layer in serving mode, or are dequantized into the master weight with ``dequantize_fp8``."""
    meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    block = _block(getattr(model, "config", None))
    slots = _check(model, meta, block, dequantize_fp8)
    _prepare_fp8_slots(model, slots, meta, dequantize_fp8)
    _copy_in(model, slots, meta, tensors.__getitem__, block, dequantize_fp8)


_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _save_dtype(dtype) -> torch.dtype | None:
    """save_pretrained's ``dtype``: None (keep), float32/bfloat16/float16 as torch dtypes or names."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _SAVE_DTYPES:
        return _SAVE_DTYPES[dtype.replace("torch.", "")]
    if isinstance(dtype, torch.dtype) and dtype in _SAVE_DTYPES.values():
        return dtype
    raise ValueError(f"save_pretrained: argument 'dtype' must be None, torch.float32, torch.bfloat16, torch.float16 "
                     f"or one of their names {sorted(_SAVE_DTYPES)}, got {dtype!r} (FP8 is quantize_fp8=True)")


_SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def _shard_bytes(size) -> int:
    """``max_shard_size``: bytes as an int, or a Hugging Face size string with transformers' meaning
    ("5GB" = 5 * 10**9, "1.5GiB" = 1.5 * 2**30, a lowercase "b" ending "Gb"/"Mb"/"Kb" means bits)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", size)
        unit = m and next(((u, f) for u, f in _SIZE_UNITS if m.group(2).upper() == u), None)
        if not unit:
            raise ValueError(f"save_pretrained: argument 'max_shard_size' must be an int (bytes) or a size such as "
                             f"'5GB', '500MB', '1.5GiB', got {size!r}")
        n = int(float(m.group(1)) * unit[1])
        if unit[0] in ("GB", "MB", "KB") and m.group(2).endswith("b"):
            n //= 8
    else:
        raise ValueError(f"save_pretrained: argument 'max_shard_size' must be an int (bytes) or a size string such "
                         f"as '5GB', got {size!r}")
    if n <= 0:
        raise ValueError(f"save_pretrained: argument 'max_shard_size' must be > 0 bytes, got {size!r}")
    return n


def save_pretrained(model, path, *, max_shard_size: int | str = 2 << 30, quantize_fp8: bool = False, dtype=None) -> None:
    from safetensors.torch import save_file

    # arguments first: nothing is written for a bad one
    max_shard_size = _shard_bytes(max_shard_size)
    dtype = _save_dtype(dtype)
    if not isinstance(quantize_fp8, bool):
        raise ValueError(f"save_pretrained: argument 'quantize_fp8' must be a bool, got {quantize_fp8!r}")
    os.makedirs(path, exist_ok=True)
    sd = hf_state_dict(model, quantize_fp8=quantize_fp8, dtype=dtype)
    cfg = model.config
    has_fp8 = any(v.dtype == _FP8 for v in sd.values())
    qc = dict(_QUANT_CONFIG) if has_fp8 else None
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


def _weights_dtype(meta: dict[str, tuple]) -> torch.dtype:
    """The dtype of the checkpoint's high-precision weights (the embedding's), what transformers uses when
    config.json names none."""
    dt = meta.get("model.embed_tokens.weight", (None, None))[1]
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def _resolve_dtype(dtype, cfg: DeepseekV3Config, meta: dict[str, tuple] | None = None) -> torch.dtype:
    """``dtype`` of from_pretrained: a floating torch.dtype, a name ("bfloat16", "torch.float32", ...), or
    None / "auto" for the checkpoint's ``torch_dtype`` (its weights' dtype when config.json names none)."""
    if dtype is None or dtype == "auto":
        name = str(cfg.torch_dtype).replace("torch.", "") if cfg.torch_dtype is not None else None
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        return _weights_dtype(meta or {})
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"from_pretrained: argument 'dtype' must be a torch dtype, 'auto' or one of "
                             f"{sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"from_pretrained: argument 'dtype' must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def load_pretrained(cls, path, *, dtype=None, device=None, fp8: bool | None = None, dequantize_fp8: bool = False):
    """Loads a checkpoint directory following what it holds (see docs/model.md, "Loading"):

    1. config.json is validated (required fields, JSON types) and the shards' headers are read (no data).
    2. MTP: when the config asks for ``num_nextn_predict_layers`` modules and the checkpoint has no MTP tensor
       at all (transformers never writes them), the model is built without MTP modules, one warning says so
       and ``config.num_nextn_predict_layers`` is 0; a partial set is an error naming the missing keys.
       Layers past the ``num_hidden_layers + num_nextn_predict_layers`` the config asks for are skipped with
       one warning (transformers ignores them too).
    3. ``fp8=None``: FP8 linears exactly when the checkpoint is FP8 (``quantization_config`` says fp8 or a
       weight is float8_e4m3fn); True/False wins.
    4. The model is built on the meta device and every key, shape, dtype and weight_scale_inv pairing is
       checked against the headers (:class:`CheckpointError` naming the keys), then it is materialized on
       ``device`` without initialization and each tensor is copied in once.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if fp8 is not None and not isinstance(fp8, bool):
        raise TypeError(f"from_pretrained: argument 'fp8' must be None, True or False, got {fp8!r}")
    if not isinstance(dequantize_fp8, bool):
        raise TypeError(f"from_pretrained: argument 'dequantize_fp8' must be a bool, got {dequantize_fp8!r}")
    cfg = _read_config(path)
    reader = _Reader(path)
    meta = reader.meta
    _precheck(cfg, meta)
    dtype = _resolve_dtype(dtype, cfg, meta)
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if n_mtp and not any((m := _LAYER_RE.match(k)) and int(m.group(1)) >= L for k in meta):
        # transformers' save_pretrained (and most fine-tuned V3 checkpoints) drop the MTP layers while the
        # config keeps asking for them: load the main model, as transformers does, and say so once.
        warnings.warn(f"{path}: config.json asks for num_nextn_predict_layers={n_mtp} MTP module(s) but the "
                      f"checkpoint holds no MTP weights (model.layers.{L}.*); loading without MTP modules "
                      f"(config.num_nextn_predict_layers set to 0)", UserWarning, stacklevel=3)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    extra = [k for k in meta if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= L + cfg.num_nextn_predict_layers]
    if extra:
        # MTP modules the config does not ask for (e.g. num_nextn_predict_layers set to 0 to serve without
        # MTP): transformers ignores layers past the model too; skip their tensors and say so once.
        layers = sorted({int(_LAYER_RE.match(k).group(1)) for k in extra})
        warnings.warn(f"{path}: the checkpoint holds {len(extra)} tensors of layers {layers} beyond the "
                      f"{L} layers + {cfg.num_nextn_predict_layers} MTP module(s) config.json asks for; "
                      f"they are not loaded", UserWarning, stacklevel=3)
        meta = {k: v for k, v in meta.items() if k not in set(extra)}
    has_fp8_weights = any(dt == _FP8 for _, dt in meta.values())
    block = _block(cfg)
    if fp8 is None:
        fp8 = cfg.is_fp8_checkpoint or has_fp8_weights
    if not (has_fp8_weights and not dequantize_fp8):
        cfg = cfg.replace(quantization_config=None)   # the model holds no FP8 weights
    elif not cfg.quantization_config:
        cfg = cfg.replace(quantization_config=dict(_QUANT_CONFIG))
    with torch.device("meta"):
        model = cls(cfg, fp8=fp8, dtype=dtype)
    slots = _check(model, meta, block, dequantize_fp8)
    _prepare_fp8_slots(model, slots, meta, dequantize_fp8)
    model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    _reset_non_persistent(model)
    _copy_in(model, slots, meta, reader.get, block, dequantize_fp8)
    return model.eval()
