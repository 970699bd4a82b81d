"""msc_scan (the fused multi-order 2D scan) and scan_orders: public functions and ops."""
import contextlib
import os
import struct

import torch

from . import _checks as ck
from ._loader import has_cuda_kernel
from ._registry import (empty, no_double_backward, none_if_empty, nvtx_range, or_empty,
                        reference_vjp, register_reference)
from .reference import conv1d as conv_ref
from .reference import msc as ref
from .reference import ssd as ssd_ref

MERGES = ("mean", "sum", None, "none")


def scan_orders(height, width, kind="cross"):
    """(k, height*width) int64 scan orders: "bidirectional", "cross", or a list of orders,
    each "row", "col", "row_rev", "col_rev" or a permutation of the raster indices."""
    return ref.scan_orders(height, width, kind)


def _check_orders(op, orders, k, L, dev, values=True):
    ck.check_tensor(op, "orders", orders, shape=(k, L), dtypes=(torch.int64,), device=dev)
    if not values or torch.compiler.is_compiling() or (dev.type == "cuda" and
                                         torch.cuda.is_current_stream_capturing()):
        return
    want = torch.arange(L, device=dev)
    srt = orders.sort(dim=1).values
    bad = (srt != want).any(dim=1).nonzero().flatten().tolist()
    if bad:
        ck.fail(op, f"orders[{bad[0]}] is not a permutation of range({L})")


# The fused kernel on CUDA where it applies; MLMAMBA_MSC_IMPL=unfused (read at import) keeps
# the unfused kernels (A/B timing).
FUSED = os.environ.get("MLMAMBA_MSC_IMPL", "") != "unfused"


def _save_env():
    env = os.environ.get("MLMAMBA_MSC_SAVE", "conv,states")
    got = {v.strip() for v in env.split(",")} - {""}
    if env.strip() == "none":
        return frozenset()
    if not got <= {"conv", "states"}:
        raise ValueError(f"msc_scan: environment variable MLMAMBA_MSC_SAVE must be 'none' or a "
                         f"comma list of conv, states; got {env!r}")
    return frozenset(got)


# Under autograd the fused forward keeps what the backward would recompute: "conv", each scan's
# conv outputs in scan order (k b L (h p + 2 g n) elements: the backward skips the conv), and
# "states", each chunk's entry state (bf16, k b ceil(L / 64) h p n elements: the backward's
# states walk runs the adjoint alone). MLMAMBA_MSC_SAVE (read at import): a comma list of those
# (default both), or "none" to recompute (the least memory).
SAVE = _save_env()
# only the warp-specialized kernel saves; these developer switches (read at import here, at
# each call in csrc/msc/ops.cpp) turn it off
WS_KERNEL = (os.environ.get("MLMAMBA_MSC_WS", "") != "0"
             and os.environ.get("MLMAMBA_SSD_FWD_VEC", "") != "0")


def fused_kernel_takes(xBC, dt, conv_weight, headdim, ngroups):
    """True when the fused CUDA kernel (csrc/msc/ops.cpp) serves these inputs: bf16 xBC on an
    sm_90 GPU, headdim 64, d_state 64 or 128, conv width 4, at most 65535 batch rows."""
    if xBC.device.type != "cuda" or xBC.dtype != torch.bfloat16 or headdim != 64:
        return False
    n = (xBC.shape[2] - dt.shape[2] * headdim) // (2 * ngroups)
    return (n in (64, 128) and conv_weight.shape[2] == 4 and xBC.shape[0] <= 65535
            and torch.cuda.get_device_capability(xBC.device)[0] == 9)


def msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
             dt_limit=(0.0, float("inf")), merge="mean", backend=None):
    """k scans of a patch grid in one pass.

    xBC (b,L,h*p+2*g*n), dt (b,L,h) in raster order; per scan: conv_weight (k,conv_dim,w),
    conv_bias (k,conv_dim) or None, A, D, dt_bias (k,h); orders (k,L) int64 permutations.
    Scan i runs causal_conv1d(silu) then ssd_scan (dt_softplus) along orders[i]; the output
    lands at raster positions. merge "mean" | "sum" -> (b,L,h,p); None -> (k,b,L,h,p).
    Under autograd the fused CUDA kernel keeps each scan's conv outputs and chunk states for
    the backward (k b L (h p + 2 g n) + k b ceil(L/64) h p n bf16 elements; MLMAMBA_MSC_SAVE).
    """
    op = "msc_scan"
    ck.check_tensor(op, "xBC", xBC, ndim=3)
    b, L, conv_dim = xBC.shape
    dev = xBC.device
    ck.check_tensor(op, "dt", dt, shape=(b, L, None), device=dev)
    h = dt.shape[2]
    if not isinstance(headdim, int) or headdim < 1 or not isinstance(ngroups, int) or ngroups < 1:
        ck.fail(op, f"headdim and ngroups must be positive ints, got {headdim!r}, {ngroups!r}")
    if h % ngroups:
        ck.fail(op, f"ngroups={ngroups} does not divide {h} heads")
    rest = conv_dim - h * headdim
    if rest <= 0 or rest % (2 * ngroups):
        ck.fail(op, f"xBC width {conv_dim} is not h*headdim + 2*ngroups*d_state "
                    f"(h={h}, headdim={headdim}, ngroups={ngroups})")
    ck.check_tensor(op, "conv_weight", conv_weight, ndim=3, device=dev)
    k, w = conv_weight.shape[0], conv_weight.shape[2]
    ck.check_tensor(op, "conv_weight", conv_weight, shape=(k, conv_dim, None))
    if not 2 <= w <= 8:
        ck.fail(op, f"conv_weight width must be between 2 and 8, got {w}")
    ck.check_tensor(op, "conv_bias", conv_bias, shape=(k, conv_dim), device=dev, optional=True)
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        ck.check_tensor(op, name, t, shape=(k, h), device=dev)
    ck.check_choice(op, "merge", merge, MERGES)
    lo, hi = ck.dt_limit_pair(op, dt_limit)
    merge_s = "none" if merge is None else merge
    use_op = ck.check_backend(op, backend, dev, has_cuda_kernel("msc_scan_fwd"))
    fused = (use_op and has_cuda_kernel("msc_scan_fwd") and FUSED
             and fused_kernel_takes(xBC, dt, conv_weight, headdim, ngroups))
    # the fused op checks (and remembers) the orders' values itself
    _check_orders(op, orders, k, L, dev, values=not fused)
    if not use_op or (dev.type == "cuda" and xBC.dtype == torch.float64):
        return ref.msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                            ngroups, (lo, hi), None if merge_s == "none" else merge_s)
    if dev.type == "cuda" and not fused:
        return composed_msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders,
                                 headdim, ngroups, (lo, hi), merge)
    save = fused and WS_KERNEL and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (xBC, dt, A, D, conv_weight, conv_bias, dt_bias))
    with nvtx_range(op):
        return torch.ops.mlmamba.msc_scan_fwd(xBC, dt, A, D, conv_weight, conv_bias, dt_bias,
                                              orders, headdim, ngroups, lo, hi, merge_s,
                                              save and "conv" in SAVE,
                                              save and "states" in SAVE)[0]


def composed_msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
                      dt_limit, merge):
    """k unfused scans through the public causal_conv1d and ssd_scan (CUDA kernels), in the
    input dtype: the CUDA path for inputs the fused kernel does not take, and (under autograd)
    the backward. This writes k permuted copies of the grid, which the fused kernel avoids."""
    from .conv1d import causal_conv1d
    from .ssd import ssd_scan
    with nvtx_range("msc_scan (unfused)"):
        return ref.msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                            ngroups, dt_limit, merge, conv=causal_conv1d, scan=ssd_scan,
                            upcast=False)


# ---- reference kernels of the ops -------------------------------------------------------

def _saved_conv(xBC, conv_weight, conv_bias, orders, h, p):
    """Each scan's conv outputs in scan order, as msc_scan_fwd saves them, the scans side by
    side: conv_x (b, L, k, h, p) and conv_bc (b, L, 2, k, g n) (B, then C)."""
    u = torch.stack([_conv_fwd_ref(xBC, o, conv_weight[i], None if conv_bias is None else
                                   conv_bias[i]) for i, o in enumerate(orders)], dim=2)
    b, L, k, _ = u.shape
    gn = (u.shape[3] - h * p) // 2
    return (u[..., :h * p].reshape(b, L, k, h, p).contiguous(),
            torch.stack((u[..., h * p:h * p + gn], u[..., h * p + gn:]), dim=2).contiguous())


