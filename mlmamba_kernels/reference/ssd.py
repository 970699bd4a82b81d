"""Reference SSD (Mamba-2) scan: the chunked algorithm, the sequential oracle and the decode step.

Equations: /work/shared/ssd-math.md. Per head, with a_t = dt_t * A:
    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D * x_t,   out_t = y_t * silu(z_t).
Segments (seq_idx changes, cu_seqlens boundaries) restart the state: from 0, from
initial_states for the first segment, or from initial_states[k] for packed sequence k.
Computes in float32 (float64 for float64 x); differentiable by autograd.
Inputs are assumed validated by the caller (mlmamba_kernels).
"""
import torch
import torch.nn.functional as F

from .conv1d import compute_dtype, segment_ids

_NO_LIMIT = (0.0, float("inf"))


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=_NO_LIMIT):
    """dt + dt_bias, then softplus, then the dt_limit clamp; float32 (float64 for float64 dt)."""
    out = dt.to(compute_dtype(dt))
    if dt_bias is not None:
        out = out + dt_bias.to(out.dtype)
    if dt_softplus:
        out = F.softplus(out)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != _NO_LIMIT:
        out = out.clamp(min=lo, max=hi)
    return out


def _d_term(D, x):
    """D * x for D (h,) or (h, p) and x (..., h, p)."""
    return (D[:, None] if D.dim() == 1 else D) * x


def _segments(b, l, seq_idx, cu_seqlens, device):
    """Segment id of every position (b, l) int64, or None when there is a single segment.

    With cu_seqlens the id is the packed sequence index k (cu[k] <= t < cu[k+1])."""
    if cu_seqlens is not None:
        pos = torch.arange(l, device=device)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        return (torch.searchsorted(cu, pos, right=True) - 1)[None].expand(b, l)
    if seq_idx is not None:
        return segment_ids(seq_idx.to(torch.int64))
    return None


def _segsum(a, mask):
    """exp(sum of a over (j, i]) for mask[i, j], else 0. a (..., T); mask broadcastable to (..., T, T).

    Sums run over the diagonal band directly (no difference of cumulative sums), so strong decay
    loses no precision; masked entries become -inf before exp, so gradients stay finite."""
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    rep = a[..., :, None].expand(*a.shape, T)                # rep[i, j] = a_i
    ss = torch.where(strict, rep, 0.0).cumsum(-2)            # ss[i, j] = sum_{j < r <= i} a_r
    return torch.where(mask, ss, float("-inf")).exp()


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
             return_final_states=False):
    """Chunked SSD scan. x (b,l,h,p) dt (b,l,h) A (h,) B,C (b,l,g,n) -> out (b,l,h,p) in x's dtype
    [, final_states (b,h,p,n), or (nseq,h,p,n) with cu_seqlens; float32 (float64 for float64 x)]."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    dev = x.device
    cdt = compute_dtype(x)
    nseq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 0
    init = None if initial_states is None else initial_states.to(cdt)
    seg = _segments(b, l, seq_idx, cu_seqlens, dev)

    # state every row starts from (cu_seqlens: the first non-empty sequence's)
    if init is None:
        s0 = x.new_zeros(b, h, p, n, dtype=cdt)
    elif cu_seqlens is not None:
        s0 = init[seg[:, 0]] if l > 0 else init[:1]
    else:
        s0 = init
    if l == 0:
        out = x.new_zeros(b, 0, h, p)
        if not return_final_states:
            return out
        if cu_seqlens is not None:
            return out, init.clone() if init is not None else x.new_zeros(nseq, h, p, n, dtype=cdt)
        return out, s0.clone()

    Q = min(chunk_size, l)
    nc = -(-l // Q)
    pad = nc * Q - l
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    # padding: dt = 0 (no decay, no input) and the last segment id, so the state passes unchanged
    xc = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, r, p)
    dtc = F.pad(dtp, (0, 0, 0, pad)).view(b, nc, Q, g, r)
    Bc = F.pad(B.to(cdt), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    Cc = F.pad(C.to(cdt), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    if seg is None:
        segc = torch.zeros(b, nc, Q, dtype=torch.int64, device=dev)
    else:
        segc = torch.cat([seg, seg[:, -1:].expand(b, pad)], 1).view(b, nc, Q)

    a = (dtc * A.to(cdt).view(g, r)).permute(0, 1, 3, 4, 2)  # (b, nc, g, r, Q)
    xdt = xc * dtc[..., None]                               # (b, nc, Q, g, r, p)
    tri = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    same = (segc[..., :, None] == segc[..., None, :]) & tri  # (b, nc, Q_i, Q_j)
    L = _segsum(a, same[:, :, None, None])                   # (b, nc, g, r, Q_i, Q_j)

    # 1. intra-chunk: (C B^T o decay mask) @ (dt x)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", CB[:, :, :, None] * L, xdt)

    # 2. each chunk's own end state, from zero
    U = torch.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", L[..., -1, :], xdt, Bc)

    # positions whose segment started before the chunk continue its incoming state
    seg_prev = torch.cat([segc[:, :1, 0], segc[:, :-1, -1]], 1)        # (b, nc)
    cont = segc == seg_prev[:, :, None]                                 # (b, nc, Q)
    segcum = torch.einsum("bcij,bcgrj->bcgri", same.to(cdt), a)        # decay since segment/chunk start
    contd = cont[:, :, None, None]
    decay_in = torch.where(contd, segcum, float("-inf")).exp()         # (b, nc, g, r, Q)

    # packed sequences with initial states: a sequence starting inside a chunk starts from init[k]
    if cu_seqlens is not None and init is not None:
        ig = init.view(nseq, g, r, p, n)[segc]                         # (b, nc, Q, g, r, p, n)
        decay_new = torch.where(contd, float("-inf"), segcum).exp()
        y = y + torch.einsum("bcign,bcigrpn->bcigrp", Cc, ig) * decay_new.permute(0, 1, 4, 2, 3)[..., None]
        U = U + decay_new[..., -1, None, None] * ig[:, :, -1]

    # 3. inter-chunk state pass: S_prev[c+1] = carry[c] S_prev[c] + U[c], vectorised over chunks
    log_carry = torch.where(contd[..., -1], segcum[..., -1], float("-inf"))  # (b, nc, g, r)
    log_carry = F.pad(log_carry.permute(0, 2, 3, 1), (1, 0))               # (b, g, r, nc+1)
    nc1 = torch.ones(nc + 1, nc + 1, dtype=torch.bool, device=dev).tril()
    states = torch.cat([s0.view(b, 1, g, r, p, n), U], 1)                 # (b, nc+1, g, r, p, n)
    passed = torch.einsum("bgrzc,bcgrpn->bzgrpn", _segsum(log_carry, nc1), states)
    s_prev = passed[:, :nc]

    # 4. state in: exp(decay since chunk start) C_i . S_prev
    y_in = torch.einsum("bcign,bcgrpn->bcigrp", Cc, s_prev)
    y = y + y_in * decay_in.permute(0, 1, 4, 2, 3)[..., None]

    y = y.reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + _d_term(D.to(cdt), x.to(cdt))
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(x.dtype).contiguous()
    if not return_final_states:
        return out
    if cu_seqlens is None:
        return out, passed[:, nc].reshape(b, h, p, n)
    return out, _packed_final_states(cu_seqlens, init, Q, L, xdt, Bc, segcum, cont, s_prev)


def _packed_final_states(cu_seqlens, init, Q, L, xdt, Bc, segcum, cont, s_prev):
    """State after each packed sequence's last token (init[k] or 0 for an empty sequence)."""
    _, nc, g, r, _, _ = L.shape
    p, n = xdt.shape[-1], Bc.shape[-1]
    cu = cu_seqlens.to(device=xdt.device, dtype=torch.int64)
    nseq = cu.shape[0] - 1
    last = (cu[1:] - 1).clamp(min=0)
    c, i = last // Q, last % Q
    rows = L[0].permute(0, 3, 1, 2, 4)[c, i]                           # (nseq, g, r, Q_j)
    S = torch.einsum("kgrj,kjgrp,kjgn->kgrpn", rows, xdt[0, c], Bc[0, c])
    dec = segcum[0].permute(0, 3, 1, 2)[c, i].exp()[..., None, None]   # (nseq, g, r, 1, 1)
    inside = cont[0, c, i].view(nseq, 1, 1, 1, 1)
    S = S + torch.where(inside, dec * s_prev[0, c], 0.0)
    if init is not None:
        init_k = init.view(nseq, g, r, p, n)
        S = S + torch.where(inside, 0.0, dec * init_k)
    else:
        init_k = torch.zeros_like(S)
    S = torch.where((cu[1:] > cu[:-1]).view(nseq, 1, 1, 1, 1), S, init_k)
    return S.reshape(nseq, g * r, p, n)


