"""The custom-op path on CPU: opcheck on every op, torch.compile, autograd, clear errors."""
import pytest
import torch
import torch.nn.functional as F

import mlmamba_kernels as mk
from mlmamba_kernels import reference as ref

ops = torch.ops.mlmamba


def _r(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)


def ssd_inputs(g, b=2, l=37, h=4, p=8, gr=2, n=8, dtype=torch.float32, grad=False):
    t = dict(x=_r(g, b, l, h, p), dt=_r(g, b, l, h) * 0.5, A=-torch.rand(h, generator=g) - 0.1,
             B=_r(g, b, l, gr, n), C=_r(g, b, l, gr, n), D=_r(g, h), z=_r(g, b, l, h, p),
             dt_bias=_r(g, h) * 0.1, initial_states=_r(g, b, h, p, n))
    return {k: v.to(dtype).requires_grad_(grad) for k, v in t.items()}


def conv_inputs(g, b=2, d=6, l=19, w=4, dtype=torch.float32, grad=False, channel_last=False):
    x = _r(g, b, l, d).transpose(1, 2) if channel_last else _r(g, b, d, l)
    t = dict(x=x, weight=_r(g, d, w), bias=_r(g, d), initial_states=_r(g, b, d, w - 1))
    return {k: v.to(dtype).requires_grad_(grad) for k, v in t.items()}


def msc_inputs(g, k=2, b=2, H=3, W=4, h=2, p=4, gr=1, n=4, w=4, grad=False):
    L, cd = H * W, h * p + 2 * gr * n
    t = dict(xBC=_r(g, b, L, cd), dt=_r(g, b, L, h) * 0.5, A=-torch.rand(k, h, generator=g) - 0.1,
             D=_r(g, k, h), conv_weight=_r(g, k, cd, w) * 0.5, conv_bias=_r(g, k, cd) * 0.1,
             dt_bias=_r(g, k, h) * 0.1)
    t = {kk: v.requires_grad_(grad) for kk, v in t.items()}
    return t, dict(orders=mk.scan_orders(H, W, "cross" if k == 4 else "bidirectional"),
                   headdim=p, ngroups=gr)


# ---- opcheck: schema, fake kernel, autograd registration, AOT dispatch -------------------

@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_ssd(rng, grad):
    t = ssd_inputs(rng, grad=grad)
    seq_idx = torch.tensor([[0] * 20 + [1] * 17] * 2, dtype=torch.int32)
    torch.library.opcheck(ops.ssd_scan_fwd, (t["x"], t["dt"], t["A"], t["B"], t["C"], 16, t["D"],
                          t["z"], t["dt_bias"], t["initial_states"], seq_idx, None, True, 0.0,
                          float("inf"), True))
    dout = _r(rng, *t["x"].shape)
    t = {k: v.detach() for k, v in t.items()}  # backward ops are not differentiable again
    torch.library.opcheck(ops.ssd_scan_bwd, (dout, None, t["x"], t["dt"], t["A"], t["B"], t["C"],
                          16, None, None, t["dt_bias"], None, None, None, True, 0.0, 0.5))
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        xg = t["x"].clone().requires_grad_(True)
        g = ops.ssd_scan_bwd(dout, None, xg, t["dt"], t["A"], t["B"], t["C"], 16, None, None,
                             None, None, None, None, False, 0.0, float("inf"))
        g[0].sum().backward()


def test_opcheck_ssd_cu_seqlens(rng):
    t = ssd_inputs(rng, b=1, l=30)
    cu = torch.tensor([0, 7, 7, 30], dtype=torch.int32)
    init = _r(rng, 3, 4, 8, 8)
    torch.library.opcheck(ops.ssd_scan_fwd, (t["x"], t["dt"], t["A"], t["B"], t["C"], 8, None,
                          None, None, init, None, cu, False, 0.0, float("inf"), True))


