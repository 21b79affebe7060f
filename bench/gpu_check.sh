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
#   BENCH_ARGS        extra arguments for `python -m bench` (default "--max-time 0.5")
#
# OUTDIR gets at most 7 files, each written as its step ends: summary.txt (status and seconds
# of each step), build.log, info.txt, tests.log, memcheck.log, bench.log and results.tgz (the
# benchmark reports, repacked after each family). A step is cut short by `timeout` when the
# budget runs out, and the steps after it are skipped. Wheels in .whl/ (`make wheelhouse`) are
# installed first, for machines without network access.
set -uo pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-build tests memcheck bench}
OPS=${GPU_CHECK_OPS:-softmax,linear_cross_entropy,stat_topk,sinkhorn,bessel}
BENCH_ARGS=${BENCH_ARGS:---max-time 0.5}

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

# step NAME LOG CMD...: runs CMD under the time left (less 10 s to pack results), logging to LOG.
step() {
  local name=$1 log=$2
  shift 2
  local limit=$(($(left) - 10))
  if ((limit < 20)); then
    note "$name: skipped (budget spent)"
    return 1
  fi
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="cut at ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (rc $rc)"
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
fi

arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null)
if [[ -z "$arch" ]]; then
  note "no CUDA device visible to torch: nothing to check"
  exit 1
fi
note "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'), sm_$arch, $(nproc) CPUs"

if has_step build; then
  # Only this GPU's architecture: half the device compile time of the default list.
  step build "$OUTDIR/build.log" env FASTLOSS_CUDA=ON FASTLOSS_CUDA_ARCHS="$arch" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" make install PYTHON="$PY"
  cp build.log "$OUTDIR/build.log" 2>/dev/null
  (cd tests && "$PY" -m fastloss info) >"$OUTDIR/info.txt" 2>&1
  if ! grep -q "^CUDA kernels built *yes" "$OUTDIR/info.txt"; then
    note "build: fastloss has no CUDA kernels (see info.txt); stopping"
    cat "$OUTDIR/info.txt" >>"$SUMMARY"
    exit 1
  fi
fi

if has_step tests; then
  (cd tests && step tests "$OUTDIR/tests.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfE --durations=15)
fi

if has_step memcheck; then
  (cd tests && step memcheck "$OUTDIR/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q -m cuda -k memcheck -p no:cacheprovider -rfE)
fi

if has_step bench; then
  : >"$OUTDIR/bench.log"
  for op in ${OPS//,/ }; do
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step "bench $op" "$RESULTS/$op.log" env PYTHONUNBUFFERED=1 "$PY" -m bench --device cuda --ops "$op" \
      --out "$RESULTS/results" $BENCH_ARGS
    rc=$?
    cat "$RESULTS/$op.log" >>"$OUTDIR/bench.log" 2>/dev/null
    [[ -d "$RESULTS/results" ]] && tar czf "$OUTDIR/results.tgz" -C "$RESULTS" results
    ((rc == 124 || rc == 137)) && break
    (($(left) < 30)) && break
  done
fi
note "gpu_check: done in $(($(date +%s) - START))s"
