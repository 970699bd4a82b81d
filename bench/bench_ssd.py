"""SSD scan forward and decode step: the cases of issue 4 (bf16, dt_bias + softplus + D).

Bytes are the fewest one call must move: x, dt, B, C read once and out written once (forward);
the state read and written, plus the small inputs (decode). Flops are the chunked algorithm's
useful products at 64-token chunks, per token and head: 2NP (state in) + 2NP (state update)
+ 64N (C B^T, causal half) + 64P (masked product, causal half).
MLMAMBA_BENCH_SSD=update (or =scan) runs only the decode (or only the scan) rows.
"""
import os

import torch

# (name, batch, seqlen, heads, headdim, dstate, with the PyTorch reference as baseline)
FWD_CASES = [
    ("b4 L2048 h80 p64 n128", 4, 2048, 80, 64, 128, True),
    ("b1 L16384 h80 p64 n128", 1, 16384, 80, 64, 128, False),
    ("b8 L2048 h24 p64 n128", 8, 2048, 24, 64, 128, False),
    ("b32 L576 h32 p64 n128 (connector)", 32, 576, 32, 64, 128, True),
]
# (name, batch, steps per graph, each on its own state, state dtype)
DECODE_CASES = [("b1 h80 p64 n128", 1, 64, torch.float32),
                ("b64 h80 p64 n128", 64, 4, torch.float32),
                ("b64 h80 p64 n128", 64, 8, torch.bfloat16)]


def fwd_inputs(b, l, h, p, n, device, seed):
    g = torch.Generator(device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    return dict(x=r(b, l, h, p).bfloat16(), dt=r(b, l, h) * 0.5, A=-torch.rand(h, device=device, generator=g) * 4 - 0.5,
                B=r(b, l, 1, n).bfloat16(), C=r(b, l, 1, n).bfloat16(), D=r(h),
                dt_bias=torch.rand(h, device=device, generator=g) * 2 - 4)


def run(ctx):
    from mlmamba_kernels import ssd_scan, ssd_state_update

    dev = ctx.device
    if not ctx.cuda:
        return
    only = os.environ.get("MLMAMBA_BENCH_SSD", "")
    for name, b, l, h, p, n, with_ref in FWD_CASES if only != "update" else []:
        if ctx.quick and b * l * h > 4 * 2048 * 80:
            continue
        nsets = 2
        sets = [fwd_inputs(b, l, h, p, n, dev, s) for s in range(nsets)]

        def ours(i, sets=sets):
            k = sets[i]
            return ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], D=k["D"],
                            dt_bias=k["dt_bias"], dt_softplus=True)

        def torch_ref(i, sets=sets):
            k = sets[i]
            return ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], D=k["D"],
                            dt_bias=k["dt_bias"], dt_softplus=True, backend="reference")

        def mma(i):  # the portable mma.sync kernel (sm_90's default is wgmma where it applies)
            os.environ["MLMAMBA_SSD_FWD_IMPL"] = "mma"
            try:
                return ours(i)
            finally:
                del os.environ["MLMAMBA_SSD_FWD_IMPL"]

        base = {"torch": torch_ref} if with_ref else {}
        if os.environ.get("MLMAMBA_BENCH_SSD_AB", "0") not in ("", "0"):
            base["mma.sync"] = mma  # A/B in one run: mma.sync time / default time (> 1: default faster)
        tokens = b * l
        nbytes = tokens * (h * p * 2 * 2 + 2 * n * 2 + h * 4)
        flops = tokens * h * (4 * n * p + 64 * (n + p))
        ctx.case(f"ssd_scan fwd {name}", ours, base or None, bytes_moved=nbytes, flops=flops,
                 nsets=nsets)
        del sets

    for name, b, nstates, sdtype in DECODE_CASES if only != "scan" else []:
        # one graph replays `nstates` steps, each on its own state (as the layers of a model
        # do), so the states come from HBM, not L2, and launch gaps stay out of the time
        h, p, n = 80, 64, 128
        g = torch.Generator(dev).manual_seed(0)
        states = [torch.randn(b, h, p, n, device=dev, generator=g).to(sdtype)
                  for _ in range(nstates)]
        x = torch.randn(b, h, p, device=dev, generator=g).bfloat16()
        dt = torch.randn(b, h, device=dev, generator=g)
        A = -torch.rand(h, device=dev, generator=g) - 0.5
        B = torch.randn(b, 1, n, device=dev, generator=g).bfloat16()
        C = torch.randn(b, 1, n, device=dev, generator=g).bfloat16()
        D = torch.randn(h, device=dev, generator=g)
        bias = torch.randn(h, device=dev, generator=g)

        def steps(i, states=states, x=x, dt=dt, A=A, B=B, C=C, D=D, bias=bias):
            for st in states:
                ssd_state_update(st, x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)

        sbytes = states[0].numel() * states[0].element_size()
        nbytes = 2 * sbytes + b * h * p * 2 * 2 + 2 * b * n * 2 + b * h * 4
        sname = "fp32" if sdtype == torch.float32 else "bf16"
        row = ctx.case(f"ssd_state_update {name} {sname} state, {nstates} steps (graph)", steps,
                       bytes_moved=nstates * nbytes, flops=nstates * 4 * states[0].numel(),
                       graph=True)
        ctx.note(f"ssd_state_update {name} {sname} state per step", us=row.us / nstates)
        del states
