"""What the EP transports share: the configuration, the handle, the dispatch layout, the error type, the
byte-row packing and the nvlink memory layout. ``buffer.py``, ``nvlink.py`` and ``hierarchical.py`` import
from here (never from each other's private parts), so the package has no import circle."""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _checks as C

__all__ = ["EPConfig", "EPHandle", "EPTimeoutError", "get_dispatch_layout", "NVLinkLayout", "al16", "BACKENDS",
           "dtype_code", "dtype_name", "disagreement", "CALL_FIELDS", "as_bytes_rows", "from_bytes",
           "COMBINE_PARTIALS", "HOP1", "group_timeout", "as_timedelta", "wait_within"]

BACKENDS = ("collective", "nvlink", "hierarchical")
CALL_FIELDS = ("dtype", "top_k", "fp8")  # what every dispatch's count exchange carries (the call signature)
COMBINE_PARTIALS = ("fp32", "native")
HOP1 = ("collective", "symm_mem")


def as_bytes_rows(t: torch.Tensor) -> torch.Tensor:
    # NOTE: gloo has no float8 type; every payload travels as raw bytes [rows, nbytes].
    row = t.element_size()
    for d in t.shape[1:]:
        row *= d
    return t.contiguous().view(torch.uint8).view(t.shape[0], row)


def from_bytes(rows: torch.Tensor, lo: int, hi: int, dtype: torch.dtype, *shape) -> torch.Tensor:
    # NOTE: a fresh dense copy: .contiguous() keeps a one-row slice's odd row stride, which view(dtype) rejects
    out = torch.empty(rows.shape[0], hi - lo, dtype=torch.uint8, device=rows.device)
    out.copy_(rows[:, lo:hi])
    return out.view(dtype).view(rows.shape[0], *shape)


def pack_rows(payload: torch.Tensor, scales, ids: torch.Tensor, weights: torch.Tensor) -> tuple:
    """One byte row per sent copy: payload | scales (FP8 only) | int32 ids | fp32 weights; returns the rows
    and the byte width of each field (what :func:`unpack_rows` cuts at)."""
    parts = [as_bytes_rows(payload)] + ([as_bytes_rows(scales)] if scales is not None else []) + \
        [as_bytes_rows(ids), as_bytes_rows(weights)]
    widths = [p.shape[1] for p in parts]
    if payload.shape[0] == 0:
        return torch.empty(0, sum(widths), dtype=torch.uint8, device=payload.device), widths
    return torch.cat(parts, 1), widths


