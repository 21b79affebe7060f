"""The benchmark harness: timing, memory, roofline, table, report and plot.

Nothing here knows about a particular op family. A family module (``bench/<family>.py``)
describes its work as :class:`Case` objects; :func:`run_cases` measures them and the
``format_*`` / ``write_*`` functions turn the :class:`Result` objects into a terminal table, a
markdown report, a JSON dump and a png plot.

Timing
    GPU: CUDA events around a block of calls. Before each block a spin kernel
    (``torch.cuda._sleep``) keeps the GPU busy while the CPU enqueues the block, so the time is
    that of the GPU work alone, without Python launch overhead (as under a CUDA graph).
    CPU: wall clock (``time.perf_counter``) around a block of calls.
    Every implementation of a case is warmed up first (the first call also compiles, for
    torch.compile), then the implementations are timed in turns, one block each per round,
    so a slow or noisy stretch of the machine weighs on all of them alike and the ratios stay
    comparable; at least ``min_repeats`` and up to ``repeats`` blocks each, or until about
    ``max_time`` seconds per implementation have passed. The reported time is the median over
    blocks of the time per call. Small cases use several calls per block (``inner``) so a
    block is long enough for the clock. On the CPU each block of a call shorter than
    ``settle_max`` starts after one untimed call: the memory state depends on what ran just
    before (the previous implementation's temporaries can leave a free top that glibc returns
    to the OS, so the next call pays page faults on fresh memory; after gigabytes of freed
    temporaries even the next call's fresh mappings are slower), and in a fixed order the same
    implementation would always follow the same predecessor. Measured on 4096 x 131072 bf16
    forward+backward: whichever of torch and fastloss followed the eager three-pass
    baseline took 1.2-1.25x longer. Only calls longer than ``settle_max`` (the eager
    baselines of the largest cases) skip it, to bound the run time. The order is also
    shuffled each round (seeded: the same orders every run), so whatever an untimed call
    cannot settle (memory freed by gigabytes of temporaries still being reclaimed) falls on
    every implementation in turn.
Rotated inputs
    Each case makes several distinct input sets (as many as fit ``input_budget`` bytes, at
    most ``max_inputs``, at least one) and the calls cycle through them, so a small case does
    not find its input already in cache.
Memory
    GPU: ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before
    it (the inputs): outputs, saved tensors and temporaries. CPU: the bytes of the tensors the
    call returns (outputs and gradients); temporaries are not seen.
Roofline
    Measured in the same run: a large ``copy_`` (GB/s counting read + write bytes) and a large
    matmul (TFLOP/s; bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------------------------
# Describing work


class Unavailable:
    """A baseline that cannot run here (peer library not installed, ...): reported, not timed."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unavailable({self.reason!r})"


@dataclass
class Case:
    """One benchmark case: an op family at one shape, dtype and mode.

    ``make_inputs(seed)`` returns the argument tuple for one call (on the device); the
    fastloss callable and every baseline take those arguments. A callable returns the tensors
    it produced (outputs and, for ``fwd+bwd``, gradients): on CPU their bytes are the reported
    memory. ``bytes_moved`` is the minimum DRAM traffic of one call (for GB/s), ``flops`` the
    arithmetic (for TFLOP/s, matmul-type families). ``check``, if given, compares fastloss
    with a reference on a small input and returns an error message or None.
    """

    family: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    mode: str
    device: str
    make_inputs: Callable[[int], tuple]
    input_bytes: int
    fastloss: Callable[..., Any]
    baselines: Dict[str, Any]  # name -> callable or Unavailable; the first is the reference
    bytes_moved: int
    flops: Optional[int] = None
    check: Optional[Callable[[], Optional[str]]] = None
    notes: List[str] = field(default_factory=list)
    threads: Optional[int] = None  # CPU threads for every implementation (None: the run's)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def dtype_str(self) -> str:
        return dtype_name(self.dtype)

    @property
    def label(self) -> str:
        return f"{self.family} {self.shape_str} {self.dtype_str} {self.mode}"


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """``fn`` as a forward+backward call ``(x, grad) -> (y, dx)``.

    ``x`` must require grad. ``torch.autograd.grad`` returns dx without accumulating into
    ``x.grad``, so every call does the same work.
    """

    def run(x: torch.Tensor, grad: torch.Tensor):
        y = fn(x)
        (dx,) = torch.autograd.grad(y, x, grad)
        return y, dx

    run.__name__ = f"{getattr(fn, '__name__', 'fn')}_fwd_bwd"
    return run


