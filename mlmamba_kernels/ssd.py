"""ssd_scan and ssd_state_update: public functions and op registration."""
import torch

from . import _checks as ck
from ._loader import has_cuda_kernel
from ._registry import (empty, no_double_backward, none_if_empty, nvtx_range, or_empty,
                        reference_vjp, register_reference)
from .reference import ssd as ref


_DSTATES = (16, 32, 64, 128, 256)


def _kernel_gap(x, B, C, nrows):
    """Why the CUDA scan kernels (forward and backward) cannot take these inputs, or None."""
    p, n = x.shape[-1], B.shape[-1]
    if x.dtype == torch.float64:
        return "float64 inputs"
    if p % 32 or p > 128:
        return f"headdim {p} (the kernels take 32, 64, 96 or 128)"
    if n not in _DSTATES:
        return f"d_state {n} (the kernels take {', '.join(map(str, _DSTATES))})"
    if B.dtype != x.dtype or C.dtype != x.dtype:
        return f"B/C dtype {B.dtype}/{C.dtype} differing from x's {x.dtype}"
    if nrows > 65535:
        return f"{nrows} batch rows (the kernels take at most 65535)"
    return None


def _update_gap(state, x, B, C):
    if x.dtype == torch.float64:
        return "float64 inputs"
    if state.shape[-1] not in _DSTATES:
        return f"d_state {state.shape[-1]} (the kernel takes {', '.join(map(str, _DSTATES))})"
    if state.dtype not in (torch.float32, torch.bfloat16):
        return f"a {state.dtype} state (the kernel takes float32 or bfloat16)"
    if B.dtype != C.dtype:
        return f"B/C dtypes {B.dtype}/{C.dtype} differ"
    return None


def _state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_heads(op, h, g, what):
    if g < 1 or h % g:
        ck.fail(op, f"{what} has {g} groups, which does not divide {h} heads")


def _check_D(op, D, h, p, dev):
    ck.check_tensor(op, "D", D, ndim=D.dim() if D is not None else None, device=dev,
                    optional=True)
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        ck.fail(op, f"D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")


def _check_cu_seqlens(op, cu_seqlens, b, l, dev):
    ck.check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
    if b != 1:
        ck.fail(op, f"cu_seqlens packs sequences into batch 1, but x has batch {b}")
    if cu_seqlens.numel() < 2:
        ck.fail(op, f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.numel()}")
    # value checks read the tensor; skipped while a graph is captured or traced
    if torch.compiler.is_compiling() or (dev.type == "cuda" and
                                         torch.cuda.is_current_stream_capturing()):
        return
    c = cu_seqlens.cpu()
    if c[0] != 0 or c[-1] != l or bool((c[1:] < c[:-1]).any()):
        ck.fail(op, f"cu_seqlens must rise from 0 to the length {l}, got {c.tolist()}")


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None,
             initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), return_final_states=False, backend=None):
    """Mamba-2 SSD scan (mamba_ssm's mamba_chunk_scan_combined shapes).

    x (b,l,h,p), dt (b,l,h), A (h,), B and C (b,l,g,n) with h % g == 0, D (h,) or (h,p),
    z (b,l,h,p), dt_bias (h,), initial_states (b,h,p,n) ((nseq,h,p,n) with cu_seqlens),
    seq_idx (b,l) int32, cu_seqlens (nseq+1,) int32 with b == 1.
    Returns out (b,l,h,p) [, final_states float32 (b,h,p,n) or (nseq,h,p,n)].
    """
    op = "ssd_scan"
    ck.check_tensor(op, "x", x, ndim=4)
    b, l, h, p = x.shape
    dev = x.device
    ck.check_tensor(op, "dt", dt, shape=(b, l, h), device=dev)
    ck.check_tensor(op, "A", A, shape=(h,), device=dev)
    ck.check_tensor(op, "B", B, ndim=4, device=dev)
    g, n = B.shape[2], B.shape[3]
    ck.check_tensor(op, "B", B, shape=(b, l, None, None))
    _check_heads(op, h, g, "B")
    ck.check_tensor(op, "C", C, shape=(b, l, g, n), device=dev)
    _check_D(op, D, h, p, dev)
    ck.check_tensor(op, "z", z, shape=(b, l, h, p), device=dev, optional=True)
    ck.check_tensor(op, "dt_bias", dt_bias, shape=(h,), device=dev, optional=True)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        ck.fail(op, f"chunk_size must be a positive int, got {chunk_size!r}")
    nstates = b
    if cu_seqlens is not None:
        if seq_idx is not None:
            ck.fail(op, "give seq_idx or cu_seqlens, not both")
        _check_cu_seqlens(op, cu_seqlens, b, l, dev)
        nstates = cu_seqlens.shape[0] - 1
    ck.check_tensor(op, "seq_idx", seq_idx, shape=(b, l), dtypes=(torch.int32,), device=dev,
                    optional=True)
    ck.check_tensor(op, "initial_states", initial_states, shape=(nstates, h, p, n), device=dev,
                    optional=True)
    lo, hi = ck.dt_limit_pair(op, dt_limit)
    use_op = ck.check_backend(op, backend, dev, has_cuda_kernel("ssd_scan_fwd"))
    if use_op and dev.type == "cuda" and has_cuda_kernel("ssd_scan_fwd"):
        use_op = ck.kernel_fits(op, backend, _kernel_gap(x, B, C, nstates))
    if not use_op:
        return ref.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                            cu_seqlens, dt_softplus, (lo, hi), return_final_states)
    with nvtx_range(op):
        out, final = torch.ops.mlmamba.ssd_scan_fwd(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
            dt_softplus, lo, hi, return_final_states)
    return (out, final) if return_final_states else out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), backend=None):
    """One decode step. state (b,h,p,n) updated in place; x (b,h,p), dt (b,h), B,C (b,g,n).
    Returns out (b,h,p) (gated by silu(z) when z is given). dt_limit clamps dt after dt_bias
    and softplus, as in ssd_scan, so decoding matches the scan."""
    op = "ssd_state_update"
    ck.check_tensor(op, "state", state, ndim=4)
    b, h, p, n = state.shape
    dev = state.device
    ck.check_tensor(op, "x", x, shape=(b, h, p), device=dev)
    ck.check_tensor(op, "dt", dt, shape=(b, h), device=dev)
    ck.check_tensor(op, "A", A, shape=(h,), device=dev)
    ck.check_tensor(op, "B", B, ndim=3, device=dev)
    g = B.shape[1]
    ck.check_tensor(op, "B", B, shape=(b, g, n))
    _check_heads(op, h, g, "B")
    ck.check_tensor(op, "C", C, shape=(b, g, n), device=dev)
    _check_D(op, D, h, p, dev)
    ck.check_tensor(op, "z", z, shape=(b, h, p), device=dev, optional=True)
    ck.check_tensor(op, "dt_bias", dt_bias, shape=(h,), device=dev, optional=True)
    lo, hi = ck.dt_limit_pair(op, dt_limit)
    if (lo, hi) != (0.0, float("inf")):  # the kernel has no clamp: bias, softplus, clamp here
        dt = ref.process_dt(dt, dt_bias, dt_softplus, (lo, hi))
        dt_bias, dt_softplus = None, False
    use_op = ck.check_backend(op, backend, dev, has_cuda_kernel("ssd_state_update"))
    if use_op and dev.type == "cuda" and has_cuda_kernel("ssd_state_update"):
        use_op = ck.kernel_fits(op, backend, _update_gap(state, x, B, C))
    if not use_op:
        return ref.ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    with nvtx_range(op):
        return torch.ops.mlmamba.ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias,
                                                  dt_softplus)


