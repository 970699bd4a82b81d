"""GPU tests of msc_scan's CUDA backward (mlmamba_kernels.msc.unfused_backward) and of its
msc_sum_rows kernel (csrc/msc/sum_rows.cu), against the float64 reference."""
import pytest
import torch
from test_msc_gpu import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels as mk
    from mlmamba_kernels import _loader
    from mlmamba_kernels import msc as msc_mod
    from mlmamba_kernels.reference import msc as ref
    from mlmamba_kernels.reference.conv1d import causal_conv1d as ref_conv

    HAVE = _loader.has_cuda_kernel("msc_sum_rows")
else:
    HAVE = False

need = pytest.mark.skipif(not HAVE, reason="needs the CUDA kernels of msc_scan")
DEV = "cuda"
NAMES = ("xBC", "dt", "A", "D", "conv_weight", "conv_bias", "dt_bias")


def cuda_gen(rng):
    return torch.Generator(DEV).manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))


def make(rng, b, H, W, k, kind, dtype=torch.bfloat16, h=2, n=64, g=1):
    if kind in ("cross", "bidirectional"):
        orders = mk.scan_orders(H, W, kind)
        orders = orders[:k] if kind == "cross" else orders
    else:
        orders = torch.stack([torch.randperm(H * W, generator=rng) for _ in range(k)])
    k, L, cd = orders.shape[0], H * W, h * 64 + 2 * g * n
    cg = cuda_gen(rng)
    r = lambda *s, scale=1.0: torch.randn(*s, device=DEV, generator=cg) * scale  # noqa: E731
    return dict(xBC=r(b, L, cd).to(dtype), dt=(r(b, L, h) * 0.5).to(dtype),
                A=-torch.rand(k, h, device=DEV, generator=cg) * 4 - 0.5, D=r(k, h),
                conv_weight=r(k, cd, 4, scale=0.5).to(dtype), conv_bias=r(k, cd).to(dtype),
                dt_bias=torch.rand(k, h, device=DEV, generator=cg) * 2 - 4,
                orders=orders.to(DEV), headdim=64, ngroups=g)


def grads(a, merge, dout):
    leaves = {k: a[k].detach().clone().requires_grad_(True) for k in NAMES}
    out = mk.msc_scan(**{**a, **leaves}, merge=merge)
    torch.empty(1 << 24, device=DEV).fill_(float("nan"))  # freed blocks now hold NaN
    return torch.autograd.grad(out, [leaves[k] for k in NAMES], dout)


def ref_grads(a, merge, dout, conv=None):
    d = {k: a[k].detach().double().requires_grad_(True) for k in NAMES}
    out = ref.msc_scan(**{**a, **d}, merge=merge, **({"conv": conv} if conv else {}))
    return torch.autograd.grad(out, [d[k] for k in NAMES], dout.double())


def conv_rounded(x, weight, bias, activation):
    """The reference conv with its output rounded to bf16, as the kernels store it (straight
    through in the backward)."""
    y = ref_conv(x, weight, bias, activation)
    return y + (y.to(torch.bfloat16).to(y.dtype) - y).detach()


def check_grads(a, merge, dout, got, want):
    """Each gradient's relative error under 5e-2 (the bf16 bound), or, where over, under 4 sens:
    sens is how far one bf16 rounding of the conv activations (as the kernels store them)
    moves that gradient of the float64 reference, i.e. the problem's conditioning. Independent
    roundings of that size add in quadrature and the kernels round ~4-8 operand sets on each
    path (activations, masked scores, states, scaled tiles): 4 sens bounds them. A 1-token
    grid's ddt is a product of two 64-term dot products that can cancel: a large sens. A wrong
    kernel errs at O(1) whatever sens is."""
    errs = {name: rel_err(g, w) for name, g, w in zip(NAMES, got, want)}
    bounds = dict.fromkeys(NAMES, 5e-2)
    if max(errs.values()) >= 5e-2:
        rounded = ref_grads(a, merge, dout, conv=conv_rounded)
        for i, name in enumerate(NAMES):
            if errs[name] >= 5e-2:
                bounds[name] = max(5e-2, 4 * rel_err(rounded[i], want[i]))
    bad = {name: (errs[name], bounds[name]) for name in NAMES if not errs[name] < bounds[name]}
    assert not bad, f"(error, bound) of each gradient over its bound: {bad}"


