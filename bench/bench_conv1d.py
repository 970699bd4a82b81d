"""causal conv1d: forward, forward+backward and the decode update (bf16, width 4, SiLU, bias).

    python -m bench --only conv1d

The cases of issue 3's speed table. Bytes moved are the fewest a call must move: forward reads
x and writes out; backward reads x and dout and writes dx; update reads x, conv_state, weight and
bias and writes out and conv_state. The baseline is plain PyTorch (F.conv1d + SiLU, autograd for
the backward). On CPU small sizes run the reference so the file is exercised in CI.
"""
import torch
import torch.nn.functional as F

import mlmamba_kernels as mk
from mlmamba_kernels import _loader

W = 4


def torch_conv(x, weight, bias):
    l = x.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=W - 1, groups=x.shape[1])[..., :l]
    return F.silu(y)


def torch_fwd_bwd(x, weight, bias, dout):
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    torch.autograd.grad(torch_conv(x, weight, bias), (x, weight, bias), dout)


def make_sets(ctx, b, d, l, channel_last, nsets, dtype):
    sets = []
    for _ in range(nsets):
        x = (torch.randn(b, l, d, device=ctx.device, dtype=dtype).transpose(1, 2) if channel_last
             else torch.randn(b, d, l, device=ctx.device, dtype=dtype))
        sets.append((x, torch.randn(d, W, device=ctx.device, dtype=dtype),
                     torch.randn(d, device=ctx.device, dtype=dtype), torch.randn_like(x)))
    return sets


def run(ctx):
    cuda = ctx.cuda and _loader.has_cuda_kernel("causal_conv1d_fwd")
    if ctx.cuda and not cuda:
        print("  causal_conv1d CUDA kernels not built: timing the reference path")
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    d = 5376 if ctx.cuda else 256
    # the last: an odd length, l-contiguous only (rows off 16-byte boundaries)
    shapes = [(4, 2048), (1, 16384), (1, 16383)] if ctx.cuda else [(2, 256), (2, 255)]
    ops = torch.ops.mlmamba
    for b, l in shapes:
        for channel_last in (False, True) if l % 2 == 0 else (False,):
            n = b * d * l
            esz = torch.finfo(dtype).bits // 8
            # rotate input sets so that L2 (50 MB) does not serve them
            nsets = max(2, min(4, int(2e8 // (4 * n * esz)) + 1))
            sets = make_sets(ctx, b, d, l, channel_last, nsets, dtype)
            tag = f"b{b} d{d} L{l} {'channel-last' if channel_last else 'l-contig'}"

            def fwd(i, sets=sets):  # the op itself: the public function adds Python checks
                x, w_, b_, _ = sets[i]
                if not cuda:
                    return mk.causal_conv1d(x, w_, b_, activation="silu")
                return ops.causal_conv1d_fwd(x, w_, b_, None, None, True, False)

            def fwd_bwd(i, sets=sets):
                x, w_, b_, dout = sets[i]
                if not cuda:
                    return torch_fwd_bwd(x, w_, b_, dout)
                ops.causal_conv1d_fwd(x, w_, b_, None, None, True, False)
                return ops.causal_conv1d_bwd(x, w_, b_, None, None, dout, None, True)

            base = ctx.baselines(torch_conv, [s[:3] for s in sets])
            ctx.case(f"conv1d fwd {tag}", fwd, base, bytes_moved=2 * n * esz, nsets=nsets)
            ctx.case(f"conv1d fwd+bwd {tag}", fwd_bwd,
                     {"torch": lambda i, sets=sets: torch_fwd_bwd(*sets[i])},
                     bytes_moved=5 * n * esz, nsets=nsets)

    # decode update, one token, inside a CUDA graph
    b = 1
    x = torch.randn(b, d, device=ctx.device, dtype=dtype)
    state = torch.randn(b, d, W - 1, device=ctx.device, dtype=dtype)
    weight = torch.randn(d, W, device=ctx.device, dtype=dtype)
    bias = torch.randn(d, device=ctx.device, dtype=dtype)
    ref_state = state.clone()

    def upd(i):
        return mk.causal_conv1d_update(x, state, weight, bias, activation="silu")

    def torch_upd(i):
        win = torch.cat([ref_state, x[:, :, None]], dim=-1)
        ref_state.copy_(win[..., 1:])
        return F.silu((win * weight).sum(-1) + bias)

    nbytes = (b * d * 2 + 2 * b * d * (W - 1) + d * W + d) * torch.finfo(dtype).bits // 8
    ctx.case(f"conv1d update b{b} d{d} (CUDA graph)", upd, {"torch": torch_upd},
             bytes_moved=nbytes, graph=True)

    # the GPU time of one update: one graph replays `steps` updates, each with its own state
    # and weights (as the layers of a model do), so the graph launch is amortised
    steps = 64 if ctx.cuda else 2
    layers = [(torch.randn_like(state), torch.randn_like(weight), torch.randn_like(bias))
              for _ in range(steps)]

    def upd_steps(i):
        for st, w_, b_ in layers:
            mk.causal_conv1d_update(x, st, w_, b_, activation="silu")

    row = ctx.case(f"conv1d update b{b} d{d}, {steps} steps (CUDA graph)", upd_steps,
                   bytes_moved=steps * nbytes, graph=True)
    ctx.note(f"conv1d update b{b} d{d} per step", us=row.us / steps)
