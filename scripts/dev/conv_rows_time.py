"""Why msc_conv_bwd (conv1d's channel-last v2 backward in rows mode) runs slower than the same
kernel on gathered rows: msc_conv_fwd / _bwd (dout in 3 pieces, and in 1) timed per scan order
at msc's shape (b32, 24x24, 2304 channels, bf16, width 4), against causal_conv1d on the rows
gathered in that order, the gather itself (msc_sum_rows, one scan) and the cat of the pieces.
Events around 20 back-to-back calls, median of 7 samples, µs per call.
    python3 scripts/dev/conv_rows_time.py [b H W channels]
    python3 scripts/dev/conv_rows_time.py prof rows|gathered   # one call each, for ncu
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import mlmamba_kernels as mk  # noqa: E402
from bench.common import _time_once  # noqa: E402


def timed(fn, reps=7, inner=20):
    dev = torch.device("cuda")
    return statistics.median(_time_once(fn, dev, inner, lead=True) * 1e6 for _ in range(reps))


def tensors(b, L, d):
    """xBC, conv weight, bias and dout (bf16, width 4), seeded."""
    g = torch.Generator("cuda").manual_seed(0)
    xBC = torch.randn(b, L, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(d, 4, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    bias = torch.randn(d, device="cuda", generator=g).to(torch.bfloat16)
    dout = torch.randn(b, L, d, device="cuda", generator=g).to(torch.bfloat16)
    return xBC, w, bias, dout


def prof(which):
    """One msc_conv_bwd (rows mode, a random order) or one causal_conv1d_bwd on the rows
    gathered in that order, at msc's shape (scripts/dev/profile_call.sh convrows / convgath)."""
    L = 24 * 24
    ops = torch.ops.mlmamba
    xBC, w, bias, dout = tensors(32, L, 2304)
    o = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    if which == "rows":
        ops.msc_conv_bwd(xBC, o.to("cuda", torch.int32), w, bias, [dout])
    else:
        xs = xBC[:, o.to("cuda")].contiguous()
        ops.causal_conv1d_bwd(xs.transpose(1, 2), w, bias, None, None, dout.transpose(1, 2), None, True)
    torch.cuda.synchronize()


def main():
    if sys.argv[1:2] == ["prof"]:
        return prof(sys.argv[2])
    b, H, W, d = (list(map(int, sys.argv[1:])) or [32, 24, 24, 2304])[:4]
    L = H * W
    ops = torch.ops.mlmamba
    xBC, w, bias, dout = tensors(b, L, d)
    pieces = [dout[..., :d - 256].contiguous(), dout[..., d - 256:d - 128].contiguous(),
              dout[..., d - 128:].contiguous()]
    cross = mk.scan_orders(H, W, "cross")
    orders = {"identity": torch.arange(L), "row_rev": cross[1], "col": cross[2],
              "col_rev": cross[3], "random": torch.randperm(L)}
    print(f"b{b} {H}x{W} d{d} bf16 w4 (µs per call)")
    print(f"{'order':10s} {'rows fwd':>9s} {'rows bwd':>9s} {'1 piece':>9s} {'gather':>9s} "
          f"{'conv fwd':>9s} {'conv bwd':>9s} {'cat':>9s}")
    for name, o in orders.items():
        rows = o.to("cuda", torch.int32)
        xs = xBC[:, o.to("cuda")].contiguous()
        xt, dt_ = xs.transpose(1, 2), dout.transpose(1, 2)
        t = [timed(lambda: ops.msc_conv_fwd(xBC, rows, w, bias)),
             timed(lambda: ops.msc_conv_bwd(xBC, rows, w, bias, pieces)),
             timed(lambda: ops.msc_conv_bwd(xBC, rows, w, bias, [dout])),
             timed(lambda: ops.msc_sum_rows([xBC], rows.view(1, -1))),
             timed(lambda: ops.causal_conv1d_fwd(xt, w, bias, None, None, True, False)),
             timed(lambda: ops.causal_conv1d_bwd(xt, w, bias, None, None, dt_, None, True)),
             timed(lambda: torch.cat(pieces, dim=-1))]
        print(f"{name:10s} " + " ".join(f"{v:9.1f}" for v in t))


if __name__ == "__main__":
    main()