def out_shape(a, merge):
    b, L, _ = a["xBC"].shape
    h, k = a["dt"].shape[2], a["orders"].shape[0]
    return (b, L, h, 64) if merge is not None else (k, b, L, h, 64)


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 8), ("random", 1, 7, 1),
                                        ("random", 1, 1, 2), ("cross", 5, 3, 4),
                                        ("random", 4, 6, 9)])
@pytest.mark.parametrize("merge", ["mean", "sum", None])
def test_backward_matches_reference(rng, kind, H, W, k, merge):
    """k = 9 is above msc_sum_rows' 8 scans: the running sums in Python."""
    a = make(rng, 2, H, W, k, kind)
    dout = torch.randn(out_shape(a, merge), device=DEV, generator=cuda_gen(rng))
    dout = dout.to(torch.bfloat16)
    got, want = grads(a, merge, dout), ref_grads(a, merge, dout)
    for name, g in zip(NAMES, got):
        assert g.dtype == a[name].dtype and g.shape == a[name].shape, name
    check_grads(a, merge, dout, got, want)


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 8)])
@pytest.mark.parametrize("merge", ["mean", None])
@pytest.mark.parametrize("save", [(), ("conv",), ("states",)])
def test_backward_recomputing_matches_saved(rng, monkeypatch, kind, H, W, k, merge, save):
    """msc.SAVE (MLMAMBA_MSC_SAVE) short of conv and states: the backward recomputes each
    scan's conv (msc_conv_fwd) and / or chunk states (the walk's forward direction) instead of
    taking the forward's; all match the reference and each other (the recomputed values may
    round a few places differently)."""
    a = make(rng, 2, H, W, k, kind)
    dout = torch.randn(out_shape(a, merge), device=DEV, generator=cuda_gen(rng))
    dout = dout.to(torch.bfloat16)
    saved = grads(a, merge, dout)
    monkeypatch.setattr(msc_mod, "SAVE", frozenset(save))
    recomputed = grads(a, merge, dout)
    for name, s, r, w in zip(NAMES, saved, recomputed, ref_grads(a, merge, dout)):
        assert rel_err(r, w) < 5e-2, name
        assert rel_err(s, r.double()) < 1e-2, name


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 9)])
@pytest.mark.parametrize("merge", ["mean", "sum", None])
@pytest.mark.parametrize("save", [("conv", "states"), ("states",), ("conv",)])
def test_cpp_backward_equals_python(rng, monkeypatch, kind, H, W, k, merge, save):
    """The saved modes' backward in C++ (msc_bwd_saved) runs the Python path's ops in its
    order: bitwise the same gradients."""
    a = make(rng, 2, H, W, k, kind)
    dout = torch.randn(out_shape(a, merge), device=DEV, generator=cuda_gen(rng))
    dout = dout.to(torch.bfloat16)
    monkeypatch.setattr(msc_mod, "SAVE", frozenset(save))
    cpp = grads(a, merge, dout)
    monkeypatch.setattr(msc_mod, "CPP_BWD", False)
    py = grads(a, merge, dout)
    for name, x, y in zip(NAMES, cpp, py):
        assert torch.equal(x, y), name


