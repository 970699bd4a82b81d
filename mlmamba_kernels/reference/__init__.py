"""Pure-PyTorch references of every op: any device, fp32 accumulation, differentiable.

They are the CPU implementations of the torch.ops.mlmamba ops and the truth for the kernel tests."""
from .conv1d import causal_conv1d, causal_conv1d_update, conv_out_like
from .msc import msc_scan, scan_orders
from .ssd import process_dt, ssd_scan, ssd_scan_naive, ssd_state_update

__all__ = ["causal_conv1d", "causal_conv1d_update", "conv_out_like", "msc_scan", "scan_orders",
           "process_dt", "ssd_scan", "ssd_scan_naive", "ssd_state_update"]
