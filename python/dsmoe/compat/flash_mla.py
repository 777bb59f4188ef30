"""FlashMLA's Python API (the ``flash_mla`` package) for dense V3 MLA decoding, backed by ``dsmoe.ops``.

A framework that calls FlashMLA switches with one line::

    import dsmoe.compat.flash_mla as flash_mla
    # or: from dsmoe.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache

Names, signatures, argument order, shapes, dtypes and return values are FlashMLA's; CUDA tensors run
dsmoe's sm_90a kernels, CPU tensors the reference (``dsmoe.ref.mla``). Both metadata interfaces work:

- classic: ``tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_k, h_k)``
  (int32 tensors, computed on the device without a host sync; reusable by every layer of a step and
  copyable into CUDA-graph buffers), then both passed to ``flash_mla_with_kvcache``;
- lazy (FlashMLA's current interface): ``sched_meta, _ = get_mla_metadata()`` returns an empty
  :class:`FlashMLASchedMeta`; the first ``flash_mla_with_kvcache`` call fills it and later calls reuse
  it (they must keep the shapes and ``cache_seqlens`` values, as in FlashMLA).

FlashMLA's current ``get_mla_metadata`` ignores any arguments and always returns the lazy object; here
arguments select the classic form. Code written for the current interface that still passes arguments
and then hands only the first result to ``flash_mla_with_kvcache`` (no ``num_splits``: vLLM's current
backend) keeps working: a metadata tensor passed without ``num_splits`` is used as a lazy handle, i.e.
the schedule is planned inside the first call that receives it (from that call's ``cache_seqlens``; a
CUDA graph that captures that call re-plans on every replay, as FlashMLA's lazy object does) and reused
by later calls with the same tensor; the tensor's own values are not read. Since such a tensor looks like
classic metadata, which callers keep across steps, a plan is reused only while ``cache_seqlens`` is
provably unchanged: the same tensor, not written in place since (its version counter), and the same
CUDA-graph capture state as when planned; otherwise the call plans again (one small kernel). A
``cache_seqlens`` made under ``torch.inference_mode`` has no version counter, so every call plans. Not
caught: one handle and one unchanged ``cache_seqlens`` captured into two CUDA graphs (torch exposes no
capture id): the second graph reuses the first capture's plan; use a handle per graph.

Supported: q ``[b, s_q, h_q, 576]`` bf16 (last dim contiguous), one KV head, 64-token pages, the bf16
cache ``[num_blocks, 64, 1, 576]`` or the 656-byte FP8 cache ``[num_blocks, 64, 1, 656]``
(float8_e4m3fn, uint8 or int8 bytes: 512 e4m3 latent values, 4 fp32 scales, 64 bf16 rope values, the
layout of FlashMLA's docstring) with ``is_fp8_kvcache=True`` (FlashMLA itself reads that layout only
in sparse mode), ``head_dim_v`` 512, any ``h_q`` and ``s_q``, ``causal``. Not implemented (raise
NotImplementedError saying what is): sparse attention (``indices``, ``topk``, ``attn_sink``, the
``extra_*`` caches, ``topk_length``), fp16, several KV heads, d_qk 512, and FlashMLA's prefill entry
points (``flash_mla_sparse_fwd``, ``flash_attn_varlen_*``). Differences: a batch of 0 sequences
returns empty outputs (FlashMLA rejects it); bad input raises TypeError/ValueError naming the argument
(FlashMLA raises RuntimeError/AssertionError); metadata tensors must come from this module's
``get_mla_metadata`` (the formats are dsmoe's: ``dsmoe.ref.mla.get_mla_metadata``); schedules a caller
writes into a ``FlashMLASchedMeta`` itself (vLLM's batch-invariant mode) are replaced by the module's own.

Semantics (those of FlashMLA's tests): ``softmax_scale`` defaults to ``q.shape[-1] ** -0.5``; cache
slots and pages past ``cache_seqlens[i]`` are never read (NaN there does not leak) and block-table
entries past the sequence may hold anything (-1, a huge id); with ``causal`` query ``j`` of the
``s_q`` new tokens sees cache positions ``< cache_seqlens[i] - s_q + j + 1``; a query that sees no
token (zero-length sequence) gives ``out = 0`` and ``lse = +inf``. ``lse`` is the natural-log
log-sum-exp of the scaled scores, ``[b, h_q, s_q]`` fp32.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Optional, Tuple

import torch

from .. import _checks as C
from .. import ops as _ops
from ..ref import mla as _ref

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]

_PAGE = _ref.MLA_BLOCK_SIZE        # 64
_D_QK = _ref.MLA_D_QK              # 576
_D_V = _ref.MLA_D_V                # 512
_FP8_BYTES = _ref.MLA_FP8_BYTES_PER_TOKEN  # 656
_FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8, torch.int8)
# NOTE: a metadata tensor passed without num_splits (a caller written for the lazy interface that still
# passes arguments to get_mla_metadata) carries its lazy FlashMLASchedMeta under this attribute. Planning
# at the first decode call rather than reusing what get_mla_metadata computed matters under CUDA graphs:
# such callers build the metadata outside the graph each step and rely on the captured call to re-plan.
_LAZY_ATTR = "_dsmoe_flash_mla_sched"
# ... and under this one the cache_seqlens the plan was made from (see _plan_key). Unlike FlashMLA's own
# lazy object, whose reuse is the caller's promise, a tensor handle looks like classic metadata, which
# callers legitimately keep across steps (persistent CUDA-graph buffers updated in place); a stale plan
# would silently attend over the wrong tokens on the GPU, so the handle re-plans whenever it cannot
# prove that cache_seqlens is unchanged.
_LAZY_KEY_ATTR = "_dsmoe_flash_mla_sched_key"
# Marks a tile_scheduler_metadata planned by this module. A FlashMLASchedMeta whose fields hold anything
# else was filled by its caller (vLLM's batch-invariant mode writes a FlashMLA-format single-split
# schedule there): not dsmoe's format (its num_splits of zeros would leave every output unwritten on the
# GPU), so the module plans its own instead.
_PLANNED_ATTR = "_dsmoe_flash_mla_planned"

_SUPPORTED = ("dsmoe.compat.flash_mla implements FlashMLA's dense MLA decoding: get_mla_metadata + "
              "flash_mla_with_kvcache with indices=None, q bf16 [b, s_q, h_q, 576], one KV head, 64-token "
              "pages, a bf16 [num_blocks, 64, 1, 576] or FP8 656-byte [num_blocks, 64, 1, 656] cache, "
              "head_dim_v 512")


def _op(fn: str) -> str:
    return f"compat.flash_mla.{fn}"


def _unsupported(fn: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"dsmoe.{_op(fn)}: {what} is not implemented. {_SUPPORTED}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling metadata of the lazy interface: made empty by ``get_mla_metadata()``, filled by the
    first ``flash_mla_with_kvcache`` call that receives it (``config`` records that call's sizes; later
    calls must match them), reused by later calls. Same fields as FlashMLA's class of this name."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # int32 [num_sm_parts, 8]
    num_splits: Optional[torch.Tensor] = None               # int32 [b + 1]


# ----------------------------------------------------------------------------- metadata
def get_mla_metadata(cache_seqlens: Optional[torch.Tensor] = None, num_q_tokens_per_head_k: Optional[int] = None,
                     num_heads_k: Optional[int] = None, num_heads_q: Optional[int] = None,
                     is_fp8_kvcache: bool = False, topk: Optional[int] = None, **kwargs):
    """Split-KV schedule for one decode step.

    Classic form, ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
    is_fp8_kvcache=False, topk=None)``: ``cache_seqlens`` int32 ``[b]``; ``num_q_tokens_per_head_k =
    s_q * h_q // h_k`` (the 2025-04 keyword name ``num_heads_per_head_k`` is accepted too); ``num_heads_k``
    1. Returns ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``, computed
    on cache_seqlens' device without a host sync. ``topk`` (sparse attention) raises NotImplementedError.

    Lazy form, ``get_mla_metadata()`` with no arguments: returns ``(FlashMLASchedMeta(), None)``;
    ``flash_mla_with_kvcache`` computes the schedule on its first call."""
    fn = "get_mla_metadata"
    if "num_heads_per_head_k" in kwargs:
        if num_q_tokens_per_head_k is not None:
            raise TypeError(f"dsmoe.{_op(fn)}: got both 'num_q_tokens_per_head_k' and its older name "
                            f"'num_heads_per_head_k'")
        num_q_tokens_per_head_k = kwargs.pop("num_heads_per_head_k")
    if kwargs:
        raise TypeError(f"dsmoe.{_op(fn)}: unexpected keyword argument(s) {sorted(kwargs)}")
    given = {"cache_seqlens": cache_seqlens, "num_q_tokens_per_head_k": num_q_tokens_per_head_k,
             "num_heads_k": num_heads_k}
    if all(v is None for v in given.values()) and num_heads_q is None and topk is None:
        return FlashMLASchedMeta(), None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise TypeError(f"dsmoe.{_op(fn)}: the classic form needs cache_seqlens, num_q_tokens_per_head_k and "
                        f"num_heads_k (missing {missing}); call get_mla_metadata() with no arguments for the "
                        f"lazy FlashMLASchedMeta")
    if topk is not None:
        raise _unsupported(fn, f"sparse attention (topk={topk!r})")
    C.check_tensor(_op(fn), "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    C.check_contiguous(_op(fn), "cache_seqlens", cache_seqlens)
    if not _is_int(num_q_tokens_per_head_k) or num_q_tokens_per_head_k <= 0:
        raise ValueError(f"dsmoe.{_op(fn)}: argument 'num_q_tokens_per_head_k' must be a positive int "
                         f"(s_q * num_heads_q // num_heads_k), got {num_q_tokens_per_head_k!r}")
    if not _is_int(num_heads_k) or num_heads_k <= 0:
        raise ValueError(f"dsmoe.{_op(fn)}: argument 'num_heads_k' must be a positive int, got {num_heads_k!r}")
    if num_heads_k != 1:
        raise _unsupported(fn, f"num_heads_k={num_heads_k} (MLA decoding has one KV head)")
    if num_heads_q is not None:
        if not _is_int(num_heads_q) or num_heads_q <= 0:
            raise ValueError(f"dsmoe.{_op(fn)}: argument 'num_heads_q' must be a positive int or None, got {num_heads_q!r}")
        if num_q_tokens_per_head_k % num_heads_q:
            raise ValueError(f"dsmoe.{_op(fn)}: argument 'num_q_tokens_per_head_k' ({num_q_tokens_per_head_k}) must "
                             f"be s_q * num_heads_q, a multiple of argument 'num_heads_q' ({num_heads_q})")
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"dsmoe.{_op(fn)}: argument 'is_fp8_kvcache' must be a bool, got {is_fp8_kvcache!r}")
    # the schedule is the same for both cache layouts (their kernels share the M tiling)
    return _ops.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, 1)


# ----------------------------------------------------------------------------- decode
def _check_cache(fn: str, q: torch.Tensor, k_cache, is_fp8_kvcache: bool) -> torch.Tensor:
    op = _op(fn)
    C.check_tensor(op, "k_cache", k_cache, ndim=4)
    nb, page, h_k, d = k_cache.shape
    if page != _PAGE:
        raise ValueError(f"dsmoe.{op}: argument 'k_cache': page_block_size (dim 1) must be {_PAGE}, got shape "
                         f"{tuple(k_cache.shape)}")
    if h_k != 1:
        raise _unsupported(fn, f"k_cache with num_heads_k={h_k} (dim 2 of shape {tuple(k_cache.shape)}; MLA has "
                               f"one KV head)")
    if is_fp8_kvcache:
        if k_cache.dtype not in _FP8_DTYPES:
            raise TypeError(f"dsmoe.{op}: argument 'k_cache' must have dtype float8_e4m3fn, uint8 or int8 with "
                            f"is_fp8_kvcache=True, got {str(k_cache.dtype).replace('torch.', '')}")
        if d != _FP8_BYTES:
            raise ValueError(f"dsmoe.{op}: argument 'k_cache': last dim must be {_FP8_BYTES} bytes per token (512 e4m3 "
                             f"+ 4 fp32 scales + 64 bf16) with is_fp8_kvcache=True, got shape {tuple(k_cache.shape)}")
        if q.shape[-1] != _D_QK:
            raise ValueError(f"dsmoe.{op}: argument 'q': head dim (last) must be {_D_QK} with an FP8 cache, got shape "
                             f"{tuple(q.shape)}")
        return k_cache.view(torch.uint8) if k_cache.dtype == torch.int8 else k_cache
    if k_cache.dtype != q.dtype:
        hint = (" (a 656-byte FP8 cache needs is_fp8_kvcache=True)"
                if k_cache.dtype in _FP8_DTYPES else "")
        raise TypeError(f"dsmoe.{op}: argument 'k_cache' must have q's dtype {str(q.dtype).replace('torch.', '')} "
                        f"with is_fp8_kvcache=False, got {str(k_cache.dtype).replace('torch.', '')}{hint}")
    if d != q.shape[-1]:
        raise ValueError(f"dsmoe.{op}: argument 'k_cache': last dim must equal q's head dim {q.shape[-1]}, got shape "
                         f"{tuple(k_cache.shape)}")
    return k_cache


def _check_sched_config(fn: str, cfg: "FlashMLASchedMeta.Config", now: "FlashMLASchedMeta.Config") -> None:
    for f in dataclasses.fields(cfg):
        was, got = getattr(cfg, f.name), getattr(now, f.name)
        if was != got:
            raise ValueError(f"dsmoe.{_op(fn)}: argument 'tile_scheduler_metadata': its schedule was planned by a "
                             f"call with {f.name}={was!r}, this call has {f.name}={got!r}; a schedule may be reused only "
                             f"with the same shapes, flags and cache_seqlens (get_mla_metadata() makes a new one)")


def _plan_key(cache_seqlens: torch.Tensor):
    """What a handle's plan depends on: this cache_seqlens tensor (identity, storage, shape), its contents
    (the version counter, bumped by every in-place write) and whether the call is being captured into a
    CUDA graph (a plan made outside a capture is not recorded in the graph, one made inside holds values
    only after a replay). None when the contents cannot be tracked (tensors made under
    torch.inference_mode keep no version counter): then every call plans."""
    try:
        version = cache_seqlens._version
    except RuntimeError:
        return None
    capturing = cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
    return (weakref.ref(cache_seqlens), cache_seqlens.data_ptr(), tuple(cache_seqlens.shape), version, capturing)


def _plan_still_valid(key, now) -> bool:
    return key is not None and now is not None and key[0]() is now[0]() and key[1:] == now[1:]


def _resolve_metadata(fn: str, sched, num_splits, cache_seqlens: torch.Tensor, cfg: "FlashMLASchedMeta.Config"):
    """(tile_scheduler_metadata, num_splits, FlashMLASchedMeta to fill with a new plan or None, tensor handle
    or None, plan key for the handle); nothing is mutated here."""
    op = _op(fn)
    handle = key = None
    if isinstance(sched, torch.Tensor) and num_splits is None:
        handle = sched
        key = _plan_key(cache_seqlens)
        sched = getattr(handle, _LAZY_ATTR, None)
        if sched is None or not _plan_still_valid(getattr(handle, _LAZY_KEY_ATTR, None), key):
            sched = FlashMLASchedMeta()
    if isinstance(sched, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError(f"dsmoe.{op}: argument 'num_splits' must be None with a FlashMLASchedMeta (the lazy "
                             f"interface keeps num_splits inside it), got {type(num_splits).__name__}")
        if sched.have_initialized:
            if sched.config is None:
                raise ValueError(f"dsmoe.{op}: argument 'tile_scheduler_metadata': FlashMLASchedMeta has "
                                 f"have_initialized=True but no config")
            _check_sched_config(fn, sched.config, cfg)
        if sched.tile_scheduler_metadata is not None or sched.num_splits is not None:
            if sched.tile_scheduler_metadata is None or sched.num_splits is None:
                raise ValueError(f"dsmoe.{op}: argument 'tile_scheduler_metadata': a FlashMLASchedMeta must hold "
                                 f"both tile_scheduler_metadata and num_splits or neither")
            if getattr(sched.tile_scheduler_metadata, _PLANNED_ATTR, False):
                return sched.tile_scheduler_metadata, sched.num_splits, None, None, None
        md, ns = _ops.get_mla_metadata(cache_seqlens, cfg.s_q * cfg.h_q, 1)
        return md, ns, sched, handle, key
    if isinstance(sched, torch.Tensor):
        return sched, num_splits, None, None, None
    raise TypeError(f"dsmoe.{op}: argument 'tile_scheduler_metadata' must be a FlashMLASchedMeta or an int32 tensor "
                    f"from get_mla_metadata, got {type(sched).__name__}")


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata,
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decoding over a paged latent cache: ``(out [b, s_q, h_q, head_dim_v] q.dtype, lse fp32 [b, h_q, s_q])``.

    q ``[b, s_q, h_q, 576]`` bf16; k_cache ``[num_blocks, 64, 1, 576]`` bf16, or the FP8 layout
    ``[num_blocks, 64, 1, 656]`` with ``is_fp8_kvcache=True``; block_table int32 ``[b, max_blocks]``;
    cache_seqlens int32 ``[b]``; head_dim_v 512; tile_scheduler_metadata and num_splits from
    ``get_mla_metadata(cache_seqlens, s_q * h_q, 1)``, or a FlashMLASchedMeta from ``get_mla_metadata()``
    with num_splits None (a metadata tensor without num_splits acts as one: see the module docstring).
    softmax_scale defaults to ``q.shape[-1] ** -0.5``. Sparse arguments (indices, attn_sink, extra_k_cache,
    extra_indices_in_kvcache, topk_length, extra_topk_length) raise NotImplementedError. Semantics and differences from FlashMLA: the module docstring."""
    fn = "flash_mla_with_kvcache"
    op = _op(fn)
    sparse = {"indices": indices, "attn_sink": attn_sink, "extra_k_cache": extra_k_cache,
              "extra_indices_in_kvcache": extra_indices_in_kvcache, "topk_length": topk_length,
              "extra_topk_length": extra_topk_length}
    given = [k for k, v in sparse.items() if v is not None]
    if given:
        raise _unsupported(fn, f"sparse attention (argument(s) {', '.join(repr(g) for g in given)} given)")
    if block_table is None or cache_seqlens is None:
        raise ValueError(f"dsmoe.{op}: arguments 'block_table' and 'cache_seqlens' are required for dense decoding, "
                         f"got block_table={type(block_table).__name__}, cache_seqlens={type(cache_seqlens).__name__}")
    C.check_tensor(op, "q", q, ndim=4)
    if q.dtype == torch.float16:
        raise _unsupported(fn, "q of dtype float16 (dsmoe's kernels are bfloat16)")
    C.check_tensor(op, "q", q, dtypes=(torch.bfloat16,))
    b, s_q, h_q, d_qk = q.shape
    if d_qk == 512:
        raise _unsupported(fn, "head dim 512 (q's last dim; dsmoe's kernels are V3's 576 = 512 latent + 64 rope)")
    if d_qk != _D_QK:
        raise ValueError(f"dsmoe.{op}: argument 'q': head dim (last) must be {_D_QK}, got shape {tuple(q.shape)}")
    if s_q < 1 or h_q < 1:
        raise ValueError(f"dsmoe.{op}: argument 'q': seq_len_q and num_heads_q must be >= 1, got shape {tuple(q.shape)}")
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"dsmoe.{op}: argument 'is_fp8_kvcache' must be a bool, got {is_fp8_kvcache!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"dsmoe.{op}: argument 'causal' must be a bool, got {causal!r}")
    kv = _check_cache(fn, q, k_cache, is_fp8_kvcache)
    if not _is_int(head_dim_v) or head_dim_v != _D_V:
        raise ValueError(f"dsmoe.{op}: argument 'head_dim_v' must be {_D_V} (the latent width), got {head_dim_v!r}")
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    if (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)
            or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"dsmoe.{op}: argument 'softmax_scale' must be None or a positive finite float, "
                         f"got {softmax_scale!r}")
    C.check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    C.check_shape(op, "cache_seqlens", cache_seqlens, (b,))
    C.check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
    if block_table.shape[0] != b:
        raise ValueError(f"dsmoe.{op}: argument 'block_table' must have shape ({b}, max_num_blocks_per_seq) (b from q), "
                         f"got {tuple(block_table.shape)}")
    cfg = FlashMLASchedMeta.Config(b, s_q, h_q, k_cache.shape[1], k_cache.shape[2], causal, is_fp8_kvcache,
                                   None, None, None)
    md, ns, sched, handle, key = _resolve_metadata(fn, tile_scheduler_metadata, num_splits, cache_seqlens, cfg)
    out, lse = _ops.mla_decode_with_kvcache(q, kv, block_table, cache_seqlens, head_dim_v, md, ns,
                                            float(softmax_scale), causal)
    if sched is not None:
        # filled only after a successful call, so a rejected call leaves the object reusable
        setattr(md, _PLANNED_ATTR, True)
        sched.have_initialized = True
        sched.config = cfg
        sched.tile_scheduler_metadata, sched.num_splits = md, ns
        if handle is not None:
            setattr(handle, _LAZY_ATTR, sched)
            setattr(handle, _LAZY_KEY_ATTR, key)
    return out, lse


