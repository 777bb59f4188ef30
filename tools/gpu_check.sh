#!/usr/bin/env bash
# Verifies dsmoe on a GPU machine where torch (CUDA) is already installed, in one command:
#   tools/gpu_check.sh OUTDIR [STAGES] [SUITES...]
#     STAGES: comma list of build,test,sanitize,bench (default: all four)
#     SUITES: benchmark suites (default: all; see `dsmoe bench --list`)
# build: pip install from this checkout without build isolation (keeps the installed CUDA torch).
# test: every test tier (the GPU tier included), each test limited to DSMOE_TEST_TIMEOUT seconds
#       (pytest-timeout, when installed) so a hung kernel costs minutes, not the whole lease.
# sanitize: compute-sanitizer memcheck over a subset of the GPU tests.
# bench: the benchmark suites, JSON under OUTDIR/results/<device>/ (copy them to bench/results/).
# Everything is also bundled into OUTDIR/gpu_check.tar.gz; OUTDIR/summary.txt is the short version.
set -u -o pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [build,test,sanitize,bench] [suites...]}
STAGES=${2:-build,test,sanitize,bench}
shift; [ $# -gt 0 ] && shift
SUITES=${*:-all}
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DSMOE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
has() { [[ ",$STAGES," == *",$1,"* ]]; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
bundle() { tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs results summary.txt 2>/dev/null; }
summary "commit $DSMOE_COMMIT  date $(date -u +%FT%TZ)  stages $STAGES"
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1 && summary "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"

if has build; then
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $PY -m pip install -v --no-build-isolation --no-deps . > "$OUT/logs/build.log" 2>&1
  rc=$?
  summary "build: rc=$rc in $(( $(date +%s) - start )) s"
  grep -E "ptxas (info|warning).*(spill|stack|lmem)|Used [0-9]+ registers" "$OUT/logs/build.log" > "$OUT/logs/ptxas.txt" || true
  if [ $rc -ne 0 ]; then tail -40 "$OUT/logs/build.log"; bundle; exit $rc; fi
fi
(cd /tmp && $PY -m dsmoe info --json > "$OUT/logs/info.json" 2>&1 && $PY -m dsmoe info) | tee -a "$OUT/summary.txt"

TIMEOUT_ARGS=()
$PY -c "import pytest_timeout" 2> /dev/null && TIMEOUT_ARGS=(--timeout "${DSMOE_TEST_TIMEOUT:-180}")
if has test; then
  $PY -m pytest tests -q -rs -p no:cacheprovider "${TIMEOUT_ARGS[@]}" --junitxml="$OUT/logs/pytest.xml" \
    ${DSMOE_TEST_ARGS:-} > "$OUT/logs/pytest.log" 2>&1
  summary "pytest (all tiers): rc=$? $(tail -1 "$OUT/logs/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/logs/pytest.log" | head -40 | tee -a "$OUT/summary.txt"
fi
if has sanitize && command -v compute-sanitizer > /dev/null; then
  timeout 400 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider -m gpu -x \
    tests/test_quant.py tests/test_moe_gpu.py -k "129 or block or graph or permute" > "$OUT/logs/sanitizer.log" 2>&1
  summary "compute-sanitizer memcheck: rc=$? $(tail -1 "$OUT/logs/sanitizer.log")"
fi
if has bench; then
  $PY bench/run.py $SUITES --out "$OUT/results" > "$OUT/logs/bench.log" 2>&1
  summary "bench ($SUITES): rc=$?"
  cat "$OUT/logs/bench.log"
fi
bundle
echo "== summary =="; cat "$OUT/summary.txt"
