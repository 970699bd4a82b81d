"""The fused msc_scan forward by merge mode and scan count (bench timing, one input set):
    python3 scripts/dev/msc_time.py [b H W h [kind]]   (default: issue 8's cross case, b32 24x24
    h32; kind: cross, bidirectional or random)
MSC_TIME_WS=0,1 times each case under those MLMAMBA_MSC_WS values, interleaved (A/B).
MSC_TIME_STEP=1 times fwd+bwd instead (merge mean, the grads of xBC and dt, as the bench), two
rounds of the msc.SAVE values in MSC_TIME_SAVE (MLMAMBA_MSC_SAVE values separated by ";",
default "conv,states;conv;none") interleaved, each with its peak memory; MSC_TIME_CPP=1,0 also
interleaves msc.CPP_BWD (the saved modes' backward in C++ or in Python).
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from bench.bench_msc import make_inputs  # noqa: E402
from bench.common import _time_once  # noqa: E402


def step(a, dev, name):
    import mlmamba_kernels as mk
    from mlmamba_kernels import msc
    a["xBC"].requires_grad_(True)
    a["dt"].requires_grad_(True)
    b, L, h = a["dt"].shape
    dout = torch.randn(b, L, h, 64, device=dev, dtype=torch.bfloat16)

    def f():
        return torch.autograd.grad(mk.msc_scan(**a), (a["xBC"], a["dt"]), dout)
    for rnd in range(2):
        for save in os.environ.get("MSC_TIME_SAVE", "conv,states;conv;none").split(";"):
            for cpp in os.environ.get("MSC_TIME_CPP", "").split(","):
                os.environ["MLMAMBA_MSC_SAVE"] = save
                msc.SAVE = msc._save_env()
                msc.CPP_BWD = cpp != "0"
                f()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                f()
                peak = torch.cuda.max_memory_allocated() / 2**20
                us = statistics.median(_time_once(f, dev, 5, lead=True) * 1e6 for _ in range(5))
                tag = f" cpp {cpp}" if cpp else ""
                print(f"{name} fwd+bwd save {save}{tag} round {rnd}: {us:.1f} us, peak {peak:.0f}"
                      " MiB", flush=True)


def main():
    b, H, W, h = (list(map(int, sys.argv[1:5])) or [32, 24, 24, 32])
    kind = sys.argv[5] if len(sys.argv) > 5 else "cross"
    dev = torch.device("cuda")
    a = make_inputs(b, H, W, h, 64, 128, kind, dev, torch.bfloat16, 0)
    if os.environ.get("MSC_TIME_STEP") == "1":
        return step(a, dev, f"{kind} b{b} {H}x{W} h{h}")
    op = torch.ops.mlmamba.msc_scan_fwd
    for k in (a["orders"].shape[0], 1):
        for merge in ("mean", "none"):
            s = {n: (v[:k] if n in ("A", "D", "conv_weight", "conv_bias", "dt_bias", "orders")
                     else v) for n, v in a.items()}

            def f(s=s, merge=merge):
                return op(s["xBC"], s["dt"], s["A"], s["D"], s["conv_weight"], s["conv_bias"],
                          s["dt_bias"], s["orders"], 64, 1, 0.0, float("inf"), merge)
            for ws in os.environ.get("MSC_TIME_WS", "").split(","):
                if ws:
                    os.environ["MLMAMBA_MSC_WS"] = ws
                f()
                us = statistics.median(_time_once(f, dev, 20, lead=True) * 1e6 for _ in range(5))
                print(f"{kind} b{b} {H}x{W} h{h} k{k} merge {merge}{' ws ' + ws if ws else ''}: "
                      f"{us:.1f} us ({us / k:.1f} per scan)", flush=True)


if __name__ == "__main__":
    main()