def loss_forward_backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """``fn`` inside a weighted-sum loss, ``(x, w) -> (y, dx)`` with dx the gradient of
    ``(fn(x) * w).sum()``.

    As in training, the gradient reaching ``fn``'s backward is a tensor the loss's backward
    just made and nothing else holds (a backward may reuse its memory), not the caller's.
    """

    def run(x: torch.Tensor, w: torch.Tensor):
        y = fn(x)
        (dx,) = torch.autograd.grad((y * w).sum(), x)
        return y, dx

    run.__name__ = f"{getattr(fn, '__name__', 'fn')}_loss_fwd_bwd"
    return run


def _raise_recompile_limits() -> None:
    # Every (shape, dtype, requires_grad) is a separate graph of the same function: allow
    # enough of them, and fail loudly rather than fall back to eager if the limit is hit.
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


class Compiled:
    """The ``torch.compile`` baseline: ``torch.compile(fn, dynamic=False)``, one compiled
    object per ``key`` (e.g. shape, dtype, device), shared by the cases that use that key.
    After a compile failure every later call fails at once with the same message, so a
    missing compiler costs one attempt per run."""

    _cache: Dict[tuple, Any] = {}
    _error: Optional[str] = None

    def __init__(self, fn: Callable, key: tuple):
        self.fn, self.key = fn, (getattr(fn, "__qualname__", repr(fn)),) + tuple(key)
        self.__name__ = "torch.compile"

    def __call__(self, *args):
        if Compiled._error is not None:
            raise RuntimeError(Compiled._error)
        fn = Compiled._cache.get(self.key)
        if fn is not None:
            return fn(*args)  # a failure here (e.g. out of memory) is this case's alone
        try:
            _raise_recompile_limits()
            fn = torch.compile(self.fn, dynamic=False)
            out = fn(*args)  # compiles
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            Compiled._error = f"torch.compile failed ({type(exc).__name__}: {lines[0][:150] if lines else ''})"
            raise
        Compiled._cache[self.key] = fn
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ImplResult:
    name: str
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    repeats: int = 0
    inner: int = 0
    first_call_s: Optional[float] = None
    peak_bytes: Optional[int] = None
    error: Optional[str] = None


@dataclass
class Result:
    case: Case
    impls: Dict[str, ImplResult]
    n_inputs: int
    check_error: Optional[str] = None

    @property
    def fastloss(self) -> ImplResult:
        return self.impls["fastloss"]

    def speedup(self, baseline: str) -> Optional[float]:
        b = self.impls.get(baseline)
        f = self.fastloss
        if b is None or b.median_s is None or f.median_s is None:
            return None
        return b.median_s / f.median_s

    @property
    def gbps(self) -> Optional[float]:
        t = self.fastloss.median_s
        return None if t is None else self.case.bytes_moved / t / 1e9

    @property
    def tflops(self) -> Optional[float]:
        t = self.fastloss.median_s
        return None if t is None or not self.case.flops else self.case.flops / t / 1e12


@dataclass
class Roofline:
    copy_gbps: Optional[float]
    copy_bytes: int
    matmul_tflops: Optional[float]
    matmul_desc: str


@dataclass
class Settings:
    device: str
    repeats: int
    min_repeats: int = 3
    max_time: float = 1.5  # seconds per measurement, past min_repeats
    warmup_time: float = 0.1
    input_budget: int = 1 << 30  # bytes of distinct input sets per case
    max_inputs: int = 32
    quick: bool = False
    settle_max: float = 4.0  # CPU: an untimed call before each block of calls shorter than this (s)

    @property
    def min_block(self) -> float:
        return 2e-4 if self.device == "cuda" else 1e-3

    @property
    def max_inner(self) -> int:
        return 32


# --------------------------------------------------------------------------------------------
# Device description


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_vector_isa() -> str:
    """The vector ISA fastloss's CPU kernels run with ("AVX-512", "AVX2", or "" elsewhere).
    Virtual machines often report a bare "AMD EPYC" or "Intel Xeon Processor" for CPUs of
    several generations: the ISA tells their reports apart."""
    import fastloss

    isa = fastloss.build_info().get("cpu_isa", "")
    return "AVX-512" if "AVX-512" in isa else "AVX2" if "AVX2" in isa else ""


def cpu_label() -> str:
    isa = cpu_vector_isa()
    return f"{cpu_model()}, {isa}" if isa else cpu_model()


def device_name(device: str, threads: Optional[int] = None) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_label()} ({threads or torch.get_num_threads()} threads)"


def device_slug(device: str, threads: Optional[int] = None) -> str:
    if device == "cuda":
        return _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(cpu_label())}-{threads or torch.get_num_threads()}threads"


