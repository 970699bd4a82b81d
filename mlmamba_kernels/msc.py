"""msc_scan (the fused multi-order 2D scan) and scan_orders: public functions and ops."""
import os

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
    """Each scan's conv outputs in scan order, as msc_scan_fwd saves them: conv_x
    (k, b, L, h, p) and conv_bc (k, b, L, 2 g n)."""
    u = torch.stack([_conv_fwd_ref(xBC, o, conv_weight[i], None if conv_bias is None else
                                   conv_bias[i]) for i, o in enumerate(orders)])
    b, L = xBC.shape[:2]
    return u[..., :h * p].reshape(-1, b, L, h, p).contiguous(), u[..., h * p:].contiguous()


def _saved_states(conv_x, conv_bc, dt, A, dt_bias, orders, ngroups, dt_limit):
    """Each chunk's entry state of each scan, as msc_scan_fwd saves them: (k, b, ceil(L / 64),
    h, p, n) bf16 (the reference scan's final state over the tokens before the chunk)."""
    k, b, L, h, p = conv_x.shape
    n = conv_bc.shape[-1] // (2 * ngroups)
    per_scan = []
    for i in range(k):
        x, dts = conv_x[i], dt[:, orders[i]]
        B, C = conv_bc[i].view(b, L, 2, ngroups, n).unbind(2)
        s = [x.new_zeros(b, h, p, n)]
        for t in range(64, L, 64):
            s.append(ssd_ref.ssd_scan(x[:, :t], dts[:, :t], A[i], B[:, :t], C[:, :t], 64,
                                      dt_bias=dt_bias[i], dt_softplus=True, dt_limit=dt_limit,
                                      return_final_states=True)[1].to(x.dtype))
        per_scan.append(torch.stack(s, 1))
    return torch.stack(per_scan).to(torch.bfloat16)


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
    order: dx[:, t] belongs to the row token t reads), dweight, dbias."""
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
    return (torch.empty_like(xBC, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            or_empty(None if bias is None else torch.empty_like(bias), xBC))


def _gather(t, rows, fast, scale=1.0):
    """t[:, rows] * scale (rows: int32 scan positions -> raster rows): msc_sum_rows with one
    scan (a row gather in 16-byte pieces, one index read per row; exact for scale 1) when fast,
    else _take_rows."""
    if not fast:
        g = _take_rows(t, rows.long())
        return g if scale == 1.0 else g * scale
    t3 = t.reshape(t.shape[0], t.shape[1], -1)
    return torch.ops.mlmamba.msc_sum_rows([t3], rows.view(1, -1), scale).view(t.shape)


_STREAMS = {}


def _side_streams(device, k):
    """min(k, MLMAMBA_MSC_STREAMS (default 4)) CUDA streams for the per-scan backwards, made
    once per device; none (one stream) on the CPU or when that is 1."""
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


def unfused_backward(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                     ngroups, dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    """msc_scan's CUDA backward (until a fused one exists): the conv and scan backward ops, one
    scan after another. Each scan's conv outputs come from the forward (conv_x, conv_bc: see
    msc_scan_fwd; with its chunk states, `states`, the scan backward's walk runs the adjoint
    alone) or are recomputed reading xBC through its order
    (msc_conv_fwd: the scan's inputs; the scan's own forward is not), dy and dt are gathered by
    the order (msc_sum_rows with one scan), and msc_conv_bwd reads xBC through the order too.
    The gradients of xBC and dt stay in scan order and `msc_sum_rows` sums them over the scans
    through the inverse orders, in scan order in fp32 with one rounding (deterministic); above
    SUM_ROWS_MAX_SCANS scans (or for float64) they are gathered back and summed here, with the
    same arithmetic. The mean's 1/k rides in the dy gathers (or divides dout once)."""
    ops = torch.ops.mlmamba
    b, L, cd = xBC.shape
    k, h, p, g = orders.shape[0], dt.shape[2], headdim, ngroups
    n = (cd - h * p) // (2 * g)
    acc = torch.float64 if xBC.dtype == torch.float64 else torch.float32
    f32 = dict(dtype=acc, device=xBC.device)
    dA, dD, ddtb = (torch.zeros(k, h, **f32) for _ in range(3))
    dw = torch.zeros(conv_weight.shape, **f32)
    db = None if conv_bias is None else torch.zeros(k, cd, **f32)
    idx_all = orders.to(device=xBC.device, dtype=torch.int64)
    inv_all = torch.empty_like(idx_all).scatter_(
        1, idx_all, torch.arange(L, device=xBC.device).expand(k, L).contiguous())
    rows = idx_all.to(torch.int32)
    # MLMAMBA_MSC_SUM_ROWS=0: indexing gathers and the running sums (developer A/B)
    fast = acc == torch.float32 and os.environ.get("MLMAMBA_MSC_SUM_ROWS", "1") != "0"
    fused_sum = fast and k <= SUM_ROWS_MAX_SCANS
    # the conv through the order (msc_conv_fwd / _bwd; MLMAMBA_MSC_CONV_ROWS=0: gathered rows
    # and causal_conv1d, developer A/B); the dout pieces need h p and g n multiples of 4
    conv_rows = (fast and (h * p) % 4 == 0 and (g * n) % 4 == 0
                 and os.environ.get("MLMAMBA_MSC_CONV_ROWS", "1") != "0")
    gxs_all, gdt_all, dxBC, ddt = [], [], None, None
    # merge mean's 1 / k: on CUDA in the fast path each scan's dy gather multiplies by
    # fp32(1 / k) before its one rounding, the value of dout / k there (CUDA divides a tensor
    # by a Python scalar as a multiply by its fp32 reciprocal; the CPU divides), without a
    # pass over dout
    dy_scale = 1.0
    if merge == "mean" and fast and MEAN_IN_DY_GATHER and dout.is_cuda:
        dy_scale = float(torch.tensor(1.0, dtype=torch.float32) / k)
    elif merge == "mean":
        dout = dout / k

    saved = conv_x is not None and conv_x.numel() > 0

    def one_scan(i):
        bias = None if conv_bias is None else conv_bias[i]
        if not conv_rows:
            xs = _gather(xBC, rows[i], fast).transpose(1, 2)    # (b, cd, L) channel-last
        if saved:  # the forward's conv outputs, scan order
            x, (B, C) = conv_x[i], conv_bc[i].view(b, L, 2, g * n).unbind(2)
        elif conv_rows:  # the conv reads xBC's rows through the order: no gathered copy
            x, B, C = torch.split(ops.msc_conv_fwd(xBC, rows[i], conv_weight[i], bias),
                                  [h * p, g * n, g * n], dim=-1)
        else:
            u = ops.causal_conv1d_fwd(xs, conv_weight[i], bias, None, None, True,
                                      False)[0].transpose(1, 2)
            x, B, C = torch.split(u, [h * p, g * n, g * n], dim=-1)
        dy = dout[i] if merge == "none" else dout
        dy, dts = _gather(dy, rows[i], fast, dy_scale), _gather(dt, rows[i], fast)
        gx, gdt, gA, gB, gC, gD, _, gdtb, _ = ops.ssd_scan_bwd(
            dy, None, x.reshape(b, L, h, p), dts, A[i], B.reshape(b, L, g, n),
            C.reshape(b, L, g, n), ref._CHUNK, D[i], None, dt_bias[i], None, None, None, True,
            dt_min, dt_max, None if states is None else states[i])
        du = [gx.reshape(b, L, h * p).to(xBC.dtype), gB.reshape(b, L, g * n).to(xBC.dtype),
              gC.reshape(b, L, g * n).to(xBC.dtype)]
        if conv_rows:  # dout in its three pieces, x through the order; dx in scan order
            gxs, gw, gb = ops.msc_conv_bwd(xBC, rows[i], conv_weight[i], bias, du)
        else:
            gxs, gw, gb, _ = ops.causal_conv1d_bwd(xs, conv_weight[i], bias, None, None,
                                                   torch.cat(du, dim=-1).transpose(1, 2), None,
                                                   True)
            gxs = gxs.transpose(1, 2)                           # (b, L, cd), scan order
        dA[i], dD[i], ddtb[i], dw[i] = gA, gD, gdtb, gw
        if db is not None:
            db[i] = gb
        return gxs, gdt

    # the scans are independent until the sums: with msc_sum_rows they may run on side streams
    # (MLMAMBA_MSC_STREAMS), scan i on stream i % n, one scan's tails overlapping another's
    streams = _side_streams(xBC.device, k) if fused_sum else []
    main = torch.cuda.current_stream(xBC.device) if streams else None
    for st in streams:
        st.wait_stream(main)
    for i in range(k):
        if streams:
            with torch.cuda.stream(streams[i % len(streams)]):
                gxs, gdt = one_scan(i)
        else:
            gxs, gdt = one_scan(i)
        if fused_sum:
            gxs_all.append(gxs)
            gdt_all.append(gdt)
        else:  # running sums in raster order: the same arithmetic as msc_sum_rows
            gxs, gdt = _take_rows(gxs, inv_all[i]), _take_rows(gdt, inv_all[i])
            dxBC = gxs.to(acc) if i == 0 else dxBC.add_(gxs)
            ddt = gdt.to(acc) if i == 0 else ddt.add_(gdt)
    for st in streams:
        main.wait_stream(st)
    for t in (gxs_all + gdt_all) if streams else ():
        t.record_stream(main)  # made on a side stream, read and freed on main
    if fused_sum:
        inv32 = inv_all.to(torch.int32)
        dxBC, ddt = ops.msc_sum_rows(gxs_all, inv32), ops.msc_sum_rows(gdt_all, inv32)
    return (dxBC.to(xBC.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dD.to(D.dtype),
            dw.to(conv_weight.dtype), or_empty(None if db is None else db.to(conv_bias.dtype), xBC),
            ddtb.to(dt_bias.dtype))


def _bwd_cuda(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim, ngroups,
              dt_min, dt_max, merge, conv_x=None, conv_bc=None, states=None):
    if xBC.dtype == torch.float64:
        return _bwd_ref(dout, xBC, dt, A, D, conv_weight, conv_bias, dt_bias, orders, headdim,
                        ngroups, dt_min, dt_max, merge)
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
    conv = ((xBC.new_empty((k, b, L, h, headdim)), xBC.new_empty((k, b, L, cd - h * headdim)))
            if save_conv else (empty(xBC), empty(xBC)))
    states = (xBC.new_empty((k, b, (L + 63) // 64, h, headdim, n), dtype=torch.bfloat16)
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
