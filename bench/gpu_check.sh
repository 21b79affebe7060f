#!/usr/bin/env bash
# Everything that needs a GPU, in one pass and within a time budget: build for this GPU's
# architecture, `python -m fastloss info`, the CUDA tests, compute-sanitizer memcheck on a
# small subset, then the GPU benchmarks (`make gpu-check` runs it).
#
#   bench/gpu_check.sh OUTDIR [SECONDS]        SECONDS: the whole budget (default 540)
#
# Environment:
#   PYTHON            interpreter with torch, pybind11 and scikit-build-core (default python3)
#   GPU_CHECK_STEPS   steps to run, in order (default "build tests memcheck bench")
#   GPU_CHECK_OPS     benchmark families, most wanted first
#                     (default softmax,linear_cross_entropy,stat_topk,sinkhorn,bessel)
#   GPU_CHECK_WORKERS pytest-xdist workers for the CUDA tests where xdist is installed (default 6;
#                     0: one process, the modules in the order below)
#   BENCH_ARGS        extra arguments for `python -m bench` (default "--max-time 0.5 --skip-baselines
#                     torch.compile": its compiles would take most of a short pass; set
#                     BENCH_ARGS="--max-time 0.5" where the budget allows them)
#
# OUTDIR gets at most 7 files, each written as its step ends: summary.txt (status and seconds
# of each step), build.log, info.txt, tests.log, memcheck.log, bench.log and results.tgz (the
# benchmark reports, repacked after each family). Each step has a share of the budget (tests
# half of what is left, memcheck 120 s, each benchmark family an equal share of the rest) and
# is stopped with SIGINT at its limit, so pytest still prints its failures and a benchmark
# family still writes the cases it finished; a hung test dumps its stack after 120 s. Wheels in
# .whl/ (`make wheelhouse`) are installed first, for machines without network access. The exit
# status is 1 when any step failed or was cut.
set -uo pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-build tests memcheck bench}
OPS=${GPU_CHECK_OPS:-softmax,linear_cross_entropy,stat_topk,sinkhorn,bessel}
BENCH_ARGS=${BENCH_ARGS:---max-time 0.5 --skip-baselines torch.compile}

[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # steps run in tests/ too
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
RESULTS=$(mktemp -d)
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
FAILED=0

# step NAME LOG CAP CMD...: runs CMD for at most CAP seconds (0: no cap) and the time left (less
# 20 s: the kill delay and packing the results), logging to LOG. At the limit: SIGINT, then
# SIGKILL 10 s later.
step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local limit=$(($(left) - 20))
  ((cap > 0 && cap < limit)) && limit=$cap
  if ((limit < 20)); then
    note "$name: skipped (budget spent)"
    FAILED=1
    return 1
  fi
  local t0=$(date +%s)
  timeout -s INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="cut at ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (rc $rc)"
  ((rc != 0)) && FAILED=1
  note "$name: $status, $(($(date +%s) - t0))s"
  tail -n 3 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return $rc
}

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

note "gpu_check: budget ${BUDGET}s, steps: $STEPS"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" && note "wheels: installed $(ls .whl/*.whl | wc -l)"
  else
    note "wheels: not installed (built for another Python? make wheelhouse WHEEL_PYTHON=...): peers skipped"
  fi
else
  note "wheels: none in .whl/ (make wheelhouse): peers not installed here are skipped"
fi

arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null)
if [[ -z "$arch" ]]; then
  note "no CUDA device visible to torch: nothing to check"
  exit 1
fi
note "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'), sm_$arch, $(nproc) CPUs"

if has_step build; then
  # Only this GPU's architecture: half the device compile time of the default list.
  step build "$OUTDIR/build.log" 0 env FASTLOSS_CUDA=ON FASTLOSS_CUDA_ARCHS="$arch" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" make install PYTHON="$PY"
  cat build.log >>"$OUTDIR/build.log" 2>/dev/null  # pip's whole log after make's lines
  (cd tests && "$PY" -m fastloss info) >"$OUTDIR/info.txt" 2>&1
  if ! grep -q "^CUDA kernels built *yes" "$OUTDIR/info.txt"; then
    note "build: fastloss has no CUDA kernels (see info.txt); stopping"
    cat "$OUTDIR/info.txt" >>"$SUMMARY"
    exit 1
  fi
fi

PYTEST=("$PY" -m pytest -q -m cuda -p no:cacheprovider -rfE -o faulthandler_timeout=120)
if has_step tests; then
  # The quick modules first, the slow linear_cross_entropy one after them, then the rest: a cut
  # run still covers most ops.
  cd tests
  order=(test_softmax.py test_stat_topk.py test_sinkhorn.py test_log_bessel.py test_vmf.py test_func.py
         test_linear_cross_entropy.py)
  for f in test_*.py; do [[ " ${order[*]} " == *" $f "* ]] || order+=("$f"); done
  workers=()
  if ((${GPU_CHECK_WORKERS:-6} > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_CHECK_WORKERS:-6}")  # the tests share the GPU; ~800 of them, many compile
  fi
  step tests "$OUTDIR/tests.log" $(($(left) / 2)) "${PYTEST[@]}" "${workers[@]}" --durations=15 "${order[@]}"
  cd ..
fi

if has_step memcheck; then
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null ||
    ls -d /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$sanitizer" ]]; then
    note "memcheck: skipped (no compute-sanitizer on PATH or in /usr/local/cuda*/bin)"
    FAILED=1
  else
    # Without torch's caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is reported rather than landing in a neighbour of the same segment.
    # Exit 86: an error memcheck found (1 would be a failing test).
    cd tests && step memcheck "$OUTDIR/memcheck.log" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$sanitizer" --tool memcheck --error-exitcode 86 "${PYTEST[@]}" -k memcheck
    cd ..
  fi
fi

if has_step bench; then
  : >"$OUTDIR/bench.log"
  families=(${OPS//,/ })
  for i in "${!families[@]}"; do
    op=${families[$i]}
    if (($(left) < 45)); then
      note "bench: skipped ${families[*]:$i} (budget spent)"
      FAILED=1
      break
    fi
    # An equal share of what is left, at least 25 s: the first (most wanted) families get theirs.
    share=$((($(left) - 20) / (${#families[@]} - i)))
    ((share < 25)) && share=25
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step "bench $op" "$RESULTS/$op.log" "$share" env PYTHONUNBUFFERED=1 "$PY" -m bench --device cuda --ops "$op" \
      --out "$RESULTS/results" $BENCH_ARGS
    cat "$RESULTS/$op.log" >>"$OUTDIR/bench.log" 2>/dev/null
    [[ -d "$RESULTS/results" ]] && tar czf "$OUTDIR/results.tgz" -C "$RESULTS" results
  done
fi
note "gpu_check: done in $(($(date +%s) - START))s$( ((FAILED)) && echo ', some steps failed or were cut')"
exit $FAILED