def test_opcheck_state_update(rng):
    state = _r(rng, 2, 4, 8, 8)
    torch.library.opcheck(ops.ssd_state_update, (state, _r(rng, 2, 4, 8), _r(rng, 2, 4),
                          -torch.rand(4), _r(rng, 2, 2, 8), _r(rng, 2, 2, 8), _r(rng, 4, 8),
                          _r(rng, 2, 4, 8), _r(rng, 4), True))


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_conv(rng, channel_last, grad):
    t = conv_inputs(rng, grad=grad, channel_last=channel_last)
    seq_idx = torch.tensor([[0] * 9 + [1] * 10] * 2, dtype=torch.int32)
    torch.library.opcheck(ops.causal_conv1d_fwd, (t["x"], t["weight"], t["bias"],
                          t["initial_states"], seq_idx, True, True))
    torch.library.opcheck(ops.causal_conv1d_fwd, (t["x"], t["weight"], None, None, None, False,
                          False))
    torch.library.opcheck(ops.causal_conv1d_update, (_r(rng, 2, 6, 3), _r(rng, 2, 6, 3),
                          t["weight"].detach(), None, True))


@pytest.mark.parametrize("merge", ["mean", "none"])
@pytest.mark.parametrize("save", [(False, False), (True, False), (False, True), (True, True)])
def test_opcheck_msc(rng, merge, save):
    t, o = msc_inputs(rng, grad=True, H=9, W=8)
    torch.library.opcheck(ops.msc_scan_fwd, (t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"],
                          t["conv_bias"], t["dt_bias"], o["orders"], o["headdim"], o["ngroups"],
                          0.0, float("inf"), merge, *save))


# ---- autograd through the op equals autograd through the reference -----------------------

