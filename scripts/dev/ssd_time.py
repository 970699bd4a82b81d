"""Cross-check of the bench's SSD forward figures: one input set, 20 back-to-back calls timed
with events, then the same 20 calls replayed from a CUDA graph (no CPU in the loop), for the
default (the warp-specialized kernel), the one-warpgroup wgmma kernel (MLMAMBA_SSD_FWD_WS=0),
the default without the sequence split (MLMAMBA_SSD_FWD_SEGMENTS=1), without the chunk-vector
pre-pass (MLMAMBA_SSD_FWD_VEC=0, which also rules out ws) and the mma.sync kernel
(MLMAMBA_SSD_FWD_IMPL=mma). SSD_TIME_SEGS=2,4 adds forced segment counts, SSD_TIME_SUBSEG=1,3
forced sub-segment counts of the split's state pass.
    python3 scripts/dev/ssd_time.py [b l h]...   (default: the four bench cases)
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from bench.bench_ssd import fwd_inputs  # noqa: E402
from bench.common import _time_once  # noqa: E402
from mlmamba_kernels import ssd_scan  # noqa: E402


def timed(fn, reps=7, inner=20):
    """Median µs per call over `reps` samples of `inner` back-to-back calls (bench timing)."""
    dev = torch.device("cuda")
    return statistics.median(_time_once(fn, dev, inner, lead=True) * 1e6 for _ in range(reps))


def main():
    args = list(map(int, sys.argv[1:])) or [4, 2048, 80, 1, 16384, 80, 8, 2048, 24, 32, 576, 32]
    names = ("MLMAMBA_SSD_FWD_IMPL", "MLMAMBA_SSD_FWD_SEGMENTS", "MLMAMBA_SSD_FWD_VEC",
             "MLMAMBA_SSD_FWD_WS", "MLMAMBA_SSD_FWD_SUBSEG")
    segs = [s for s in os.environ.get("SSD_TIME_SEGS", "").split(",") if s]
    variants = [("default", {}), ("no ws", {"MLMAMBA_SSD_FWD_WS": "0"}),
                ("no split", {"MLMAMBA_SSD_FWD_SEGMENTS": "1"}),
                ("no pre-pass", {"MLMAMBA_SSD_FWD_VEC": "0"}),
                ("mma.sync", {"MLMAMBA_SSD_FWD_IMPL": "mma"})]
    variants += [(f"seg {s}", {"MLMAMBA_SSD_FWD_SEGMENTS": s}) for s in segs]
    subs = [s for s in os.environ.get("SSD_TIME_SUBSEG", "").split(",") if s]
    variants += [(f"subseg {s}", {"MLMAMBA_SSD_FWD_SUBSEG": s}) for s in subs]
    for b, l, h in zip(args[0::3], args[1::3], args[2::3]):
        k = fwd_inputs(b, l, h, 64, 128, "cuda", 0)
        row = []
        for _, env in variants:
            for nm in names:
                os.environ.pop(nm, None)
            os.environ.update(env)

            def f(k=k):
                return ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], D=k["D"],
                                dt_bias=k["dt_bias"], dt_softplus=True)
            f()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            row.append((timed(f), timed(g.replay)))
        for nm in names:
            os.environ.pop(nm, None)
        print(f"b{b} L{l} h{h}: " + " | ".join(
            f"{name} {t[0]:.1f} us (graph {t[1]:.1f})" for (name, _), t in zip(variants, row)),
            flush=True)


if __name__ == "__main__":
    main()