class _SaveFlags(TorchDispatchMode):
    """Records the (save_conv, save_states) arguments of each msc_scan_fwd call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mlmamba.msc_scan_fwd.default:  # (trailing defaults dropped)
            kw = kwargs or {}
            self.flags.append(tuple(bool(args[i]) if len(args) > i else bool(kw.get(k, False))
                                    for i, k in ((13, "save_conv"), (14, "save_states"))))
        return func(*args, **(kwargs or {}))


@need
def test_saved_only_under_autograd(rng, monkeypatch):
    a = make(rng, 1, 5, 3, 4, "cross")
    leaf = dict(a, A=a["A"].clone().requires_grad_(True))
    with _SaveFlags() as on:
        mk.msc_scan(**a)
        mk.msc_scan(**leaf)
    with torch.no_grad(), _SaveFlags() as off:
        mk.msc_scan(**leaf)
    monkeypatch.setattr(msc_mod, "SAVE", frozenset(["states"]))
    with _SaveFlags() as some:
        mk.msc_scan(**leaf)
    monkeypatch.setattr(msc_mod, "WS_KERNEL", False)  # MLMAMBA_MSC_WS=0 at import: none
    with _SaveFlags() as no_ws:
        mk.msc_scan(**leaf)
    assert on.flags == [(False, False), (True, True)] and off.flags == [(False, False)]
    assert some.flags == [(False, True)] and no_ws.flags == [(False, False)]


@need
@pytest.mark.parametrize("nstreams", ["2", "4"])
def test_backward_on_side_streams_equals_one_stream(rng, monkeypatch, nstreams):
    """Scan by scan (nothing saved: the path with side streams), the scans' parts on side
    streams (MLMAMBA_MSC_STREAMS) give bitwise the one-stream result, also when the caller's
    stream is not the default one."""
    monkeypatch.setattr(msc_mod, "SAVE", frozenset())
    a = make(rng, 3, 24, 24, 4, "cross")
    dout = torch.randn(out_shape(a, "mean"), device=DEV, generator=cuda_gen(rng))
    dout = dout.to(torch.bfloat16)
    monkeypatch.setenv("MLMAMBA_MSC_STREAMS", "1")
    one = grads(a, "mean", dout)
    monkeypatch.setenv("MLMAMBA_MSC_STREAMS", nstreams)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        many = grads(a, "mean", dout)
    torch.cuda.current_stream().wait_stream(side)
    for name, x, y in zip(NAMES, one, many):
        assert torch.equal(x, y), name


@need
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backward_other_dtypes(rng, dtype):
    a = make(rng, 2, 5, 3, 4, "cross", dtype=dtype)
    dout = torch.randn(out_shape(a, "mean"), device=DEV, generator=cuda_gen(rng)).to(dtype)
    tol = 5e-2 if dtype == torch.float16 else 1e-2
    for name, g, w in zip(NAMES, grads(a, "mean", dout), ref_grads(a, "mean", dout)):
        assert rel_err(g, w) < tol, name


@need
def test_backward_bitwise_deterministic_and_equal_to_running_sums(rng, monkeypatch):
    a = make(rng, 3, 24, 24, 4, "cross")
    dout = torch.randn(out_shape(a, "mean"), device=DEV, generator=cuda_gen(rng))
    dout = dout.to(torch.bfloat16)
    first, second = grads(a, "mean", dout), grads(a, "mean", dout)
    monkeypatch.setattr(msc_mod, "SUM_ROWS_MAX_SCANS", 0)  # the Python running sums
    running = grads(a, "mean", dout)
    for name, x, y, z in zip(NAMES, first, second, running):
        assert torch.equal(x, y), name
        assert torch.equal(x, z), name


def laid_out(t, layout, cols):
    """t[..., :cols]: contiguous ("contig"), with offset rows ("slice": the one-element path),
    or with its first two dims' strides swapped ("strided")."""
    if layout == "slice":
        return t[..., 1:cols + 1]
    if layout == "strided":
        return t.transpose(0, 1).contiguous().transpose(0, 1)[..., :cols]
    return t[..., :cols].contiguous()


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,cols,layout", [(1, 16, "contig"), (3, 2304, "contig"),
                                           (8, 40, "slice"), (5, 13, "contig"),
                                           (2, 32, "strided"), (4, 7, "slice")])
