"""SSD scan backward (issue 5): the training cases, bf16, dt_bias + softplus + D, no z.

Rows: the backward op alone, and forward + backward (the two ops back to back) when the CUDA
forward is built. Bytes are the fewest the backward must move: x, dout, B, C, dt read once;
dx, dB, dC, ddt written once. Flops are the backward's useful products at 64-token chunks, per
token and head: 4NP (chunk states and adjoints) + 8NP (u, S_prev C, dB and dC state terms)
+ 128(N+P) (the four causal Q x Q products). Peak extra memory: the backward's allocations
beyond its inputs and outputs (workspaces), measured.
"""
import math

import torch

from .bench_ssd import FWD_CASES, fwd_inputs


def _bwd_args(k, dout):
    return (dout, None, k["x"], k["dt"], k["A"], k["B"], k["C"], 256, k["D"], None, k["dt_bias"],
            None, None, None, True, 0.0, math.inf)


def _fwd_args(k):
    return (k["x"], k["dt"], k["A"], k["B"], k["C"], 256, k["D"], None, k["dt_bias"], None, None,
            None, True, 0.0, math.inf, False)


def run(ctx):
    import mlmamba_kernels  # noqa: F401
    from mlmamba_kernels._loader import has_cuda_kernel

    if not ctx.cuda or not has_cuda_kernel("ssd_scan_bwd"):
        print("  ssd_scan_bwd: no CUDA kernel built, skipped")
        return
    ops = torch.ops.mlmamba
    with_fwd = has_cuda_kernel("ssd_scan_fwd")
    dev = ctx.device
    for name, b, l, h, p, n, _ in FWD_CASES:
        if ctx.quick and b * l * h > 4 * 2048 * 80:
            continue
        nsets = 2
        sets = [fwd_inputs(b, l, h, p, n, dev, s) for s in range(nsets)]
        douts = [torch.randn(b, l, h, p, device=dev).bfloat16() for _ in range(nsets)]

        def bwd(i, sets=sets, douts=douts):
            return ops.ssd_scan_bwd(*_bwd_args(sets[i], douts[i]))

        def fwd_bwd(i, sets=sets, douts=douts):
            ops.ssd_scan_fwd(*_fwd_args(sets[i]))
            return ops.ssd_scan_bwd(*_bwd_args(sets[i], douts[i]))

        tokens = b * l
        nbytes = tokens * (h * p * 2 * 3 + 4 * n * 2 + h * 4 * 2)
        flops = tokens * h * (12 * n * p + 128 * (n + p))
        # peak extra memory of one backward call
        bwd(0)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = bwd(0)
        torch.cuda.synchronize()
        out_bytes = sum(t.numel() * t.element_size() for t in grads)
        extra = torch.cuda.max_memory_allocated() - base - out_bytes
        del grads
        ctx.case(f"ssd_scan bwd {name}", bwd, bytes_moved=nbytes, flops=flops, nsets=nsets,
                 extra={"peak_extra_MiB": extra / 2**20})
        if with_fwd:
            fb = tokens * (h * p * 2 * 5 + 6 * n * 2 + h * 4 * 3)
            ff = tokens * h * (16 * n * p + 192 * (n + p))
            ctx.case(f"ssd_scan fwd+bwd {name}", fwd_bwd, bytes_moved=fb, flops=ff, nsets=nsets)
        del sets, douts
