"""causal_conv1d and causal_conv1d_update: public functions and op registration."""
import torch

from . import _checks as ck
from ._loader import has_cuda_kernel
from ._registry import (empty, no_double_backward, none_if_empty, nvtx_range, or_empty,
                        reference_vjp, register_reference)
from .reference import conv1d as ref

ACTIVATIONS = (None, "silu", "swish")


def _check(op, x, weight, bias, activation, initial_states=None, seq_idx=None):
    ck.check_tensor(op, "x", x, ndim=3)
    b, d, l = x.shape
    dev = x.device
    ck.check_tensor(op, "weight", weight, ndim=2, device=dev)
    if weight.shape[0] != d:
        ck.fail(op, f"weight must have shape (d={d}, width), got {tuple(weight.shape)}")
    w = weight.shape[1]
    if not 2 <= w <= 8:
        ck.fail(op, f"weight width must be between 2 and 8, got {w}")
    ck.check_tensor(op, "bias", bias, shape=(d,), device=dev, optional=True)
    ck.check_choice(op, "activation", activation, ACTIVATIONS)
    ck.check_tensor(op, "initial_states", initial_states, shape=(b, d, w - 1), device=dev,
                    optional=True)
    ck.check_tensor(op, "seq_idx", seq_idx, shape=(b, l), dtypes=(torch.int32,), device=dev,
                    optional=True)


def _kernel_gap(x, weight, bias, initial_states=None):
    """Why the CUDA conv kernels cannot take these inputs, or None."""
    for t in (x, weight, bias, initial_states):
        if t is not None and t.dtype == torch.float64:
            return "float64 inputs"
    return None


def _weight_2d(weight):
    # nn.Conv1d stores depthwise weights as (d, 1, w); accept that too
    return weight.squeeze(1) if weight is not None and weight.dim() == 3 and weight.shape[1] == 1 else weight


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None,
                  return_final_states=False, seq_idx=None, backend=None):
    """Depthwise causal conv1d (+ SiLU) over x (b, d, l), l or d contiguous.

    weight (d, w) with 2 <= w <= 8, bias (d,), initial_states (b, d, w-1), seq_idx (b, l)
    int32 (the convolution restarts where it changes). Returns out in x's dtype and layout,
    and final_states (b, d, w-1) when return_final_states.
    """
    op = "causal_conv1d"
    weight = _weight_2d(weight)
    _check(op, x, weight, bias, activation, initial_states, seq_idx)
    silu = activation is not None
    use_op = ck.check_backend(op, backend, x.device, has_cuda_kernel("causal_conv1d_fwd"))
    if use_op and x.is_cuda and has_cuda_kernel("causal_conv1d_fwd"):
        use_op = ck.kernel_fits(op, backend, _kernel_gap(x, weight, bias, initial_states))
    if not use_op:
        return ref.causal_conv1d(x, weight, bias, "silu" if silu else None, initial_states,
                                 return_final_states, seq_idx)
    with nvtx_range(op):
        out, final = torch.ops.mlmamba.causal_conv1d_fwd(
            x, weight, bias, initial_states, seq_idx, silu, return_final_states)
    return (out, final) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """Decode: x (b, d) or (b, d, l) new tokens; conv_state (b, d, w-1) updated in place."""
    op = "causal_conv1d_update"
    weight = _weight_2d(weight)
    ck.check_tensor(op, "x", x, dtypes=ck.FLOATS)
    if x.dim() not in (2, 3):
        ck.fail(op, f"x must have shape (b, d) or (b, d, l), got {tuple(x.shape)}")
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    _check(op, x3, weight, bias, activation)
    b, d, _ = x3.shape
    ck.check_tensor(op, "conv_state", conv_state, shape=(b, d, weight.shape[1] - 1),
                    device=x.device)
    silu = activation is not None
    use_op = ck.check_backend(op, backend, x.device, has_cuda_kernel("causal_conv1d_update"))
    if use_op and x.is_cuda and has_cuda_kernel("causal_conv1d_update"):
        use_op = ck.kernel_fits(op, backend, _kernel_gap(x, weight, bias, conv_state))
    if not use_op:
        return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None)
    with nvtx_range(op):
        return torch.ops.mlmamba.causal_conv1d_update(x, conv_state, weight, bias, silu)


# ---- reference kernels of the ops -------------------------------------------------------

def _fwd_ref(x, weight, bias, initial_states, seq_idx, silu, return_final_states):
    out = ref.causal_conv1d(x, weight, bias, "silu" if silu else None, initial_states, True,
                            seq_idx)
    y, final = out
    return y, (final if return_final_states else empty(x))


def _bwd_ref(x, weight, bias, initial_states, seq_idx, dout, dfinal_states, silu):
    act = "silu" if silu else None
    dx_, dw, db, dinit = reference_vjp(
        lambda x_, w_, b_, i_: ref.causal_conv1d(x_, w_, b_, act, i_, True, seq_idx),
        (x, weight, bias, initial_states), (dout, dfinal_states))
    dx = ref.conv_out_like(x)
    dx.copy_(dx_)
    return dx, dw, or_empty(db, x), or_empty(dinit, x)


def _update_ref(x, conv_state, weight, bias, silu):
    return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None)


register_reference("causal_conv1d_fwd", _fwd_ref)
register_reference("causal_conv1d_bwd", _bwd_ref)
no_double_backward("causal_conv1d_bwd")
register_reference("causal_conv1d_update", _update_ref)


@torch.library.register_fake("mlmamba::causal_conv1d_fwd")
def _fwd_fake(x, weight, bias, initial_states, seq_idx, silu, return_final_states):
    b, d, _ = x.shape
    final = x.new_empty((b, d, weight.shape[1] - 1)) if return_final_states else empty(x)
    return ref.conv_out_like(x), final


@torch.library.register_fake("mlmamba::causal_conv1d_bwd")
def _bwd_fake(x, weight, bias, initial_states, seq_idx, dout, dfinal_states, silu):
    return (ref.conv_out_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format),
            or_empty(None if bias is None else torch.empty_like(bias), x),
            or_empty(None if initial_states is None else
                     torch.empty_like(initial_states, memory_format=torch.contiguous_format), x))


@torch.library.register_fake("mlmamba::causal_conv1d_update")
def _update_fake(x, conv_state, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, weight, bias, initial_states, seq_idx, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
    ctx.silu = silu


def _backward(ctx, dout, dfinal):
    x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
    dx, dw, db, dinit = torch.ops.mlmamba.causal_conv1d_bwd(
        x, weight, bias, initial_states, seq_idx, dout, none_if_empty(dfinal), ctx.silu)
    return dx, dw, none_if_empty(db), none_if_empty(dinit), None, None, None


torch.library.register_autograd("mlmamba::causal_conv1d_fwd", _backward, setup_context=_setup)
