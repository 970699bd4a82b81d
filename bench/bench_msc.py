"""msc_scan: k scans of a patch grid (conv width 4 + SSD per scan), merged by mean (bf16).

    python -m bench --only msc

The cases of issue 8's speed table (h32 p64 n128 g1; the bidirectional case at the 2.7B
connector's width, h80). Bytes moved are the fewest a call must move: the forward reads xBC and
dt once and writes the merged output once; the backward reads xBC, dt and dout and writes dxBC
and ddt. "ours" is whatever backend msc_scan picks: until the fused kernel lands, on CUDA that
is the unfused composition of the CUDA conv and scan kernels (k permuted copies). The baseline
is the PyTorch reference. On CPU small sizes run so the file is exercised in CI.
"""
import torch

import mlmamba_kernels as mk

W = 4
# (name, batch, grid height, grid width, heads, orders kind, with fwd+bwd, with reference)
CASES = [
    ("cross k4 b32 24x24 h32", 32, 24, 24, 32, "cross", True, True),
    ("bidirectional k2 b8 27x27 h80", 8, 27, 27, 80, "bidirectional", False, False),
    ("random k4 b32 24x24 h32", 32, 24, 24, 32, "random", False, False),
]


def orders_of(kind, hh, ww, device, gen):
    if kind != "random":
        return mk.scan_orders(hh, ww, kind).to(device)
    return torch.stack([torch.randperm(hh * ww, generator=gen) for _ in range(4)]).to(device)


def make_inputs(b, hh, ww, h, p, n, kind, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    orders = orders_of(kind, hh, ww, device, gen)
    k, L, cd = orders.shape[0], hh * ww, h * p + 2 * n
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device)  # noqa: E731
    return dict(xBC=r(b, L, cd).to(dtype), dt=r(b, L, h, scale=0.5).to(dtype),
                A=-torch.rand(k, h, generator=gen).to(device) * 4 - 0.5, D=r(k, h),
                conv_weight=r(k, cd, W, scale=0.5).to(dtype), conv_bias=r(k, cd).to(dtype),
                dt_bias=(torch.rand(k, h, generator=gen) * 2 - 4).to(device), orders=orders,
                headdim=p, ngroups=1)


def run(ctx):
    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    p, n = (64, 128) if ctx.cuda else (16, 16)
    cases = CASES if ctx.cuda else [("cross k4 b1 5x3 h2", 1, 5, 3, 2, "cross", True, True)]
    for name, b, hh, ww, h, kind, with_bwd, with_ref in cases:
        if ctx.quick and ctx.cuda and not with_ref:
            continue
        sets = [make_inputs(b, hh, ww, h, p, n, kind, dev, dtype, s) for s in range(2)]
        L, cd = hh * ww, h * p + 2 * n
        esz = torch.finfo(dtype).bits // 8
        fwd_bytes = b * L * (cd + h + h * p) * esz
        bwd_bytes = b * L * (2 * (cd + h) + h * p) * esz

        def fwd(i, sets=sets, backend=None):
            return mk.msc_scan(**sets[i], backend=backend)

        base = {"torch": lambda i: fwd(i, backend="reference")} if with_ref else {}
        ctx.case(f"msc fwd {name}", fwd, base, bytes_moved=fwd_bytes, nsets=2)
        if not with_bwd:
            continue
        grads = []
        for s in sets:
            t = {k: (v.detach().clone().requires_grad_(True) if k in ("xBC", "dt") else v)
                 for k, v in s.items()}
            grads.append((t, torch.randn(b, L, h, p, device=dev, dtype=dtype)))

        def fwd_bwd(i, backend=None):
            t, dout = grads[i]
            y = mk.msc_scan(**t, backend=backend)
            return torch.autograd.grad(y, (t["xBC"], t["dt"]), dout)

        base = {"torch": lambda i: fwd_bwd(i, backend="reference")} if with_ref else {}
        ctx.case(f"msc fwd+bwd {name}", fwd_bwd, base, bytes_moved=fwd_bytes + bwd_bytes, nsets=2)
