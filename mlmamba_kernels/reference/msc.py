"""Reference multi-order 2D scan (MSC): k Mamba-2 scans of one patch grid, each along its own
visiting order, sharing one in_proj output. The fused kernel reads the grid through the order;
this reference gathers a permuted copy, which is what the kernel must be equal to."""
import torch

from .conv1d import causal_conv1d
from .ssd import ssd_scan

_NO_LIMIT = (0.0, float("inf"))
_CHUNK = 256


def _named_order(name, height, width):
    raster = torch.arange(height * width, dtype=torch.int64)
    col = raster.view(height, width).t().reshape(-1)
    named = {"row": raster, "col": col, "row_rev": raster.flip(0), "col_rev": col.flip(0)}
    if name not in named:
        raise ValueError(f"scan_orders: unknown order name {name!r}; expected one of {sorted(named)}")
    return named[name]


def scan_orders(height, width, kind):
    """(k, height*width) int64: orders[i][t] is the raster index that scan i visits at step t.

    kind: "bidirectional" (row, row_rev), "cross" (row, col, row_rev, col_rev), or a list of
    orders, each a name ("row", "col", "row_rev", "col_rev") or a sequence/tensor of raster indices."""
    L = height * width
    if isinstance(kind, str):
        presets = {"bidirectional": ["row", "row_rev"], "cross": ["row", "col", "row_rev", "col_rev"]}
        if kind not in presets:
            raise ValueError(f"scan_orders: kind must be 'bidirectional', 'cross' or a list of orders, got {kind!r}")
        kind = presets[kind]
    rows = []
    for i, order in enumerate(kind):
        if isinstance(order, str):
            rows.append(_named_order(order, height, width))
            continue
        t = torch.as_tensor(order).detach().to("cpu")
        if t.dim() != 1 or t.numel() != L or t.is_floating_point() or t.is_complex():
            raise ValueError(f"scan_orders: order {i} must be {L} integer raster indices "
                             f"(a {height}x{width} grid), got shape {tuple(t.shape)} of {t.dtype}")
        t = t.to(torch.int64)
        if not torch.equal(t.sort().values, torch.arange(L)):
            raise ValueError(f"scan_orders: order {i} is not a permutation of range({L})")
        rows.append(t)
    if not rows:
        raise ValueError("scan_orders: at least one order is needed")
    return torch.stack(rows)


def msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
             dt_limit=_NO_LIMIT, merge="mean", conv=causal_conv1d, scan=ssd_scan, upcast=True):
    """xBC (b,L,h*p+2*g*n), dt (b,L,h) in raster order; A, D, dt_bias (k,h); conv_weight (k,cd,w);
    conv_bias (k,cd) or None; orders (k,L). Per scan i: gather along orders[i], causal conv + silu,
    ssd_scan (softplus on), scatter back. merge "mean"/"sum" -> (b,L,h,p); None/"none" -> (k,b,L,h,p).

    `conv`/`scan` are the conv and scan to compose (the references by default; the public ops
    give the unfused CUDA path); `upcast` keeps the activations in fp32 between them."""
    b, L, cd = xBC.shape
    h = dt.shape[2]
    p, g = headdim, ngroups
    n = (cd - h * p) // (2 * g)
    src = xBC.to(torch.float64 if xBC.dtype == torch.float64 else torch.float32) if upcast else xBC
    ys = []
    for i in range(orders.shape[0]):
        idx = orders[i].to(device=xBC.device, dtype=torch.int64)
        xs = src[:, idx].transpose(1, 2)                          # (b, cd, L) channel-last
        bias = None if conv_bias is None else conv_bias[i]
        xs = conv(xs, conv_weight[i], bias, "silu").transpose(1, 2)
        x, B, C = torch.split(xs, [h * p, g * n, g * n], dim=-1)
        y = scan(x.reshape(b, L, h, p), dt[:, idx], A[i], B.reshape(b, L, g, n),
                 C.reshape(b, L, g, n), _CHUNK, D=D[i], dt_bias=dt_bias[i],
                 dt_softplus=True, dt_limit=dt_limit)
        ys.append(y[:, torch.argsort(idx)])                       # back to raster positions
    y = torch.stack(ys)
    if merge in ("mean", "sum"):
        y = y.sum(0) if merge == "sum" else y.mean(0)
    elif merge not in (None, "none"):
        raise ValueError(f"msc_scan: merge must be 'mean', 'sum' or None, got {merge!r}")
    return y.to(xBC.dtype)
