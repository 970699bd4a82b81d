"""python -m bench [--only conv1d,ssd] [--quick] [--json PATH]

Runs every bench/bench_*.py module's run(ctx) on the GPU if there is one (our kernels against
the PyTorch reference), else on the CPU (the references at small sizes), and prints one table:
case, µs (median), GB/s, TFLOP/s, % of this run's measured copy bandwidth and matmul peak,
speed-up over each baseline. Rows are also written as JSON.
"""
import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from pathlib import Path

import torch

from .common import HEADER, Context, format_row, measure_roofline, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--only", default="", help="comma-separated module names (conv1d, ssd, ...)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and cases")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU exists")
    ap.add_argument("--json", default=None, help="where to write the rows "
                    "(default: $MLMAMBA_LOG_DIR/bench.json or ./bench-results.json)")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ["MLMAMBA_BENCH_QUICK"] = "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    if args.only:
        want = args.only.split(",")
        unknown = [w for w in want if w not in names]
        if unknown:
            ap.error(f"--only: unknown benchmark(s) {unknown}; have {names}")
        names = [n for n in names if n in want]
    roof = measure_roofline(device)
    print(f"device {roof.device}: copy {roof.copy_gbps:.0f} GB/s, "
          f"matmul {roof.matmul_tflops:.3g} TFLOP/s (measured in this run)", flush=True)
    ctx = Context(device, roof, args.quick or device.type == "cpu")
    failed = []
    for name in names:
        print(f"--- {name}", flush=True)
        try:
            importlib.import_module(f"bench.bench_{name}").run(ctx)
        except Exception:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
    print("\n" + HEADER)
    for r in ctx.rows:
        print(format_row(r))
    path = args.json or os.path.join(os.environ.get("MLMAMBA_LOG_DIR", "."), "bench.json"
                                     if os.environ.get("MLMAMBA_LOG_DIR") else "bench-results.json")
    write_json(path, roof, ctx.rows)
    print(f"\nrows written to {path}; device {roof.device}")
    if failed:
        print(f"FAILED benchmarks: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