@contextlib.contextmanager
def cpu_threads(threads: Optional[int]):
    """torch's CPU thread count set to ``threads`` (None: unchanged) for the block."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(previous)


def family_meta(meta: dict, threads: Optional[int]) -> dict:
    """The run's metadata for a family whose CPU cases ran at ``threads`` (None: the run's)."""
    if not threads or meta["device"] != "cpu":
        return meta
    return {**meta, "threads": threads, "device_name": device_name("cpu", threads),
            "slug": device_slug("cpu", threads), "build_info": {**meta["build_info"], "num_threads": threads}}


# --------------------------------------------------------------------------------------------
# Clocks


class _CpuClock:
    def block(self, call: Callable[[], Any], inner: int, enqueue_s: float = 0.0) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            call()
        return time.perf_counter() - t0

    def sync(self) -> None:
        pass


class _CudaClock:
    """CUDA-event timing; a spin kernel before each block hides the CPU's enqueue time."""

    MAX_SLEEP_S = 0.02

    def __init__(self) -> None:
        self.cycles_per_s: Optional[float] = None
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda.synchronize()
            start, end = self._events()
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            if ms > 0:
                self.cycles_per_s = 20_000_000 / (ms * 1e-3)

    @staticmethod
    def _events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def block(self, call: Callable[[], Any], inner: int, enqueue_s: float = 0.0) -> float:
        """enqueue_s: the CPU time to enqueue one call of this implementation."""
        start, end = self._events()
        if self.cycles_per_s:
            sleep_s = min(self.MAX_SLEEP_S, 1.5 * inner * enqueue_s + 2e-5)
            torch.cuda._sleep(max(1, int(sleep_s * self.cycles_per_s)))
        start.record()
        for _ in range(inner):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3


def make_clock(device: str):
    return _CudaClock() if device == "cuda" else _CpuClock()


