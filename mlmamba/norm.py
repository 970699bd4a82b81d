"""RMS norms used by Mamba-2 blocks.

Both norms compute in float32 whatever the input dtype.

`RMSNorm` returns ``weight * x_hat.to(input dtype)`` (x_hat normalised in fp32), as HF transformers
and mamba_ssm do. `rms_norm_gated` is mamba_ssm's ``RMSNormGated(norm_before_gate=False)``:
``rmsnorm(y * silu(z))`` computed per group of ``group_size`` channels, times weight.

Note on groups: mamba_ssm (and its CUDA path in transformers) normalise each group of
``d_inner / ngroups`` channels separately; the PyTorch path of transformers' Mamba2 normalises over the
whole width. The two agree only when ngroups == 1. We follow mamba_ssm.
"""

import torch
from torch import nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

__all__ = ["RMSNorm", "RMSNormGated", "rms_norm", "rms_norm_gated", "add_rms_norm"]


def rms_norm(x, weight, eps=1e-5):
    """fp32 RMS norm over the last dim; returns ``weight * x_hat.to(x.dtype)``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _use_triton(*tensors):
    """Fused Triton kernels on CUDA for inference; the PyTorch path when autograd needs a graph."""
    if triton is None or not tensors[0].is_cuda or tensors[0].dtype == torch.float64:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def add_rms_norm(x, residual, weight, eps=1e-5, residual_in_fp32=True, out_dtype=None):
    """Pre-norm block entry, mamba_ssm's fused add + RMSNorm: ``s = x + residual`` (in fp32), returns
    ``(normed, s)``, normed = ``(x_hat * weight)`` computed in fp32 and cast to `out_dtype` (default
    x's dtype); s is kept in fp32 when residual_in_fp32, else cast to x's dtype. residual may be None.
    One Triton kernel on CUDA.
    """
    if _use_triton(x, residual, weight):
        return _add_rms_norm_triton(x, residual, weight, eps, residual_in_fp32, out_dtype)
    s = x.float() if residual is None else x.float() + residual.float()
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    normed = (h * weight.float()).to(x.dtype if out_dtype is None else out_dtype)
    return normed, (s if residual_in_fp32 else s.to(x.dtype))


def rms_norm_gated(y, z, weight, eps=1e-5, group_size=None):
    """``rmsnorm(y * silu(z))`` per group of `group_size` channels (default: the whole last dim).

    Computed in fp32, multiplied by `weight` in fp32 and returned in y's dtype. `z` may be None
    (plain grouped RMS norm).
    """
    dim = y.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm_gated: weight has shape {tuple(weight.shape)}, expected ({dim},)")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"rms_norm_gated: z has shape {tuple(z.shape)}, expected y's shape {tuple(y.shape)}")
    gs = dim if group_size is None else group_size
    if gs <= 0 or dim % gs != 0:
        raise ValueError(f"rms_norm_gated: group_size {group_size} does not divide the width {dim}")
    if _use_triton(y, z, weight):
        return _rms_norm_gated_triton(y, z, weight, eps, gs)
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32  # fp32, or fp64 for fp64
    h = y.to(cdt)
    if z is not None:
        h = h * F.silu(z.to(cdt))
    h = h.unflatten(-1, (dim // gs, gs))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.flatten(-2) * weight.to(cdt)).to(y.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMS norm with norm_before_gate=False: ``rmsnorm(y * silu(z)) * weight``."""

    def __init__(self, dim, eps=1e-5, group_size=None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = dim if group_size is None else group_size
        if dim % self.group_size != 0:
            raise ValueError(f"RMSNormGated: group_size {group_size} does not divide dim {dim}")
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y, z=None):
        return rms_norm_gated(y, z, self.weight, self.eps, self.group_size)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}"


# -- Triton kernels (CUDA, inference) -------------------------------------------------------------
def _warps(n):
    # one program per row (group): wide rows want more threads (decode has a single row)
    return max(4, min(16, triton.next_power_of_2(n) // 512))


def _rows(t, n):
    """t as a (rows, n) tensor with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(X, R, W, OUT, ROUT, sx, sr, so, sro, N, eps,
                             HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        s = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            s += tl.load(R + row * sr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(ROUT + row * sro + cols, s.to(ROUT.dtype.element_ty), mask=m)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + row * so + cols, (s * rstd * w).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_gated_kernel(Y, Z, W, OUT, sy, sz, so, GS, eps,
                               HAS_Z: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
        m = tl.arange(0, BLOCK) < GS
        h = tl.load(Y + row * sy + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + row * sz + cols, mask=m, other=0.0).to(tl.float32)
            h = h * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / GS + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + row * so + cols, (h * rstd * w).to(OUT.dtype.element_ty), mask=m)


def _add_rms_norm_triton(x, residual, weight, eps, residual_in_fp32, out_dtype):
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype if out_dtype is None else out_dtype)
    rout = torch.empty(x2.shape, device=x.device, dtype=torch.float32 if residual_in_fp32 else x.dtype)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, rout, x2.stride(0), r2.stride(0),
                                              out.stride(0), rout.stride(0), n, eps,
                                              HAS_R=residual is not None, BLOCK=triton.next_power_of_2(n),
                                              num_warps=_warps(n))
    return out.view(x.shape), rout.view(x.shape)


def _rms_norm_gated_triton(y, z, weight, eps, gs):
    n = y.shape[-1]
    y2 = _rows(y, n)
    z2 = _rows(z, n) if z is not None else y2
    out = torch.empty(y2.shape, device=y.device, dtype=y.dtype)
    if y2.shape[0]:
        _rms_norm_gated_kernel[(y2.shape[0], n // gs)](y2, z2, weight, out, y2.stride(0), z2.stride(0),
                                                       out.stride(0), gs, eps, HAS_Z=z is not None,
                                                       BLOCK=triton.next_power_of_2(gs), num_warps=_warps(gs))
    return out.view(y.shape)
