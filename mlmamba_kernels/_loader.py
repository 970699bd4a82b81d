"""Loads the CUDA extension if it was built, and says which backend each op uses."""
from pathlib import Path

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the schemas and the CUDA kernels)
    LOAD_ERROR = None
except ImportError as e:  # not built (pure-Python install) or built against another torch
    _C = None
    if not list(Path(__file__).parent.glob("_C.*")):
        LOAD_ERROR = ("not built: a pure-Python install (no CUDA toolkit or CUDA torch at "
                      "install time, or MLMAMBA_SKIP_CUDA_BUILD=1)")
    else:
        LOAD_ERROR = f"built but cannot be loaded (rebuild against this torch): {e}"


def has_cuda_kernel(op):
    """True when `torch.ops.mlmamba.<op>` has a CUDA kernel of ours (not the reference)."""
    return _C is not None and op in _C_CUDA_OPS


def _cuda_ops_of_extension():
    if _C is None:
        return frozenset()
    from ._schemas import SCHEMAS
    return frozenset(n for n in SCHEMAS
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"mlmamba::{n}", "CUDA"))


# Taken before Python registers any reference as a CUDA fallback.
_C_CUDA_OPS = _cuda_ops_of_extension()