# --------------------------------------------------------------------------------------------
# Measuring


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``obj`` (a tensor or a nest of them)."""
    seen = {}

    def walk(o):
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[(st.data_ptr(), o.device)] = st.nbytes()
        elif isinstance(o, (list, tuple)):
            for item in o:
                walk(item)
        elif isinstance(o, dict):
            for item in o.values():
                walk(item)

    walk(obj)
    return sum(seen.values())


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class _Timer:
    """One implementation of a case: warmed up and calibrated on construction (see the module
    docstring), then timed one block per :meth:`sample` call."""

    def __init__(self, fn: Callable, inputs: Sequence[tuple], settings: Settings, clock):
        self.res = ImplResult(name=getattr(fn, "__name__", "fn"))
        self.clock = clock
        self.enqueue_s = 0.0  # CPU time to enqueue one call (measured on GPU; sizes the spin kernel)
        n = len(inputs)
        state = {"i": 0}

        def call():
            args = inputs[state["i"] % n]
            state["i"] += 1
            return fn(*args)

        self.call = call
        res = self.res
        # Warm-up; the first call compiles where there is compiling to do. On CPU the first
        # call's result gives the memory figure, so no extra call is spent on it.
        t0 = time.perf_counter()
        out = call()
        clock.sync()
        res.first_call_s = time.perf_counter() - t0
        if settings.device != "cuda":
            res.peak_bytes = _tensor_bytes(out)
        del out
        warm = 1
        t_warm = time.perf_counter()
        while warm < 3 and time.perf_counter() - t_warm < settings.warmup_time:
            call()
            warm += 1
        clock.sync()

        if settings.device == "cuda":
            # Peak device memory of one call, over what is already allocated (the inputs).
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = call()
            torch.cuda.synchronize()
            res.peak_bytes = max(0, torch.cuda.max_memory_allocated() - before)
            del out
            # How long the CPU takes to enqueue one call (the GPU is kept busy meanwhile).
            if clock.cycles_per_s:
                torch.cuda._sleep(int(0.01 * clock.cycles_per_s))
            t0 = time.perf_counter()
            call()
            self.enqueue_s = time.perf_counter() - t0
            torch.cuda.synchronize()

        # Calibrate: one call in a block; it counts as a sample when blocks are single calls.
        t1 = clock.block(call, 1, self.enqueue_s)
        self.inner = 1
        if 0 < t1 < settings.min_block:
            self.inner = min(settings.max_inner, max(1, math.ceil(settings.min_block / t1)))
        self.samples: List[float] = [t1] if self.inner == 1 else []
        self.settle = settings.device != "cuda" and t1 < settings.settle_max

    def sample(self) -> None:
        if self.settle:
            self.call()
        self.samples.append(self.clock.block(self.call, self.inner, self.enqueue_s) / self.inner)

    def result(self) -> ImplResult:
        res = self.res
        res.median_s = statistics.median(self.samples)
        res.min_s = min(self.samples)
        res.repeats = len(self.samples)
        res.inner = self.inner
        return res


def time_interleaved(timers: Sequence[_Timer], settings: Settings, on_error=None) -> List[_Timer]:
    """Times the timers in rounds of one block each (see the module docstring); returns those
    that did not fail. ``on_error(timer, exc)`` hears of each failure."""
    live = [t for t in timers if len(t.samples) < settings.repeats or not t.samples]
    done = [t for t in timers if t not in live]
    deadline = time.perf_counter() + settings.max_time * max(1, len(live))
    order_rng = random.Random(0)  # the same orders in every run
    while live:
        # A fresh order each round, so that no implementation keeps the same predecessor.
        order = list(live)
        order_rng.shuffle(order)
        for t in order:
            try:
                t.sample()
            except Exception as exc:
                live.remove(t)
                if on_error is not None:
                    on_error(t, exc)
                continue
            if len(t.samples) >= settings.repeats or (
                len(t.samples) >= settings.min_repeats and time.perf_counter() >= deadline
            ):
                live.remove(t)
                done.append(t)
    return done


def time_callable(fn: Callable, inputs: Sequence[tuple], settings: Settings, clock) -> ImplResult:
    """One implementation on its own (the rooflines)."""
    timer = _Timer(fn, inputs, settings, clock)
    failures = []
    time_interleaved([timer], settings, on_error=lambda _t, exc: failures.append(exc))
    if failures:
        raise failures[0]
    return timer.result()


def n_rotating_inputs(input_bytes: int, settings: Settings) -> int:
    if input_bytes <= 0:
        return settings.max_inputs
    return max(1, min(settings.max_inputs, settings.input_budget // input_bytes))


def measure_roofline(settings: Settings, clock, progress=None) -> Roofline:
    dev = settings.device
    copy_bytes = (1 << 30) if dev == "cuda" else (256 << 20)
    copy_gbps = None
    try:
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=dev).uniform_()
        dst = torch.empty_like(src)
        r = time_callable(lambda: dst.copy_(src), [()], settings, clock)
        copy_gbps = 2 * copy_bytes / r.median_s / 1e9
        del src, dst
    except Exception as exc:  # pragma: no cover - reported, not fatal
        _log(progress, f"copy roofline failed: {_short_error(exc)}")
    free_memory(dev)
    if progress is not None:
        progress.update(1)

    if dev == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    desc = f"{n}x{n}x{n} {dtype_name(dtype)}"
    tflops = None
    try:
        a = torch.randn(n, n, dtype=dtype, device=dev)
        b = torch.randn(n, n, dtype=dtype, device=dev)
        r = time_callable(lambda: a @ b, [()], settings, clock)
        tflops = 2 * n**3 / r.median_s / 1e12
        del a, b
    except Exception as exc:  # pragma: no cover
        _log(progress, f"matmul roofline failed: {_short_error(exc)}")
    free_memory(dev)
    if progress is not None:
        progress.update(1)
    return Roofline(copy_gbps=copy_gbps, copy_bytes=copy_bytes, matmul_tflops=tflops, matmul_desc=desc)


def _log(progress, msg: str) -> None:
    if progress is not None:
        progress.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def run_case(case: Case, settings: Settings, clock, progress=None) -> Result:
    """Measure fastloss and every baseline of one case on the same rotated inputs."""
    impls: Dict[str, ImplResult] = {}
    n_inputs = n_rotating_inputs(case.input_bytes, settings)
    check_error = None
    inputs: List[tuple] = []
    try:
        inputs = [case.make_inputs(seed) for seed in range(n_inputs)]
    except Exception as exc:
        msg = f"inputs: {_short_error(exc)}"
        _log(progress, f"{case.label}: {msg}")
        for name in ["fastloss", *case.baselines]:
            impls[name] = ImplResult(name=name, error=msg)
        if progress is not None:
            progress.update(1 + len(case.baselines))
        free_memory(settings.device)
        return Result(case, impls, n_inputs=0)

    if case.check is not None:
        try:
            check_error = case.check()
        except Exception as exc:
            check_error = f"check failed to run: {_short_error(exc)}"
        if check_error:
            _log(progress, f"{case.label}: {check_error}")

    # Warm up and calibrate each implementation, then time them all in turns.
    timers: Dict[str, _Timer] = {}
    for name, fn in [("fastloss", case.fastloss), *case.baselines.items()]:
        if progress is not None:
            progress.set_postfix_str(f"{case.shape_str} {case.dtype_str} {case.mode} {name}", refresh=True)
        if isinstance(fn, Unavailable):
            impls[name] = ImplResult(name=name, error=fn.reason)
        else:
            try:
                timers[name] = _Timer(fn, inputs, settings, clock)
            except Exception as exc:
                impls[name] = ImplResult(name=name, error=_short_error(exc))
                _log(progress, f"{case.label}: {name} skipped: {impls[name].error}")
            free_memory(settings.device)
    if progress is not None:
        progress.set_postfix_str(f"{case.shape_str} {case.dtype_str} {case.mode} timing", refresh=True)
    names = {id(t): name for name, t in timers.items()}

    def failed(t: _Timer, exc: Exception) -> None:
        name = names[id(t)]
        impls[name] = ImplResult(name=name, error=_short_error(exc))
        _log(progress, f"{case.label}: {name} skipped: {impls[name].error}")
        free_memory(settings.device)

    for t in time_interleaved(list(timers.values()), settings, on_error=failed):
        r = t.result()
        r.name = names[id(t)]
        impls[r.name] = r
    # Report in the case's order.
    impls = {name: impls[name] for name in ["fastloss", *case.baselines] if name in impls}
    if progress is not None:
        progress.update(1 + len(case.baselines))
    del timers
    del inputs
    free_memory(settings.device)
    return Result(case, impls, n_inputs=n_inputs, check_error=check_error)


class LoadMonitor:
    """CPU time used by other processes while the benchmark runs (Linux /proc/stat), in cores.

    On a shared machine other work steals cores from the timed threads; the report says so.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            import resource

            with open("/proc/stat") as f:
                fields = f.readline().split()
            ticks = os.sysconf("SC_CLK_TCK")
            # user nice system idle iowait irq softirq steal
            vals = [int(v) for v in fields[1:9]]
            busy = (sum(vals) - vals[3] - vals[4]) / ticks
            steal = vals[7] / ticks
            own = 0.0
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
                ru = resource.getrusage(who)
                own += ru.ru_utime + ru.ru_stime
            return time.perf_counter(), busy, own, steal
        except Exception:
            return None

    def stop(self) -> Optional[dict]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        if wall <= 0:
            return None
        others = max(0.0, (end[1] - self._start[1]) - (end[2] - self._start[2])) / wall
        steal = max(0.0, end[3] - self._start[3]) / wall
        return {"other_processes_cores": round(others, 2), "steal_cores": round(steal, 2), "cpus": os.cpu_count()}