# ----------------------------------------------------------------------------- not implemented
def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: Optional[torch.Tensor] = None, topk_length: Optional[torch.Tensor] = None,
                         indexer_topk: int = 0):
    """FlashMLA's sparse prefill: not implemented (raises NotImplementedError)."""
    raise _unsupported("flash_mla_sparse_fwd", "sparse prefill (flash_mla_sparse_fwd)")


def flash_attn_varlen_func(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv, dropout_p=0.0,
                           softmax_scale=None, causal=False, deterministic=False, is_varlen=True):
    """FlashMLA's dense prefill (SM100): not implemented (raises NotImplementedError)."""
    raise _unsupported("flash_attn_varlen_func", "dense prefill (flash_attn_varlen_func)")


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, head_dim_qk, dropout_p=0.0, softmax_scale=None,
                                     causal=False, deterministic=False, is_varlen=True):
    """FlashMLA's dense prefill (SM100): not implemented (raises NotImplementedError)."""
    raise _unsupported("flash_attn_varlen_qkvpacked_func", "dense prefill (flash_attn_varlen_qkvpacked_func)")


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv, head_dim_qk,
                                    dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False, is_varlen=True):
    """FlashMLA's dense prefill (SM100): not implemented (raises NotImplementedError)."""
    raise _unsupported("flash_attn_varlen_kvpacked_func", "dense prefill (flash_attn_varlen_kvpacked_func)")