def test_ssd_grad_matches_reference(rng):
    t = ssd_inputs(rng, dtype=torch.float64, grad=True)
    out, fin = mk.ssd_scan(**t, chunk_size=16, dt_softplus=True, return_final_states=True)
    w1, w2 = torch.randn_like(out), torch.randn_like(fin)
    g_op = torch.autograd.grad((out * w1).sum() + (fin * w2).sum(), list(t.values()))
    out, fin = ref.ssd_scan_naive(**t, dt_softplus=True, return_final_states=True)
    g_ref = torch.autograd.grad((out * w1).sum() + (fin * w2).sum(), list(t.values()))
    for name, a, b in zip(t, g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_conv_grad_matches_reference(rng):
    t = conv_inputs(rng, dtype=torch.float64, grad=True, channel_last=True)
    out, fin = mk.causal_conv1d(**t, activation="silu", return_final_states=True)
    assert out.stride(1) == 1  # channel-last in, channel-last out
    w1, w2 = torch.randn_like(out), torch.randn_like(fin)
    g_op = torch.autograd.grad((out * w1).sum() + (fin * w2).sum(), list(t.values()))
    xpad = torch.cat([t["initial_states"], t["x"]], dim=-1)
    ref_out = F.silu(F.conv1d(xpad, t["weight"].unsqueeze(1), t["bias"], groups=6))
    ref_fin = xpad[..., -3:]
    g_ref = torch.autograd.grad((ref_out * w1).sum() + (ref_fin * w2).sum(), list(t.values()))
    for name, a, b in zip(t, g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_backend_reference_equals_op(rng):
    t = ssd_inputs(rng)
    a = mk.ssd_scan(**t, chunk_size=8)
    b = mk.ssd_scan(**t, chunk_size=8, backend="reference")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        mk.ssd_scan(**t, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.ssd_scan(**t, backend="triton")


# ---- torch.compile(fullgraph=True) over a small Mamba-2-like composition -----------------

def test_compile_fullgraph(rng):
    b, l, h, p, n, w = 2, 24, 2, 4, 4, 4
    d = h * p + 2 * n

    def layer(xBC, dt, weight, bias, A, D):
        xBC = mk.causal_conv1d(xBC.transpose(1, 2), weight, bias, "silu").transpose(1, 2)
        x, B, C = torch.split(xBC, [h * p, n, n], dim=-1)
        y = mk.ssd_scan(x.reshape(b, l, h, p), dt, A, B.reshape(b, l, 1, n),
                        C.reshape(b, l, 1, n), chunk_size=8, D=D, dt_softplus=True)
        return y.sum()

    args = (_r(rng, b, l, d), _r(rng, b, l, h), _r(rng, d, w), _r(rng, d), -torch.rand(h),
            _r(rng, h))
    args = [a.requires_grad_(True) for a in args]
    eager = layer(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(*args)
    g_comp = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, b2 in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b2)


def test_compile_msc_op_with_saved_outputs(rng):
    # msc_scan_fwd with its saved (non-differentiable) outputs under torch.compile and
    # autograd, as the CUDA path calls it: the same values and gradients as eager
    t, o = msc_inputs(rng, grad=True, H=9, W=8)
    names = ("xBC", "dt", "A", "D", "conv_weight", "conv_bias", "dt_bias")

    def f(*a):
        out, cx, cbc, st = ops.msc_scan_fwd(*a, o["orders"], o["headdim"], o["ngroups"], 0.0,
                                            float("inf"), "mean", True, True)
        return out.square().sum(), cx, st

    args = [t[k] for k in names]
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert not compiled[1].requires_grad and not compiled[2].requires_grad
    for a, b2 in zip(compiled, eager):
        torch.testing.assert_close(a, b2)
    for a, b2 in zip(torch.autograd.grad(compiled[0], args), torch.autograd.grad(eager[0], args)):
        torch.testing.assert_close(a, b2)


# ---- bad input: a clear error naming the argument ----------------------------------------

def test_ssd_errors(rng):
    t = ssd_inputs(rng)
    with pytest.raises(ValueError, match="B has 3 groups, which does not divide 4 heads"):
        mk.ssd_scan(**{**t, "B": _r(rng, 2, 37, 3, 8), "C": _r(rng, 2, 37, 3, 8)})
    with pytest.raises(ValueError, match=r"ssd_scan: dt must have shape \(2, 37, 4\)"):
        mk.ssd_scan(**{**t, "dt": _r(rng, 2, 36, 4)})
    with pytest.raises(ValueError, match=r"ssd_scan: D must have shape \(4,\) or \(4, 8\)"):
        mk.ssd_scan(**{**t, "D": _r(rng, 3)})
    with pytest.raises(ValueError, match="ssd_scan: x must have dtype in"):
        mk.ssd_scan(**{**t, "x": t["x"].to(torch.int64)})
    with pytest.raises(ValueError, match="seq_idx must have dtype in \\(int32\\)"):
        mk.ssd_scan(**t, seq_idx=torch.zeros(2, 37, dtype=torch.int64))
    with pytest.raises(ValueError, match="cu_seqlens packs sequences into batch 1"):
        mk.ssd_scan(**t, cu_seqlens=torch.tensor([0, 37], dtype=torch.int32))
    one = ssd_inputs(rng, b=1)
    one.pop("initial_states")
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the length 37"):
        mk.ssd_scan(**one, cu_seqlens=torch.tensor([0, 20, 10, 37], dtype=torch.int32))
    with pytest.raises(ValueError, match="dt_limit must satisfy"):
        mk.ssd_scan(**t, dt_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        mk.ssd_scan(**t, chunk_size=0)


def test_ssd_state_update_errors(rng):
    state = _r(rng, 2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"ssd_state_update: x must have shape \(2, 4, 8\)"):
        mk.ssd_state_update(state, _r(rng, 2, 4), _r(rng, 2, 4), -torch.rand(4),
                            _r(rng, 2, 1, 8), _r(rng, 2, 1, 8))
    with pytest.raises(ValueError, match="B has 3 groups, which does not divide 4 heads"):
        mk.ssd_state_update(state, _r(rng, 2, 4, 8), _r(rng, 2, 4), -torch.rand(4),
                            _r(rng, 2, 3, 8), _r(rng, 2, 3, 8))


def test_conv_errors(rng):
    t = conv_inputs(rng)
    with pytest.raises(ValueError, match="weight width must be between 2 and 8, got 9"):
        mk.causal_conv1d(t["x"], _r(rng, 6, 9))
    with pytest.raises(ValueError, match=r"weight must have shape \(d=6, width\)"):
        mk.causal_conv1d(t["x"], _r(rng, 5, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.causal_conv1d(t["x"], t["weight"], activation="relu")
    with pytest.raises(ValueError, match=r"initial_states must have shape \(2, 6, 3\)"):
        mk.causal_conv1d(t["x"], t["weight"], initial_states=_r(rng, 2, 6, 4))
    with pytest.raises(ValueError, match="causal_conv1d: x must have shape"):
        mk.causal_conv1d(t["x"][0], t["weight"])
    with pytest.raises(ValueError, match=r"conv_state must have shape \(2, 6, 3\)"):
        mk.causal_conv1d_update(_r(rng, 2, 6), _r(rng, 2, 6, 4), t["weight"])
    # nn.Conv1d's (d, 1, w) weight is accepted
    a = mk.causal_conv1d(t["x"], t["weight"].unsqueeze(1))
    torch.testing.assert_close(a, mk.causal_conv1d(t["x"], t["weight"]))


def test_msc_errors(rng):
    t, o = msc_inputs(rng)
    bad = o["orders"].clone()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(ValueError, match=r"orders\[1\] is not a permutation of range\(12\)"):
        mk.msc_scan(**t, **{**o, "orders": bad})
    with pytest.raises(ValueError, match="ngroups=3 does not divide 2 heads"):
        mk.msc_scan(**t, **{**o, "ngroups": 3})
    with pytest.raises(ValueError, match="merge must be one of"):
        mk.msc_scan(**t, **o, merge="max")
    with pytest.raises(ValueError, match=r"A must have shape \(2, 2\)"):
        mk.msc_scan(**{**t, "A": -torch.rand(3, 2)}, **o)


def test_kernel_gaps_route_to_reference():
    from mlmamba_kernels import _checks, conv1d, ssd
    x = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    B = torch.zeros(1, 4, 1, 128, dtype=torch.bfloat16)
    assert ssd._kernel_gap(x, B, B, 1) is None
    assert "headdim 48" in ssd._kernel_gap(x[..., :48], B, B, 1)
    assert "d_state 100" in ssd._kernel_gap(x, B[..., :100], B[..., :100], 1)
    assert "B/C dtype" in ssd._kernel_gap(x, B.float(), B.float(), 1)
    assert "65536 batch rows" in ssd._kernel_gap(x, B, B, 65536)
    st = torch.zeros(1, 2, 64, 128, dtype=torch.float16)
    assert "float16 state" in ssd._update_gap(st, x[:, 0], B[:, 0], B[:, 0])
    assert conv1d._kernel_gap(torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(2, 4),
                              None) == "float64 inputs"
    assert _checks.kernel_fits("op", None, None)
    with pytest.warns(UserWarning, match="op: the CUDA kernel does not take thing"):
        assert not _checks.kernel_fits("op", None, "thing")
    with pytest.raises(ValueError, match="backend='cuda' was asked for, but the CUDA kernel"):
        _checks.kernel_fits("op", "cuda", "thing")


@pytest.mark.parametrize("merge", ["mean", "sum", None])
def test_composed_msc_equals_reference(rng, merge):
    # the unfused CUDA path of msc_scan composes the public ops; on CPU they run the references
    from mlmamba_kernels.msc import composed_msc_scan
    t, o = msc_inputs(rng, k=4, H=3, W=5)
    t = {k: v.double() for k, v in t.items()}
    a = composed_msc_scan(**t, **o, dt_limit=(0.0, float("inf")), merge=merge)
    b = mk.msc_scan(**t, **o, merge=merge)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("merge", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_msc_unfused_backward_equals_reference(rng, merge, bias):
    # the CUDA backward of msc_scan (the gather, scan, conv backward and sum ops; the scans as
    # one SSD of k h heads); on CPU the ops run their references, so it must equal autograd
    # through the reference msc_scan
    from mlmamba_kernels.msc import _bwd_ref, unfused_backward
    t, o = msc_inputs(rng, k=4, H=3, W=5, n=8)
    t = {k: v.double() for k, v in t.items()}
    if not bias:
        t["conv_bias"] = None
    k, b, L, h, p = 4, 2, 15, 2, 4
    dout = torch.randn((k, b, L, h, p) if merge == "none" else (b, L, h, p), generator=rng,
                       dtype=torch.float64)
    args = (dout, t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"], t["conv_bias"],
            t["dt_bias"], o["orders"], o["headdim"], o["ngroups"], 0.0, float("inf"), merge)
    got, want = unfused_backward(*args), _bwd_ref(*args)
    for gv, wv in zip(got, want):
        torch.testing.assert_close(gv, wv, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("merge", ["mean", "none"])
def test_msc_backward_takes_the_saved_conv(rng, merge):
    # msc_scan_fwd(save_conv=True) returns each scan's conv outputs in scan order; the backward
    # given them equals the one that recomputes them, and their shapes are the fake's (the
    # chunk states only spare the CUDA kernel a walk; test_msc_saved_states_reference)
    from mlmamba_kernels.msc import _fwd_fake, _fwd_ref, unfused_backward
    t, o = msc_inputs(rng, k=4, H=3, W=5, n=8)
    t = {k: v.double() for k, v in t.items()}
    fwd = (t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"], t["conv_bias"], t["dt_bias"],
           o["orders"], o["headdim"], o["ngroups"], 0.0, float("inf"), merge)
    out, cx, cbc, st = _fwd_ref(*fwd, True, True)
    fake = _fwd_fake(*fwd, True, True)
    assert [(x.shape, x.dtype) for x in (out, cx, cbc, st)] == [(x.shape, x.dtype) for x in fake]
    assert [x.numel() for x in _fwd_ref(*fwd)[1:]] == [0, 0, 0]
    # the scans side by side: x (b, L, k, h, p), B / C (b, L, 2, k, g n), states (b, chunks,
    # k, h, p, n)
    assert cx.shape == (2, 15, 4, 2, 4) and cbc.shape == (2, 15, 2, 4, 8)
    assert st.shape == (2, 1, 4, 2, 4, 8) and not st.any()  # one chunk: each entry state is zero
    i, L, h, p = 2, 15, 2, 4  # scan 2's token 7 is the conv of its rows orders[2][4..7]
    rows = t["xBC"][:, o["orders"][i][4:8]]
    u = torch.nn.functional.silu(torch.einsum("blc,cl->bc", rows, t["conv_weight"][i])
                                 + t["conv_bias"][i])
    torch.testing.assert_close(cx[:, 7, i].reshape(2, h * p), u[:, :h * p], rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(cbc[:, 7, :, i].reshape(2, 16), u[:, h * p:], rtol=1e-12,
                               atol=1e-12)
    dout = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    args = (dout,) + fwd[:-1] + (merge,)
    # the scans as one SSD (given the saved conv, or the states alone: the conv recomputed in
    # the saved layout) and scan by scan (nothing saved)
    want = unfused_backward(*args)
    for got in (unfused_backward(*args, cx, cbc, st), unfused_backward(*args, None, None, st)):
        for gv, wv in zip(got, want):
            torch.testing.assert_close(gv, wv, rtol=1e-12, atol=1e-12)


def test_msc_saved_states_reference(rng):
    # the reference of the saved chunk states: scan i's state entering chunk c is the state of
    # the sequential recurrence after its first 64 c tokens
    from mlmamba_kernels.msc import _fwd_ref
    from mlmamba_kernels.reference import ssd as ssd_ref
    t, o = msc_inputs(rng, k=4, H=10, W=13, n=8)  # L 130: chunks of 64, 64, 2
    t = {k: v.double() for k, v in t.items()}
    _, cx, cbc, st = _fwd_ref(t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"],
                              t["conv_bias"], t["dt_bias"], o["orders"], 4, 1, 0.0,
                              float("inf"), "mean", True, True)
    assert st.shape == (2, 3, 4, 2, 4, 8) and st.dtype == torch.bfloat16
    for i, c in ((0, 1), (3, 2)):
        t_end = 64 * c
        B, C = cbc[:, :, :, i].reshape(2, 130, 2, 1, 8).unbind(2)
        want = ssd_ref.ssd_scan_naive(cx[:, :t_end, i], t["dt"][:, o["orders"][i][:t_end]],
                                      t["A"][i], B[:, :t_end], C[:, :t_end],
                                      dt_bias=t["dt_bias"][i], dt_softplus=True,
                                      return_final_states=True)[1]
        torch.testing.assert_close(st[:, c, i].double(), want, rtol=2**-7, atol=1e-6)


def test_msc_unfused_backward_sums_through_msc_sum_rows(rng, monkeypatch):
    # float32: the per-scan gradients summed by the msc_sum_rows op (its reference on CPU) give
    # the same values as the running sums in raster order
    from mlmamba_kernels import msc as m
    t, o = msc_inputs(rng, k=4, H=3, W=5, n=8)
    dout = torch.randn(2, 15, 2, 4, generator=rng)
    args = (dout, t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"], t["conv_bias"],
            t["dt_bias"], o["orders"], o["headdim"], o["ngroups"], 0.0, float("inf"), "mean")
    got = m.unfused_backward(*args)
    monkeypatch.setattr(m, "SUM_ROWS_MAX_SCANS", 0)
    for gv, wv in zip(got, m.unfused_backward(*args)):
        assert torch.equal(gv, wv)
    for gv, wv in zip(got, m._bwd_ref(*args)):
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5)


def test_msc_sum_rows_reference(rng):
    src = [torch.randn(2, 6, 5, generator=rng) for _ in range(3)]
    inv = torch.stack([torch.randperm(6, generator=rng) for _ in range(3)]).to(torch.int32)
    got = ops.msc_sum_rows(src, inv)
    want = sum(s.double()[:, ix] for s, ix in zip(src, inv.long()))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(ops.msc_sum_rows, (src, inv))
    # scale multiplies the fp32 sum before its rounding
    torch.testing.assert_close(ops.msc_sum_rows(src, inv, 0.5).double(), want * 0.5, rtol=1e-6,
                               atol=1e-6)
    torch.library.opcheck(ops.msc_sum_rows, (src, inv, 0.5))


def test_msc_gather_rows_reference(rng):
    # out[:, t, i] = src_i[:, rows[i, t]] * scale, src shared or one per scan; a position
    # outside range(L) reads a zero row
    src = torch.randn(2, 6, 5, generator=rng)
    rows = torch.stack([torch.randperm(6, generator=rng) for _ in range(3)]).to(torch.int32)
    rows[1, 2] = 9
    got = ops.msc_gather_rows(src, rows, 0.5)
    assert got.shape == (2, 6, 3, 5)
    for i in range(3):
        for t in range(6):
            r = int(rows[i, t])
            assert torch.equal(got[:, t, i], src[:, r] * 0.5 if r < 6 else torch.zeros(2, 5))
    per = torch.randn(3, 2, 6, 5, generator=rng, dtype=torch.float64)
    got = ops.msc_gather_rows(per, rows)
    assert torch.equal(got[:, 4, 2], per[2][:, rows[2, 4].long()])
    torch.library.opcheck(ops.msc_gather_rows, (src, rows, 0.5))
    torch.library.opcheck(ops.msc_gather_rows, (per, rows))


def test_msc_conv_references(rng, monkeypatch):
    # msc_conv_fwd / _bwd (CPU: their references) equal causal_conv1d on the gathered rows, an
    # entry outside range(L) reading a zero row; the backward given the saved conv (the scans
    # as one SSD) equals the one recomputing it through msc_conv_fwd (scan by scan)
    x = torch.randn(2, 9, 12, generator=rng, dtype=torch.float64)
    w, b = torch.randn(12, 4, generator=rng), torch.randn(12, generator=rng)
    rows = torch.randperm(9, generator=rng).to(torch.int32)
    rows[3] = -2
    xs = x[:, rows.long().clamp(min=0)].clone()
    xs[:, 3] = 0
    u = ops.msc_conv_fwd(x, rows, w.double(), b.double())
    y = ops.causal_conv1d_fwd(xs.transpose(1, 2), w.double(), b.double(), None, None, True,
                              False)[0]
    torch.testing.assert_close(u, y.transpose(1, 2), rtol=1e-12, atol=1e-12)
    g = torch.randn(2, 9, 12, generator=rng, dtype=torch.float64)
    dx, dw, db = ops.msc_conv_bwd(x, rows, w.double(), b.double(), [g[..., :8], g[..., 8:]])
    want = ops.causal_conv1d_bwd(xs.transpose(1, 2), w.double(), b.double(), None, None,
                                 g.transpose(1, 2), None, True)
    for got, ref in zip((dx, dw, db), (want[0].transpose(1, 2), want[1], want[2])):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(ops.msc_conv_fwd, (x, rows, w.double(), b.double()))
    torch.library.opcheck(ops.msc_conv_bwd, (x, rows, w.double(), None, [g]))
    # k scans at once: rows (k, L), weight (k, d, w), bias (k, d), pieces (b, L, k, c)
    R = torch.stack([rows, rows.flip(0)])
    W2, B2 = torch.stack([w, 2 * w]).double(), torch.stack([b, -b]).double()
    g2 = torch.randn(2, 9, 2, 12, generator=rng, dtype=torch.float64)
    dx2, dw2, db2 = ops.msc_conv_bwd(x, R, W2, B2, [g2[..., :8], g2[..., 8:]])
    for i in range(2):
        one = ops.msc_conv_bwd(x, R[i], W2[i], B2[i], [g2[:, :, i]])
        for got, ref in zip((dx2[i], dw2[i], db2[i]), one):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.library.opcheck(ops.msc_conv_bwd, (x, R, W2, B2, [g2[..., :8], g2[..., 8:]]))
    from mlmamba_kernels import msc as m
    t, o = msc_inputs(rng, k=4, H=3, W=5, n=8)
    args = (torch.randn(2, 15, 2, 4, generator=rng), t["xBC"], t["dt"], t["A"], t["D"],
            t["conv_weight"], t["conv_bias"], t["dt_bias"], o["orders"], o["headdim"],
            o["ngroups"], 0.0, float("inf"), "mean")
    got = m.unfused_backward(*args)  # scan by scan
    _, cx, cbc, _ = m._fwd_ref(*args[1:], True, False)
    for gv, wv in zip(got, m.unfused_backward(*args, cx, cbc)):  # the scans as one SSD
        torch.testing.assert_close(gv, wv, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MLMAMBA_MSC_STREAMS", "two")
    with pytest.raises(ValueError, match="MLMAMBA_MSC_STREAMS must be a positive integer"):
        m.unfused_backward(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 7, 12), (2, 7, 5), (3, 6, 2, 4)])
def test_msc_take_rows(rng, dtype, shape):
    # rows gathered as 8-byte words where they allow it, else element by element: always t[:, idx]
    from mlmamba_kernels.msc import _take_rows
    t = torch.randn(*shape, generator=rng).to(dtype)
    idx = torch.randperm(shape[1], generator=rng)
    for v in (t, t.transpose(1, 2).contiguous().transpose(1, 2), t[..., 1:], t.expand(2, *t.shape)[1]):
        assert torch.equal(_take_rows(v, idx), v[:, idx])


def test_state_update_dt_limit(rng):
    # the public decode step clamps dt like ssd_scan does (the kernel itself has no clamp)
    b, h, p, n = 2, 4, 8, 8
    state = _r(rng, b, h, p, n, dtype=torch.float64)
    args = (_r(rng, b, h, p, dtype=torch.float64), _r(rng, b, h, dtype=torch.float64) * 3,
            -torch.rand(h, dtype=torch.float64), _r(rng, b, 1, n, dtype=torch.float64),
            _r(rng, b, 1, n, dtype=torch.float64))
    kw = dict(D=_r(rng, h, dtype=torch.float64), dt_bias=_r(rng, h, dtype=torch.float64),
              dt_softplus=True)
    s1, s2 = state.clone(), state.clone()
    y1 = mk.ssd_state_update(s1, *args, **kw, dt_limit=(0.05, 0.5))
    y2 = ref.ssd_state_update(s2, *args, **kw, dt_limit=(0.05, 0.5))
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    y3 = mk.ssd_state_update(state.clone(), *args, **kw)
    assert not torch.allclose(y1, y3)  # the clamp is active on these inputs


def test_msc_rows_and_inverse_cache(rng):
    # the backward's int32 orders and inverse permutations, remembered per orders tensor and
    # version (an in-place edit recomputes them); fp32(1 / k) as torch's fp32 division
    from mlmamba_kernels import msc as m
    orders = torch.stack([torch.randperm(11, generator=rng) for _ in range(3)])
    rows, inv = m._rows_and_inverse(orders, orders.device)
    assert rows.dtype == torch.int32 and torch.equal(rows, orders.int())
    for i in range(3):
        assert torch.equal(inv[i][rows[i].long()], torch.arange(11, dtype=torch.int32))
    again = m._rows_and_inverse(orders, orders.device)
    assert again[0] is rows and again[1] is inv
    orders[0] = orders[0].flip(0)
    rows2, inv2 = m._rows_and_inverse(orders, orders.device)
    assert rows2 is not rows and torch.equal(rows2, orders.int())
    assert m._rows_and_inverse(orders.clone(), orders.device)[0] is not rows2
    for k in range(1, 65):
        assert m._recip32(k) == float(torch.tensor(1.0, dtype=torch.float32) / k)


def test_msc_bwd_saved_reference(rng):
    # msc_bwd_saved (CPU: its reference) is the batched unfused_backward given the orders as
    # int32 rows (and their inverses), merge mean's 1/k as dy_scale
    from mlmamba_kernels import msc as m
    t, o = msc_inputs(rng, k=4, H=3, W=5, n=8)
    t = {kk: v.double() for kk, v in t.items()}
    dout = torch.randn(2, 15, 2, 4, generator=rng, dtype=torch.float64)
    args = (t["xBC"], t["dt"], t["A"], t["D"], t["conv_weight"], t["conv_bias"], t["dt_bias"],
            o["orders"], o["headdim"], o["ngroups"], 0.0, float("inf"), "mean")
    _, cx, cbc, _ = m._fwd_ref(*args, True, False)
    want = m.unfused_backward(dout, *args, cx, cbc)
    rows, inv = m._rows_and_inverse(o["orders"], dout.device)
    got = ops.msc_bwd_saved(dout, *args[:7], rows, inv, *args[8:], 0.25, cx, cbc, None)
    for gv, wv in zip(got, want):
        torch.testing.assert_close(gv, wv, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(ops.msc_bwd_saved,
                          (dout, *args[:7], rows, inv, *args[8:], 0.25, cx, cbc, None))