def run_cases(cases: Sequence[Case], settings: Settings, progress_desc: str = "bench"):
    """Rooflines first, then every case, with a progress bar on stderr.

    Returns (rooflines, results, load): the rooflines keyed by the cases' CPU thread counts
    (each family is compared with the machine at its own thread count; None: the default
    count, and every CUDA case), load what :class:`LoadMonitor` saw (or None).
    Interrupted (Ctrl-C, SIGINT, or SIGTERM: a time limit) after the roofline, it returns the
    cases finished so far, so their reports are still written; `results` is then shorter than
    `cases`.
    """
    from tqdm import tqdm

    clock = make_clock(settings.device)
    monitor = LoadMonitor()
    counts = list(dict.fromkeys(c.threads for c in cases)) if settings.device == "cpu" else [None]
    total = 2 * len(counts) + sum(1 + len(c.baselines) for c in cases)
    with tqdm(total=total, desc=progress_desc, file=sys.stderr, unit="run", dynamic_ncols=True) as progress:
        progress.set_postfix_str("roofline")
        rooflines = {}
        for threads in counts:  # (the bessel family runs at 1 thread, the others at the default)
            with cpu_threads(threads):
                rooflines[threads] = measure_roofline(settings, clock, progress)
        results = []
        try:
            for c in cases:
                with cpu_threads(c.threads if settings.device == "cpu" else None):
                    results.append(run_case(c, settings, clock, progress))
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(results)} of {len(cases)} cases finished", file=sys.stderr)
    return rooflines, results, monitor.stop()


