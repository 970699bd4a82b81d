"""Where the time of msc_scan goes on CUDA: torch.profiler over a few calls of one bench case,
kernel table by GPU time, plus CPU vs GPU time per call.
    python3 scripts/dev/msc_prof.py [cross|bidirectional|random] [bwd]
MSC_MERGE=mean|sum|none picks the merge (default: msc_scan's).
MSC_PROF_STACK=1 adds a table by self CPU time with each op's Python stack (where the host
time of a step goes).
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import mlmamba_kernels as mk  # noqa: E402
from bench.bench_msc import CASES, make_inputs  # noqa: E402


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "cross"
    bwd = "bwd" in sys.argv[2:]
    name, b, hh, ww, h, kind, *_ = next(c for c in CASES if c[5] == kind)
    a = make_inputs(b, hh, ww, h, 64, 128, kind, "cuda", torch.bfloat16, 0)
    merge = os.environ.get("MSC_MERGE")
    if merge:
        a["merge"] = None if merge == "none" else merge
    if bwd:
        a["xBC"].requires_grad_(True)
        a["dt"].requires_grad_(True)
        dout = torch.randn(b, hh * ww, h, 64, device="cuda", dtype=torch.bfloat16)

    def f():
        y = mk.msc_scan(**a)
        if bwd:
            torch.autograd.grad(y, (a["xBC"], a["dt"]), dout.expand_as(y))

    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        f()
    e1.record()
    cpu = (time.perf_counter() - t0) / 10 * 1e6
    torch.cuda.synchronize()
    print(f"{name} {'fwd+bwd' if bwd else 'fwd'}: {e0.elapsed_time(e1) / 10 * 1e3:.1f} us/call "
          f"(events), CPU enqueue {cpu:.1f} us/call")
    stack = os.environ.get("MSC_PROF_STACK") == "1"
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=stack,
                 record_shapes=stack) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                    max_name_column_width=70))
    if stack:
        print(prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total",
                                                          row_limit=15))


if __name__ == "__main__":
    main()
