"""MLA decoding over a paged latent KV cache (FlashMLA-compatible shapes), BF16 and FP8 caches.

Plan/run: ``get_mla_metadata`` computes the split-KV schedule once per decode step (on the device for
CUDA tensors, no host sync) and every layer reuses it in ``mla_decode_with_kvcache``. CUDA tensors run
dsmoe's sm_90a kernels; CPU tensors run ``dsmoe.ref.mla`` (which is the specification: formulas,
cache layouts and the metadata format are documented there and in docs/mla.md).

Sizes: the kernels are built for V3's latent cache (``kv_lora_rank`` 512 + rope 64 = 576 values per
token). The bf16 cache takes any ``kv_lora_rank`` / rope width / head count: other sizes run the
reference on every device (on CUDA tensors too, with a host sync per call), so small models can use the
same decode path. The FP8 (656-byte) cache exists for the 576-value layout only.

Out-of-range ids inside ``block_table`` and ``cache_seqlens`` larger than the table cannot be checked
on a CUDA tensor without a host sync. CPU tensors are always checked; set ``DSMOE_CHECK_BLOCK_TABLE=1``
to check CUDA tensors too (one sync per call: a debug switch, not for CUDA-graph capture). Without it
the kernel still never reads past ``block_table[b, :max_blocks]`` (it clamps the sequence length to
the table), but it trusts the ids stored there.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .. import _checks as C
from .. import _native
from ..ref import mla as ref
from ._registry import register

__all__ = [
    "get_mla_metadata",
    "mla_decode_with_kvcache",
    "mla_kvcache_append",
    "quantize_mla_kvcache_fp8",
    "dequantize_mla_kvcache_fp8",
    "mla_fp8_kvcache_empty",
]

_BF16 = torch.bfloat16
_FP8 = torch.float8_e4m3fn
_BLOCK = ref.MLA_BLOCK_SIZE
_DQK = ref.MLA_D_QK
_DV = ref.MLA_D_V
_FP8_BYTES = ref.MLA_FP8_BYTES_PER_TOKEN
_CPU_NUM_SMS = 132  # CPU tensors: schedule as for an H100 SXM (the result does not depend on it)
_MAX_PARTS = 8192   # split parts (metadata rows) the kernels accept (csrc/mla.cu kMaxParts)


def _on_device(t: torch.Tensor):
    """Makes t's GPU the current device for the launch (the launchers set per-device kernel attributes
    and launch on the current device); a no-op when it already is."""
    return _native.on_device(t.device)


def _check_enabled() -> bool:
    return os.environ.get("DSMOE_CHECK_BLOCK_TABLE", "0") not in ("", "0")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_NUM_SMS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kernel_sizes(d_qk: int, d_v: int) -> bool:
    """Whether the sm_90a kernels take these sizes (V3's: 576 = 512 latent + 64 rope, V = the 512 latent)."""
    return d_qk == _DQK and d_v == _DV


def _kv_kind(op: str, kv_cache: torch.Tensor) -> bool:
    """Validates the cache; returns True for the FP8 (656-byte) layout."""
    C.check_tensor(op, "kv_cache", kv_cache, dtypes=(_BF16, _FP8, torch.uint8), ndim=4)
    nb, bs, hk, d = kv_cache.shape
    if bs != _BLOCK:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': block size (dim 1) must be {_BLOCK}, got shape {tuple(kv_cache.shape)}")
    if hk != 1:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': number of KV heads (dim 2) must be 1, got shape {tuple(kv_cache.shape)}")
    fp8 = kv_cache.dtype != _BF16
    if fp8 and d != _FP8_BYTES:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': last dim must be {_FP8_BYTES} for an FP8 (656-byte) "
                         f"cache, got shape {tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d or kv_cache.stride(1) != d:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': each 64-token page must be contiguous, got strides {kv_cache.stride()}")
    if (kv_cache.stride(0) * kv_cache.element_size()) % 16:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': page stride must be a multiple of 16 bytes, got {kv_cache.stride(0)} elements")
    return fp8