def load_warning(meta: dict) -> Optional[str]:
    load = meta.get("load")
    if not load:
        return None
    others = load["other_processes_cores"] + load["steal_cores"]
    if others < 0.15:
        return None
    return (
        f"other processes used {load['other_processes_cores']:.2f} cores on average during the run "
        f"(steal {load['steal_cores']:.2f}) of {load['cpus']}: timings are noisy"
    )


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    """A goal stated next to the results, computed from them, never asserted.

    ``value(result, roofline)`` gives the figure compared with ``minimum`` for every selected
    result; the target is met when all of them reach it, and none failed its correctness check
    or went unmeasured (a crashed or wrong case is not evidence of a target).
    """

    text: str
    select: Callable[[Result], bool]
    value: Callable[[Result, Roofline], Optional[float]]
    minimum: float
    percent: bool = False

    def _fmt(self, v: float) -> str:
        return f"{100 * v:.0f}%" if self.percent else f"{v:.2f}x"

    def evaluate(self, results: Sequence[Result], roofline: Roofline) -> Tuple[str, str]:
        vals = []
        for r in results:
            if self.select(r):
                v = self.value(r, roofline)
                vals.append((v, r))
        if not vals:
            return "n/a", "no such case in this run"
        missing = [r for v, r in vals if v is None]
        known = [(v, r) for v, r in vals if v is not None]
        if not known:
            return "n/a", "not measured"
        worst_v, worst_r = min(known, key=lambda t: t[0])
        c = worst_r.case
        detail = f"worst {self._fmt(worst_v)} at {c.shape_str} {c.dtype_str} {c.mode} ({len(known)} case(s))"
        failing = [r for v, r in known if v < self.minimum]
        unchecked = [r for _, r in vals if r.check_error]
        if failing:
            detail += f"; {len(failing)} below"
        if missing:
            detail += f"; {len(missing)} not measured"
        if unchecked:
            detail += f"; {len(unchecked)} failed the correctness check"
        if failing or unchecked:
            return "not met", detail
        return ("met" if not missing else "incomplete"), detail


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _families(results: Sequence[Result]) -> Dict[str, List[Result]]:
    fams: Dict[str, List[Result]] = {}
    for r in results:
        fams.setdefault(r.case.family, []).append(r)
    return fams


def _baseline_order(results: Sequence[Result]) -> List[str]:
    names: List[str] = []
    for r in results:
        for b in r.case.baselines:
            if b not in names:
                names.append(b)
    return names


def table_rows(results: Sequence[Result], roofline: Roofline) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of one family's table."""
    baselines = _baseline_order(results)
    use_tflops = any(r.case.flops for r in results)
    # Matmul-type families against the matmul roofline, the others against the copy's.
    header = ["shape", "dtype", "mode", "fastloss ms"]
    header += ["TFLOP/s", "% of matmul"] if use_tflops else ["GB/s", "% of copy BW"]
    header += [f"{b} ms" for b in baselines]
    header += [f"vs {b}" for b in baselines]
    header += ["peak mem", "inputs"]
    rows = []
    for r in results:
        f = r.fastloss
        fl = fmt_ms(f.median_s) if f.median_s is not None else "error"
        gbps = r.gbps
        rate = r.tflops if use_tflops else gbps
        if use_tflops:
            rate_s = "-" if rate is None else f"{rate:.2f}"
        else:
            rate_s = "-" if rate is None else f"{rate:.1f}"
        if use_tflops:
            pct = "-" if rate is None or not roofline.matmul_tflops else f"{100 * rate / roofline.matmul_tflops:.0f}%"
        else:
            pct = "-" if gbps is None or not roofline.copy_gbps else f"{100 * gbps / roofline.copy_gbps:.0f}%"
        row = [r.case.shape_str, r.case.dtype_str, r.case.mode, fl, rate_s, pct]
        for b in baselines:
            ir = r.impls.get(b)
            if ir is None:
                row.append("")
            elif ir.median_s is None:
                row.append("skip")
            else:
                row.append(fmt_ms(ir.median_s))
        for b in baselines:
            row.append(_ratio(r.speedup(b)) if b in r.impls else "")
        row.append(fmt_bytes(f.peak_bytes))
        row.append(str(r.n_inputs))
        rows.append(row)
    return header, rows