def _saved_states(conv_x, conv_bc, dt, A, dt_bias, orders, ngroups, dt_limit):
    """Each chunk's entry state of each scan, as msc_scan_fwd saves them: (b, ceil(L / 64), k,
    h, p, n) bf16 (the reference scan's final state over the tokens before the chunk)."""
    b, L, k, h, p = conv_x.shape
    n = conv_bc.shape[-1] // ngroups
    per_scan = []
    for i in range(k):
        x, dts = conv_x[:, :, i], dt[:, orders[i]]
        B, C = conv_bc[:, :, :, i].reshape(b, L, 2, ngroups, n).unbind(2)
        s = [x.new_zeros(b, h, p, n)]
        for t in range(64, L, 64):
            s.append(ssd_ref.ssd_scan(x[:, :t], dts[:, :t], A[i], B[:, :t], C[:, :t], 64,
                                      dt_bias=dt_bias[i], dt_softplus=True, dt_limit=dt_limit,
                                      return_final_states=True)[1].to(x.dtype))
        per_scan.append(torch.stack(s, 1))
    return torch.stack(per_scan, 2).to(torch.bfloat16)


def _fwd_ref(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups, dt_min,
             dt_max, merge, save_conv=False, save_states=False):
    out = ref.msc_scan(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
                       (dt_min, dt_max), None if merge == "none" else merge).contiguous()
    if not (save_conv or save_states):
        return out, empty(xBC), empty(xBC), empty(xBC)
    conv_x, conv_bc = _saved_conv(xBC, conv_weight, conv_bias, orders, dt.shape[2], headdim)
    states = (_saved_states(conv_x, conv_bc, dt, A, dt_bias, orders, ngroups, (dt_min, dt_max))
              if save_states else empty(xBC))
    return (out,) + ((conv_x, conv_bc) if save_conv else (empty(xBC), empty(xBC))) + (states,)