def _check_table_values(op: str, block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int,
                        s_q: int = 0) -> None:
    """Host checks of the data (CPU always; CUDA only under DSMOE_CHECK_BLOCK_TABLE=1: it syncs)."""
    sl = cache_seqlens.cpu().long()
    bt = block_table.cpu().long()
    cap = bt.shape[1] * _BLOCK
    if sl.numel() and int(sl.min()) < 0:
        raise ValueError(f"dsmoe.{op}: argument 'cache_seqlens': lengths must be >= 0, got min {int(sl.min())}")
    if sl.numel() and int(sl.max()) > cap:
        b = int(sl.argmax())
        raise ValueError(f"dsmoe.{op}: argument 'cache_seqlens': cache_seqlens[{b}]={int(sl[b])} exceeds the "
                         f"block table's capacity {bt.shape[1]} blocks x {_BLOCK} = {cap} tokens")
    used = torch.arange(bt.shape[1]).view(1, -1) < ((sl + _BLOCK - 1) // _BLOCK).view(-1, 1)
    ids = bt[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise ValueError(f"dsmoe.{op}: argument 'block_table': block id {int(bad)} used by a sequence is out of "
                         f"range [0, {num_blocks}) (num_blocks of kv_cache)")


# ----------------------------------------------------------------------------- metadata
@torch.library.custom_op("dsmoe::get_mla_metadata", mutates_args=())
def _get_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = cache_seqlens.shape[0]
    if not _native.use_kernel("mla", cache_seqlens):
        return ref.get_mla_metadata(cache_seqlens, 1, 1, num_sm_parts)
    md = torch.empty((num_sm_parts, ref.MLA_METADATA_FIELDS), dtype=torch.int32, device=cache_seqlens.device)
    ns = torch.empty((B + 1,), dtype=torch.int32, device=cache_seqlens.device)
    launch = _native.require_kernel("get_mla_metadata", "mla_get_metadata")
    with _on_device(cache_seqlens):
        launch(cache_seqlens.data_ptr(), B, num_sm_parts, md.data_ptr(), ns.data_ptr(), _native.stream(cache_seqlens))
    return md, ns


@_get_metadata.register_fake
def _(cache_seqlens, num_sm_parts):
    B = cache_seqlens.shape[0]
    return (cache_seqlens.new_empty((num_sm_parts, ref.MLA_METADATA_FIELDS), dtype=torch.int32),
            cache_seqlens.new_empty((B + 1,), dtype=torch.int32))


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int = 1, *,
                     num_sms: Optional[int] = None):
    """Split-KV schedule for one decode step: ``(tile_scheduler_metadata int32 [P, 8], num_splits int32 [B + 1])``.

    ``num_q_tokens_per_head_k = s_q * num_heads_q // num_heads_k`` (MLA: ``s_q * H``); ``num_heads_k`` is 1.
    ``P = max(1, num_sms // (num_heads_k * ceil(num_q_tokens_per_head_k / 64)))``, ``num_sms`` defaulting to
    the device's SM count (132 for CPU tensors). Format: ``dsmoe.ref.mla.get_mla_metadata``. Reusable by
    every layer of the step; computed on the device without a host sync."""
    op = "get_mla_metadata"
    C.check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    C.check_contiguous(op, "cache_seqlens", cache_seqlens)
    if not _is_int(num_q_tokens_per_head_k) or num_q_tokens_per_head_k <= 0:
        raise ValueError(f"dsmoe.{op}: argument 'num_q_tokens_per_head_k' must be a positive int, got {num_q_tokens_per_head_k!r}")
    if num_heads_k != 1:
        raise ValueError(f"dsmoe.{op}: argument 'num_heads_k': MLA has one KV head, got {num_heads_k!r}")
    if num_sms is None:
        num_sms = _num_sms(cache_seqlens.device)
    if not _is_int(num_sms) or num_sms <= 0:
        raise ValueError(f"dsmoe.{op}: argument 'num_sms' must be a positive int, got {num_sms!r}")
    P = ref.mla_num_sm_parts(num_sms, num_q_tokens_per_head_k, num_heads_k)
    if P > _MAX_PARTS:
        raise ValueError(f"dsmoe.{op}: argument 'num_sms': gives {P} split parts, at most {_MAX_PARTS} are supported")
    return torch.ops.dsmoe.get_mla_metadata(cache_seqlens, P)


# ----------------------------------------------------------------------------- decode
@torch.library.custom_op("dsmoe::mla_decode_with_kvcache", mutates_args=())
def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
            tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor, head_dim_v: int,
            softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    op = "mla_decode_with_kvcache"
    B, s_q, H, d_qk = q.shape
    fp8 = kv_cache.dtype != _BF16
    kernel = _native.use_kernel("mla", q) and _kernel_sizes(d_qk, head_dim_v)
    if not kernel or _check_enabled():
        _check_table_values(op, block_table, cache_seqlens, kv_cache.shape[0], s_q)
    if not kernel:
        return ref.mla_decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    out = torch.empty((B, s_q, H, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, s_q), dtype=torch.float32, device=q.device)
    P = tile_scheduler_metadata.shape[0]
    # NOTE: worst case of the schedule: every sequence has one split plus one extra per part.
    n_acc = B + P
    o_acc = torch.empty((n_acc, s_q * H, head_dim_v), dtype=torch.float32, device=q.device)
    l_acc = torch.empty((n_acc, s_q * H), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    if q.data_ptr() % 16 or kv_cache.data_ptr() % 16:
        raise ValueError(f"dsmoe.{op}: arguments 'q' and 'kv_cache' must start at 16-byte aligned addresses")
    launch = _native.require_kernel(op, "mla_decode")
    with _on_device(q):
        _launch_decode(launch, q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
                       o_acc, l_acc, P, fp8, softmax_scale, causal)
    return out, lse


def _launch_decode(launch, q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
                   o_acc, l_acc, P, fp8, softmax_scale, causal):
    B, s_q, H, _ = q.shape
    launch(q.data_ptr(), kv_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(),
           tile_scheduler_metadata.data_ptr(), num_splits.data_ptr(), out.data_ptr(), lse.data_ptr(),
           o_acc.data_ptr(), l_acc.data_ptr(),
           B, s_q, H, kv_cache.shape[0], block_table.shape[1], P,
           q.stride(0), q.stride(1), q.stride(2), block_table.stride(0), kv_cache.stride(0) * kv_cache.element_size(),
           fp8, float(softmax_scale), bool(causal), _native.stream(q))


@_decode.register_fake
def _(q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v, softmax_scale, causal):
    B, s_q, H, _ = q.shape
    return q.new_empty((B, s_q, H, head_dim_v)), q.new_empty((B, H, s_q), dtype=torch.float32)


def mla_decode_with_kvcache(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                            num_splits: torch.Tensor, softmax_scale: float, causal: bool = False, *,
                            kv_scales: Optional[torch.Tensor] = None):
    """MLA decode (absorbed form, MQA with d_qk 576, d_v 512 for V3) over a paged cache.

    q ``[B, s_q, H, d_qk]`` bf16 (last dim contiguous; with V3's sizes, other strides multiples of 8
    elements); kv_cache ``[num_blocks, 64, 1, d_qk]`` bf16, or the FP8 layout ``[num_blocks, 64, 1, 656]``
    (d_qk 576; float8_e4m3fn or uint8 bytes, scales inline; see ``dsmoe.ref.mla``); block_table int32
    ``[B, max_blocks]``; cache_seqlens int32 ``[B]``; head_dim_v (the latent width, V = the first
    head_dim_v cache values) in ``[1, d_qk]``, 512 for the FP8 cache. The sm_90a kernel runs d_qk 576 /
    head_dim_v 512 on CUDA tensors; other sizes run the reference (any device); metadata from
    ``get_mla_metadata`` for these cache_seqlens and ``s_q * H``; softmax_scale is required (V3: 0.135234).
    Returns ``(out [B, s_q, H, head_dim_v] bf16, lse fp32 [B, H, s_q])`` (natural log). ``causal`` masks among
    the s_q new tokens (query i sees positions ``< seqlen - s_q + i + 1``); a query that sees nothing
    gives out = 0, lse = +inf. ``kv_scales`` exists for signature compatibility and must be None: the
    FP8 layout carries its scales inline."""
    op = "mla_decode_with_kvcache"
    C.check_tensor(op, "q", q, dtypes=(_BF16,), ndim=4)
    fp8 = _kv_kind(op, kv_cache)
    C.check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
    C.check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    C.check_tensor(op, "tile_scheduler_metadata", tile_scheduler_metadata, dtypes=(torch.int32,), ndim=2)
    C.check_tensor(op, "num_splits", num_splits, dtypes=(torch.int32,), ndim=1)
    B, s_q, H, d = q.shape
    if fp8 and d != _DQK:
        raise ValueError(f"dsmoe.{op}: argument 'q': head dim (last) must be {_DQK} (512 latent + 64 rope) with an "
                         f"FP8 cache, got shape {tuple(q.shape)}")
    if not fp8 and d != kv_cache.shape[-1]:
        raise ValueError(f"dsmoe.{op}: argument 'q': head dim (last) must equal argument 'kv_cache''s last dim "
                         f"(kv_lora_rank + rope), got q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)}")
    if fp8 and head_dim_v != _DV:
        raise ValueError(f"dsmoe.{op}: argument 'head_dim_v' must be {_DV} with an FP8 cache, got {head_dim_v!r}")
    if not _is_int(head_dim_v) or not 1 <= head_dim_v <= d:
        raise ValueError(f"dsmoe.{op}: argument 'head_dim_v' must be an int in [1, {d}] (the latent width; "
                         f"{d} = q's head dim), got {head_dim_v!r}")
    if s_q < 1 or H < 1:
        raise ValueError(f"dsmoe.{op}: argument 'q': s_q and H must be >= 1, got shape {tuple(q.shape)}")
    C.check_last_dim_contiguous(op, "q", q)
    # the kernel's vector loads need 16-byte aligned rows; checked on CPU too so a CPU run catches it
    if _kernel_sizes(d, head_dim_v) and any(s % 8 for s in q.stride()[:3]):
        raise ValueError(f"dsmoe.{op}: argument 'q': strides must be multiples of 8 elements (16 bytes), got {q.stride()}")
    if block_table.shape[0] != B:
        raise ValueError(f"dsmoe.{op}: argument 'block_table' must have shape ({B}, max_blocks) (B from q), got {tuple(block_table.shape)}")
    C.check_last_dim_contiguous(op, "block_table", block_table)
    C.check_shape(op, "cache_seqlens", cache_seqlens, (B,))
    C.check_contiguous(op, "cache_seqlens", cache_seqlens)
    C.check_shape(op, "num_splits", num_splits, (B + 1,))
    if tile_scheduler_metadata.shape[1] != ref.MLA_METADATA_FIELDS or tile_scheduler_metadata.shape[0] < 1:
        raise ValueError(f"dsmoe.{op}: argument 'tile_scheduler_metadata' must have shape (num_sm_parts, "
                         f"{ref.MLA_METADATA_FIELDS}), got {tuple(tile_scheduler_metadata.shape)}")
    C.check_contiguous(op, "tile_scheduler_metadata", tile_scheduler_metadata)
    C.check_contiguous(op, "num_splits", num_splits)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"dsmoe.{op}: argument 'softmax_scale' must be a positive finite float, got {softmax_scale!r}")
    if kv_scales is not None:
        raise ValueError(f"dsmoe.{op}: argument 'kv_scales' must be None: the FP8 cache layout "
                         f"[num_blocks, 64, 1, 656] carries its scales inline")
    if fp8 and kv_cache.dtype not in (_FP8, torch.uint8):
        raise TypeError(f"dsmoe.{op}: argument 'kv_cache': FP8 cache must be float8_e4m3fn or uint8")
    C.check_same_device(op, {"q": q, "kv_cache": kv_cache, "block_table": block_table, "cache_seqlens": cache_seqlens,
                             "tile_scheduler_metadata": tile_scheduler_metadata, "num_splits": num_splits})
    return torch.ops.dsmoe.mla_decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                                   num_splits, head_dim_v, float(softmax_scale), bool(causal))


