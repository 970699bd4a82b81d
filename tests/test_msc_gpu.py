"""GPU tests of the fused msc_scan forward (csrc/msc/ops.cpp, the MSC mode of the wgmma SSD
kernel) against the float64 reference (mlmamba_kernels.reference.msc)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels as mk
    from mlmamba_kernels import _loader
    from mlmamba_kernels.msc import fused_kernel_takes
    from mlmamba_kernels.reference import msc as ref

    HAVE = (_loader.has_cuda_kernel("msc_scan_fwd")
            and torch.cuda.get_device_capability()[0] == 9)
else:
    HAVE = False

need = pytest.mark.skipif(not HAVE, reason="fused msc_scan needs its CUDA kernel and sm_90")
DEV = "cuda"
TOL = 1.5e-2  # ||out - ref|| / ||ref||, bf16 operands (the SSD forward's bf16 bound)


def rel_err(out, want):
    out, want = out.double(), want.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def orders_of(kind, H, W, k, g):
    if kind in ("cross", "bidirectional"):
        return mk.scan_orders(H, W, kind).to(DEV)
    return torch.stack([torch.randperm(H * W, generator=g) for _ in range(k)]).to(DEV)


def make(rng, b, H, W, h=4, n=128, g=1, k=4, kind="cross", dt_dtype=torch.float32,
         bias=True, wide=0):
    """Random msc_scan inputs (bf16 xBC); wide > 0 makes xBC a slice of a wider tensor."""
    orders = orders_of(kind, H, W, k, rng)
    k, L, cd = orders.shape[0], H * W, h * 64 + 2 * g * n
    cg = torch.Generator(DEV).manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
    r = lambda *s, scale=1.0: torch.randn(*s, device=DEV, generator=cg) * scale  # noqa: E731
    xBC = r(b, L, cd + wide).to(torch.bfloat16)[..., :cd]
    return dict(xBC=xBC, dt=(r(b, L, h) * 0.5).to(dt_dtype),
                A=-torch.rand(k, h, device=DEV, generator=cg) * 4 - 0.5, D=r(k, h),
                conv_weight=r(k, cd, 4, scale=0.5).to(torch.bfloat16),
                conv_bias=r(k, cd).to(torch.bfloat16) if bias else None,
                dt_bias=torch.rand(k, h, device=DEV, generator=cg) * 2 - 4, orders=orders,
                headdim=64, ngroups=g)


def reference(a, merge, dt_limit=(0.0, float("inf"))):
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in a.items()}
    return ref.msc_scan(**d, dt_limit=dt_limit, merge=merge)


def fused(a, merge, dt_limit=(0.0, float("inf")), save=False):
    """The op itself (the fused kernel; it raises where it cannot run), on a poisoned cache:
    out, or with save (out, conv_x, conv_bc, states)."""
    torch.empty(1 << 24, device=DEV).fill_(float("nan"))  # freed blocks now hold NaN
    outs = torch.ops.mlmamba.msc_scan_fwd(a["xBC"], a["dt"], a["A"], a["D"], a["conv_weight"],
                                          a["conv_bias"], a["dt_bias"], a["orders"], 64,
                                          a["ngroups"], *dt_limit,
                                          "none" if merge is None else merge, save, save)
    return outs if save else outs[0]


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 4), ("random", 1, 1, 1),
                                        ("random", 1, 7, 8), ("cross", 9, 15, 4)])
@pytest.mark.parametrize("merge", ["mean", "sum", None])
def test_matches_reference(rng, kind, H, W, k, merge):
    a = make(rng, 2, H, W, k=k, kind=kind)
    want = reference(a, merge)
    got = fused(a, merge)
    assert got.shape == want.shape
    assert rel_err(got, want) < TOL
    # the public function picks the fused kernel for these inputs, with the same result
    assert fused_kernel_takes(a["xBC"], a["dt"], a["conv_weight"], 64, 1)
    assert torch.equal(mk.msc_scan(**a, merge=merge), got)


@need
@pytest.mark.parametrize("n,g,h", [(64, 1, 3), (128, 2, 4), (64, 4, 8)])
@pytest.mark.parametrize("dt_dtype", [torch.float32, torch.bfloat16])
def test_state_sizes_groups_dt_dtype(rng, n, g, h, dt_dtype):
    a = make(rng, 3, 8, 9, h=h, n=n, g=g, kind="cross", dt_dtype=dt_dtype)
    for merge in ("mean", None):
        assert rel_err(fused(a, merge), reference(a, merge)) < TOL


@need
@pytest.mark.parametrize("wide,bias", [(8, True), (3, False), (0, False)])
def test_strided_xbc_no_bias_dt_limit(rng, wide, bias):
    a = make(rng, 2, 11, 13, kind="random", bias=bias, wide=wide)
    assert not a["xBC"].is_contiguous() or wide == 0
    lim = (0.01, 0.05)
    assert rel_err(fused(a, "sum", lim), reference(a, "sum", lim)) < TOL


@need
def test_long_grid_many_chunks(rng):
    a = make(rng, 1, 40, 33, kind="cross")  # 1320 tokens: 21 chunks, the last one partial
    assert rel_err(fused(a, "mean"), reference(a, "mean")) < TOL


def kernel_names(fn):
    """Names of the CUDA kernels fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@need
