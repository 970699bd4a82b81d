"""Argument checks shared by every public op: one clear message naming op and argument."""
import warnings

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail(op, msg):
    raise ValueError(f"{op}: {msg}")


def check_tensor(op, name, t, shape=None, ndim=None, dtypes=FLOATS, device=None, optional=False):
    """Check one argument. `shape` may hold None for a free dimension."""
    if t is None:
        if optional:
            return
        fail(op, f"{name} is required")
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        want = tuple("*" if s is None else s for s in shape) if shape is not None else f"{ndim}-D"
        fail(op, f"{name} must have shape {want}, got {tuple(t.shape)}")
    if shape is not None:
        for i, s in enumerate(shape):
            if s is not None and t.shape[i] != s:
                want = tuple("*" if s2 is None else s2 for s2 in shape)
                fail(op, f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        fail(op, f"{name} is on {t.device} but the inputs are on {device}")


def check_choice(op, name, value, choices):
    if value not in choices:
        fail(op, f"{name} must be one of {choices}, got {value!r}")


def check_backend(op, backend, device, has_kernel):
    """Resolve backend=None|"reference"|"cuda" to True (use the op path) or False (reference)."""
    check_choice(op, "backend", backend, (None, "reference", "cuda"))
    if backend == "reference":
        return False
    if backend == "cuda":
        if device.type != "cuda":
            fail(op, f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not has_kernel:
            from ._loader import LOAD_ERROR
            why = LOAD_ERROR or "this op has no CUDA kernel in this build"
            fail(op, f"backend='cuda' was asked for but the CUDA kernel is unavailable ({why})")
    return True


_WARNED = set()


def kernel_fits(op, backend, gap):
    """True when the CUDA kernel takes these inputs (gap is None). Otherwise the reference
    serves them, with a one-time warning; backend="cuda" makes that an error instead."""
    if gap is None:
        return True
    if backend == "cuda":
        fail(op, f"backend='cuda' was asked for, but the CUDA kernel does not take {gap}")
    if (op, gap) not in _WARNED:
        _WARNED.add((op, gap))
        warnings.warn(f"{op}: the CUDA kernel does not take {gap}; running the PyTorch "
                      "reference instead (slow)", stacklevel=3)
    return False


def dt_limit_pair(op, dt_limit):
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        fail(op, f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    if not lo >= 0.0 or not hi > lo:
        fail(op, f"dt_limit must satisfy 0 <= min < max, got {dt_limit!r}")
    return lo, hi
