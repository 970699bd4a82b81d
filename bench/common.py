"""Shared benchmark helpers: timing, the same run's roofline, the result table.

A benchmark module bench/bench_<name>.py defines `run(ctx)` and calls `ctx.case(...)` once per
case. Timing alternates the variants (A B A B ...) because GPU clocks drift, rotates through
several input sets so that L2 does not serve repeated reads, and reports medians.
"""
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Roofline:
    device: str
    copy_gbps: float      # measured device-to-device copy, bytes read + written
    matmul_tflops: float  # measured bf16 matmul (fp32 on CPU)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device, inner, lead=False):
    """Seconds per call of fn() averaged over `inner` back-to-back calls.

    lead (CUDA): one untimed call is enqueued before the start event. A GPU-bound call is
    still running when the timed ones are enqueued, so they run back to back and the events
    time the GPU; a CPU-bound call (eager decode) shows its steady state, the GPU waiting for
    the CPU between calls. Without it a sample of one call also counts the Python and launch
    overhead in front of it, which the GPU spends idle."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if lead:
            fn()
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _rotating(fn, nsets):
    """fn(i) over input sets i = 0..nsets-1, as a no-argument callable."""
    state = {"i": 0}

    def call():
        fn(state["i"])
        state["i"] = (state["i"] + 1) % nsets
    return call


def cuda_graph_fn(fn):
    """Capture fn() once in a CUDA graph; returns a callable that replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_variants(fns, device, nsets=1, reps=None, min_seconds=None):
    """Median seconds per call of each variant fns[name](i), i the input set.
    Variants alternate within one run; each sample runs enough calls to last ~0.5 ms."""
    quick = os.environ.get("MLMAMBA_BENCH_QUICK", "0") not in ("", "0")
    reps = reps or (5 if quick or device.type == "cpu" else 25)
    calls = {k: _rotating(f, nsets) for k, f in fns.items()}
    inner = {}
    for k, c in calls.items():  # warm-up (compilation, autotuning) and inner-loop sizing
        c()
        _sync(device)
        t = _time_once(c, device, 2)
        inner[k] = max(1, min(200, int(5e-4 / max(t, 1e-7))))
    samples = {k: [] for k in calls}
    for _ in range(reps):
        for k, c in calls.items():
            samples[k].append(_time_once(c, device, inner[k], lead=True))
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_roofline(device):
    """The two ceilings of this run: copy bandwidth and matmul rate, measured now."""
    if device.type == "cuda":
        n = 256 * 2**20  # 1 GiB of fp32
        a = torch.empty(n, device=device)
        a.uniform_()
        b = torch.empty_like(a)
        t = time_variants({"copy": lambda i: b.copy_(a)}, device)["copy"]
        copy = 2 * a.numel() * 4 / t / 1e9
        m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        t = time_variants({"mm": lambda i: m @ m}, device, reps=10)["mm"]
        mm = 2 * 8192**3 / t / 1e12
        name = torch.cuda.get_device_name(device)
        del a, b, m
    else:
        a = torch.rand(32 * 2**20)
        b = torch.empty_like(a)
        t = time_variants({"copy": lambda i: b.copy_(a)}, device)["copy"]
        copy = 2 * a.numel() * 4 / t / 1e9
        m = torch.randn(1024, 1024)
        t = time_variants({"mm": lambda i: m @ m}, device)["mm"]
        mm = 2 * 1024**3 / t / 1e12
        name = "cpu"
    return Roofline(name, copy, mm)


@dataclass
class Row:
    case: str
    us: float
    gbytes: float = 0.0
    tflop: float = 0.0
    pct_copy: float = float("nan")
    pct_mm: float = float("nan")
    speedup: dict = field(default_factory=dict)   # over each baseline, e.g. {"torch": 12.3}
    extra: dict = field(default_factory=dict)
    t_start: float = 0.0  # wall clock (time.time()) around the timing, to match clock logs
    t_end: float = 0.0


class Context:
    """Handed to each benchmark's run(ctx)."""

    def __init__(self, device, roofline, quick):
        self.device = device
        self.roof = roofline
        self.quick = quick
        self.rows = []

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def baselines(self, reference, sets):
        """The PyTorch baselines of a case: `reference` eager, and torch.compile'd where
        compiling works here (skipped with a note where it fails). `sets` is the list of
        input sets, each a tuple of arguments; returns {"torch": fn, "torch.compile": fn}
        with fn(i) = reference(*sets[i]), ready for case(..., baselines=...)."""
        out = {"torch": lambda i: reference(*sets[i])}
        if os.environ.get("MLMAMBA_BENCH_NO_COMPILE", "0") in ("", "0"):
            comp = torch.compile(reference, dynamic=False)
            try:
                comp(*sets[0])
                out["torch.compile"] = lambda i: comp(*sets[i])
            except Exception as e:  # noqa: BLE001  (a baseline that cannot compile is skipped)
                print(f"  torch.compile baseline skipped: {type(e).__name__}: {str(e)[:120]}")
        return out

    def case(self, name, ours, baselines=None, bytes_moved=0, flops=0, nsets=1, graph=False,
             extra=None):
        """Time `ours(i)` against each `baselines[name](i)` (i = input set) and add a row.
        bytes_moved/flops: the fewest bytes one call must move, and its useful flops."""
        fns = {"ours": ours, **(baselines or {})}
        if graph and self.cuda:
            fns = {k: (lambda g: (lambda i: g()))(cuda_graph_fn(lambda f=f: f(0)))
                   for k, f in fns.items()}
            nsets = 1
        t_start = time.time()
        t = time_variants(fns, self.device, nsets=nsets)
        us = t["ours"] * 1e6
        row = Row(name, us, bytes_moved / 1e9, flops / 1e12, extra=dict(extra or {}),
                  t_start=t_start, t_end=time.time())
        if bytes_moved:
            row.pct_copy = 100 * bytes_moved / t["ours"] / 1e9 / self.roof.copy_gbps
        if flops:
            row.pct_mm = 100 * flops / t["ours"] / 1e12 / self.roof.matmul_tflops
        row.speedup = {k: t[k] / t["ours"] for k in fns if k != "ours"}
        row.extra.update({f"{k}_us": t[k] * 1e6 for k in fns if k != "ours"})
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def note(self, name, **values):
        """A row of measured values that are not a timed kernel (tokens/s, memory, ...)."""
        row = Row(name, float("nan"), extra=values)
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


HEADER = f"{'case':<46} {'µs':>10} {'GB/s':>8} {'TFLOP/s':>8} {'%copy':>6} {'%mm':>5}  speed-up"


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_row(r):
    gbs = r.gbytes / (r.us / 1e6) if r.gbytes and r.us == r.us else None
    tfs = r.tflop / (r.us / 1e6) if r.tflop and r.us == r.us else None
    sp = " ".join(f"{k} {v:.2f}x" for k, v in r.speedup.items())
    if not sp and r.extra:
        sp = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in r.extra.items())
    return (f"{r.case:<46} {_f(r.us, '10.1f')} {_f(gbs, '8.0f')} {_f(tfs, '8.1f')} "
            f"{_f(r.pct_copy, '6.1f')} {_f(r.pct_mm, '5.1f')}  {sp}")


def write_json(path, roof, rows):
    with open(path, "w") as f:
        json.dump({"roofline": asdict(roof), "rows": [asdict(r) for r in rows]}, f, indent=1)