@pytest.mark.parametrize("kind,H,W,k,dt_dtype", [("cross", 24, 24, 4, torch.float32),
                                                 ("random", 5, 3, 4, torch.bfloat16),
                                                 ("bidirectional", 40, 33, 2, torch.float32)])
@pytest.mark.parametrize("merge", ["mean", None])
def test_vector_prepass(rng, monkeypatch, kind, H, W, k, dt_dtype, merge):
    """The chunk vectors from the pre-pass (msc_vectors_kernel, the default) are the values
    warp 0 computes in the walk (MLMAMBA_SSD_FWD_VEC=0): the same code through the same orders,
    so the outputs are bitwise equal; odd grids, partial chunks, dt limits included."""
    a = make(rng, 2, H, W, k=k, kind=kind, dt_dtype=dt_dtype)
    lim = (0.01, 0.5)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_VEC", "0")
    base = fused(a, merge, lim)
    monkeypatch.delenv("MLMAMBA_SSD_FWD_VEC")
    got = fused(a, merge, lim)
    assert torch.equal(got, base)
    assert rel_err(got, reference(a, merge, lim)) < TOL
    names = kernel_names(lambda: fused(a, merge, lim))
    assert any("msc_vectors_kernel" in nm for nm in names), names


@need
@pytest.mark.parametrize("kind,H,W,k,n", [("cross", 24, 24, 4, 128), ("bidirectional", 27, 27, 2, 64),
                                          ("random", 5, 3, 4, 128), ("random", 1, 1, 1, 128),
                                          ("random", 1, 7, 8, 64), ("cross", 40, 33, 4, 128)])
@pytest.mark.parametrize("merge", ["mean", "sum", None])
def test_ws_kernel(rng, monkeypatch, kind, H, W, k, n, merge):
    """The warp-specialized MSC kernel (the default; mask and state in one warpgroup;
    loads, conv and output in the other) does the one-warpgroup kernel's arithmetic operation
    for operation: bitwise equal outputs; odd grids, one-token grids, partial chunks."""
    a = make(rng, 2, H, W, n=n, k=k, kind=kind)
    monkeypatch.setenv("MLMAMBA_MSC_WS", "0")
    base = fused(a, merge)
    monkeypatch.setenv("MLMAMBA_MSC_WS", "1")
    got = fused(a, merge)
    names = kernel_names(lambda: fused(a, merge))
    assert any("ssd_fwd_ws_msc_kernel" in nm for nm in names), names
    assert torch.equal(got, base)
    assert rel_err(got, reference(a, merge)) < TOL


@need
def test_deterministic(rng):
    a = make(rng, 4, 24, 24, kind="cross")
    assert torch.equal(fused(a, "mean"), fused(a, "mean"))


