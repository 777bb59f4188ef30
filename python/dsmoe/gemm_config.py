"""Tile configuration of the FP8 GEMM kernels: a pure function of the problem shape.

``choose_config(M, N, K, num_sms, kind)`` returns the :class:`GemmConfig` the CUDA launcher runs with.
It is the one place where configurations are chosen; the launcher receives every field as an argument
and refuses any (block_m, block_n, kind) that is not compiled (the list below mirrors the explicit
instantiations in ``csrc/gemm.cu``; ``tests/test_gemm_config.py`` checks the two lists agree) and any
stage count whose shared memory does not fit.

Kinds: ``dense`` (fp8_gemm_nt, bf16 out), ``dense_f32`` (fp8_gemm_nt with fp32 out), ``contiguous``
(m_grouped_fp8_gemm_nt_contiguous), ``masked`` (m_grouped_fp8_gemm_nt_masked; M is ``expected_m``)
and ``kgrouped`` (k_grouped_fp8_gemm_tn_contiguous and fp8_gemm_tn; M, N are the output dims, K the
token count).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["GemmConfig", "KINDS", "INSTANTIATIONS", "SMEM_LIMIT", "choose_config", "smem_bytes", "max_stages"]

# Kind codes passed to the launcher (csrc/gemm.h enum GemmKind mirrors them).
KINDS = {"dense": 0, "dense_f32": 1, "contiguous": 2, "masked": 3, "kgrouped": 4}

# (kind, block_m, block_n) compiled in csrc/gemm.cu. NOTE: keep in sync with kInstantiations there
# (checked by tests/test_gemm_config.py by parsing the C++ source).
INSTANTIATIONS = (
    ("dense", 64, 128), ("dense", 128, 128),
    ("dense_f32", 64, 128), ("dense_f32", 128, 128),
    ("contiguous", 128, 128),
    ("masked", 64, 128), ("masked", 128, 128),
    ("kgrouped", 128, 128),
)

BLOCK_K = 128
# Opt-in shared memory per block on sm_90 (227 KiB).
SMEM_LIMIT = 232448
MAX_STAGES = 8
# Number of n-blocks one rasterization group spans (inside a group consecutive tiles step through its
# n-blocks, then the next m-block, so the CTAs that run at the same time share A and B tiles in L2).
RASTER_GROUP_N = 8


@dataclass(frozen=True)
class GemmConfig:
    kind: str
    block_m: int
    block_n: int
    num_stages: int
    num_ctas: int       # persistent grid size
    raster_group_n: int
    smem_bytes: int

    @property
    def num_threads(self) -> int:
        # one producer warpgroup + one consumer warpgroup per 64 rows of the tile
        return 128 * (1 + self.block_m // 64)


def smem_bytes(kind: str, block_m: int, block_n: int, num_stages: int) -> int:
    """Dynamic shared memory of one CTA. NOTE: the same formula is ``gemm_smem_bytes`` in
    include/dsmoe/gemm/fp8_gemm.cuh (the launcher recomputes and checks it)."""
    per_stage = block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4
    if kind == "kgrouped":
        per_stage += block_n * 4
    barriers = num_stages * 2 * 8
    # + 1024: the runtime alignment of the tile buffers to the 1024-byte swizzle atom
    return 1024 + num_stages * per_stage + barriers


def max_stages(kind: str, block_m: int, block_n: int) -> int:
    s = MAX_STAGES
    while s > 2 and smem_bytes(kind, block_m, block_n, s) > SMEM_LIMIT:
        s -= 1
    return s


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def choose_config(M: int, N: int, K: int, num_sms: int, kind: str = "dense") -> GemmConfig:
    """Picks block_m among the compiled ones for ``kind``: the one with the smallest modeled time
    ``waves * block_m * cost(block_m)``, where ``waves = ceil(tiles / num_sms)`` and a 64-row tile is
    modeled 15% less efficient per row than a 128-row tile (one consumer warpgroup instead of two
    sharing each B tile). Ties go to the larger tile. M <= 64 always takes 64 when compiled."""
    if kind not in KINDS:
        raise ValueError(f"dsmoe.gemm_config: unknown kind {kind!r}, expected one of {sorted(KINDS)}")
    for name, v in (("M", M), ("N", N), ("K", K), ("num_sms", num_sms)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"dsmoe.gemm_config: {name} must be a non-negative int, got {v!r}")
    if num_sms < 1:
        raise ValueError(f"dsmoe.gemm_config: num_sms must be >= 1, got {num_sms}")
    return _choose(M, N, K, num_sms, kind)


# NOTE: every GEMM call asks for its config; the answer is a pure function of a few ints (the result is
# a frozen dataclass), so it is memoized to keep the per-call host cost to a dict lookup.
@functools.lru_cache(maxsize=4096)
def _choose(M: int, N: int, K: int, num_sms: int, kind: str) -> GemmConfig:
    options = sorted({(bm, bn) for k, bm, bn in INSTANTIATIONS if k == kind})
    cost = {64: 1.15, 128: 1.0}
    best = None
    for bm, bn in options:
        tiles = _ceil(max(M, 1), bm) * _ceil(max(N, 1), bn)
        waves = _ceil(tiles, num_sms)
        t = waves * bm * cost.get(bm, 1.0)
        if M <= 64 and bm == 64:
            t = -1.0  # decode: never compute more than 64 padded rows
        key = (t, -bm)
        if best is None or key < best[0]:
            best = (key, bm, bn, tiles)
    _, bm, bn, tiles = best
    stages = max_stages(kind, bm, bn)
    # NOTE: grouped kinds learn the tile count on the device; they always launch one CTA per SM.
    ctas = num_sms if kind in ("contiguous", "masked", "kgrouped") else max(1, min(num_sms, tiles))
    return GemmConfig(kind, bm, bn, stages, ctas, RASTER_GROUP_N, smem_bytes(kind, bm, bn, stages))
