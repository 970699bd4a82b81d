"""Run one SSD case a few times, for a profiler (ncu / nsys) on a GPU box.
    ncu --kernel-name regex:ssd_fwd --launch-skip 2 --launch-count 1 --section WarpStateStats \
        --section SourceCounters -o $OUT/fwd python3 scripts/dev/ssd_prof.py fwd 4 2048 80
    python3 scripts/dev/ssd_prof.py bwd 4 2048 80
    python3 scripts/dev/ssd_prof.py fwd 1 16384 80 table   # torch.profiler kernel table
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from bench.bench_ssd import fwd_inputs  # noqa: E402
from mlmamba_kernels import ssd_scan  # noqa: E402


def main():
    what, b, l, h = sys.argv[1], *map(int, sys.argv[2:5])
    k = fwd_inputs(b, l, h, 64, 128, "cuda", 0)
    if what == "bwd":
        for name in ("x", "dt", "B", "C"):
            k[name].requires_grad_(True)
    table = "table" in sys.argv[5:]
    for i in range(4 if not table else 8):
        if table and i == 3:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
        y = ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], D=k["D"], dt_bias=k["dt_bias"],
                     dt_softplus=True)
        if what == "bwd":
            y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    if table:  # 5 profiled calls
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20,
                                        max_name_column_width=70))


if __name__ == "__main__":
    main()
