#!/usr/bin/env python3
"""Shows, without a GPU, that the GPU-tier tests fail on a wrong kernel (and pass on a right one).

Runs the selected GPU-tier tests on the CPU (DSMOE_TEST_GPU_ON_CPU=1: every op is its reference), first
unmodified (all must pass), then once per mutation of tests/mutations.py (DSMOE_TEST_MUTATION): each
listed test must FAIL, except under a CONTROL mutation (a correct kernel's arithmetic emulated), where
all must pass. Prints a markdown table (docs/gpu.md keeps the last one); exit status 1 if any
expectation is not met.

    PYTHONPATH=python python tools/mutation_check.py [--only NAME[,NAME]] [--seed N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
M, Q, G, R = "tests/test_mla_gpu.py::", "tests/test_quant.py::", "tests/test_gemm_gpu.py::", "tests/test_moe_gpu.py::"
DECODE = [M + "test_decode_bf16[63-2-19]", M + "test_decode_bf16[64-4-2]"]
# the FlashMLA drop-in (dsmoe.compat.flash_mla) reaches the same op: an FP8 classic and a bf16 lazy case
COMPAT = ["tests/test_compat_flash_mla.py::test_gpu_decode_matches_fp64[3-2-63-seqlens2-True-True-False]",
          "tests/test_compat_flash_mla.py::test_gpu_decode_matches_fp64[6-2-128-seqlens1-True-False-True]"]
ONE_HOT = [M + "test_decode_one_hot_rows_exact[132-2-32-True-False]", M + "test_decode_one_hot_rows_exact[1-1-64-False-True]"]
FUSED = [M + "test_append_matches_reference[True-False-False]", M + "test_append_matches_reference[True-True-False]",
         M + "test_append_matches_reference[True-True-True]"]
UNFUSED = [M + "test_append_matches_reference[False-False-False]", M + "test_append_matches_reference[False-True-False]",
           M + "test_append_matches_reference[False-True-True]", M + "test_append_unfused_special_values_bit_exact[True-True]"]
QUANT_CM = [Q + "test_gpu_token_group_bit_identical[False-True-129-128-dtype1]", Q + "test_gpu_token_group_3d_strided_and_empty",
            Q + "test_gpu_outputs_fully_written_and_deterministic"]
ROUTE = [R + "test_route_inf_bias_and_odd_expert_counts_on_gpu", R + "test_route_generic_logits_and_deciding_bias[sigmoid]",
         R + "test_route_generic_logits_and_deciding_bias[softmax]"]

# mutation -> tests that must fail under it (CONTROL: must all pass)
PLAN = {
    "mla_decode_emulated_ok": DECODE + COMPAT,  # CONTROL
    "mla_decode_emulated_bf16_rowsum": DECODE + COMPAT,
    "mla_decode_lse_off": DECODE + ONE_HOT + COMPAT,
    "mla_decode_drop_row": DECODE + ONE_HOT + COMPAT,
    "mla_decode_out_scale": DECODE + ONE_HOT + COMPAT,
    "mla_decode_unwritten_lse": DECODE + [M + "test_outputs_fully_written_and_deterministic"] + COMPAT,
    "mla_append_rope_sign": FUSED,
    "mla_append_ignore_ue8m0": [M + "test_append_matches_reference[False-True-True]", M + "test_append_matches_reference[True-True-True]",
                                M + "test_append_unfused_special_values_bit_exact[True-True]"],
    "mla_append_stray_write": FUSED + UNFUSED,
    "mla_append_latent_ulp": FUSED + UNFUSED[:3],
    "gemm_out_scale": [G + "test_fp8_gemm_nt[192-128-7]", G + "test_dense_any_schedule[64-1-1-2]"],
    "gemm_drop_row": [G + "test_fp8_gemm_nt[192-128-7]", G + "test_dense_any_schedule[64-1-1-2]"],
    "gemm_contiguous_writes_padding": [G + "test_m_grouped_contiguous[192-256]",
                                       G + "test_contiguous_unvalidated_bad_indices_are_padding"],
    "gemm_masked_ignores_mask": [G + "test_masked_m_above_m_max_is_clamped"],
    "gemm_k_grouped_scale": [G + "test_k_grouped_tn"],
    "quant_scale_padding": QUANT_CM,
    "quant_row_unwritten": QUANT_CM,
    "quant_scale_off": QUANT_CM[:2],  # the fully-written test checks writes and determinism, not values
    "route_nan_rows_order": ROUTE[:1],
    "route_ignore_bias": ROUTE[1:],
}
CONTROLS = {"mla_decode_emulated_ok"}


def run(tests, mutation, seed, py):
    junit = Path(f"/tmp/dsmoe_mutation_{os.getpid()}.xml")
    env = dict(os.environ, DSMOE_TEST_GPU_ON_CPU="1", DSMOE_TEST_SEED=str(seed), PYTHONPATH=str(ROOT / "python"))
    env.pop("DSMOE_TEST_MUTATION", None)
    if mutation:
        env["DSMOE_TEST_MUTATION"] = mutation
    subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=1800)
    res = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        kinds = {c.tag for c in tc}
        res[f"{tc.get('name')}"] = "fail" if kinds & {"failure", "error"} else ("skip" if "skipped" in kinds else "pass")
    junit.unlink()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--seed", type=int, default=12345)
    a = ap.parse_args(argv)
    plan = {k: v for k, v in PLAN.items() if not a.only or k in a.only.split(",")}
    py = sys.executable
    all_tests = sorted({t for ts in plan.values() for t in ts})
    base = run(all_tests, None, a.seed, py)
    ok = True
    print("| mutation | test | expected | got |\n| --- | --- | --- | --- |")
    for t in all_tests:
        name = t.split("::")[1]
        if base.get(name) != "pass":
            ok = False
        print(f"| (none) | {name} | pass | {base.get(name, 'missing')} |")
    for mut, tests in plan.items():
        res = run(tests, mut, a.seed, py)
        want = "pass" if mut in CONTROLS else "fail"
        for t in tests:
            name = t.split("::")[1]
            got = res.get(name, "missing")
            ok &= got == want
            print(f"| {mut}{' (control)' if mut in CONTROLS else ''} | {name} | {want} | {got}{'' if got == want else ' **UNEXPECTED**'} |")
    print("\nall expectations met" if ok else "\nSOME EXPECTATIONS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