@need
def test_identity_order_equals_conv_then_scan(rng):
    """k = 1 and the identity order: causal_conv1d + ssd_scan composed (the conv's bf16 output
    is the scan's input in both; the conv arithmetic may round differently in a few places)."""
    a = make(rng, 2, 7, 19, k=1, kind="random")
    a["orders"] = torch.arange(7 * 19, device=DEV).unsqueeze(0)
    got = fused(a, None)[0]
    h, cd = 4, a["xBC"].shape[2]
    xs = mk.causal_conv1d(a["xBC"].transpose(1, 2), a["conv_weight"][0], a["conv_bias"][0],
                          "silu").transpose(1, 2)
    x, B, C = torch.split(xs, [h * 64, 128, 128], dim=-1)
    b, L = xs.shape[:2]
    want = mk.ssd_scan(x.reshape(b, L, h, 64), a["dt"], a["A"][0], B.reshape(b, L, 1, 128),
                       C.reshape(b, L, 1, 128), 64, D=a["D"][0], dt_bias=a["dt_bias"][0],
                       dt_softplus=True)
    assert cd == h * 64 + 256
    assert rel_err(got, want) < 4e-3


@need
def test_grad_through_fused_forward(rng):
    a = make(rng, 2, 5, 6, h=2, kind="cross")
    names = ("xBC", "dt", "A", "D", "conv_weight", "conv_bias", "dt_bias")
    leaves = {k: a[k].detach().clone().requires_grad_(True) for k in names}
    out = mk.msc_scan(**{**a, **leaves})
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [leaves[k] for k in names], dout)
    d = {k: a[k].detach().double().requires_grad_(True) for k in names}
    want = torch.autograd.grad(ref.msc_scan(**{**a, **d}), [d[k] for k in names], dout.double())
    for name, g, w in zip(names, got, want):
        assert rel_err(g, w) < 5e-2, name


@need
def test_errors(rng):
    a = make(rng, 1, 3, 4, k=2, kind="random")
    bad = a["orders"].clone()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(RuntimeError, match="permutation"):
        fused({**a, "orders": bad}, "mean")
    with pytest.raises(RuntimeError, match="bfloat16"):
        fused({**a, "xBC": a["xBC"].float()}, "mean")
    with pytest.raises(RuntimeError, match="merge"):
        fused(a, "max")
    with pytest.raises(RuntimeError, match="conv_weight"):
        fused({**a, "conv_weight": a["conv_weight"][:, :, :3]}, "mean")


@need
def test_other_inputs_take_the_unfused_path(rng):
    a = make(rng, 1, 4, 5, k=2, kind="random")
    a16 = {**a, "xBC": a["xBC"].half(), "conv_weight": a["conv_weight"].half(),
           "conv_bias": a["conv_bias"].half()}
    assert not fused_kernel_takes(a16["xBC"], a16["dt"], a16["conv_weight"], 64, 1)
    assert rel_err(mk.msc_scan(**a16), reference(a16, "mean")) < TOL


@need
def test_orders_edited_in_place_are_checked_again(rng):
    a = make(rng, 1, 3, 4, k=2, kind="random")
    fused(a, "mean")
    a["orders"][0, 0] = a["orders"][0, 1]  # in place: the op's cache of checked orders misses
    with pytest.raises(RuntimeError, match="permutation"):
        fused(a, "mean")