def test_sum_rows_equals_reference(rng, dtype, k, cols, layout):
    b, L = 3, 37
    cg = cuda_gen(rng)
    src = [laid_out(torch.randn(b, L, cols + 8, device=DEV, generator=cg).to(dtype), layout,
                    cols) for _ in range(k)]
    inv = torch.stack([torch.randperm(L, generator=rng) for _ in range(k)]).to(DEV, torch.int32)
    got = torch.ops.mlmamba.msc_sum_rows(src, inv)
    want = msc_mod._sum_rows_ref(src, inv)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, want)
    exact = sum(s.double()[:, ix] for s, ix in zip(src, inv.long()))
    assert rel_err(got, exact) < 1e-2


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_rows_gathers_exactly(rng, dtype):
    """One scan: an exact row gather (the backward's gathers of xBC, dy and dt), -0 kept; two
    scans of -0 sum to -0, as the running sums do."""
    t = torch.randn(3, 29, 24, generator=rng).to(dtype)
    t[0, :5] = -0.0
    t, idx = t.to(DEV), torch.randperm(29, generator=rng).to(DEV, torch.int32)
    got = torch.ops.mlmamba.msc_sum_rows([t], idx.view(1, -1))
    want = t[:, idx.long()]
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    z = torch.full((2, 4, 8), -0.0, device=DEV, dtype=dtype)
    two = torch.ops.mlmamba.msc_sum_rows([z, z], torch.arange(4, device=DEV, dtype=torch.int32)
                                         .expand(2, 4).contiguous())
    assert two.signbit().all()


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mean_in_dy_gather_equals_division(rng, monkeypatch, dtype):
    """merge mean's 1 / k in the dy gathers (scale fp32(1 / k)) gives bitwise the gradients of
    dividing dout by k first; k = 3, so 1 / k is not a power of two."""
    a = make(rng, 2, 5, 3, 3, "random", dtype=dtype)
    dout = torch.randn(out_shape(a, "mean"), device=DEV, generator=cuda_gen(rng)).to(dtype)
    folded = grads(a, "mean", dout)
    monkeypatch.setattr(msc_mod, "MEAN_IN_DY_GATHER", False)
    divided = grads(a, "mean", dout)
    for name, x, y in zip(NAMES, folded, divided):
        assert torch.equal(x, y), name


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [3, 4, 7])
def test_sum_rows_scale_equals_division(rng, dtype, k):
    """merge mean's 1 / k rides in the backward's dy gather: one scan at scale fp32(1 / k)
    equals dout / k gathered (torch multiplies by the fp32 reciprocal of a scalar divisor);
    with several scans the sum is scaled once before its rounding, as the reference."""
    t = torch.randn(3, 29, 24, generator=rng).to(dtype).to(DEV)
    idx = torch.randperm(29, generator=rng).to(DEV, torch.int32)
    scale = float(torch.tensor(1.0, dtype=torch.float32) / k)
    got = torch.ops.mlmamba.msc_sum_rows([t], idx.view(1, -1), scale)
    assert torch.equal(got, (t / k)[:, idx.long()])
    src = [torch.randn(2, 11, 16, generator=rng).to(dtype).to(DEV) for _ in range(3)]
    inv = torch.stack([torch.randperm(11, generator=rng) for _ in range(3)]).to(DEV, torch.int32)
    got = torch.ops.mlmamba.msc_sum_rows(src, inv, 0.37)
    assert torch.equal(got, msc_mod._sum_rows_ref(src, inv, 0.37))