def _bwd_ref(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
             dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    grads = reference_vjp(
        lambda *t: (ref.msc_scan(*t, orders, headdim, ngroups, (dt_min, dt_max),
                                 None if merge == "none" else merge),),
        (xBC, dt, A, D, conv_weight, conv_bias, dt_bias), (dout,))
    return tuple(or_empty(g, xBC) for g in grads)


def _take_rows(t, idx):
    """t[:, idx] for a tensor whose rows are contiguous: gathered as 8-byte words where the
    rows allow it (a bf16 row moved 2 bytes per index is ~4x slower than the copy)."""
    try:
        return t.view(torch.int64)[:, idx].view(t.dtype)
    except RuntimeError:  # row length, stride or offset not a multiple of 8 bytes
        return t[:, idx]


SUM_ROWS_MAX_SCANS = 8  # kMaxSumScans of csrc/msc/msc.h
MEAN_IN_DY_GATHER = True  # merge mean's 1 / k in the CUDA backward's dy gathers (tests: False)


def _sum_rows_ref(grads, inv, scale=1.0):
    """msc_sum_rows' reference: out[:, r] = scale * sum over i, in order, of
    grads[i][:, inv[i, r]], in fp32 (float64 for float64; scale rounded to that type) with one
    rounding at the end."""
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    out = None
    for g, ix in zip(grads, inv.long()):
        rows = g[:, ix].to(acc)
        out = rows if out is None else out.add_(rows)
    return out.mul_(torch.tensor(scale, dtype=acc)).to(grads[0].dtype)


register_reference("msc_sum_rows", _sum_rows_ref)


@torch.library.register_fake("mlmamba::msc_sum_rows")
def _sum_rows_fake(grads, inv, scale=1.0):
    return torch.empty_like(grads[0], memory_format=torch.contiguous_format)


def _rows_of(xBC, rows):
    """xBC[:, rows], an entry outside range(L) reading a zero row."""
    r = rows.long()
    ok = ((r >= 0) & (r < xBC.shape[1]))[None, :, None]
    return xBC[:, r.clamp(0, max(xBC.shape[1] - 1, 0))].masked_fill(~ok, 0)


def _conv_fwd_ref(xBC, rows, weight, bias):
    """msc_conv_fwd's reference: causal conv (SiLU) of the rows xBC[:, rows], token order."""
    xs = _rows_of(xBC, rows).transpose(1, 2)
    return conv_ref.causal_conv1d(xs, weight, bias, "silu").transpose(1, 2).contiguous()


def _conv_bwd_ref(xBC, rows, weight, bias, dout):
    """msc_conv_bwd's reference: the gradients of the conv of the gathered rows (dx in token
    order: dx[:, t] belongs to the row token t reads), dweight, dbias. k scans (rows (k, L),
    dout pieces (b, L, k, c)): each scan's, stacked."""
    if rows.dim() == 2:
        per = [_conv_bwd_ref(xBC, rows[i], weight[i], None if bias is None else bias[i],
                             [g[:, :, i] for g in dout]) for i in range(rows.shape[0])]
        return (torch.stack([r[0] for r in per]), torch.stack([r[1] for r in per]),
                or_empty(None if bias is None else torch.stack([r[2] for r in per]), xBC))
    xs = _rows_of(xBC, rows)
    dx, dw, db = reference_vjp(
        lambda x_, w_, b_: (conv_ref.causal_conv1d(x_.transpose(1, 2), w_, b_, "silu"),),
        (xs, weight, bias), (torch.cat(list(dout), dim=2).transpose(1, 2),))
    return dx.contiguous(), dw, or_empty(db, xBC)


register_reference("msc_conv_fwd", _conv_fwd_ref)
register_reference("msc_conv_bwd", _conv_bwd_ref)


@torch.library.register_fake("mlmamba::msc_conv_fwd")
def _conv_fwd_fake(xBC, rows, weight, bias):
    return torch.empty_like(xBC, memory_format=torch.contiguous_format)


@torch.library.register_fake("mlmamba::msc_conv_bwd")
def _conv_bwd_fake(xBC, rows, weight, bias, dout):
    if rows.dim() == 2:
        return (xBC.new_empty((rows.shape[0], *xBC.shape)),
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                or_empty(None if bias is None else torch.empty_like(bias), xBC))
    return (torch.empty_like(xBC, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            or_empty(None if bias is None else torch.empty_like(bias), xBC))


def _gather_rows_ref(src, rows, scale=1.0):
    """msc_gather_rows' reference: out (b, L, k, cols), out[:, t, i] = src_i[:, rows[i, t]]
    times scale (src_i: src[i] of a (k, b, L, cols) src, else src) in fp32 (float64 for
    float64) with one rounding; zeros where rows holds a position outside range(L)."""
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    srcs = src.unbind(0) if src.dim() == 4 else [src] * rows.shape[0]
    out = torch.stack([_rows_of(t, r) for t, r in zip(srcs, rows)], dim=2).to(acc)
    return out.mul_(torch.tensor(scale, dtype=acc)).to(src.dtype)


register_reference("msc_gather_rows", _gather_rows_ref)


@torch.library.register_fake("mlmamba::msc_gather_rows")
def _gather_rows_fake(src, rows, scale=1.0):
    return src.new_empty(src.shape[-3], src.shape[-2], rows.shape[0], src.shape[-1])


_STREAMS = {}


def _side_streams(device, k):
    """min(k, MLMAMBA_MSC_STREAMS (default 4)) CUDA streams for the backward's per-scan parts,
    made once per device; none (one stream) on the CPU or when that is 1."""
    env = os.environ.get("MLMAMBA_MSC_STREAMS", "") or "4"
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"msc_scan: environment variable MLMAMBA_MSC_STREAMS must be a "
                         f"positive integer, got {env!r}")
    n = min(k, int(env))
    if device.type != "cuda" or n <= 1:
        return []
    pool = _STREAMS.setdefault(device.index or 0, [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device))
    return pool[:n]


_ORDERS = []  # (orders, version, device, stream, rows, inv), the most recent first


def _rows_and_inverse(orders, device):
    """The (k, L) orders as int32 on device (rows) and their inverse permutations (inv: inv[i,
    orders[i, t]] = t), remembered for the last 8 orders tensors at their version (a step's
    backward then makes neither again) and reused on the stream that made them (an entry
    dropped later is freed to that stream); not while a CUDA graph is captured."""
    cuda = device.type == "cuda"
    live = not orders.is_inference() and not (cuda and torch.cuda.is_current_stream_capturing())
    stream = torch.cuda.current_stream(device) if cuda else None
    key = (orders._version, device, stream) if live else None
    if live:
        for e in _ORDERS:
            if e[0] is orders and e[1:4] == key:
                return e[4], e[5]
    order64 = orders.to(device=device, dtype=torch.int64)
    rows = order64.to(torch.int32)
    k, L = rows.shape
    inv = torch.empty_like(rows).scatter_(
        1, order64, torch.arange(L, device=device, dtype=torch.int32).expand(k, L))
    if live:
        _ORDERS.insert(0, (orders, *key, rows, inv))
        del _ORDERS[8:]
    return rows, inv


def _recip32(k):
    """fp32(1 / k), the reciprocal torch multiplies by on CUDA for a division by k (a double
    division rounded to fp32 equals the fp32 division: no double-rounding error)."""
    return struct.unpack("f", struct.pack("f", 1.0 / k))[0]


def unfused_backward(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                     ngroups, dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    """msc_scan's CUDA backward (until a fused one exists). Where the forward saved its conv
    outputs or chunk states, the k scans' SSDs run as one SSD backward of k h heads and k g
    groups, the scans side by side in scan order as the forward lays them out: x, B, C (conv_x,
    conv_bc; else recomputed through each order by msc_conv_fwd and laid out so), the chunk
    states (the SSD backward's walk then runs the adjoint alone), dout and dt gathered through
    the orders by one msc_gather_rows each. With nothing saved (MLMAMBA_MSC_SAVE=none, the
    least memory) the same runs scan by scan, scan i's part on side stream i % n
    (MLMAMBA_MSC_STREAMS). Then the conv backward (msc_conv_bwd, xBC read through the orders:
    one launch of the k scans after the one SSD, else each scan's). The gradients of xBC and dt
    stay in scan order and msc_sum_rows sums them over the scans through the inverse orders, in
    scan order in fp32 with one rounding (deterministic); above SUM_ROWS_MAX_SCANS scans they
    are gathered back and summed here with the same arithmetic. The int32 orders and their
    inverses are remembered per orders tensor and version. Merge mean's 1/k rides in dout's
    gather on CUDA (as a multiply by its fp32 reciprocal: the value of dout / k there); the CPU
    divides."""
    ops = torch.ops.mlmamba
    b, L, cd = xBC.shape
    k, h, p, g = orders.shape[0], dt.shape[2], headdim, ngroups
    gn = (cd - h * p) // 2
    n = gn // g
    rows, inv = _rows_and_inverse(orders, xBC.device)
    dy_scale = 1.0
    if merge == "mean" and MEAN_IN_DY_GATHER and dout.is_cuda:
        dy_scale = _recip32(k)
    elif merge == "mean":
        dout = dout / k
    bias = [None if conv_bias is None else conv_bias[i] for i in range(k)]

    saved = conv_x is not None and conv_x.numel() > 0

    def ssd_part(lo, hi):
        """Scans lo..hi-1 side by side in scan order as one SSD backward of (hi - lo) h heads and
        (hi - lo) g groups: their conv backward's dout pieces dx, dB, dC (b, L, hi - lo, c), their
        ddt (b, L, hi - lo, h), and the (hi - lo) h gradients of A, D, dt_bias."""
        m = hi - lo
        src = dout.reshape(k, b, L, h * p)[lo:hi] if merge == "none" else dout.reshape(b, L, h * p)
        dy = ops.msc_gather_rows(src, rows[lo:hi], dy_scale).view(b, L, m * h, p)
        dts = ops.msc_gather_rows(dt, rows[lo:hi]).view(b, L, m * h)
        if saved:  # the forward's: x (b, L, k, h, p), B / C (b, L, 2, k, g n)
            x, bc = conv_x[:, :, lo:hi], conv_bc[:, :, :, lo:hi]
        elif m == 1:  # recomputed through the order; views of the conv's output
            u = ops.msc_conv_fwd(xBC, rows[lo], conv_weight[lo], bias[lo])
            x, bc = u[..., :h * p], u[..., h * p:].unflatten(-1, (2, 1, gn))
        else:  # recomputed, laid out as the forward saves them
            x, bc = xBC.new_empty(b, L, m, h * p), xBC.new_empty(b, L, 2, m, gn)
            for j in range(m):
                u = ops.msc_conv_fwd(xBC, rows[lo + j], conv_weight[lo + j], bias[lo + j])
                x[:, :, j], bc[:, :, :, j] = u[..., :h * p], u[..., h * p:].unflatten(-1, (2, gn))
        B, C = bc.reshape(b, L, 2, m * g, n).unbind(2)
        cs = None if states is None else states.view(b, -1, m * h, p, n)
        gx, gdt, dA, gB, gC, dD, _, ddtb, _ = ops.ssd_scan_bwd(
            dy, None, x.reshape(b, L, m * h, p), dts, A[lo:hi].reshape(m * h), B, C, ref._CHUNK,
            D[lo:hi].reshape(m * h), None, dt_bias[lo:hi].reshape(m * h), None, None, None,
            True, dt_min, dt_max, cs)
        gx = gx.reshape(b, L, m, h * p).to(xBC.dtype)
        gB, gC = (t.reshape(b, L, m, gn).to(xBC.dtype) for t in (gB, gC))
        return [gx, gB, gC], gdt.reshape(b, L, m, h), [dA, dD, ddtb]

    # with the forward's saved tensors (its layout) all scans run as one SSD and one conv
    # backward of k scans; else scan by scan. The conv backward: dout in its three pieces, x
    # through the order, dx in scan order. The scans are independent until the sums
    if saved or states is not None:
        du, gdt, params = ssd_part(0, k)
        dxs, dw, db = ops.msc_conv_bwd(xBC, rows, conv_weight, conv_bias, du)
        db = None if conv_bias is None else db  # (the op's empty tensor)
        del du
        gxs, gdts = list(dxs.unbind(0)), list(gdt.unbind(2))
    else:
        # on side streams: each scan's SSD overlaps the conv backwards before it
        streams = _side_streams(xBC.device, k)
        main = torch.cuda.current_stream(xBC.device) if streams else None
        for st in streams:
            st.wait_stream(main)
        convs, gdts, params = [], [], []
        for i in range(k):
            stream = streams[i % len(streams)] if streams else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                du, gdt, pr = ssd_part(i, i + 1)
                params += pr
                # its dout pieces freed once enqueued (scan by scan: the least memory)
                convs.append(ops.msc_conv_bwd(xBC, rows[i], conv_weight[i], bias[i],
                                              [t[:, :, 0] for t in du]))
                gdts.append(gdt[:, :, 0])
                del du
        for st in streams:
            main.wait_stream(st)
        for t in [u for c in convs for u in c] + gdts + params if streams else ():
            t.record_stream(main)  # made on a side stream, read and freed on main
        gxs = [c[0] for c in convs]
        dw = torch.stack([c[1] for c in convs])
        db = None if conv_bias is None else torch.stack([c[2] for c in convs])
    if k <= SUM_ROWS_MAX_SCANS:
        dxBC, ddt = ops.msc_sum_rows(gxs, inv), ops.msc_sum_rows(gdts, inv)
    else:  # running sums in raster order: the same arithmetic as msc_sum_rows
        acc, inv64 = torch.float64 if xBC.dtype == torch.float64 else torch.float32, inv.long()
        dxBC = ddt = None
        for i in range(k):
            u, v = _take_rows(gxs[i], inv64[i]).to(acc), _take_rows(gdts[i], inv64[i]).to(acc)
            dxBC, ddt = (u, v) if i == 0 else (dxBC.add_(u), ddt.add_(v))
    dA, dD, ddtb = (torch.cat(params[j::3]).reshape(k, h) for j in range(3))
    return (dxBC.to(xBC.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dD.to(D.dtype),
            dw.to(conv_weight.dtype), or_empty(None if db is None else db.to(conv_bias.dtype), xBC),
            ddtb.to(dt_bias.dtype))


# the saved modes' CUDA backward in C++ (msc_bwd_saved; tests: False, the same ops from Python)
CPP_BWD = True


def _bwd_saved_ref(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, rows, inv, headdim,
                   ngroups, dt_min, dt_max, merge, dy_scale, conv_x=None, conv_bc=None,
                   states=None):
    """msc_bwd_saved's reference: unfused_backward with dout times dy_scale (merge mean's fp32
    1/k: then summed), the orders rows (inv, their inverses, recomputed)."""
    if merge == "mean":
        dout, merge = dout * dy_scale, "sum"
    elif dy_scale != 1.0:
        dout = dout * dy_scale
    return unfused_backward(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, rows.long(),
                            headdim, ngroups, dt_min, dt_max, merge, conv_x, conv_bc, states)


register_reference("msc_bwd_saved", _bwd_saved_ref)


@torch.library.register_fake("mlmamba::msc_bwd_saved")
def _bwd_saved_fake(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, rows, inv, headdim,
                    ngroups, dt_min, dt_max, merge, dy_scale, conv_x=None, conv_bc=None,
                    states=None):
    return tuple(or_empty(None if t is None else
                          torch.empty_like(t, memory_format=torch.contiguous_format), xBC)
                 for t in (xBC, dt, A, D, conv_weight, conv_bias, dt_bias))


def _bwd_cuda(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
              dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    if xBC.dtype == torch.float64:
        return _bwd_ref(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                        ngroups, dt_min, dt_max, merge)
    saved = (conv_x is not None and conv_x.numel() > 0) or (states is not None and
                                                             states.numel() > 0)
    if saved and CPP_BWD and MEAN_IN_DY_GATHER and has_cuda_kernel("msc_bwd_saved"):
        rows, inv = _rows_and_inverse(orders, xBC.device)
        scale = _recip32(orders.shape[0]) if merge == "mean" else 1.0
        return torch.ops.mlmamba.msc_bwd_saved(
            dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, rows, inv, headdim, ngroups,
            dt_min, dt_max, merge, scale, conv_x, conv_bc, states)
    return unfused_backward(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders,
                            headdim, ngroups, dt_min, dt_max, merge, conv_x, conv_bc, states)


register_reference("msc_scan_fwd", _fwd_ref)
torch.library.impl("mlmamba::msc_scan_bwd", "CPU")(_bwd_ref)
torch.library.impl("mlmamba::msc_scan_bwd", "CUDA")(_bwd_cuda)
no_double_backward("msc_scan_bwd")


@torch.library.register_fake("mlmamba::msc_scan_fwd")
def _fwd_fake(xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups, dt_min,
              dt_max, merge, save_conv=False, save_states=False):
    b, L, cd = xBC.shape
    h, k = dt.shape[2], orders.shape[0]
    shape = (b, L, h, headdim) if merge != "none" else (k, b, L, h, headdim)
    n = (cd - h * headdim) // (2 * ngroups)
    conv = ((xBC.new_empty((b, L, k, h, headdim)), xBC.new_empty((b, L, 2, k, ngroups * n)))
            if save_conv else (empty(xBC), empty(xBC)))
    states = (xBC.new_empty((b, (L + 63) // 64, k, h, headdim, n), dtype=torch.bfloat16)
              if save_states else empty(xBC))
    return (xBC.new_empty(shape),) + conv + (states,)


@torch.library.register_fake("mlmamba::msc_scan_bwd")
def _bwd_fake(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
              dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    return tuple(or_empty(None if t is None else
                          torch.empty_like(t, memory_format=torch.contiguous_format), xBC)
                 for t in (xBC, dt, A, D, conv_weight, conv_bias, dt_bias))


_FWD_ARGS = ("xBC", "dt", "A", "D", "conv_weight", "conv_bias", "dt_bias", "orders", "headdim",
             "ngroups", "dt_min", "dt_max", "merge", "save_conv", "save_states")


def _setup(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs))
    saved = output[1:]  # conv_x, conv_bc, states
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero gradients made for them (a pass over each)
    ctx.save_for_backward(*(a[k] for k in ("xBC", "dt", "A", "D", "conv_weight", "conv_bias",
                                            "dt_bias", "orders")), *saved)
    ctx.consts = (a["headdim"], a["ngroups"], a["dt_min"], a["dt_max"], a["merge"])


def _backward(ctx, dout, *_saved_grads):
    if dout is None:  # (grads are not materialized)
        return (None,) * len(_FWD_ARGS)
    xBC, dt, A, D, cw, cb, dtb, orders, *saved = ctx.saved_tensors
    g = torch.ops.mlmamba.msc_scan_bwd(dout, xBC, dt, A, D, cw, cb, dtb, orders, *ctx.consts,
                                       *(none_if_empty(t) for t in saved))
    dxBC, ddt, dA, dD, dcw, dcb, ddtb = (none_if_empty(t) for t in g)
    return (dxBC, ddt, dA, dD, dcw, dcb, ddtb) + (None,) * (len(_FWD_ARGS) - 7)


torch.library.register_autograd("mlmamba::msc_scan_fwd", _backward, setup_context=_setup)
