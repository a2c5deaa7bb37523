#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (H100, torch + CUDA preinstalled, no internet).
#
#   bench/gpu_check.sh [PART...] [--ops OP[,OP...]] [options]
#
# PARTs (default: build tests sanitize bench), run in this order, each one even if an earlier
# one failed; a summary with the status and seconds of each part comes at the end:
#   build      MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 setup.py build_ext --inplace, then
#              build_tools/cuda_check.py (every CUDA op registered)
#   tests      pytest -m cuda (the CUDA test files below for --ops, else tests/)
#   sanitize   each CUDA test file once under compute-sanitizer --tool memcheck: every
#              tests/test_*_cuda.py and every tests/test_*.py with cuda-marked tests (with --ops,
#              those that name one of the ops)
#   racecheck  the same under --tool racecheck (slow: give a narrow --racecheck-k)
#   bench      bench/<op>_gpu.py --device cuda (else bench/<op>.py --device cuda); all bench/*_gpu.py
#              without --ops
# Options:
#   --ops a,b            limit tests, sanitizer runs and benchmarks to these ops (e.g. layer_norm)
#   --pytest-k EXPR      -k filter for the tests part
#   --sanitize-k EXPR    -k filter for memcheck (default: "not compile and not deterministic")
#   --racecheck-k EXPR   -k filter for racecheck (default: "matches_reference and not 9000 and not 20000")
#   --bench-args "..."   extra arguments for every benchmark (e.g. "--smoke" or "--repeats 7")
#   --timeout-build S / --timeout-tests S / --timeout-sanitize S / --timeout-bench S   (seconds per part)
#
# Results go to $OUT (or ./out/gpu_check when OUT is unset), flat and at most 8 files:
#   summary.txt  env + part statuses and timings     build.log  tests.log  sanitize.log
#   bench.log    bench.json (every benchmark's JSON, keyed by script)
# Installs nothing from the network. If pytest or hypothesis are missing, wheels carried in .whl/
# (see the device README) are installed into a temporary folder; otherwise the tests are reported
# as skipped. Exit status: 0 when every part that ran passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
OUTDIR="${OUT:-$ROOT/out/gpu_check}"
mkdir -p "$OUTDIR"
RESULT_FILES="summary.txt build.log tests.log sanitize.log bench.log bench.json"
for f in $RESULT_FILES; do rm -f "$OUTDIR/$f"; done  # no stale results from an earlier run
LOG="$(mktemp -d /tmp/gpu_check.XXXXXX)"
export PYTHONUNBUFFERED=1

PARTS=()
OPS=""
PYTEST_K=""
SANITIZE_K="not compile and not deterministic"
RACECHECK_K="matches_reference and not 9000 and not 20000"
BENCH_ARGS=""
T_BUILD=420
T_TESTS=300
T_SANITIZE=360
T_BENCH=300
while [ $# -gt 0 ]; do
  case "$1" in
    build|tests|sanitize|racecheck|bench) PARTS+=("$1") ;;
    --ops) OPS="$2"; shift ;;
    --ops=*) OPS="${1#--ops=}" ;;
    --pytest-k) PYTEST_K="$2"; shift ;;
    --sanitize-k) SANITIZE_K="$2"; shift ;;
    --racecheck-k) RACECHECK_K="$2"; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift ;;
    --timeout-build) T_BUILD="$2"; shift ;;
    --timeout-tests) T_TESTS="$2"; shift ;;
    --timeout-sanitize) T_SANITIZE="$2"; shift ;;
    --timeout-bench) T_BENCH="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(build tests sanitize bench)
IFS=',' read -r -a OP_LIST <<< "$OPS"

SUMMARY="$LOG/summary.txt"
STATUS=0
START_ALL=$(date +%s)
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# ---- environment --------------------------------------------------------------------------
{
  echo "== gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
  echo "parts: ${PARTS[*]}   ops: ${OPS:-all}"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -2
  else
    echo "nvidia-smi: missing"
  fi
  echo "python: $($PY --version 2>&1) at $(command -v $PY)"
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1 | tail -1
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
  echo "cores: $(nproc)"
} | tee -a "$SUMMARY"

SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
if [ -z "$SANITIZER" ]; then
  for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
                   /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    [ -x "$candidate" ] && SANITIZER="$candidate" && break
  done
fi
say "compute-sanitizer: ${SANITIZER:-missing}"