def format_text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = {0, 1, 2}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown_table(header: List[str], rows: List[List[str]], right_from: int = 3) -> str:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(":---" if i < right_from else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _impl_notes(results: Sequence[Result]) -> List[str]:
    """Skipped baselines and failed checks, each distinct message once."""
    notes: Dict[str, List[str]] = {}
    for r in results:
        where = f"{r.case.shape_str} {r.case.dtype_str} {r.case.mode}"
        if r.check_error:
            notes.setdefault(f"fastloss check: {r.check_error}", []).append(where)
        for name, ir in r.impls.items():
            if ir.error:
                notes.setdefault(f"{name}: {ir.error}", []).append(where)
    out = []
    for msg, where in notes.items():
        if len(where) == len(results):
            where_s = "all cases"
        else:
            where_s = ", ".join(where[:6]) + (" ..." if len(where) > 6 else "")
        out.append(f"{msg} ({where_s})")
    return out


def format_terminal(
    meta: dict, rooflines: Dict[str, Roofline], results: Sequence[Result], family_notes: Dict[str, List[str]],
    targets
) -> str:
    """The run's tables; ``rooflines`` per family (each at its family's thread count)."""
    lines = [
        f"device: {meta['device_name']}   torch {meta['torch']}   fastloss {meta['fastloss_version']}   "
        f"threads {meta['threads']}",
    ]
    warn = load_warning(meta)
    if warn:
        lines.append(f"WARNING: {warn}")
    if meta.get("skipped_baselines"):
        lines.append(f"baselines left out (--skip-baselines): {meta['skipped_baselines']}")
    for fam, rs in _families(results).items():
        roofline = rooflines[fam]
        header, rows = table_rows(rs, roofline)
        n = rs[0].case.threads
        threads = f" at {n} thread{'s' if n != 1 else ''}" if n else ""
        lines += ["", f"[{fam}]  roofline{threads}: copy {_num(roofline.copy_gbps, '.1f')} GB/s (read+write), matmul "
                  f"{_num(roofline.matmul_tflops, '.2f')} TFLOP/s ({roofline.matmul_desc})",
                  format_text_table(header, rows)]
        for note in family_notes.get(fam, []) + _impl_notes(rs):
            lines.append(f"  note: {note}")
    if targets:
        lines += ["", "targets (not asserted):"]
        for fam, tgt, status, detail in targets:
            lines.append(f"  [{status:>7}] {fam}: {tgt.text} -- {detail}")
    return "\n".join(lines)


def _num(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def evaluate_targets(family_targets: Dict[str, List[Target]], results: Sequence[Result],
                     rooflines: Dict[str, Roofline]):
    out = []
    fams = _families(results)
    for fam, tgts in family_targets.items():
        for t in tgts:
            status, detail = t.evaluate(fams.get(fam, []), rooflines[fam])
            out.append((fam, t, status, detail))
    return out


def collect_meta(settings: Settings) -> dict:
    import fastloss

    info = fastloss.build_info()
    info.pop("parallel_backend", None)
    meta = {
        "device": settings.device,
        "device_name": device_name(settings.device),
        "slug": device_slug(settings.device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastloss_version": getattr(fastloss, "__version__", info.get("version", "?")),
        "build_info": info,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "quick": settings.quick,
        "repeats": settings.repeats,
        "min_repeats": settings.min_repeats,
        "max_time": settings.max_time,
        "input_budget": settings.input_budget,
        "max_inputs": settings.max_inputs,
    }
    return meta


def format_markdown(
    meta: dict, roofline: Roofline, results: Sequence[Result], family_notes: Dict[str, List[str]], targets
) -> str:
    dev = meta["device"]
    bi = ", ".join(f"{k}={v}" for k, v in meta["build_info"].items())
    timing = (
        "CUDA events around blocks of calls, the GPU kept busy by a spin kernel while the CPU enqueues "
        "(Python launch overhead excluded)"
        if dev == "cuda"
        else f"wall clock (`time.perf_counter`) around blocks of calls, {meta['threads']} threads"
    )
    mem = (
        "`torch.cuda.max_memory_allocated()` during one call minus what was allocated before it "
        "(the inputs): outputs, saved tensors and temporaries"
        if dev == "cuda"
        else "bytes of the tensors the fastloss call returns (outputs, and gradients for fwd+bwd); "
        "temporaries are not counted"
    )
    lines = [
        f"# fastloss benchmarks: {meta['device_name']}" + (" (quick)" if meta["quick"] else ""),
        "",
        f"- date: {meta['date']}",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}"
        + (f" (CUDA {meta['torch_cuda']})" if meta["torch_cuda"] else "")
        + f", Python {meta['python']}",
        f"- fastloss {meta['fastloss_version']}; build: {bi}",
        f"- threads: {meta['threads']}",
        f"- roofline (measured in this run at these threads): copy **{_num(roofline.copy_gbps, '.1f')} GB/s** "
        f"(`copy_` of {fmt_bytes(roofline.copy_bytes)} fp32, read + write bytes counted); "
        f"matmul **{_num(roofline.matmul_tflops, '.2f')} TFLOP/s** ({roofline.matmul_desc})",
    ]
    if meta.get("elapsed_s") is not None:
        lines.append(f"- run time: {meta['elapsed_s']:.0f} s")
    warn = load_warning(meta)
    if warn:
        lines.append(f"- **warning**: {warn}")
    if meta.get("interrupted"):
        lines.append(f"- **interrupted**: {meta['interrupted']}")
    if meta.get("skipped_baselines"):
        lines.append(f"- baselines left out (--skip-baselines): {meta['skipped_baselines']}")
    lines += [
        "",
        "Method: " + timing + f"; warm-up (first call compiles), then the implementations of a case timed "
        "in turns (one block each per round, so machine noise weighs on all alike), the median over at least "
        f"{meta['min_repeats']} and up to {meta['repeats']} timed blocks (or about {meta['max_time']:g} s "
        "per implementation). Inputs rotated: each case cycles through as many distinct input sets as fit "
        f"{fmt_bytes(meta['input_budget'])} (at most {meta['max_inputs']}, at least 1: column `inputs`). "
        "GB/s = minimum bytes moved per call / fastloss time; `% of copy BW` against the copy roofline "
        "above (matmul-type families: TFLOP/s and `% of matmul` against the matmul roofline); `vs X` = X time / fastloss time (above 1: fastloss faster). "
        f"Peak mem: {mem}.",
    ]
    for fam, rs in _families(results).items():
        header, rows = table_rows(rs, roofline)
        lines += ["", f"## {fam}", "", format_markdown_table(header, rows)]
        notes = family_notes.get(fam, []) + _impl_notes(rs)
        if notes:
            lines.append("")
            # A note may carry a markdown table (lines starting with "|", after a blank line):
            # those lines go in as they are, the others as bullets.
            lines += [n if n == "" or n.startswith("|") else f"- {n}" for n in notes]
    if targets:
        lines += ["", "## Targets", "", "Computed from the numbers above; stated, not asserted.", ""]
        lines.append("| family | target | status | detail |")
        lines.append("|:---|:---|:---|:---|")
        for fam, t, status, detail in targets:
            lines.append(f"| {fam} | {t.text} | **{status}** | {detail} |")
    return "\n".join(lines) + "\n"


def results_json(meta: dict, roofline: Roofline, results: Sequence[Result], targets) -> dict:
    return {
        "meta": meta,
        "roofline": {
            "copy_gbps": roofline.copy_gbps,
            "copy_bytes": roofline.copy_bytes,
            "matmul_tflops": roofline.matmul_tflops,
            "matmul": roofline.matmul_desc,
        },
        "results": [
            {
                "family": r.case.family,
                "shape": list(r.case.shape),
                "dtype": r.case.dtype_str,
                "mode": r.case.mode,
                "bytes_moved": r.case.bytes_moved,
                "flops": r.case.flops,
                "inputs": r.n_inputs,
                "gbps": r.gbps,
                "check_error": r.check_error,
                "impls": {
                    name: {
                        "median_ms": None if ir.median_s is None else ir.median_s * 1e3,
                        "min_ms": None if ir.min_s is None else ir.min_s * 1e3,
                        "repeats": ir.repeats,
                        "calls_per_block": ir.inner,
                        "first_call_s": ir.first_call_s,
                        "peak_bytes": ir.peak_bytes,
                        "error": ir.error,
                    }
                    for name, ir in r.impls.items()
                },
                "speedup": {b: r.speedup(b) for b in r.case.baselines},
            }
            for r in results
        ],
        "targets": [{"family": f, "target": t.text, "status": s, "detail": d} for f, t, s, d in targets],
    }


def write_plot(path: str, meta: dict, results: Sequence[Result]) -> Optional[str]:
    """Grouped bars: per case, fastloss speed-up against each baseline (log scale, 1 = parity)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except Exception as exc:  # pragma: no cover
        return f"plot skipped: {_short_error(exc)}"

    fams = _families(results)
    if not fams:
        return "plot skipped: no results"
    n_cases = max(len(rs) for rs in fams.values())
    fig_w = max(8.0, 0.55 * n_cases + 2)
    fig, axes = plt.subplots(len(fams), 1, figsize=(fig_w, 4.8 * len(fams)), squeeze=False)
    for ax, (fam, rs) in zip(axes[:, 0], fams.items()):
        baselines = _baseline_order(rs)
        k = max(1, len(baselines))
        width = 0.8 / k
        xs = list(range(len(rs)))
        for j, b in enumerate(baselines):
            vals = [r.speedup(b) for r in rs]
            pos = [x - 0.4 + width * (j + 0.5) for x in xs]
            heights = [v if v is not None else float("nan") for v in vals]
            ax.bar(pos, heights, width=width, label=f"vs {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xticks(xs)
        labels = [f"{r.case.shape_str}\n{r.case.dtype_str} {r.case.mode}" for r in rs]
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("fastloss speed-up (baseline time / fastloss time)")
        ax.set_title(f"{fam} on {meta['device_name']}, torch {meta['torch']}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: str, stem: str, meta, roofline, results, family_notes, targets) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    paths = []
    with open(base + ".md", "w") as f:
        f.write(format_markdown(meta, roofline, results, family_notes, targets))
    paths.append(base + ".md")
    with open(base + ".json", "w") as f:
        json.dump(results_json(meta, roofline, results, targets), f, indent=1)
    paths.append(base + ".json")
    err = write_plot(base + ".png", meta, results)
    if err:
        print(err, file=sys.stderr)
    else:
        paths.append(base + ".png")
    return paths
