#!/usr/bin/env bash
# One command that verifies dsmoe on a GPU machine where torch (CUDA) is already installed:
#   tools/gpu_check.sh OUTDIR [bench suites...]      (default suites: all)
# Builds the package from this checkout (no build isolation, so the installed CUDA torch is kept),
# runs every test (the GPU tier included), a compute-sanitizer pass over the quantizer tests, and the
# benchmarks. Logs and JSON go under OUTDIR; OUTDIR/gpu_check.tar.gz bundles them and
# OUTDIR/summary.txt is the short version. Copy OUTDIR/results/<device>/*.json to bench/results/.
set -u -o pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [suites...]}
shift
SUITES=${*:-all}
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DSMOE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
summary "commit $DSMOE_COMMIT  date $(date -u +%FT%TZ)"
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1 && summary "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"

start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-$(nproc)} \
  $PY -m pip install -v --no-build-isolation --no-deps . > "$OUT/logs/build.log" 2>&1
rc=$?
summary "build: rc=$rc in $(( $(date +%s) - start )) s"
grep -E "ptxas (info|warning).*(spill|stack|lmem)|Used [0-9]+ registers" "$OUT/logs/build.log" > "$OUT/logs/ptxas.txt" || true
if [ $rc -ne 0 ]; then tail -40 "$OUT/logs/build.log"; tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs summary.txt; exit $rc; fi

cd /tmp  # import the installed package, not the source tree
$PY -m dsmoe info --json > "$OUT/logs/info.json" 2>&1
$PY -m dsmoe info | tee -a "$OUT/summary.txt"
cd - > /dev/null

$PY -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/logs/pytest.xml" > "$OUT/logs/pytest.log" 2>&1
summary "pytest (all tiers): rc=$? $(tail -1 "$OUT/logs/pytest.log")"

if command -v compute-sanitizer > /dev/null; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_quant.py -k "129 or block or graph" > "$OUT/logs/sanitizer.log" 2>&1
  summary "compute-sanitizer memcheck (quant): rc=$? $(tail -1 "$OUT/logs/sanitizer.log")"
fi

$PY bench/run.py $SUITES --out "$OUT/results" > "$OUT/logs/bench.log" 2>&1
summary "bench ($SUITES): rc=$?"
cat "$OUT/logs/bench.log"
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs results summary.txt
echo "== summary =="; cat "$OUT/summary.txt"