# ---- reference kernels of the ops -------------------------------------------------------

def _fwd_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
             dt_softplus, dt_min, dt_max, return_final_states):
    out, final = ref.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                              seq_idx, cu_seqlens, dt_softplus, (dt_min, dt_max), True)
    return out.contiguous(), (final.contiguous() if return_final_states else empty(x))


def _bwd_ref(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
             seq_idx, cu_seqlens, dt_softplus, dt_min, dt_max, chunk_states=None):
    # chunk_states only spares the CUDA kernel a walk: the reference recomputes them
    grads = reference_vjp(
        lambda x_, dt_, A_, B_, C_, D_, z_, dtb_, init_: ref.ssd_scan(
            x_, dt_, A_, B_, C_, chunk_size, D_, z_, dtb_, init_, seq_idx, cu_seqlens,
            dt_softplus, (dt_min, dt_max), True),
        (x, dt, A, B, C, D, z, dt_bias, initial_states), (dout, dfinal_states))
    return tuple(or_empty(g, x) for g in grads)


def _update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return ref.ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus).contiguous()


register_reference("ssd_scan_fwd", _fwd_ref)
register_reference("ssd_scan_bwd", _bwd_ref)
no_double_backward("ssd_scan_bwd")
register_reference("ssd_state_update", _update_ref)


@torch.library.register_fake("mlmamba::ssd_scan_fwd")
def _fwd_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
              dt_softplus, dt_min, dt_max, return_final_states):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not return_final_states:
        return out, empty(x)
    b, _, h, p = x.shape
    nstates = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return out, x.new_empty((nstates, h, p, B.shape[-1]), dtype=_state_dtype(x))


def _like(t, ref_t):
    return or_empty(None if t is None else
                    torch.empty_like(t, memory_format=torch.contiguous_format), ref_t)


@torch.library.register_fake("mlmamba::ssd_scan_bwd")
def _bwd_fake(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
              seq_idx, cu_seqlens, dt_softplus, dt_min, dt_max, chunk_states=None):
    return tuple(_like(t, x) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


@torch.library.register_fake("mlmamba::ssd_state_update")
def _update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_FWD_ARGS = ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "initial_states",
             "seq_idx", "cu_seqlens", "dt_softplus", "dt_min", "dt_max", "return_final_states")


def _setup(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs))
    ctx.save_for_backward(*(a[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias",
                                            "initial_states", "seq_idx", "cu_seqlens")))
    ctx.consts = (a["chunk_size"], a["dt_softplus"], a["dt_min"], a["dt_max"])


def _backward(ctx, dout, dfinal):
    x, dt, A, B, C, D, z, dt_bias, init, seq_idx, cu = ctx.saved_tensors
    chunk, softplus, lo, hi = ctx.consts
    g = torch.ops.mlmamba.ssd_scan_bwd(dout, none_if_empty(dfinal), x, dt, A, B, C, chunk, D, z,
                                       dt_bias, init, seq_idx, cu, softplus, lo, hi)
    dx, ddt, dA, dB, dC, dD, dz, ddtb, dinit = (none_if_empty(t) for t in g)
    return dx, ddt, dA, dB, dC, None, dD, dz, ddtb, dinit, None, None, None, None, None, None


torch.library.register_autograd("mlmamba::ssd_scan_fwd", _backward, setup_context=_setup)
