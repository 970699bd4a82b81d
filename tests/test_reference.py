"""CPU tests of the PyTorch references (mlmamba_kernels.reference), float64 on random inputs.

Every test draws a fresh seed and prints it; rerun one with MLMAMBA_TEST_SEED=<seed>.
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from mlmamba_kernels.reference import (causal_conv1d, causal_conv1d_update, msc_scan, process_dt,
                                       scan_orders, ssd_scan, ssd_scan_naive, ssd_state_update)

F64 = torch.float64


@pytest.fixture
def gen():
    seed = int(os.environ.get("MLMAMBA_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}: rerun with MLMAMBA_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=F64)


def noncontig(t):
    """The same values in a non-contiguous view (every stride doubled)."""
    buf = t.new_zeros(*t.shape, 2)
    buf[..., 0] = t
    return buf[..., 0]


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


# ---------------------------------------------------------------- SSD scan

def resets(gen, b, l, chunk):
    """seq_idx (b, l) int32 with several resets, one exactly on a chunk boundary (t = chunk)."""
    seq = torch.zeros(b, l, dtype=torch.int32)
    for i in range(b):
        cand = {chunk, chunk - 1, l // 3, l - 1, int(torch.randint(1, max(l, 2), (1,), generator=gen))}
        for t in sorted(c for c in cand if 0 < c < l):
            seq[i, t:] += int(torch.randint(1, 3, (1,), generator=gen))
    return seq


def ssd_inputs(gen, b, l, h, p, g, n, chunk, features):
    """(args, kwargs) for ssd_scan; features is a set of names, "all" switches everything on."""
    every = {"D_hp", "z", "dt_bias", "dt_limit", "initial_states", "seq_idx", "final"}
    on = every if "all" in features else set(features)
    x = noncontig(randn(gen, b, l, h, p))
    A = -(rand(gen, h) * 1.5 + 0.05)
    B = noncontig(randn(gen, b, l, g, n))
    C = randn(gen, b, l, g, n)
    kw = {}
    if "dt_bias" in on or "dt_limit" in on:
        dt = noncontig(randn(gen, b, l, h))
        kw.update(dt_bias=randn(gen, h) * 0.5, dt_softplus=True)
        if "dt_limit" in on:
            kw["dt_limit"] = (0.3, 1.2)
    else:
        dt = rand(gen, b, l, h) * 0.8 + 0.01
    if "D_h" in on:
        kw["D"] = randn(gen, h)
    if "D_hp" in on:
        kw["D"] = randn(gen, h, p)
    if "z" in on:
        kw["z"] = noncontig(randn(gen, b, l, h, p))
    if "initial_states" in on:
        kw["initial_states"] = randn(gen, b, h, p, n)
    if "seq_idx" in on:
        kw["seq_idx"] = resets(gen, b, l, chunk)
    kw["return_final_states"] = "final" in on or "initial_states" in on
    return (x, dt, A, B, C, chunk), kw


def check_against_naive(args, kw, tol=1e-10):
    got = ssd_scan(*args, **kw)
    want = ssd_scan_naive(*args, **kw)
    if kw.get("return_final_states"):
        close(got[0], want[0], tol)
        close(got[1], want[1], tol)
        assert got[1].dtype == F64
    else:
        close(got, want, tol)


FEATURES = [(), ("D_h",), ("D_hp",), ("z",), ("dt_bias",), ("dt_limit",), ("initial_states",),
            ("seq_idx",), ("final",), ("all",)]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "+".join(f) or "plain")
def test_ssd_chunked_matches_naive_each_feature(gen, features):
    for l, chunk in [(65, 16), (130, 64)]:
        args, kw = ssd_inputs(gen, 2, l, 4, 3, 2, 5, chunk, features)
        check_against_naive(args, kw)


@pytest.mark.parametrize("l", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [64, 16])
def test_ssd_chunked_matches_naive_lengths(gen, l, chunk):
    args, kw = ssd_inputs(gen, 2, l, 4, 3, 2, 5, chunk, {"all"})
    check_against_naive(args, kw)


@pytest.mark.parametrize("g", [1, 2, 6])
def test_ssd_groups(gen, g):
    args, kw = ssd_inputs(gen, 2, 70, 6, 2, g, 3, 16, {"all"})
    check_against_naive(args, kw)
    # head i reads group i // (h // g): the same as repeating B and C per head
    x, dt, A, B, C, chunk = args
    Bh, Ch = (t.repeat_interleave(6 // g, dim=2) for t in (B, C))
    close(ssd_scan(*args, **kw)[0], ssd_scan(x, dt, A, Bh, Ch, chunk, **kw)[0])


def test_ssd_initial_states_only_first_segment(gen):
    args, kw = ssd_inputs(gen, 2, 50, 2, 3, 1, 4, 16, {"initial_states", "seq_idx"})
    x, dt, A, B, C, chunk = args
    t0 = int((kw["seq_idx"][0] != kw["seq_idx"][0, 0]).int().argmax())   # first reset of row 0
    kw2 = dict(kw, initial_states=kw["initial_states"] * 3.0)
    close(ssd_scan(*args, **kw)[0][0, t0:], ssd_scan(*args, **kw2)[0][0, t0:])
    assert (ssd_scan(*args, **kw)[0][0, :t0] - ssd_scan(*args, **kw2)[0][0, :t0]).abs().max() > 1e-6


def cu_case(gen, lens, chunk, with_init, features=("D_hp", "z", "dt_bias"), dims=(4, 3, 2, 5)):
    l = sum(lens)
    h, p, g, n = dims
    args, kw = ssd_inputs(gen, 1, l, h, p, g, n, chunk, set(features))
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    kw.update(cu_seqlens=cu, return_final_states=True)
    if with_init:
        kw["initial_states"] = randn(gen, len(lens), h, p, n)
    return args, kw


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk", [16, 64])
def test_ssd_cu_seqlens(gen, with_init, chunk):
    lens = [0, 1, 17, 0, 16, 40, 1, 0, 5, 0]
    args, kw = cu_case(gen, lens, chunk, with_init)
    check_against_naive(args, kw)
    # each packed sequence equals its own call (its initial state in, its final state out)
    x, dt, A, B, C, _ = args
    out, final = ssd_scan(*args, **kw)
    cu = kw["cu_seqlens"].tolist()
    for k in range(len(lens)):
        s, e = cu[k], cu[k + 1]
        init = kw["initial_states"][k:k + 1] if with_init else None
        if s == e:
            close(final[k], init[0] if with_init else torch.zeros_like(final[k]))
            continue
        one = ssd_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk, D=kw["D"],
                       z=kw["z"][:, s:e], dt_bias=kw["dt_bias"], dt_softplus=True,
                       initial_states=init, return_final_states=True)
        close(out[:, s:e], one[0])
        close(final[k], one[1][0])


def test_ssd_cu_seqlens_all_empty_or_single(gen):
    for lens in ([1], [0, 3, 0], [1, 1, 1]):
        args, kw = cu_case(gen, lens, 16, True)
        check_against_naive(args, kw)


@pytest.mark.parametrize("split", [1, 23, 32, 64])
def test_ssd_final_states_chain(gen, split):
    l, chunk = 97, 16
    args, kw = ssd_inputs(gen, 2, l, 4, 3, 2, 5, chunk, {"D_hp", "z", "dt_bias", "dt_limit", "initial_states"})
    x, dt, A, B, C, _ = args
    whole, final = ssd_scan(*args, **kw)
    cut = lambda t, a, b_: None if t is None else t[:, a:b_]
    kw1 = dict(kw, z=cut(kw["z"], 0, split))
    out1, mid = ssd_scan(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], chunk, **kw1)
    kw2 = dict(kw, z=cut(kw["z"], split, l), initial_states=mid)
    out2, end = ssd_scan(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], chunk, **kw2)
    close(torch.cat([out1, out2], 1), whole)
    close(end, final)


def test_ssd_gradients_match_naive(gen):
    args, kw = ssd_inputs(gen, 2, 37, 4, 2, 2, 3, 8, {"all"})
    x, dt, A, B, C, chunk = args
    leaves = [x, dt, A, B, C, kw["D"], kw["z"], kw["dt_bias"], kw["initial_states"]]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

    def grads(fn):
        x_, dt_, A_, B_, C_, D_, z_, bias_, init_ = leaves
        out, final = fn(x_, dt_, A_, B_, C_, chunk, D=D_, z=z_, dt_bias=bias_, initial_states=init_,
                        seq_idx=kw["seq_idx"], dt_softplus=True, dt_limit=(0.05, 3.0),
                        return_final_states=True)
        loss = (out * wo).sum() + (final * wf).sum()
        return torch.autograd.grad(loss, leaves)

    wo, wf = randn(gen, 2, 37, 4, 2), randn(gen, 2, 4, 2, 3)
    for name, a, b in zip(names, grads(ssd_scan), grads(ssd_scan_naive)):
        assert torch.isfinite(a).all(), name
        close(a, b, 1e-9)


def test_ssd_gradcheck_packed(gen):
    lens = [3, 0, 6, 2]
    args, kw = cu_case(gen, lens, 4, True, features=("D_h", "dt_bias"), dims=(2, 2, 1, 2))
    x, dt, A, B, C, chunk = args
    inputs = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, kw["initial_states"])]

    def fn(x_, dt_, A_, B_, C_, init_):
        return ssd_scan(x_, dt_, A_, B_, C_, chunk, D=kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True,
                        cu_seqlens=kw["cu_seqlens"], initial_states=init_, return_final_states=True)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_ssd_dtypes(gen):
    args, kw = ssd_inputs(gen, 2, 70, 4, 8, 2, 16, 32, {"all"})
    x, dt, A, B, C, chunk = args
    want, want_final = ssd_scan_naive(*args, **kw)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]:
        lo = lambda t: t.to(dtype)
        kw_lo = dict(kw, z=lo(kw["z"]), initial_states=kw["initial_states"].float())
        out, final = ssd_scan(lo(x), lo(dt), A.float(), lo(B), lo(C), chunk, **kw_lo)
        assert out.dtype == dtype and final.dtype == torch.float32 and out.is_contiguous()
        assert out.is_contiguous() and final.shape == (2, 4, 8, 16)
        # compare against float64 computed from the same rounded inputs
        ref, ref_final = ssd_scan_naive(lo(x).double(), lo(dt).double(), A.float().double(),
                                        lo(B).double(), lo(C).double(), chunk,
                                        **dict(kw_lo, z=kw_lo["z"].double(),
                                               initial_states=kw_lo["initial_states"].double()))
        close(out.double(), ref, tol)
        close(final.double(), ref_final, 1e-4)


def test_process_dt(gen):
    dt, bias = randn(gen, 3, 5, 4) * 3, randn(gen, 4)
    want = torch.log1p(torch.exp(dt + bias)).clamp(0.2, 2.0)
    close(process_dt(dt, bias, True, (0.2, 2.0)), want)
    close(process_dt(dt, None, False), dt)
    assert process_dt(dt.to(torch.bfloat16)).dtype == torch.float32
    assert process_dt(dt).dtype == F64


def test_ssd_chunked_is_fast():
    b, l, h, p, n = 2, 512, 8, 16, 16
    x, z = torch.randn(b, l, h, p), torch.randn(b, l, h, p)
    dt, A = torch.randn(b, l, h), -torch.rand(h) - 0.1
    B, C = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    ssd_scan(x, dt, A, B, C, 256, D=torch.randn(h), z=z, dt_softplus=True)   # warm up
    t = time.perf_counter()
    ssd_scan(x, dt, A, B, C, 256, D=torch.randn(h), z=z, dt_softplus=True, return_final_states=True)
    assert time.perf_counter() - t < 2.0


# ---------------------------------------------------------------- causal conv1d

def conv_oracle(x, weight, bias, act, init, seq_idx):
    """F.conv1d (cross-correlation, zero padding) run separately on every seq_idx segment."""
    b, d, l = x.shape
    w = weight.shape[1]
    out = torch.zeros(b, d, l, dtype=F64)
    for i in range(b):
        bounds = [0] + [t for t in range(1, l) if seq_idx is not None and seq_idx[i, t] != seq_idx[i, t - 1]] + [l]
        for s, e in zip(bounds[:-1], bounds[1:]):
            front = init[i] if (init is not None and s == 0) else torch.zeros(d, w - 1, dtype=F64)
            seg = torch.cat([front, x[i, :, s:e]], 1)[None]
            out[i, :, s:e] = F.conv1d(seg, weight[:, None, :], bias, groups=d)[0]
    return F.silu(out) if act == "silu" else out


def conv_input(gen, b, d, l, layout):
    if layout == "channel_last":
        return randn(gen, b, l, d).transpose(1, 2)
    if layout == "sliced":   # a slice of a fused projection: neither dim contiguous
        return randn(gen, b, l, 2 * d + 3)[:, :, 1:2 * d + 1:2].transpose(1, 2)
    return randn(gen, b, d, l)


@pytest.mark.parametrize("w", range(2, 9))
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "sliced"])
def test_conv_matches_f_conv1d(gen, w, layout):
    b, d = 2, 5
    for l, feats in [(1, "init"), (max(w - 2, 1), "init"), (37, ""), (37, "bias silu init"), (40, "seq init silu")]:
        x = conv_input(gen, b, d, l, layout)
        weight = randn(gen, d, w)
        bias = randn(gen, d) if "bias" in feats else None
        act = "silu" if "silu" in feats else None
        init = randn(gen, b, d, w - 1) if "init" in feats else None
        seq = resets(gen, b, l, 16) if "seq" in feats else None
        out, final = causal_conv1d(x, weight, bias, act, init, True, seq)
        close(out, conv_oracle(x, weight, bias, act, init, seq))
        prev = init if init is not None else torch.zeros(b, d, w - 1, dtype=F64)
        close(final, torch.cat([prev, x], 2)[:, :, -(w - 1):])
        assert final.is_contiguous() and final.shape == (b, d, w - 1)
        if layout == "channel_last" and d > 1:
            assert out.stride(1) == 1
        else:
            assert out.is_contiguous()


def test_conv_dtypes(gen):
    x = randn(gen, 2, 7, 33, dtype=torch.bfloat16)
    weight, init = randn(gen, 7, 4), randn(gen, 2, 7, 3, dtype=torch.bfloat16)
    out, final = causal_conv1d(x, weight.float(), None, "silu", init, True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    want = conv_oracle(x.double(), weight.float().double(), None, "silu", init.double(), None)
    close(out.double(), want, 1e-2)
    assert torch.equal(final, x[:, :, -3:])


def test_conv_gradients_finite_and_correct(gen):
    x = randn(gen, 2, 3, 11).requires_grad_()
    weight, bias, init = (randn(gen, *s).requires_grad_() for s in [(3, 4), (3,), (2, 3, 3)])
    seq = resets(gen, 2, 11, 4)
    fn = lambda *a: causal_conv1d(*a[:2], a[2], "silu", a[3], True, seq)
    assert torch.autograd.gradcheck(fn, (x, weight, bias, init), fast_mode=True)


@pytest.mark.parametrize("w", [2, 4, 8])
def test_conv_update_matches_full(gen, w):
    b, d, l0, l1 = 3, 6, 5, 9
    x = conv_input(gen, b, d, l0 + l1, "channel_last")
    weight, bias = randn(gen, d, w), randn(gen, d)
    full = causal_conv1d(x, weight, bias, "silu")
    _, state = causal_conv1d(x[:, :, :l0], weight, bias, "silu", None, True)
    got = []
    for t in range(l0, l0 + 4):                       # one token at a time, x (b, d)
        got.append(causal_conv1d_update(x[:, :, t], state, weight, bias, "silu")[:, :, None])
    got.append(causal_conv1d_update(x[:, :, l0 + 4:], state, weight, bias, "silu"))  # the rest at once
    close(torch.cat(got, 2), full[:, :, l0:])
    close(state, x[:, :, -(w - 1):])


# ---------------------------------------------------------------- decode = prefill

@pytest.mark.parametrize("prefill", [0, 2, 21])
def test_decode_loop_matches_full_sequence(gen, prefill):
    """A Mamba-2 mixer core: causal_conv1d(silu) + ssd_scan over the sequence equals
    causal_conv1d_update + ssd_state_update token by token (after an optional prefill)."""
    b, l, h, p, g, n, w = 2, 30, 4, 3, 2, 5, 4
    cd = h * p + 2 * g * n
    xBC = randn(gen, b, l, cd)
    weight, cbias = randn(gen, cd, w) * 0.5, randn(gen, cd)
    dt, A = randn(gen, b, l, h), -(rand(gen, h) + 0.1)
    D, z, dt_bias = randn(gen, h, p), randn(gen, b, l, h, p), randn(gen, h)
    lim = (0.05, 2.0)

    def core(xbc, dt_, z_, conv_init=None, ssm_init=None):
        xc, conv_final = causal_conv1d(xbc.transpose(1, 2), weight, cbias, "silu", conv_init, True)
        xs, Bs, Cs = torch.split(xc.transpose(1, 2), [h * p, g * n, g * n], -1)
        L = xbc.shape[1]
        y, ssm_final = ssd_scan(xs.reshape(b, L, h, p), dt_, A, Bs.reshape(b, L, g, n),
                                Cs.reshape(b, L, g, n), 8, D=D, z=z_, dt_bias=dt_bias,
                                dt_softplus=True, dt_limit=lim, initial_states=ssm_init,
                                return_final_states=True)
        return y, conv_final, ssm_final

    full = core(xBC, dt, z)[0]
    _, conv_state, ssm_state = core(xBC[:, :prefill], dt[:, :prefill], z[:, :prefill])
    conv_state = conv_state.clone()
    for t in range(prefill, l):
        xc = causal_conv1d_update(xBC[:, t], conv_state, weight, cbias, "silu")
        xs, Bs, Cs = torch.split(xc, [h * p, g * n, g * n], -1)
        y = ssd_state_update(ssm_state, xs.reshape(b, h, p), dt[:, t], A, Bs.reshape(b, g, n),
                             Cs.reshape(b, g, n), D=D, z=z[:, t], dt_bias=dt_bias,
                             dt_softplus=True, dt_limit=lim)
        close(y, full[:, t])


def test_state_update_low_precision_state(gen):
    b, h, p, g, n = 2, 4, 8, 1, 16
    state = randn(gen, b, h, p, n, dtype=torch.bfloat16)
    x, dt, A = randn(gen, b, h, p, dtype=torch.bfloat16), randn(gen, b, h), -(rand(gen, h) + 0.1)
    B, C = randn(gen, b, g, n), randn(gen, b, g, n)
    ref_state = state.double()
    want = ssd_state_update(ref_state, x.double(), dt, A, B, C, dt_softplus=True)
    y = ssd_state_update(state, x, dt.float(), A.float(), B.float(), C.float(), dt_softplus=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    close(state.double(), ref_state, 1e-2)
    close(y.double(), want, 2e-2)


# ---------------------------------------------------------------- multi-order scan

def msc_inputs(gen, b, H, W, k, h=4, p=2, g=2, n=3, w=4, bias=True):
    L, cd = H * W, h * p + 2 * g * n
    return dict(xBC=randn(gen, b, L, cd), dt=randn(gen, b, L, h), A=-(rand(gen, k, h) + 0.1),
                D=randn(gen, k, h), conv_weight=randn(gen, k, cd, w) * 0.5,
                conv_bias=randn(gen, k, cd) if bias else None, dt_bias=randn(gen, k, h),
                headdim=p, ngroups=g)


def one_scan(inp, i, xBC, dt, lim):
    """conv(silu) + ssd_scan of scan i on an explicitly permuted copy."""
    b, L, _ = xBC.shape
    h, p, g = dt.shape[2], inp["headdim"], inp["ngroups"]
    n = (xBC.shape[2] - h * p) // (2 * g)
    bias = None if inp["conv_bias"] is None else inp["conv_bias"][i]
    xc = causal_conv1d(xBC.transpose(1, 2).contiguous(), inp["conv_weight"][i], bias, "silu")
    xs, Bs, Cs = torch.split(xc.transpose(1, 2), [h * p, g * n, g * n], -1)
    return ssd_scan(xs.reshape(b, L, h, p), dt, inp["A"][i], Bs.reshape(b, L, g, n),
                    Cs.reshape(b, L, g, n), 16, D=inp["D"][i], dt_bias=inp["dt_bias"][i],
                    dt_softplus=True, dt_limit=lim)


def test_msc_identity_order_is_conv_plus_ssd(gen):
    inp = msc_inputs(gen, 2, 3, 7, 1)
    order = torch.arange(21)[None]
    got = msc_scan(**inp, orders=order, merge=None)
    assert got.shape == (1, 2, 21, 4, 2)
    close(got[0], one_scan(inp, 0, inp["xBC"], inp["dt"], (0.0, float("inf"))))


@pytest.mark.parametrize("H,W", [(5, 3), (1, 7), (4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_msc_cross_is_four_permuted_scans(gen, H, W, bias):
    inp = msc_inputs(gen, 2, H, W, 4, bias=bias)
    orders = scan_orders(H, W, "cross")
    lim = (0.01, 4.0)
    want = []
    for i in range(4):
        o = orders[i]
        y = one_scan(inp, i, inp["xBC"][:, o], inp["dt"][:, o], lim)
        back = torch.empty_like(y)
        back[:, o] = y                          # step t's output lands at raster position o[t]
        want.append(back)
    want = torch.stack(want)
    close(msc_scan(**inp, orders=orders, dt_limit=lim, merge="none"), want)
    close(msc_scan(**inp, orders=orders, dt_limit=lim, merge="sum"), want.sum(0))
    close(msc_scan(**inp, orders=orders, dt_limit=lim), want.mean(0))


def test_msc_low_precision_and_grad(gen):
    inp = msc_inputs(gen, 1, 3, 5, 2)
    orders = scan_orders(3, 5, "bidirectional")
    want = msc_scan(**inp, orders=orders)
    lo = dict(inp, xBC=inp["xBC"].to(torch.bfloat16))
    got = msc_scan(**lo, orders=orders)
    assert got.dtype == torch.bfloat16
    close(got.double(), msc_scan(**dict(inp, xBC=lo["xBC"].double()), orders=orders), 2e-2)
    xBC = inp["xBC"].clone().requires_grad_()
    msc_scan(**dict(inp, xBC=xBC), orders=orders).sum().backward()
    assert torch.isfinite(xBC.grad).all() and xBC.grad.abs().sum() > 0
    assert want.shape == (1, 15, 4, 2)


# ---------------------------------------------------------------- scan orders

def test_scan_orders_named():
    o = scan_orders(5, 3, "cross")
    assert o.dtype == torch.int64 and o.shape == (4, 15)
    r, c = 3, 2                                  # grid cell (row 3, col 2) has raster index 11
    assert o[0, r * 3 + c] == 11                 # row-major step
    assert o[1, c * 5 + r] == 11                 # column-major step
    assert torch.equal(o[2], o[0].flip(0)) and torch.equal(o[3], o[1].flip(0))
    assert torch.equal(scan_orders(5, 3, "bidirectional"), o[[0, 2]])
    assert torch.equal(scan_orders(1, 1, "cross"), torch.zeros(4, 1, dtype=torch.int64))
    one_row = scan_orders(1, 7, "cross")
    assert torch.equal(one_row[0], torch.arange(7)) and torch.equal(one_row[1], torch.arange(7))
    assert torch.equal(one_row[2], torch.arange(7).flip(0))


def test_scan_orders_custom(gen):
    perm = torch.randperm(15, generator=gen)
    o = scan_orders(5, 3, ["col_rev", perm, perm.tolist()])
    assert torch.equal(o[0], scan_orders(5, 3, "cross")[3])
    assert torch.equal(o[1], perm) and torch.equal(o[2], perm)


def test_scan_orders_rejects_bad_orders():
    bad = torch.arange(15)
    bad[4] = 5
    with pytest.raises(ValueError, match="order 1 is not a permutation"):
        scan_orders(5, 3, ["row", bad])
    with pytest.raises(ValueError, match="order 0"):
        scan_orders(5, 3, [torch.arange(14)])
    with pytest.raises(ValueError, match="order 0"):
        scan_orders(2, 2, [[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="unknown order name"):
        scan_orders(2, 2, ["diagonal"])
    with pytest.raises(ValueError, match="kind"):
        scan_orders(2, 2, "spiral")


def test_empty_sequence(gen):
    x, dt, B = randn(gen, 2, 0, 4, 3), randn(gen, 2, 0, 4), randn(gen, 2, 0, 2, 5)
    A, init = -rand(gen, 4), randn(gen, 2, 4, 3, 5)
    out, final = ssd_scan(x, dt, A, B, B, 64, initial_states=init, return_final_states=True)
    assert out.shape == (2, 0, 4, 3)
    close(final, init)
    cu = torch.zeros(3, dtype=torch.int32)
    out, final = ssd_scan(x[:1], dt[:1], A, B[:1], B[:1], 64, cu_seqlens=cu, return_final_states=True)
    assert out.shape == (1, 0, 4, 3) and final.shape == (2, 4, 3, 5) and not final.any()
    xc, cinit = randn(gen, 2, 3, 0), randn(gen, 2, 3, 3)
    out, final = causal_conv1d(xc, randn(gen, 3, 4), None, "silu", cinit, True,
                               torch.zeros(2, 0, dtype=torch.int32))
    assert out.shape == (2, 3, 0)
    close(final, cinit)
