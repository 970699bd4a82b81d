"""GPU tests of msc_conv_fwd / msc_conv_bwd (csrc/msc/conv_ops.cpp: conv1d's channel-last
kernels reading xBC's rows through a scan order) against the float64 reference."""
import pytest
import torch
from test_conv1d_gpu import close, close_sum

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels  # noqa: F401  (defines the ops, loads _C)
    from mlmamba_kernels import _loader
    from mlmamba_kernels import msc as msc_mod

    HAVE = _loader.has_cuda_kernel("msc_conv_bwd")
else:
    HAVE = False

need = pytest.mark.skipif(not HAVE, reason="needs the CUDA kernels of msc_scan")
DEV = "cuda"


def cuda_gen(rng):
    return torch.Generator(DEV).manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))


def make(rng, b, L, d, w, dtype, rows="perm", layout="contig", wdtype=None, bias=True):
    cg = cuda_gen(rng)
    r = lambda *s: torch.randn(*s, device=DEV, generator=cg)  # noqa: E731
    wide = r(b, L, d + 9).to(dtype)
    xBC = wide[..., 1:d + 1] if layout == "slice" else wide[..., :d].contiguous()
    idx = torch.randperm(L, generator=rng)
    if rows == "holes" and L > 2:  # entries outside range(L) read zero rows
        idx[0], idx[L // 2] = -1, L + 3
    weight = (r(d, w) * 0.5).to(wdtype or dtype)
    return dict(xBC=xBC, rows=idx.to(DEV, torch.int32), weight=weight,
                bias=(r(d) * 0.5).to(wdtype or dtype) if bias else None)


def pieces_of(t, splits, layout):
    out, c0 = [], 0
    for c in splits:
        p = t[..., c0:c0 + c]
        out.append(p.contiguous() if layout == "contig" else p)
        c0 += c
    return out


def run_and_check(a, splits, layout, dtype, rng):
    b, L, d = a["xBC"].shape
    f64 = {k: (None if v is None or k == "rows" else v.double()) for k, v in a.items()}
    torch.empty(1 << 24, device=DEV).fill_(float("nan"))  # freed blocks now hold NaN
    u = torch.ops.mlmamba.msc_conv_fwd(a["xBC"], a["rows"], a["weight"], a["bias"])
    want_u = msc_mod._conv_fwd_ref(f64["xBC"], a["rows"], f64["weight"], f64["bias"])
    close("u", u, want_u, dtype)
    g = torch.randn(b, L, d, device=DEV, generator=cuda_gen(rng)).to(dtype)
    torch.empty(1 << 24, device=DEV).fill_(float("nan"))
    dx, dw, db = torch.ops.mlmamba.msc_conv_bwd(a["xBC"], a["rows"], a["weight"], a["bias"],
                                                pieces_of(g, splits, layout))
    wdx, wdw, wdb = msc_mod._conv_bwd_ref(f64["xBC"], a["rows"], f64["weight"], f64["bias"],
                                          [g.double()])
    close("dx", dx, wdx, dtype)
    close_sum("dweight", dw, wdw.to(dw.dtype), a["weight"].dtype)
    if a["bias"] is not None:
        close_sum("dbias", db, wdb.to(db.dtype), a["bias"].dtype)
    else:
        assert db.numel() == 0
    return u, dx, dw, db


@need
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("w", [2, 3, 4, 5, 8])
def test_matches_reference(rng, dtype, w):
    a = make(rng, 3, 200, 2304, w, dtype)
    run_and_check(a, [2048, 128, 128], "contig", dtype, rng)


@need
@pytest.mark.parametrize("b,L,d,splits,rows,layout,bias", [
    (2, 576, 264, [128, 128, 8], "perm", "contig", True),      # msc-like, small
    (1, 1, 16, [16], "perm", "contig", True),                  # one token
    (2, 7, 37, [36, 1], "holes", "slice", False),              # odd d, offset rows: 2 pieces
    (3, 129, 8, [4, 4], "holes", "contig", True),
    (2, 1000, 520, [512, 4, 4], "perm", "slice", True),        # strided pieces
    (1, 65, 5, [5], "perm", "slice", True),                    # fewer channels than a lane
    (2, 33, 16, [8, 0, 8], "perm", "contig", True),            # an empty piece
    (2, 33, 16, [0, 0, 16], "holes", "contig", True),
])
@pytest.mark.parametrize("impl", ["default", "v2"])
def test_shapes_rows_and_pieces(rng, monkeypatch, b, L, d, splits, rows, layout, bias, impl):
    """default: the streaming forward where the rows are 16-byte aligned (else v2)."""
    if impl == "v2":
        monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", "v2")
    a = make(rng, b, L, d, 4, torch.bfloat16, rows=rows, layout=layout, bias=bias)
    run_and_check(a, splits, layout, torch.bfloat16, rng)


@need
def test_mixed_weight_dtype(rng):
    a = make(rng, 2, 100, 72, 4, torch.bfloat16, wdtype=torch.float32)
    run_and_check(a, [64, 8], "contig", torch.bfloat16, rng)


@need
@pytest.mark.parametrize("impl", ["pipe", "v2"])
def test_identity_rows_equal_causal_conv1d(rng, monkeypatch, impl):
    """rows = arange: the forward is the plain channel-last causal conv's kernel, bitwise."""
    monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", impl)
    a = make(rng, 2, 300, 264, 4, torch.bfloat16)
    a["rows"] = torch.arange(300, device=DEV, dtype=torch.int32)
    u = torch.ops.mlmamba.msc_conv_fwd(a["xBC"], a["rows"], a["weight"], a["bias"])
    y = torch.ops.mlmamba.causal_conv1d_fwd(a["xBC"].transpose(1, 2), a["weight"], a["bias"],
                                            None, None, True, False)[0]
    assert torch.equal(u, y.transpose(1, 2))


@need
@pytest.mark.parametrize("k,b,L,d,splits,rows,bias,wdtype", [
    (4, 32, 576, 2304, [2048, 128, 128], "perm", True, None),   # msc's cross case
    (2, 3, 729, 336, [320, 8, 8], "holes", False, None),        # bidirectional-like, odd L
    (3, 2, 33, 16, [8, 0, 8], "perm", True, torch.float32),     # an empty piece, fp32 weights
    (5, 1, 7, 37, [36, 1], "holes", True, None)])
def test_k_scans_equal_scan_by_scan(rng, k, b, L, d, splits, rows, bias, wdtype):
    """rows (k, L), weight (k, d, w), bias (k, d), pieces (b, L, k, c): the k scans in one
    launch. dx is bitwise each scan's alone (its arithmetic does not depend on the launch's
    chunks); dweight / dbias sum the same terms in other chunks: within a rounding of their
    dtype of the scan-by-scan sums, and held to the float64 reference."""
    scans = [make(rng, b, L, d, 4, torch.bfloat16, rows=rows, bias=bias, wdtype=wdtype)
             for _ in range(k)]
    xBC = scans[0]["xBC"]
    R = torch.stack([s["rows"] for s in scans])
    Wt = torch.stack([s["weight"] for s in scans])
    Bs = torch.stack([s["bias"] for s in scans]) if bias else None
    g = torch.randn(b, L, k, d, device=DEV, generator=cuda_gen(rng)).to(torch.bfloat16)
    torch.empty(1 << 24, device=DEV).fill_(float("nan"))
    dx, dw, db = torch.ops.mlmamba.msc_conv_bwd(xBC, R, Wt, Bs, pieces_of(g, splits, "slice"))
    assert dx.shape == (k, b, L, d) and dw.shape == Wt.shape
    assert db.shape == (Bs.shape if bias else (0,))
    for i in range(k):
        one = torch.ops.mlmamba.msc_conv_bwd(xBC, R[i], Wt[i], None if Bs is None else Bs[i],
                                             pieces_of(g[:, :, i], splits, "contig"))
        assert torch.equal(dx[i], one[0]), i
        tol = (dict(rtol=1e-5, atol=1e-4) if Wt.dtype == torch.float32
               else dict(rtol=2**-7, atol=1e-3))
        torch.testing.assert_close(dw[i], one[1], **tol)
        want = msc_mod._conv_bwd_ref(xBC.double(), R[i], Wt[i].double(),
                                     None if Bs is None else Bs[i].double(),
                                     [g[:, :, i].double()])
        close_sum("dweight", dw[i], want[1].to(dw.dtype), Wt.dtype)
        if bias:
            torch.testing.assert_close(db[i], one[2], **tol)
            close_sum("dbias", db[i], want[2].to(db.dtype), Bs.dtype)
    again = torch.ops.mlmamba.msc_conv_bwd(xBC, R, Wt, Bs, pieces_of(g, splits, "slice"))
    for x, y in zip((dx, dw, db), again):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match=r"weight must be a float tensor of shape \("):
        torch.ops.mlmamba.msc_conv_bwd(xBC, R, Wt[0], Bs, pieces_of(g, splits, "slice"))
    with pytest.raises(RuntimeError, match=r"dout\[0\] must be a"):
        torch.ops.mlmamba.msc_conv_bwd(xBC, R, Wt, Bs, [g[:, :, 0]])