@need
def test_sum_rows_errors(rng):
    f = torch.ops.mlmamba.msc_sum_rows
    g = torch.randn(2, 5, 8, device=DEV)
    inv = torch.stack([torch.randperm(5), torch.randperm(5)]).to(DEV, torch.int32)
    with pytest.raises(RuntimeError, match="grads must hold 1 to 8"):
        f([g] * 9, torch.zeros(9, 5, dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match=r"grads\[1\] must match"):
        f([g, g.half()], inv)
    with pytest.raises(RuntimeError, match="inv must be a contiguous int32"):
        f([g, g], inv.long())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        f([g.double(), g.double()], inv)


@need
def test_sum_rows_opcheck(rng):
    src = [torch.randn(2, 6, 16, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    inv = torch.stack([torch.randperm(6) for _ in range(3)]).to(DEV, torch.int32)
    for args in ((src, inv), (src, inv, 0.25)):
        torch.library.opcheck(torch.ops.mlmamba.msc_sum_rows.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,cols,per_scan,layout", [(1, 16, False, "contig"),
                                                    (4, 2048, False, "contig"),
                                                    (4, 2048, True, "contig"),
                                                    (3, 13, False, "contig"),
                                                    (3, 520, False, "slice"),
                                                    (2, 40, False, "slice"),
                                                    (9, 32, True, "strided")])
def test_gather_rows_equals_reference(rng, dtype, k, cols, per_scan, layout):
    """msc_gather_rows: out[:, t, i] = src_i[:, rows[i, t]], exact at scale 1 (-0 kept), src
    shared (read by source row, k > 1) or one per scan, strided or offset rows; a position
    outside range(L) reads zeros and a repeated one its row; at scale fp32(1 / k) it equals
    dout / k gathered (merge mean's fold)."""
    b, L = 3, 37
    cg = cuda_gen(rng)
    shape = (k, b, L, cols + 8) if per_scan else (b, L, cols + 8)
    t = torch.randn(shape, device=DEV, generator=cg).to(dtype)
    t[..., 0, :3, :] = -0.0
    src = laid_out(t, layout, cols)
    rows = torch.stack([torch.randperm(L, generator=rng) for _ in range(k)]).to(DEV, torch.int32)
    got = torch.ops.mlmamba.msc_gather_rows(src, rows)
    assert got.shape == (b, L, k, cols) and got.is_contiguous() and got.dtype == dtype
    of = lambda i: src[i] if per_scan else src  # noqa: E731
    for i in range(k):
        want = of(i)[:, rows[i].long()]
        assert torch.equal(got[:, :, i], want)
        assert torch.equal(got[:, :, i].signbit(), want.signbit())
    scale = float(torch.tensor(1.0, dtype=torch.float32) / 3)
    got = torch.ops.mlmamba.msc_gather_rows(src, rows, scale)
    assert torch.equal(got[:, :, k - 1], (of(k - 1) / 3)[:, rows[k - 1].long()])
    bad = rows.clone()
    bad[0, 5] = L
    bad[k - 1, 7], bad[k - 1, 9] = -1, bad[k - 1, 8]  # a hole, a duplicate (not a permutation)
    bad[k - 1, 20:24] = bad[k - 1, 2]
    got = torch.ops.mlmamba.msc_gather_rows(src, bad)
    want = msc_mod._gather_rows_ref(src, bad)
    assert not got[:, 5, 0].any() and torch.equal(got, want)


@need
def test_gather_rows_errors_and_opcheck(rng):
    f = torch.ops.mlmamba.msc_gather_rows
    g = torch.randn(2, 5, 8, device=DEV)
    rows = torch.stack([torch.randperm(5), torch.randperm(5)]).to(DEV, torch.int32)
    with pytest.raises(RuntimeError, match="rows must be a contiguous 2-dim"):
        f(g, rows.long())
    with pytest.raises(RuntimeError, match=r"src must have shape \(2, batch, 5, cols\)"):
        f(g.expand(3, 2, 5, 8), rows)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        f(g.double(), rows)
    with pytest.raises(RuntimeError, match="src must be a"):
        f(g[0], rows)
    for args in ((g.bfloat16(), rows), (g.expand(2, 2, 5, 8), rows, 0.25)):
        torch.library.opcheck(f.default, args, test_utils=("test_schema", "test_faketensor"))
