"""Row-length sweep of the CPU softmax ops against torch (outside the issue's grid).

``python -m bench.softmax_rows [--dtypes fp32,bf16,fp16] [--cols 17,24,127,300] [--elements N]``

For each dtype and row length: softmax and log-softmax, forward and backward (the backward
ops called alone, on a gradient and an output the caller holds), over tensors of about
``--elements`` entries in four rotating input sets (so that the data streams from memory as
in training, not from cache). Each ratio is torch's median time over fastloss's, the median of
``--rounds`` in-process rounds that alternate the two. Large fresh outputs are allocated
differently from call to call; run it with glibc's heap kept, e.g.
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736``, to compare the
kernels rather than the page faults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastloss

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("softmax fwd", "log-softmax fwd", "softmax bwd", "log-softmax bwd")


def _median_seconds(fn, inputs, calls: int) -> float:
    times = []
    for i in range(calls):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pair(op: str, dtype: torch.dtype):
    """(torch, fastloss) callables of the op, each taking one input set."""
    log = op.startswith("log")
    if op.endswith("fwd"):
        if log:
            return (lambda x: torch.log_softmax(x, -1)), (lambda x: fastloss.log_softmax(x, -1))
        return (lambda x: torch.softmax(x, -1)), (lambda x: fastloss.softmax(x, -1))
    ref = torch.ops.aten._log_softmax_backward_data if log else torch.ops.aten._softmax_backward_data
    ours = torch.ops.fastloss.log_softmax_backward if log else torch.ops.fastloss.softmax_backward
    return (lambda g, y: ref(g, y, -1, dtype)), (lambda g, y: ours(g, y, -1, dtype))


def sweep(dtype_names, cols, elements: int, rounds: int, calls: int):
    torch.manual_seed(0)
    rows_out = []
    for name in dtype_names:
        dtype = DTYPES[name]
        for c in cols:
            r = max(1, elements // c)
            xs = [torch.randn(r, c).to(dtype) for _ in range(4)]
            ratios = {}
            for op in OPS:
                if op.endswith("fwd"):
                    inputs = [(x,) for x in xs]
                else:
                    fwd = torch.log_softmax if op.startswith("log") else torch.softmax
                    inputs = [(torch.randn(r, c).to(dtype), fwd(x.float(), -1).to(dtype)) for x in xs]
                ref, ours = _pair(op, dtype)
                ours(*inputs[0])  # warm-up
                ref(*inputs[0])
                per_round = []
                for i in range(rounds):
                    order = (ref, ours) if i % 2 == 0 else (ours, ref)  # alternating which goes first
                    t = {fn: _median_seconds(fn, inputs, calls) for fn in order}
                    per_round.append(t[ref] / t[ours])
                ratios[op] = statistics.median(per_round)
            rows_out.append((f"{r} x {c}", name, ratios))
    return rows_out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.softmax_rows", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--cols", default="17,24,40,50,100,127,300,1000")
    p.add_argument("--elements", type=int, default=1 << 21, help="entries per input tensor (default 2M)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=12, help="calls timed per implementation and round")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {', '.join(unknown)} (choose from {', '.join(DTYPES)})")
    try:
        cols = [int(c) for c in args.cols.split(",")]
    except ValueError:
        cols = []
    if not cols or min(cols) < 1:
        p.error(f"--cols: expected comma-separated positive row lengths, got {args.cols!r}")
    if min(args.elements, args.rounds, args.calls) < 1:
        p.error("--elements, --rounds and --calls must be at least 1")
    results = sweep(dtypes, cols, args.elements, args.rounds, args.calls)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels), fastloss "
          f"{fastloss.build_info()['cpu_isa']}, {torch.get_num_threads()} threads; torch time / fastloss time "
          f"(above 1: fastloss faster)\n")
    print("| rows x cols | dtype | " + " | ".join(OPS) + " |")
    print("|:---|:---|" + "---:|" * len(OPS))
    for shape, name, ratios in results:
        print(f"| {shape} | {name} | " + " | ".join(f"{ratios[op]:.2f}x" for op in OPS) + " |")


if __name__ == "__main__":
    main()