have_module() { $PY -c "import $1" >/dev/null 2>&1; }
if ! have_module pytest || ! have_module hypothesis; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site .whl/*.whl \
      && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
TEST_DEPS=ok
for module in pytest hypothesis; do
  if have_module "$module"; then
    say "python module $module: $($PY -c "import $module; print($module.__version__)" 2>/dev/null)"
  else
    say "python module $module: MISSING (carry wheels in .whl/, see the device README)"
    TEST_DEPS=missing
  fi
done

# ---- helpers -------------------------------------------------------------------------------
declare -a RESULTS=()
record() {  # part status seconds
  RESULTS+=("$(printf '%-10s %-26s %5ss' "$1" "$2" "$3")")
  case "$2" in ok*|skipped*) ;; *) STATUS=1 ;; esac
}

# Runs "$@" with a time limit, output appended to log file $LOGFILE; returns its exit status.
run_logged() {
  local limit="$1"; shift
  echo "+ $*" >> "$LOGFILE"
  timeout -k 15 "$limit" "$@" >> "$LOGFILE" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "!! timed out after ${limit}s: $*" >> "$LOGFILE"
  return $rc
}

test_files() {  # the CUDA test files: tests/test_*_cuda.py and any tests/test_*.py with cuda-marked
  # tests (`@pytest.mark.cuda` or `pytestmark = pytest.mark.cuda`); with --ops, those naming one of them
  local f op files=()
  for f in tests/test_*.py; do
    [ -e "$f" ] || continue
    case "$f" in
      *_cuda.py) ;;
      *) grep -qE "mark\.cuda\b" "$f" || continue ;;
    esac
    if [ -n "$OPS" ]; then
      local named=no
      for op in "${OP_LIST[@]}"; do grep -qw "$op" "$f" && named=yes; done
      [ "$named" = yes ] || continue
    fi
    files+=("$f")
  done
  echo "${files[@]:-}"
}

# ---- parts ---------------------------------------------------------------------------------
part_build() {
  LOGFILE="$LOG/build.log"
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 run_logged "$T_BUILD" $PY setup.py build_ext --inplace || return 1
  run_logged 60 $PY build_tools/cuda_check.py || return 1
  tail -n 8 "$LOGFILE"
}

part_tests() {
  LOGFILE="$LOG/tests.log"
  [ "$TEST_DEPS" = ok ] || { echo "skipped (pytest/hypothesis missing)"; return 3; }
  local files=""
  if [ -n "$OPS" ]; then
    files="$(test_files)"
    [ -n "$files" ] || { echo "no test files for --ops $OPS" >> "$LOGFILE"; return 1; }
  fi
  local args=(-m pytest -m cuda -q -rfEs -p no:cacheprovider)
  [ -n "$PYTEST_K" ] && args+=(-k "$PYTEST_K")
  # shellcheck disable=SC2086
  run_logged "$T_TESTS" $PY "${args[@]}" ${files:-tests}
  local rc=$?
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOGFILE" | tail -n 15
  return $rc
}

part_sanitizer() {  # tool k-expression
  local tool="$1" k="$2"
  LOGFILE="$LOG/sanitize.log"
  [ -n "$SANITIZER" ] || { echo "compute-sanitizer not found" >> "$LOGFILE"; return 4; }
  [ "$TEST_DEPS" = ok ] || return 3
  local files rc=0
  files="$(test_files)"
  [ -n "$files" ] || { echo "no CUDA test files to run under $tool" >> "$LOGFILE"; return 1; }
  for f in $files; do
    echo "=== $tool: $f (-k '$k')" >> "$LOGFILE"
    # No caching allocator: each tensor is its own allocation, so out-of-bounds accesses show.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=ci run_logged "$T_SANITIZE" \
      "$SANITIZER" --tool "$tool" --error-exitcode 99 --report-api-errors no --print-limit 20 \
      $PY -m pytest -m cuda -q -x -p no:cacheprovider -k "$k" "$f" || rc=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)|Invalid|Race reported|timed out" "$LOGFILE" | tail -n 6
  done
  return $rc
}

BENCH_JSONS=()
part_bench() {
  LOGFILE="$LOG/bench.log"
  local scripts=()
  if [ -z "$OPS" ]; then
    for f in bench/*_gpu.py; do [ -e "$f" ] && scripts+=("$f"); done
  else
    for op in "${OP_LIST[@]}"; do
      if [ -e "bench/${op}_gpu.py" ]; then scripts+=("bench/${op}_gpu.py")
      elif [ -e "bench/${op}.py" ]; then scripts+=("bench/${op}.py")
      fi
    done
  fi
  [ ${#scripts[@]} -gt 0 ] || { echo "no GPU benchmarks found" >> "$LOGFILE"; return 1; }
  local rc=0
  for s in "${scripts[@]}"; do
    local name json
    name="$(basename "$s" .py)"
    json="$LOG/bench-$name.json"
    echo "=== $s" >> "$LOGFILE"
    # shellcheck disable=SC2086
    run_logged "$T_BENCH" $PY "$s" --device cuda --json "$json" $BENCH_ARGS || rc=1
    [ -e "$json" ] && BENCH_JSONS+=("$json")
    grep -E "^\|" "$LOGFILE" | tail -n 12
  done
  return $rc
}

for part in "${PARTS[@]}"; do
  say "---- $part"
  t0=$(date +%s)
  case "$part" in
    build) part_build ;;
    tests) part_tests ;;
    sanitize) part_sanitizer memcheck "$SANITIZE_K" ;;
    racecheck) part_sanitizer racecheck "$RACECHECK_K" ;;
    bench) part_bench ;;
  esac
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) st=ok ;;
    3) st="skipped (no pytest/hypothesis)" ;;
    4) st="NOT RUN (no compute-sanitizer)" ;;
    124|137) st="TIMEOUT" ;;
    *) st="FAILED (rc=$rc)" ;;
  esac
  say "$part: $st in ${dt}s"
  record "$part" "$st" "$dt"
done

# ---- summary and results -------------------------------------------------------------------
{
  echo "== summary (total $(( $(date +%s) - START_ALL ))s)"
  printf '%s\n' "${RESULTS[@]}"
  echo "overall: $([ $STATUS -eq 0 ] && echo OK || echo FAILED)"
} | tee -a "$SUMMARY"

if [ ${#BENCH_JSONS[@]} -gt 0 ]; then
  $PY - "$LOG/bench.json" "${BENCH_JSONS[@]}" <<'EOF'
import json, sys, pathlib
out, paths = sys.argv[1], sys.argv[2:]
merged = {pathlib.Path(p).stem.removeprefix("bench-"): json.loads(pathlib.Path(p).read_text()) for p in paths}
pathlib.Path(out).write_text(json.dumps(merged, indent=2))
EOF
fi
for f in $RESULT_FILES; do
  # At most 8 MiB per log (the tail holds the verdicts).
  [ -e "$LOG/$f" ] && tail -c 8388608 "$LOG/$f" > "$OUTDIR/$f"
done
echo "[gpu_check] results in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
exit $STATUS