@need
def test_backward_bitwise_deterministic(rng):
    a = make(rng, 4, 576, 2304, 4, torch.bfloat16)
    g = torch.randn(4, 576, 2304, device=DEV, generator=cuda_gen(rng)).to(torch.bfloat16)
    p = pieces_of(g, [2048, 128, 128], "contig")
    one = torch.ops.mlmamba.msc_conv_bwd(a["xBC"], a["rows"], a["weight"], a["bias"], p)
    two = torch.ops.mlmamba.msc_conv_bwd(a["xBC"], a["rows"], a["weight"], a["bias"], p)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@need
def test_errors_name_the_argument(rng):
    a = make(rng, 2, 10, 16, 4, torch.bfloat16)
    fwd, bwd = torch.ops.mlmamba.msc_conv_fwd, torch.ops.mlmamba.msc_conv_bwd
    g = torch.zeros(2, 10, 16, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="rows must be an int32 tensor of shape"):
        fwd(a["xBC"], a["rows"].long(), a["weight"], a["bias"])
    with pytest.raises(RuntimeError, match="weight must be a float tensor of shape"):
        fwd(a["xBC"], a["rows"], a["weight"][:8], a["bias"])
    with pytest.raises(RuntimeError, match="bias must be a float tensor of shape"):
        fwd(a["xBC"], a["rows"], a["weight"], a["bias"][:3])
    with pytest.raises(RuntimeError, match="xBC must be a 3-dim"):
        fwd(a["xBC"][0], a["rows"], a["weight"], a["bias"])
    with pytest.raises(RuntimeError, match="must have a multiple of 4 channels"):
        bwd(a["xBC"], a["rows"], a["weight"], a["bias"], [g[..., :6], g[..., 6:]])
    with pytest.raises(RuntimeError, match="must hold 16 channels in all"):
        bwd(a["xBC"], a["rows"], a["weight"], a["bias"], [g[..., :8]])
    with pytest.raises(RuntimeError, match=r"dout\[0\] must be a"):
        bwd(a["xBC"], a["rows"], a["weight"], a["bias"], [g.float()])
    with pytest.raises(RuntimeError, match="dout must hold 1 to 3 tensors"):
        bwd(a["xBC"], a["rows"], a["weight"], a["bias"], [g[..., :4]] * 4)


@need
def test_opcheck(rng):
    a = make(rng, 2, 9, 24, 4, torch.bfloat16)
    g = torch.randn(2, 9, 24, device=DEV).to(torch.bfloat16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mlmamba.msc_conv_fwd.default,
                          (a["xBC"], a["rows"], a["weight"], a["bias"]), test_utils=utils)
    torch.library.opcheck(torch.ops.mlmamba.msc_conv_bwd.default,
                          (a["xBC"], a["rows"], a["weight"], a["bias"],
                           [g[..., :16], g[..., 16:]]), test_utils=utils)