def ssd_scan_naive(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None,
                   initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                   dt_limit=_NO_LIMIT, return_final_states=False):
    """The oracle: the recurrence, one step at a time (chunk_size is ignored)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    decay = torch.exp(dtp * A.to(cdt))                                  # (b, l, h)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=2)                     # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=2)
    init = None if initial_states is None else initial_states.to(cdt)
    zero = xf.new_zeros(b, h, p, n)

    def step(S, t):
        S = decay[:, t, :, None, None] * S + (dtp[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        return S, torch.einsum("bhpn,bhn->bhp", S, Ch[:, t])

    ys = []
    if cu_seqlens is not None:                                          # b == 1: one sequence at a time
        cu = [int(v) for v in cu_seqlens.tolist()]
        finals = []
        for k in range(len(cu) - 1):
            S = zero if init is None else init[k:k + 1]
            for t in range(cu[k], cu[k + 1]):
                S, y = step(S, t)
                ys.append(y)
            finals.append(S[0])
        final = torch.stack(finals) if finals else xf.new_zeros(0, h, p, n)
    else:
        S = zero if init is None else init
        for t in range(l):
            if seq_idx is not None and t > 0:
                reset = (seq_idx[:, t] != seq_idx[:, t - 1]).view(b, 1, 1, 1)
                S = torch.where(reset, 0.0, S)
            S, y = step(S, t)
            ys.append(y)
        final = S
    y = torch.stack(ys, 1) if ys else xf.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + _d_term(D.to(cdt), xf)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(x.dtype).contiguous()
    return (out, final) if return_final_states else out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=_NO_LIMIT):
    """One decode step. state (b,h,p,n) updated in place (computed in fp32, written back in its
    dtype); x (b,h,p) dt (b,h) B,C (b,g,n) -> out (b,h,p) in x's dtype."""
    h = x.shape[1]
    g = B.shape[1]
    cdt = compute_dtype(x, state)
    xf = x.to(cdt)
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)       # (b, h)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=1)                     # (b, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=1)
    S = torch.exp(dtp * A.to(cdt))[..., None, None] * state.to(cdt) \
        + (dtp[..., None] * xf)[..., None] * Bh[:, :, None, :]
    state.copy_(S)
    y = torch.einsum("bhpn,bhn->bhp", S, Ch)
    if D is not None:
        y = y + _d_term(D.to(cdt), xf)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
