"""The GEMM tile heuristic (pure function of the shape) and its agreement with the compiled list."""
import re
from pathlib import Path

import pytest

from dsmoe import gemm_config as gc

ROOT = Path(__file__).resolve().parents[1]


def test_instantiations_match_cpp_source():
    src = (ROOT / "csrc" / "gemm.cu").read_text()
    block = re.search(r"#define DSMOE_GEMM_INSTANTIATIONS\(X\)((?:[^\n]*\\\n)*[^\n]*)", src)
    assert block, "csrc/gemm.cu must list its instantiations in #define DSMOE_GEMM_INSTANTIATIONS(X)"
    cpp = set(re.findall(r"X\(k(\w+),\s*(\d+),\s*(\d+)\)", block.group(1)))
    assert len(cpp) == len(gc.INSTANTIATIONS)
    names = {"Dense": "dense", "DenseF32": "dense_f32", "Contiguous": "contiguous", "Masked": "masked",
             "KGrouped": "kgrouped"}
    cpp = {(names[k], int(m), int(n)) for k, m, n in cpp}
    assert cpp == set(gc.INSTANTIATIONS)


def test_smem_formula_matches_cpp_header():
    src = (ROOT / "include" / "dsmoe" / "gemm" / "fp8_gemm.cuh").read_text()
    body = re.search(r"constexpr int gemm_smem_bytes\(Kind kind, int bm, int bn, int stages\) \{\s*return (.*?);", src, re.S)
    assert body, "gemm_smem_bytes not found in fp8_gemm.cuh"
    expr = " ".join(body.group(1).split())
    assert expr == ("1024 + stages * (bm * kBlockK + bn * kBlockK + bm * 4 + (scale_b_per_row(kind) ? bn * 4 : 0)) + "
                    "stages * 2 * 8"), "the C++ formula changed: update dsmoe.gemm_config.smem_bytes and this test"
    # 128x128 dense, 6 stages: 1024 + 6 * (16384 + 16384 + 512) + 96
    assert gc.smem_bytes("dense", 128, 128, 6) == 1024 + 6 * 33280 + 96
    assert gc.smem_bytes("kgrouped", 128, 128, 6) == 1024 + 6 * 33792 + 96


@pytest.mark.parametrize("kind", sorted(gc.KINDS))
def test_config_is_valid_and_deterministic(kind):
    for M in [1, 7, 64, 65, 128, 129, 4095, 4096, 65536]:
        for N, K in [(2112, 7168), (24576, 1536), (7168, 16384), (64, 128)]:
            c = gc.choose_config(M, N, K, 132, kind)
            assert c == gc.choose_config(M, N, K, 132, kind)
            assert (kind, c.block_m, c.block_n) in gc.INSTANTIATIONS
            assert 2 <= c.num_stages <= gc.MAX_STAGES
            assert c.smem_bytes <= gc.SMEM_LIMIT
            assert gc.smem_bytes(kind, c.block_m, c.block_n, c.num_stages + 1) > gc.SMEM_LIMIT or c.num_stages == gc.MAX_STAGES
            assert 1 <= c.num_ctas <= 132
            assert c.num_threads == 128 * (1 + c.block_m // 64)


def test_choices():
    # decode-size M takes 64-row tiles where compiled
    assert gc.choose_config(1, 7168, 2048, 132, "dense").block_m == 64
    assert gc.choose_config(64, 7168, 2048, 132, "masked").block_m == 64
    # large M takes 128-row tiles
    assert gc.choose_config(4096, 7168, 2048, 132, "dense").block_m == 128
    # grouped kinds run persistent on every SM; dense never launches more CTAs than tiles
    assert gc.choose_config(1, 128, 128, 132, "dense").num_ctas == 1
    assert gc.choose_config(1, 128, 128, 132, "masked").num_ctas == 132
    # stage counts fill shared memory
    assert gc.choose_config(4096, 4096, 4096, 132, "dense").num_stages == 6
    assert gc.choose_config(8, 4096, 4096, 132, "dense").num_stages == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kind"):
        gc.choose_config(1, 1, 1, 1, "nope")
    with pytest.raises(ValueError, match="num_sms must be >= 1"):
        gc.choose_config(1, 1, 1, 0, "dense")
    with pytest.raises(ValueError, match="M must be a non-negative int"):
        gc.choose_config(-1, 1, 1, 1, "dense")


def test_native_module_agrees():
    from dsmoe import _native

    if not _native.has_kernel("gemm_smem_bytes"):
        pytest.skip("dsmoe._C not built with CUDA here")
    C = _native.native()
    names = {v: k for k, v in gc.KINDS.items()}
    assert {(names[k], m, n) for k, m, n in C.gemm_instantiations} == set(gc.INSTANTIATIONS)
    for kind, bm, bn in gc.INSTANTIATIONS:
        for s in range(2, gc.MAX_STAGES + 1):
            assert C.gemm_smem_bytes(gc.KINDS[kind], bm, bn, s) == gc.smem_bytes(kind, bm, bn, s)