# ----------------------------------------------------------------------------- append
@torch.library.custom_op("dsmoe::mla_kvcache_append", mutates_args=("kv_cache",))
def _append(kv_cache: torch.Tensor, block_table: torch.Tensor, batch_ids: torch.Tensor, positions: torch.Tensor,
            latent: torch.Tensor, k_rope: torch.Tensor, norm_weight: Optional[torch.Tensor], cos: Optional[torch.Tensor],
            sin: Optional[torch.Tensor], eps: float, rope_interleaved: bool, scale_ue8m0: bool) -> None:
    op = "mla_kvcache_append"
    kernel = _native.use_kernel("mla", kv_cache) and latent.shape[1] == _DV and k_rope.shape[1] == ref.MLA_D_ROPE
    if not kernel or _check_enabled():
        _check_append_values(op, kv_cache, block_table, batch_ids, positions)
    if not kernel:
        ref.mla_kvcache_append(kv_cache, block_table, batch_ids, positions, latent, k_rope, norm_weight=norm_weight,
                               eps=eps, cos=cos, sin=sin, rope_interleaved=rope_interleaved, scale_ue8m0=scale_ue8m0)
        return
    T = latent.shape[0]
    if T == 0:
        return
    launch = _native.require_kernel(op, "mla_kvcache_append")
    with _on_device(kv_cache):
        _launch_append(launch, kv_cache, block_table, batch_ids, positions, latent, k_rope, norm_weight, cos, sin, eps,
                       rope_interleaved, scale_ue8m0)