@need
def test_inference_mode(rng):
    """Inference tensors (the VLM's connector) have no version counter to cache the check by."""
    with torch.inference_mode():
        a = make(rng, 1, 3, 4, k=2, kind="random")
        want = fused(a, "mean")
        assert torch.equal(fused(a, "mean"), want)
        a["orders"][0, 0] = a["orders"][0, 1]
        with pytest.raises(RuntimeError, match="permutation"):
            fused(a, "mean")


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 4), ("random", 1, 1, 1)])
@pytest.mark.parametrize("merge", ["mean", None])
def test_saved_conv_and_states(rng, monkeypatch, kind, H, W, k, merge):
    """save_conv / save_states: the kernel also stores each scan's conv'd x in scan order and
    each chunk's entry state (by TMA) and returns the conv'd B / C it read; the output is
    bitwise the same. The saved x, B, C are the conv (SiLU) of the rows through the order,
    rounded to bf16 once; the states are the reference scan's, from the saved conv outputs
    (float64). Without the warp-specialized kernel, asking to save raises."""
    from mlmamba_kernels.msc import _conv_fwd_ref, _saved_states
    a = make(rng, 2, H, W, k=k, kind=kind)
    plain = fused(a, merge)
    out, cx, cbc, st = fused(a, merge, save=True)
    assert torch.equal(out, plain)
    b, L, cd = a["xBC"].shape
    h = a["dt"].shape[2]
    # the scans side by side (one SSD of k h heads and k groups for the backward)
    assert cx.shape == (b, L, k, h, 64) and cbc.shape == (b, L, 2, k, (cd - h * 64) // 2)
    assert st.shape == (b, (L + 63) // 64, k, h, 64, 128) and st.dtype == torch.bfloat16
    for i in range(k):
        u = _conv_fwd_ref(a["xBC"].double(), a["orders"][i], a["conv_weight"][i].double(),
                          a["conv_bias"][i].double())
        torch.testing.assert_close(cx[:, :, i].reshape(b, L, h * 64).double(), u[..., :h * 64],
                                   rtol=2**-8, atol=1e-5)
        torch.testing.assert_close(cbc[:, :, :, i].reshape(b, L, -1).double(), u[..., h * 64:],
                                   rtol=2**-8, atol=1e-5)
    want = _saved_states(cx.double(), cbc.double(), a["dt"].double(), a["A"].double(),
                         a["dt_bias"].double(), a["orders"], 1, (0.0, float("inf")))
    assert not st[:, 0].any()  # each scan starts from zero
    for i in range(k):
        assert rel_err(st[:, :, i], want[:, :, i]) < 1e-2
    monkeypatch.setenv("MLMAMBA_MSC_WS", "0")
    with pytest.raises(RuntimeError, match="warp-specialized"):
        fused(a, merge, save=True)


@need
@pytest.mark.parametrize("kind,H,W,k", [("cross", 24, 24, 4), ("bidirectional", 27, 27, 2),
                                        ("random", 5, 3, 3), ("random", 1, 7, 8),
                                        ("cross", 9, 15, 4)])
@pytest.mark.parametrize("save", [False, True])
def test_split_by_scan(rng, monkeypatch, kind, H, W, k, save):
    """merge none: a CTA per (row, head, scan) (the default) gives bitwise the outputs (and
    the saved conv outputs and states) of a CTA per (row, head) running the k scans in turn
    (MLMAMBA_MSC_SPLIT=0); merge mean ignores the setting."""
    a = make(rng, 3, H, W, k=k, kind=kind)
    monkeypatch.setenv("MLMAMBA_MSC_SPLIT", "0")
    base = fused(a, None, save=save)
    mean = fused(a, "mean")
    monkeypatch.delenv("MLMAMBA_MSC_SPLIT")
    got = fused(a, None, save=save)
    for g, w in zip(got if save else (got,), base if save else (base,)):
        assert torch.equal(g, w)
    assert rel_err(got[0] if save else got, reference(a, None)) < TOL
    assert torch.equal(fused(a, "mean"), mean)


@need
@pytest.mark.parametrize("save", [(False, False), (True, True), (False, True)])
def test_opcheck(rng, save):
    a = make(rng, 1, 9, 15, h=2, k=2, kind="random")
    args = (a["xBC"], a["dt"], a["A"], a["D"], a["conv_weight"], a["conv_bias"], a["dt_bias"],
            a["orders"], 64, 1, 0.0, float("inf"), "mean", *save)
    torch.library.opcheck(torch.ops.mlmamba.msc_scan_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@need
def test_torch_compile_fullgraph(rng):
    a = make(rng, 2, 4, 6, kind="cross")
    f = torch.compile(lambda **kw: mk.msc_scan(**kw), fullgraph=True)
    assert torch.equal(f(**a), fused(a, "mean"))
