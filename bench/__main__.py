"""``python -m bench [--ops softmax] [--device cpu|cuda|auto] [--quick] [--repeats N] [--out DIR]``"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time

import torch

import fastloss

from . import FAMILIES, harness


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="fastloss microbenchmarks")
    p.add_argument("--ops", default=",".join(FAMILIES),
                   help=f"comma-separated op families (default: all: {','.join(FAMILIES)})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if a GPU is available and fastloss was built with CUDA kernels, else cpu")
    p.add_argument("--quick", action="store_true", help="reduced cases and repeats (smoke test)")
    p.add_argument("--repeats", type=int, default=None,
                   help="most timed blocks per measurement (default: cpu 20, cuda 100, quick 5)")
    p.add_argument("--max-time", type=float, default=None,
                   help="time budget per implementation of a case, its first 3 blocks included (they always run) "
                        "(default: cpu 1.5, cuda 1.0, quick 0.25)")
    p.add_argument("-k", "--filter", default=None,
                   help="only cases whose label ('family shape dtype mode', "
                        "e.g. 'softmax 8x151936 bf16 fwd') contains this text")
    p.add_argument("--skip-baselines", default="",
                   help="comma-separated baseline names to leave out, e.g. 'torch.compile' (its compiles can "
                        "take most of a short GPU run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for the markdown report, png plot and JSON (default: bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        # The best device fastloss has kernels for: a CUDA torch without nvcc at build time
        # builds the CPU kernels only.
        device = "cuda" if torch.cuda.is_available() and fastloss.build_info()["cuda"] else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if device == "cuda" and not fastloss.build_info()["cuda"]:
        print("--device cuda: fastloss was built without its CUDA kernels (no nvcc at build time?)", file=sys.stderr)
        return 2

    if device == "cuda":
        repeats, max_time, budget = 100, 1.0, 2 << 30
    else:
        repeats, max_time, budget = 20, 1.5, 1 << 30
    if args.quick:
        repeats, max_time = 5, 0.25
    settings = harness.Settings(
        device=device,
        repeats=max(1, args.repeats if args.repeats is not None else repeats),
        max_time=args.max_time if args.max_time is not None else max_time,
        input_budget=budget,
        quick=args.quick,
    )
    settings.min_repeats = min(settings.min_repeats, settings.repeats)

    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    skipped = {b.strip() for b in args.skip_baselines.split(",") if b.strip()}
    cases, family_notes, family_targets, family_threads = [], {}, {}, {}
    unknown = [fam for fam in families if fam not in FAMILIES]
    if unknown:
        print(f"unknown op family {', '.join(map(repr, unknown))}; known: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    for fam in families:
        mod = importlib.import_module(f"bench.{fam}")
        fam_cases = mod.cases(device, args.quick)
        # A family may fix the CPU thread count its targets are stated at (e.g. one thread each).
        family_threads[fam] = getattr(mod, "CPU_THREADS", None) if device == "cpu" else None
        for c in fam_cases:
            c.threads = family_threads[fam]
        if args.filter:
            fam_cases = [c for c in fam_cases if args.filter in c.label]
        for c in fam_cases:
            c.baselines = {name: fn for name, fn in c.baselines.items() if name not in skipped}
        cases += fam_cases
        family_notes[fam] = list(mod.notes(device, fam_cases)) if hasattr(mod, "notes") and fam_cases else []
        family_targets[fam] = list(mod.targets(device)) if hasattr(mod, "targets") else []
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2

    meta = harness.collect_meta(settings)
    if skipped:
        meta["skipped_baselines"] = ", ".join(sorted(skipped))
    print(f"fastloss bench on {meta['device_name']} (torch {meta['torch']}, {len(cases)} cases"
          f"{', quick' if args.quick else ''})", file=sys.stderr)
    t0 = time.perf_counter()
    # A time limit's SIGTERM stops the cases like Ctrl-C (once: a second one, or one while the
    # reports are written, ends the process as usual), and the finished cases are reported.
    def _interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rooflines, results, load = harness.run_cases(cases, settings)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elapsed = time.perf_counter() - t0
    meta["elapsed_s"] = round(elapsed, 1)
    meta["load"] = load
    # A family with cases missing is marked interrupted, gets no targets (its missing cases would
    # count) and a report name of its own, so it never replaces a complete report.
    ran = {fam: sum(r.case.family == fam for r in results) for fam in families}
    total = {fam: sum(c.family == fam for c in cases) for fam in families}
    cut = {fam for fam in families if 0 < ran[fam] < total[fam]}
    # Each family against the roofline at its own thread count (a family -k left without
    # cases states no figure against it).
    any_roofline = next(iter(rooflines.values()))
    family_roofline = {fam: rooflines.get(family_threads[fam], any_roofline) for fam in families}
    targets = harness.evaluate_targets({f: t for f, t in family_targets.items() if f not in cut}, results,
                                       family_roofline)
    print(harness.format_terminal(meta, family_roofline, results, family_notes, targets))

    # One report per family, so families can be re-run and committed independently.
    suffix = ("-quick" if args.quick else "") + ("-filtered" if args.filter else "")
    paths = []
    for fam in families:
        fam_results = [r for r in results if r.case.family == fam]
        if not fam_results:
            continue
        fam_meta = harness.family_meta(meta, family_threads[fam])
        stem = f"{fam}-{fam_meta['slug']}{suffix}"
        if fam in cut:
            fam_meta = {**fam_meta, "interrupted": f"{ran[fam]} of {total[fam]} cases ran; targets not evaluated"}
            stem += "-interrupted"
        paths += harness.write_outputs(args.out, stem, fam_meta, family_roofline[fam], fam_results,
                                       {fam: family_notes[fam]}, [t for t in targets if t[0] == fam])
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in paths)} in {elapsed:.0f} s", file=sys.stderr)
    return 130 if len(results) < len(cases) else 0


if __name__ == "__main__":
    sys.exit(main())