def _launch_append(launch, kv_cache, block_table, batch_ids, positions, latent, k_rope, norm_weight, cos, sin, eps,
                   rope_interleaved, scale_ue8m0):
    T = latent.shape[0]
    launch(kv_cache.data_ptr(), block_table.data_ptr(), batch_ids.data_ptr(), positions.data_ptr(),
           latent.data_ptr(), k_rope.data_ptr(), _native.ptr(norm_weight), _native.ptr(cos), _native.ptr(sin),
           T, kv_cache.shape[0], block_table.shape[0], block_table.shape[1], block_table.stride(0),
           latent.stride(0), k_rope.stride(0), 0 if cos is None else cos.stride(0), 0 if sin is None else sin.stride(0),
           kv_cache.stride(0) * kv_cache.element_size(), kv_cache.dtype != _BF16, float(eps), bool(rope_interleaved),
           bool(scale_ue8m0), _native.stream(kv_cache))


@_append.register_fake
def _(kv_cache, block_table, batch_ids, positions, latent, k_rope, norm_weight, cos, sin, eps, rope_interleaved, scale_ue8m0):
    return None


def _check_append_values(op, kv_cache, block_table, batch_ids, positions) -> None:
    pos = positions.cpu().long()
    bid = batch_ids.cpu().long()
    keep = pos >= 0
    pos, bid = pos[keep], bid[keep]
    if bid.numel() == 0:
        return
    B, mb = block_table.shape
    if int(bid.min()) < 0 or int(bid.max()) >= B:
        raise ValueError(f"dsmoe.{op}: argument 'batch_ids': ids must be in [0, {B}) (rows of block_table), "
                         f"got range [{int(bid.min())}, {int(bid.max())}]")
    if int(pos.max()) >= mb * _BLOCK:
        raise ValueError(f"dsmoe.{op}: argument 'positions': position {int(pos.max())} exceeds the block table's "
                         f"capacity {mb} x {_BLOCK} = {mb * _BLOCK} tokens")
    ids = block_table.cpu().long()[bid, pos // _BLOCK]
    nb = kv_cache.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= nb:
        bad = ids[(ids < 0) | (ids >= nb)][0]
        raise ValueError(f"dsmoe.{op}: argument 'block_table': block id {int(bad)} used by a new token is out of "
                         f"range [0, {nb}) (num_blocks of kv_cache)")
    # NOTE: two tokens aimed at one physical slot would race on the GPU (which write lands is unspecified).
    slots = ids * _BLOCK + pos % _BLOCK
    uniq, counts = torch.unique(slots, return_counts=True)
    if bool((counts > 1).any()):
        dup = int(uniq[counts > 1][0])
        raise ValueError(f"dsmoe.{op}: arguments 'batch_ids'/'positions': {int(counts.max())} tokens write the same "
                         f"cache slot (block {dup // _BLOCK}, offset {dup % _BLOCK}); each slot may be written once per call")


def mla_kvcache_append(kv_cache: torch.Tensor, block_table: torch.Tensor, batch_ids: torch.Tensor,
                       positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, *,
                       norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                       cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                       rope_interleaved: bool = True, scale_ue8m0: bool = False) -> None:
    """Writes T new tokens into the paged cache (bf16 or FP8 layout), in place; optionally fused with the
    latent RMSNorm (``norm_weight [kv_lora]``, ``eps``) and the RoPE of k_rope (``cos, sin`` fp32
    ``[T, rope / 2]``).

    batch_ids, positions int32 ``[T]`` (token t -> sequence batch_ids[t], position positions[t]; a
    negative position skips the token); latent ``[T, kv_lora]`` and k_rope ``[T, rope]`` bf16 (e.g. views
    of kv_a_proj_with_mqa's output) with ``kv_lora + rope`` = the cache's last dim (V3: 512 + 64; the
    FP8 cache takes only those; the kernel runs them on CUDA, other sizes run the reference). Exact semantics: ``dsmoe.ref.mla.mla_kvcache_append``. Decoding
    ``s_q`` new tokens per sequence: ``positions = cache_seqlens_after - s_q + i``.

    Each cache slot may be written by at most one token per call: on CPU (always) and on CUDA under
    ``DSMOE_CHECK_BLOCK_TABLE=1`` a repeated slot raises ValueError; unchecked on CUDA, which of the
    writes lands is unspecified."""
    op = "mla_kvcache_append"
    fp8 = _kv_kind(op, kv_cache)
    C.check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
    C.check_last_dim_contiguous(op, "block_table", block_table)
    C.check_tensor(op, "batch_ids", batch_ids, dtypes=(torch.int32,), ndim=1)
    C.check_tensor(op, "positions", positions, dtypes=(torch.int32,), ndim=1)
    C.check_tensor(op, "latent", latent, dtypes=(_BF16,), ndim=2)
    C.check_tensor(op, "k_rope", k_rope, dtypes=(_BF16,), ndim=2)
    T = latent.shape[0]
    # the rope width is k_rope's; the latent must fill the rest of a cache row
    R = ref.MLA_D_ROPE if fp8 else k_rope.shape[1]
    L = _DV if fp8 else kv_cache.shape[-1] - R
    if L < 1:
        raise ValueError(f"dsmoe.{op}: argument 'k_rope': width {R} leaves no latent values in the cache's "
                         f"rows of {kv_cache.shape[-1]}, got shape {tuple(k_rope.shape)}")
    C.check_shape(op, "latent", latent, (T, L))
    C.check_shape(op, "k_rope", k_rope, (T, R))
    C.check_shape(op, "batch_ids", batch_ids, (T,))
    C.check_shape(op, "positions", positions, (T,))
    for n, t in (("latent", latent), ("k_rope", k_rope)):
        C.check_last_dim_contiguous(op, n, t)
    C.check_contiguous(op, "batch_ids", batch_ids)
    C.check_contiguous(op, "positions", positions)
    named = {"kv_cache": kv_cache, "block_table": block_table, "batch_ids": batch_ids, "positions": positions,
             "latent": latent, "k_rope": k_rope}
    if norm_weight is not None:
        C.check_tensor(op, "norm_weight", norm_weight, dtypes=(_BF16, torch.float32), ndim=1)
        C.check_shape(op, "norm_weight", norm_weight, (L,))
        C.check_contiguous(op, "norm_weight", norm_weight)
        if norm_weight.dtype != _BF16:
            norm_weight = norm_weight.to(_BF16)
        named["norm_weight"] = norm_weight
    if (cos is None) != (sin is None):
        raise ValueError(f"dsmoe.{op}: arguments 'cos' and 'sin' must be given together")
    if cos is not None:
        if R % 2:
            raise ValueError(f"dsmoe.{op}: argument 'k_rope': RoPE (cos/sin given) needs an even width, got "
                             f"shape {tuple(k_rope.shape)}")
        for n, t in (("cos", cos), ("sin", sin)):
            C.check_tensor(op, n, t, dtypes=(torch.float32,), ndim=2)
            C.check_shape(op, n, t, (T, R // 2))
            C.check_last_dim_contiguous(op, n, t)
            named[n] = t
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"dsmoe.{op}: argument 'eps' must be a float >= 0, got {eps!r}")
    C.check_same_device(op, named)
    torch.ops.dsmoe.mla_kvcache_append(kv_cache, block_table, batch_ids, positions, latent, k_rope, norm_weight,
                                       cos, sin, float(eps), bool(rope_interleaved), bool(scale_ue8m0))


# ----------------------------------------------------------------------------- FP8 cache helpers
def quantize_mla_kvcache_fp8(kv_cache: torch.Tensor, *, scale_ue8m0: bool = False) -> torch.Tensor:
    """bf16 ``[..., 576]`` -> FP8 ``[..., 656]`` float8_e4m3fn (torch on any device; layout in dsmoe.ref.mla)."""
    op = "quantize_mla_kvcache_fp8"
    C.check_tensor(op, "kv_cache", kv_cache, dtypes=(_BF16, torch.float32), min_ndim=1)
    if kv_cache.shape[-1] != _DQK:
        raise ValueError(f"dsmoe.{op}: argument 'kv_cache': last dim must be {_DQK}, got shape {tuple(kv_cache.shape)}")
    return ref.quantize_mla_kvcache_fp8(kv_cache, scale_ue8m0=scale_ue8m0)


def dequantize_mla_kvcache_fp8(kv_fp8: torch.Tensor, out_dtype: torch.dtype = _BF16) -> torch.Tensor:
    """FP8 ``[..., 656]`` -> ``[..., 576]`` (latent ``bf16(e4m3 * scale)``, rope as stored)."""
    op = "dequantize_mla_kvcache_fp8"
    C.check_tensor(op, "kv_fp8", kv_fp8, dtypes=(_FP8, torch.uint8), min_ndim=1)
    if kv_fp8.shape[-1] != _FP8_BYTES:
        raise ValueError(f"dsmoe.{op}: argument 'kv_fp8': last dim must be {_FP8_BYTES}, got shape {tuple(kv_fp8.shape)}")
    return ref.dequantize_mla_kvcache_fp8(kv_fp8, out_dtype)


def mla_fp8_kvcache_empty(num_blocks: int, device=None) -> torch.Tensor:
    """An uninitialized FP8 cache ``[num_blocks, 64, 1, 656]`` float8_e4m3fn."""
    return torch.empty((num_blocks, _BLOCK, 1, _FP8_BYTES), dtype=_FP8, device=device)


register("get_mla_metadata", "mla", ["mla_get_metadata"])
register("mla_decode_with_kvcache", "mla", ["mla_decode"])
register("mla_kvcache_append", "mla", ["mla_kvcache_append"])
register("quantize_mla_kvcache_fp8", "mla", [], "torch on every device")
register("dequantize_mla_kvcache_fp8", "mla", [], "torch on every device")
