"""Registers the PyTorch references as the ops' CPU kernels (and as CUDA fallback where no
CUDA kernel of ours is built), plus fake kernels and autograd."""
import contextlib
import os

import torch

from ._loader import _C, has_cuda_kernel
from ._schemas import define_all

if _C is None:
    define_all()

_NVTX = os.environ.get("MLMAMBA_NVTX", "0") not in ("", "0")


def nvtx_range(name):
    """An NVTX range named `name` when MLMAMBA_NVTX=1, else a no-op context."""
    if not _NVTX:
        return contextlib.nullcontext()
    import nvtx
    return nvtx.annotate(name, domain="mlmamba")


def register_reference(op, fn):
    """`fn` serves mlmamba::<op> on CPU, and on CUDA when no CUDA kernel of ours exists."""
    qual = f"mlmamba::{op}"
    torch.library.impl(qual, "CPU")(fn)
    if not has_cuda_kernel(op):
        torch.library.impl(qual, "CUDA")(fn)


def empty(ref):
    """The empty tensor that stands for an output not asked for (docs/ops.md)."""
    return ref.new_empty((0,))


def or_empty(t, ref):
    return empty(ref) if t is None else t


def none_if_empty(t):
    return None if t is None or t.numel() == 0 else t


# The dispatch-key exclusions of plain eager code, taken at import. Op kernels can run with
# autograd excluded (under a dispatch mode such as opcheck's SchemaCheckMode or a FLOP
# counter); the reference backward restores plain eager so autograd records its graph.
_EAGER_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()


def reference_vjp(forward, inputs, cotangents):
    """Gradients of `forward(*inputs)` (a tuple of outputs) by autograd, for the reference
    backward ops. None inputs get None; inputs that do not reach an output get zeros.
    cotangents: one per output, None (or empty) where that output's gradient is absent."""
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, _EAGER_EXCLUDE), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        outs = forward(*leaves)
        pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents)
                 if c is not None and c.numel()]
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], used, [c for _, c in pairs],
                                         allow_unused=True))
    res = []
    for t in leaves:
        g = next(grads) if t is not None else None
        res.append(None if t is None else (torch.zeros_like(t) if g is None else g.contiguous()))
    return res


def no_double_backward(op):
    """Backward ops are not differentiable again: say so instead of silently returning zeros."""
    def backward(ctx, *grads):
        raise RuntimeError(f"mlmamba::{op} is a backward op; double backward is not supported")

    torch.library.register_autograd(f"mlmamba::{op}", backward,
                                    setup_context=lambda ctx, inputs, output: None)
