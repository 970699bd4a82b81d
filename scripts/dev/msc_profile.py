"""Where msc_scan's forward + backward spends its GPU time (torch profiler, per kernel), at
issue 8's cross case (b32 24x24 h32 p64 n128, k4, merge mean, bf16):
    python3 scripts/dev/msc_profile.py [b H W h]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import mlmamba_kernels as mk  # noqa: E402
from bench.bench_msc import make_inputs  # noqa: E402


def main():
    b, H, W, h = (list(map(int, sys.argv[1:5])) or [32, 24, 24, 32])
    a = make_inputs(b, H, W, h, 64, 128, "cross", torch.device("cuda"), torch.bfloat16, 0)
    for k in ("xBC", "dt", "A", "D", "conv_weight", "conv_bias", "dt_bias"):
        a[k] = a[k].detach().requires_grad_(True)
    out = mk.msc_scan(**a)
    dout = torch.randn_like(out)

    def step():
        o = mk.msc_scan(**a)
        torch.autograd.grad(o, [a[k] for k in ("xBC", "dt", "A", "D", "conv_weight",
                                                 "conv_bias", "dt_bias")], dout)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
