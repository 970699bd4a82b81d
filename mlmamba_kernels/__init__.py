"""mlmamba_kernels: CUDA kernels for Mamba-2 (SSD scan, causal conv1d, decode steps, the fused
multi-order 2D scan) as torch custom ops `torch.ops.mlmamba.*`, with PyTorch references.

On CUDA tensors with the extension built, the ops run our kernels; otherwise the reference.
Every public function takes backend=None | "reference" | "cuda" to force one.
"""
from ._registry import nvtx_range
from .conv1d import causal_conv1d, causal_conv1d_update
from .msc import msc_scan, scan_orders
from .ssd import ssd_scan, ssd_state_update

__all__ = ["ssd_scan", "ssd_state_update", "causal_conv1d", "causal_conv1d_update", "msc_scan",
           "scan_orders", "build_info", "nvtx_range"]

# public function -> the ops it runs
_OPS = {
    "ssd_scan": ("ssd_scan_fwd", "ssd_scan_bwd"),
    "ssd_state_update": ("ssd_state_update",),
    "causal_conv1d": ("causal_conv1d_fwd", "causal_conv1d_bwd"),
    "causal_conv1d_update": ("causal_conv1d_update",),
    "msc_scan": ("msc_scan_fwd", "msc_scan_bwd", "msc_sum_rows", "msc_gather_rows",
                 "msc_conv_fwd", "msc_conv_bwd", "msc_bwd_saved"),
}


def build_info():
    """How the extension was built and which backend each op uses on CUDA tensors."""
    import torch

    from ._loader import _C, LOAD_ERROR, has_cuda_kernel
    info = {
        "extension_built": _C is not None,
        "extension_error": LOAD_ERROR,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if _C is not None:
        built = _C.build_info()
        info.update(built_cuda_archs=built["cuda_archs"], built_torch=built["torch_version"],
                    built_cuda=built["cuda_version"])
    info["backends"] = {
        name: {op: ("cuda" if has_cuda_kernel(op) else "reference") for op in ops}
        for name, ops in _OPS.items()}
    return info