def unpack_rows(rows: torch.Tensor, widths: list, dtype: torch.dtype, hidden: int, k: int) -> tuple:
    """The inverse of :func:`pack_rows`: ``(payload or (fp8, scales), ids int32, weights fp32)``."""
    cuts = [0]
    for w in widths:
        cuts.append(cuts[-1] + w)
    if len(widths) == 4:
        x = (from_bytes(rows, cuts[0], cuts[1], torch.float8_e4m3fn, hidden),
             from_bytes(rows, cuts[1], cuts[2], torch.float32, hidden // 128))
    else:
        x = from_bytes(rows, cuts[0], cuts[1], dtype, hidden)
    return x, from_bytes(rows, cuts[-3], cuts[-2], torch.int32, k), from_bytes(rows, cuts[-2], cuts[-1], torch.float32, k)


class EPTimeoutError(RuntimeError):
    """A collective of the EP buffer failed or timed out (a peer died, or never joined)."""


def group_timeout(group) -> datetime.timedelta:
    """The timeout the process group was created with (its backend's options), or torch's default."""
    for dev in ("cpu", "cuda"):
        try:
            t = group._get_backend(torch.device(dev)).options._timeout
        except Exception:  # noqa: BLE001 - private API: any failure falls back to the default
            continue
        if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
            return t
    return dist.default_pg_timeout


def as_timedelta(t, who: str = "dsmoe.EPBuffer") -> datetime.timedelta:
    """``timeout`` argument (seconds or a timedelta) -> a positive timedelta; errors name ``who``."""
    if isinstance(t, datetime.timedelta):
        td = t
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        td = datetime.timedelta(seconds=float(t))
    else:
        raise TypeError(f"{who}: argument 'timeout' must be seconds or a datetime.timedelta, got {t!r}")
    if not td.total_seconds() > 0:
        raise ValueError(f"{who}: argument 'timeout' must be positive, got {t!r}")
    return td


def wait_within(work, timeout: datetime.timedelta, error: type, what: str) -> None:
    """Waits for an async collective or p2p ``work`` at most ``timeout``; a failure (a peer that died, or
    raised and never sent) or the timeout raises ``error`` naming ``what``. NOTE: a plain ``work.wait()``
    would block until the process group's own timeout (30 min by default), or forever on some backends."""
    try:
        ok = work.wait(timeout)
    except Exception as e:  # noqa: BLE001 - every backend raises its own type
        raise error(f"{what}: failed or timed out after {timeout} (a peer died, raised, diverged or did not "
                    f"call): {e}") from e
    if ok is False:
        raise error(f"{what}: did not complete within {timeout}")


# dtype codes for the agreement checks (every float dtype a payload may have)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


def dtype_code(dt: torch.dtype) -> int:
    return _DTYPES.index(dt) if dt in _DTYPES else 15


def dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else f"dtype#{code}"


def disagreement(rows: list, fields, fmt=None) -> str:
    """'' when every rank's row equals rank 0's; else 'field: rank 0 = a, rank 1 = b; ...' per differing field."""
    parts = []
    for j, name in enumerate(fields):
        vals = [r[j] for r in rows]
        if any(v != vals[0] for v in vals):
            show = (fmt or {}).get(name, str)
            parts.append(f"{name}: " + ", ".join(f"rank {r} = {show(v)}" for r, v in enumerate(vals)))
    return "; ".join(parts)


def al16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True)
class NVLinkLayout:
    """Byte layout of one rank's nvlink buffer (one ``ep_alloc``; every peer maps it).

    dispatch region [W sources][T][row]: row = payload | topk_idx int32[k] | weights fp32[k]; the pitch fits the
    largest row (bf16 payload, or fp8 payload + scales, and ``top_k_max``), but a dispatch copies only the
    row of its own form (``dispatch_row``): FP8 moves ~half the bytes of bf16.
    combine region [W sources][T][crow]: bf16/fp16 payload | fp32[k] weight gradients (dispatch backward).
    Then: counts int32[2W] per region (slot 2s: rows from source s; 2s+1: the source's call signature),
    flags u64[W] per region, an epoch per region, a done-block counter per region, and the status words
    (int32 error: 0 ok, 1 + s = timed out waiting for source s, -1 = closed; int32 local input error)."""
    world: int
    max_tokens: int
    hidden: int
    top_k_max: int

    @property
    def bf16_payload(self) -> int:
        return al16(self.hidden * 2)

    @property
    def fp8_payload(self) -> int:
        return al16(self.hidden) + al16(self.hidden // 128 * 4) if self.hidden % 128 == 0 else 0

    @property
    def row(self) -> int:
        return max(self.bf16_payload, self.fp8_payload) + 2 * al16(self.top_k_max * 4)

    @property
    def crow(self) -> int:
        return self.bf16_payload + al16(self.top_k_max * 4)

    def dispatch_row(self, fp8: bool, k: int) -> tuple[int, int, int]:
        """``(bytes copied per row, offset of topk_idx, offset of the weights)`` of one dispatch form."""
        p = self.fp8_payload if fp8 else self.bf16_payload
        return p + 2 * al16(k * 4), p, p + al16(k * 4)

    def offsets(self) -> dict:
        W, T = self.world, self.max_tokens
        sizes = [("ddata", W * T * self.row), ("cdata", W * T * self.crow), ("dcnt", al16(2 * W * 4)),
                 ("ccnt", al16(2 * W * 4)), ("dflag", al16(W * 8)), ("cflag", al16(W * 8)), ("depoch", 16),
                 ("cepoch", 16), ("ddone", 16), ("cdone", 16), ("err", 16)]
        out, off = {}, 0
        for name, n in sizes:
            out[name] = off
            off += n
        out["total"] = off
        return out

    @property
    def nbytes(self) -> int:
        return self.offsets()["total"]


@dataclass(frozen=True)
class EPConfig:
    """Validated configuration. ``max_tokens_per_rank`` sizes the worst-case receive buffer of the nvlink
    backend (each source writes at most that many tokens to each peer); ``num_sms`` bounds its kernels (the
    device's SM count is checked when the transport is built on it). ``ranks_per_node``: the group's ranks
    are node-major, ``ranks_per_node`` consecutive ranks per node (0: one node holds the whole group); the
    hierarchical backend routes by it, every backend's ``stats()`` classifies traffic by it.
    ``combine_partials`` (hierarchical): the dtype a node's partial sums cross nodes in ("fp32": the
    accumulation dtype, combine equal to the flat backend's up to summation order; a partial of a single
    16-bit row crosses as that row, losslessly; "native": the rows' dtype, half the inter-node combine bytes
    for bf16 rows at one extra rounding per node partial).
    ``hop1`` (hierarchical): "collective" (all_to_all on the rail group: NCCL, gloo) or "symm_mem" (CUDA:
    torch symmetric memory's NVSHMEM ``all_to_all_vdev_2d``, buffers sized by ``max_tokens_per_rank``)."""
    world_size: int
    num_experts: int
    hidden: int
    backend: str = "collective"
    max_tokens_per_rank: int = 0
    num_sms: int = 20
    top_k_max: int = 32
    ranks_per_node: int = 0
    combine_partials: str = "fp32"
    hop1: str = "collective"
    num_local_experts: int = field(init=False)

    def __post_init__(self):
        def bad(arg, msg):
            raise ValueError(f"dsmoe.EPBuffer: argument '{arg}': {msg}")

        for name in ("world_size", "num_experts", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive int, got {v!r}")
        if self.num_experts % self.world_size:
            bad("num_experts", f"{self.num_experts} experts cannot be split evenly over world size {self.world_size}")
        if self.backend not in BACKENDS:
            bad("backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "nvlink":
            if not isinstance(self.max_tokens_per_rank, int) or self.max_tokens_per_rank <= 0:
                bad("max_tokens_per_rank", f"the nvlink backend needs a positive worst-case token count per rank, "
                    f"got {self.max_tokens_per_rank}")
            if not isinstance(self.num_sms, int) or isinstance(self.num_sms, bool) or self.num_sms < 1:
                bad("num_sms", f"must be a positive int (at most the device's SM count), got {self.num_sms!r}")
            if self.hidden % 8:
                bad("hidden", f"the nvlink backend moves 16-byte vectors: hidden must be a multiple of 8, got {self.hidden}")
        rpn = self.ranks_per_node
        if not isinstance(rpn, int) or isinstance(rpn, bool) or rpn < 0:
            bad("ranks_per_node", f"must be a positive int (0: the whole group on one node), got {rpn!r}")
        if rpn and self.world_size % rpn:
            bad("ranks_per_node", f"the world size {self.world_size} must be a multiple of ranks_per_node={rpn} "
                f"(every node holds the same number of ranks)")
        if self.backend == "hierarchical" and not rpn:
            bad("ranks_per_node", "the hierarchical backend needs the ranks per node (torchrun's LOCAL_WORLD_SIZE "
                "when set), got none")
        if self.combine_partials not in COMBINE_PARTIALS:
            bad("combine_partials", f"must be one of {COMBINE_PARTIALS}, got {self.combine_partials!r}")
        if self.hop1 not in HOP1:
            bad("hop1", f"must be one of {HOP1}, got {self.hop1!r}")
        if self.hop1 == "symm_mem":
            if self.backend != "hierarchical":
                bad("hop1", f"'symm_mem' is an option of the hierarchical backend, got backend {self.backend!r}")
            if not isinstance(self.max_tokens_per_rank, int) or self.max_tokens_per_rank <= 0:
                bad("max_tokens_per_rank", f"hop1='symm_mem' sizes its symmetric buffers by a positive worst-case "
                    f"token count per rank, got {self.max_tokens_per_rank}")
        object.__setattr__(self, "num_local_experts", self.num_experts // self.world_size)

    @property
    def nodes(self) -> int:
        return self.world_size // (self.ranks_per_node or self.world_size)

    def nvlink_layout(self) -> NVLinkLayout:
        return NVLinkLayout(self.world_size, self.max_tokens_per_rank, self.hidden, self.top_k_max)

    def nvlink_recv_bytes(self) -> int:
        """Bytes the nvlink transport allocates per rank (the exact ``ep_alloc`` size: dispatch and combine
        regions plus counters); 0 for the collective backend."""
        return self.nvlink_layout().nbytes if self.backend == "nvlink" else 0


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, world_size: int, *, validate: bool = True):
    """``(num_tokens_per_rank int32 [W], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, W])``.

    A token counts once per rank that hosts any of its experts; -1 entries are skipped. Any other id
    outside ``[0, E)`` is a ValueError naming 'topk_idx' (``validate=True``: reads the range back, a host
    sync on a GPU, skipped while compiling or capturing a CUDA graph); unchecked, such ids are skipped
    like -1 (as the permutation layout kernel does), never an out-of-bounds access."""
    op = "get_dispatch_layout"
    C.check_tensor(op, "topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), ndim=2)
    C.check_int(op, "num_experts", num_experts, min_value=1)
    C.check_int(op, "world_size", world_size, min_value=1)
    if num_experts % world_size:
        raise ValueError(f"dsmoe.{op}: argument 'num_experts'={num_experts} must be a multiple of world_size={world_size}")
    if validate:
        C.check_index_range(op, "topk_idx", topk_idx, -1, num_experts, "-1 = skipped")
    T, k = topk_idx.shape
    L = num_experts // world_size
    idx = topk_idx.long()
    valid = (idx >= 0) & (idx < num_experts)
    rank_of = torch.where(valid, idx // L, torch.full_like(idx, world_size))
    in_rank = torch.zeros(T, world_size + 1, dtype=torch.bool, device=idx.device)
    in_rank.scatter_(1, rank_of, True)
    in_rank = in_rank[:, :world_size]
    # NOTE: no boolean-mask indexing or CUDA bincount here (both read sizes back to the host): the nvlink
    # backend's graph-safe mode calls this under CUDA graph capture.
    slots = torch.where(valid, idx, torch.full_like(idx, num_experts)).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    per_expert.scatter_add_(0, slots, torch.ones_like(slots))
    return in_rank.sum(0).to(torch.int32), per_expert[:num_experts].to(torch.int32), in_rank


@dataclass
class EPHandle:
    """What combine (and the backward passes) need from a dispatch."""
    num_tokens: int
    send_token_idx: torch.Tensor   # int64 [S]: local token of each sent row, grouped by destination rank
    send_counts: list              # rows sent to each rank
    recv_counts: list              # rows received from each rank
    slot_is_local: torch.Tensor    # bool [S, k]: slot j of sent row i belongs to its destination
    top_k: int
    dtype: torch.dtype = torch.bfloat16  # the row dtype combine (and the gradients) travel in, agreed by all ranks
    nv: dict | None = None          # nvlink backend state
    hier: dict | None = None        # hierarchical backend state (both hops' layouts)
