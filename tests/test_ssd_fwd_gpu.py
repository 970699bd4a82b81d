"""GPU tests of the CUDA SSD scan forward (ssd_scan_fwd) and decode step (ssd_state_update)
against the float64 references (mlmamba_kernels.reference.ssd)."""
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels as mk
    from mlmamba_kernels import _loader
    from mlmamba_kernels.reference import ssd as ref

    HAVE_FWD = _loader.has_cuda_kernel("ssd_scan_fwd")
    HAVE_UPD = _loader.has_cuda_kernel("ssd_state_update")
else:
    HAVE_FWD = HAVE_UPD = False

need_fwd = pytest.mark.skipif(not HAVE_FWD, reason="ssd_scan_fwd CUDA kernel not built")
need_upd = pytest.mark.skipif(not HAVE_UPD, reason="ssd_state_update CUDA kernel not built")

DEV = "cuda"
# ||out - ref|| / ||ref|| bounds. bf16: products take bf16 operands (as the inputs are);
# fp16 / fp32: operands split into bf16 hi + lo (about 16 mantissa bits).
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 2e-4}
TOL_STATE = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def rel_err(out, want):
    out, want = out.double(), want.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def gen(rng):
    """A CUDA generator seeded from the test's (printed) CPU generator."""
    return torch.Generator(DEV).manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))


def make(rng, b, l, h, p, n, g=1, dtype=torch.bfloat16, D="h", z=True, dt_bias=True,
         softplus=True, init=False, dt_dtype=torch.float32, fused=False):
    """Random inputs shaped as a Mamba-2 layer makes them. fused=True slices x, z, B, C, dt out
    of one (b, l, 2hp + 2gn + h) in_proj output, so they are not contiguous."""
    cg = gen(rng)
    r = lambda *s, dt=dtype: torch.randn(*s, device=DEV, generator=cg).to(dt)  # noqa: E731
    if fused:
        w = 2 * h * p + 2 * g * n + h
        zxbcdt = r(b, l, w)
        zz, xx, BB, CC, dd = torch.split(zxbcdt, [h * p, h * p, g * n, g * n, h], dim=-1)
        x, zt = xx.view(b, l, h, p), zz.view(b, l, h, p)
        B, C = BB.view(b, l, g, n), CC.view(b, l, g, n)
        dt_raw = dd if softplus else dd.float().abs().mul(0.05).add(1e-3).to(dtype)
    else:
        x, zt, B, C = r(b, l, h, p), r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
        u = torch.rand(b, l, h, device=DEV, generator=cg)
        dt_raw = (torch.randn(b, l, h, device=DEV, generator=cg) * 0.5 if softplus
                  else 10 ** (-3 + 2 * u)).to(dt_dtype)
    A = -torch.exp(torch.rand(h, device=DEV, generator=cg) * 2.5 - 1)     # [-4.5, -0.37]
    if softplus:  # softplus(bias) in [1e-3, 0.1]
        bias = torch.log(torch.expm1(10 ** (-3 + 2 * torch.rand(h, device=DEV, generator=cg))))
    else:         # dt must stay positive without softplus
        bias = torch.rand(h, device=DEV, generator=cg) * 0.05
    Dt = None
    if D == "h":
        Dt = torch.randn(h, device=DEV, generator=cg)
    elif D == "hp":
        Dt = torch.randn(h, p, device=DEV, generator=cg)
    return dict(x=x, dt=dt_raw, A=A, B=B, C=C, D=Dt, z=zt if z else None,
                dt_bias=bias if dt_bias else None, dt_softplus=softplus,
                initial_states=torch.randn(b, h, p, n, device=DEV, generator=cg) if init else None)


def run_ours(kw, **extra):
    a = {**kw, **extra}
    return torch.ops.mlmamba.ssd_scan_fwd(
        a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("chunk_size", 256), a.get("D"),
        a.get("z"), a.get("dt_bias"), a.get("initial_states"), a.get("seq_idx"),
        a.get("cu_seqlens"), a.get("dt_softplus", False), a.get("dt_limit", (0.0, math.inf))[0],
        a.get("dt_limit", (0.0, math.inf))[1], True)


def run_ref(kw, naive=None, **extra):
    """float64 reference on the (already rounded) inputs; the step-by-step oracle for short
    sequences, the float64 chunked form for long ones."""
    a = {**kw, **extra}
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in a.items()}
    l = a["x"].shape[1]
    fn = ref.ssd_scan_naive if (naive if naive is not None else l <= 300) else ref.ssd_scan
    return fn(d["x"], d["dt"], d["A"], d["B"], d["C"], 64, d.get("D"), d.get("z"),
              d.get("dt_bias"), d.get("initial_states"), a.get("seq_idx"), a.get("cu_seqlens"),
              a.get("dt_softplus", False), a.get("dt_limit", (0.0, math.inf)), True)


def check(kw, dtype=None, **extra):
    dtype = dtype or kw["x"].dtype
    out, fin = run_ours(kw, **extra)
    want, wfin = run_ref(kw, **extra)
    assert out.shape == want.shape and out.dtype == kw["x"].dtype and out.is_contiguous()
    assert fin.dtype == torch.float32 and fin.shape == wfin.shape
    e, es = rel_err(out, want), rel_err(fin, wfin)
    assert e < TOL[dtype], f"out rel err {e:.3g}"
    assert es < TOL_STATE[dtype], f"final state rel err {es:.3g}"
    return e, es


# ---- features -----------------------------------------------------------------------------

@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_features(rng, dtype):
    kw = make(rng, 2, 257, 4, 64, 64, g=2, dtype=dtype, D="hp", init=True)
    check(kw, dt_limit=(0.002, 0.08))


@need_fwd
@pytest.mark.parametrize("feature", ["none", "D_h", "D_hp", "z", "dt_bias", "softplus",
                                     "dt_limit", "init", "dt_bf16"])
def test_feature_alone(rng, feature):
    kw = make(rng, 2, 100, 3, 64, 32, D={"D_h": "h", "D_hp": "hp"}.get(feature),
              z=feature == "z", dt_bias=feature == "dt_bias", softplus=feature == "softplus",
              init=feature == "init",
              dt_dtype=torch.bfloat16 if feature == "dt_bf16" else torch.float32)
    extra = {"dt_limit": (0.003, 0.02)} if feature == "dt_limit" else {}
    check(kw, **extra)


@need_fwd
@pytest.mark.parametrize("l", [1, 63, 64, 65, 255, 257, 1000, 4097])
def test_lengths(rng, l):
    check(make(rng, 2, l, 2, 64, 64, g=1, init=l % 2 == 1))


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [32, 64, 128])
@pytest.mark.parametrize("n", [16, 32, 64, 128, 256])
def test_headdim_dstate(rng, dtype, p, n):
    check(make(rng, 1, 130, 2, p, n, dtype=dtype, init=True))


@need_fwd
@pytest.mark.parametrize("pt", ["32", "64"])
@pytest.mark.parametrize("minb", ["1", "2"])
def test_both_channel_splits(rng, monkeypatch, pt, minb):
    """Every kernel variant the host may pick for dstate 128: 32 or 64 head channels per CTA,
    registers budgeted for 1 or 2 CTAs per SM (the host picks by grid size)."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_PT", pt)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_MINB", minb)
    check(make(rng, 2, 200, 3, 128, 128, init=True))


def kernel_names(kw, **extra):
    """Names of the CUDA kernels one forward call runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_ours(kw, **extra)
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def fwd_kernel_names(kw, **extra):
    """Names of the forward kernels one call runs (the two sm_90 kernels can give bitwise
    equal outputs: the same bf16 operands summed in the same k order)."""
    return [nm for nm in kernel_names(kw, **extra) if "ssd_fwd" in nm]


def three_segments(l):
    """seq_idx (2, l) with resets at l / 3 and 2 l / 3."""
    si = torch.zeros(2, l, dtype=torch.int32, device=DEV)
    si[:, l // 3:] = 1
    si[:, (2 * l) // 3:] = 2
    return si


def assert_bitwise_as(monkeypatch, base_env, env, kernel, kw, exact=True, **extra):
    """Outputs and final states with the variables env set are bitwise those with base_env
    (exact=False: within a bf16 rounding of the outputs and 1e-4 of the fp32 final states),
    and the call runs a kernel whose name holds `kernel`."""
    for k, v in base_env.items():
        monkeypatch.setenv(k, v)
    base, base_fin = run_ours(kw, **extra)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out, fin = run_ours(kw, **extra)
    assert any(kernel in nm for nm in kernel_names(kw, **extra))
    if exact:
        assert torch.equal(out, base) and torch.equal(fin, base_fin)
        return
    scale = base.float().abs().max().item()
    assert (out.float() - base.float()).abs().max().item() <= 8e-3 * scale
    fscale = base_fin.abs().max().item()
    assert torch.allclose(fin, base_fin, rtol=1e-4, atol=1e-5 * fscale)


sm90 = pytest.mark.skipif(not torch.cuda.is_available() or
                          torch.cuda.get_device_capability()[0] != 9, reason="needs sm_90")


@need_fwd
@sm90
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("l", [1, 64, 200])
def test_wgmma_kernel(rng, monkeypatch, n, l):
    """The sm_90a kernel (the default there for bf16, headdim 64; forced here): every feature."""
    kw = make(rng, 2, l, 3, 64, n, init=True)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_IMPL", "wgmma")
    check(kw, dt_limit=(0.002, 0.5))
    names = fwd_kernel_names(kw, dt_limit=(0.002, 0.5))
    assert names and all("wgmma" in nm for nm in names), names
    b = 2
    seq = torch.zeros(b, l, dtype=torch.int32, device=DEV)
    for t in (5, 64, 65, 130):   # resets inside a chunk and on its boundary
        if t < l:
            seq[0, t:] += 1
    check(make(rng, b, l, 3, 64, n, D="hp"), seq_idx=seq)
    # non-contiguous slices of one in_proj output, two groups; packed sequences with states
    check(make(rng, 2, l, 8, 64, n, g=2, fused=True, init=True, z=False))  # rows 16-B aligned
    lens = [1, 0, 70, 64, 0, 129, 3]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    kw = make(rng, 1, sum(lens), 3, 64, n)
    kw["initial_states"] = torch.randn(len(lens), 3, 64, n, device=DEV, generator=gen(rng))
    check(kw, cu_seqlens=cu)


@need_fwd
@sm90
@pytest.mark.parametrize("ws,subseg,vec", [("", "", ""), ("0", "", ""), ("", "1", ""),
                                            ("", "3", ""), ("", "3", "0"), ("0", "2", "0")])
@pytest.mark.parametrize("segments", ["2", "3", "7"])
@pytest.mark.parametrize("l,n", [(300, 64), (1000, 128), (4097, 128)])
def test_sequence_split(rng, monkeypatch, segments, l, n, ws, subseg, vec):
    """The wgmma forward with the sequence split in segments (fwd_split.cpp): (sub-)segment
    states from zero, combined with the decays (one kernel from the pre-pass's chunk decays, or
    torch ops without the pre-pass), then every segment from its incoming state (on the
    warp-specialized kernel by default, on the wgmma one with MLMAMBA_SSD_FWD_WS=0)."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_SEGMENTS", segments)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_WS", ws)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_SUBSEG", subseg)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_VEC", vec)
    kw = make(rng, 2, l, 3, 64, n, D="hp", init=True)
    check(kw, dt_limit=(0.002, 0.5))
    names = kernel_names(kw, dt_limit=(0.002, 0.5))
    # template <N, SO (state only), MSC>: the state-only pass and the full pass both ran
    assert any("true, false>" in nm for nm in names), names
    full = "false, false>" if ws == "0" or vec == "0" else "ssd_fwd_ws_kernel"
    assert any(full in nm for nm in names), names
    assert any("split_states_kernel" in nm for nm in names) == (vec != "0"), names
    check(make(rng, 1, l, 2, 64, n, softplus=False, dt_bias=False, z=False))  # no init, no bias


@need_fwd
@sm90
@pytest.mark.parametrize("n,l,fused,init,segments", [
    (64, 1, False, False, ""), (128, 63, True, True, ""), (128, 65, False, True, ""),
    (64, 1000, True, False, ""), (128, 4097, False, True, "3"), (64, 300, True, True, "2")])
def test_tma_loads(rng, monkeypatch, n, l, fused, init, segments):
    """The wgmma kernel's tiles by TMA hold the same values as by
    cp.async (zeros past the sequence end included), so the outputs are bitwise equal."""
    if segments:
        monkeypatch.setenv("MLMAMBA_SSD_FWD_SEGMENTS", segments)
    kw = make(rng, 2, l, 3, 64, n, g=1, D="hp", init=init, fused=fused)
    seq = torch.zeros(2, l, dtype=torch.int32, device=DEV)
    seq[:, l // 2:] = 1  # a reset inside the sequence (no effect on the loads)
    extra = {} if segments else {"seq_idx": seq}
    monkeypatch.setenv("MLMAMBA_SSD_FWD_TMA", "0")
    base, base_fin = run_ours(kw, **extra)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_TMA", "require")  # an error if TMA is not used
    out, fin = run_ours(kw, **extra)
    assert torch.equal(out, base) and torch.equal(fin, base_fin)
    check(kw, **extra)


@need_fwd
@sm90
@pytest.mark.parametrize("n,l,tma,segments,seq,limit,softplus", [
    (64, 1, "", "", False, False, True), (128, 63, "0", "", True, False, True),
    (128, 4097, "", "3", False, True, True), (64, 1000, "", "", True, False, False),
    (128, 300, "0", "2", False, False, True), (128, 2048, "", "", True, True, True)])
def test_vector_prepass(rng, monkeypatch, n, l, tma, segments, seq, limit, softplus):
    """The wgmma walk's chunk vectors from the parallel pre-pass (the default) are the values
    warp 0 computes in the walk (MLMAMBA_SSD_FWD_VEC=0): the same code on the same rows and
    segments, so bitwise equal outputs and final states; TMA and cp.async. With the split,
    step 2 differs (the segment decays from the chunk decays' product in one kernel, or from
    torch ops), so there the two agree within rounding."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_TMA", tma)
    monkeypatch.setenv("MLMAMBA_SSD_FWD_WS", "0")  # the wgmma kernel on both sides
    if segments:
        monkeypatch.setenv("MLMAMBA_SSD_FWD_SEGMENTS", segments)
    kw = make(rng, 2, l, 5, 64, n, g=1, init=True, softplus=softplus)
    extra = {"dt_limit": (0.002, 0.5)} if limit else {}
    if seq:
        extra["seq_idx"] = three_segments(l)
    assert_bitwise_as(monkeypatch, {"MLMAMBA_SSD_FWD_VEC": "0"}, {"MLMAMBA_SSD_FWD_VEC": ""},
                      "fwd_vectors_kernel", kw, exact=not segments, **extra)
    check(kw, **extra)


@need_fwd
@sm90
@pytest.mark.parametrize("n,l,init,z,D,seq,limit,fused", [
    (64, 1, False, False, None, False, False, False), (128, 63, True, True, "h", False, False, False),
    (128, 65, True, False, "hp", True, False, True), (64, 1000, False, True, "h", True, True, False),
    (128, 4097, True, True, "h", False, False, True), (128, 2048, True, False, "h", True, True, False)])
def test_ws_kernel(rng, monkeypatch, n, l, init, z, D, seq, limit, fused):
    """The warp-specialized kernel (the default where it can run: a state and an output
    warpgroup per CTA) does the wgmma kernel's (MLMAMBA_SSD_FWD_WS=0) arithmetic operation for
    operation: bitwise equal outputs and final states (no sequence split on either side), and
    within tolerance of float64."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_SEGMENTS", "1")
    kw = make(rng, 2, l, 5, 64, n, g=1, D=D, z=z, init=init, fused=fused)
    extra = {"dt_limit": (0.002, 0.5)} if limit else {}
    if seq:
        extra["seq_idx"] = three_segments(l)
    assert_bitwise_as(monkeypatch, {"MLMAMBA_SSD_FWD_WS": "0"}, {"MLMAMBA_SSD_FWD_WS": ""},
                      "ssd_fwd_ws_kernel", kw,
                      **extra)
    check(kw, **extra)


@need_fwd
@sm90
def test_ws_kernel_needs_tma(rng, monkeypatch):
    """Asked for by name where it cannot run (no TMA maps here), the error says why."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_IMPL", "ws")
    monkeypatch.setenv("MLMAMBA_SSD_FWD_TMA", "0")
    with pytest.raises(RuntimeError, match="MLMAMBA_SSD_FWD_IMPL=ws: it needs TMA"):
        run_ours(make(rng, 1, 70, 2, 64, 64))


@need_fwd
@sm90
def test_sequence_split_chosen_for_few_heads(rng):
    """Two heads of one long sequence leave most SMs idle: the host splits it by itself."""
    kw = make(rng, 1, 4096, 2, 64, 128, init=True)
    check(kw)
    names = fwd_kernel_names(kw)
    assert any("true, false>" in nm for nm in names), names


@need_fwd
@sm90
@pytest.mark.parametrize("impl", ["", "mma"])
def test_sm90_kernel_choice(rng, monkeypatch, impl):
    """Unset: a wgmma kernel for bf16 headdim 64 (the warp-specialized one with TMA tiles);
    MLMAMBA_SSD_FWD_IMPL=mma: the portable one (what sm_80 runs), still correct on these shapes."""
    monkeypatch.setenv("MLMAMBA_SSD_FWD_IMPL", impl)
    kw = make(rng, 2, 150, 3, 64, 128, init=True)
    check(kw)
    names = fwd_kernel_names(kw)
    assert names and all(("ssd_fwd_ws_kernel" in nm) == (impl == "") for nm in names), names
    monkeypatch.setenv("MLMAMBA_SSD_FWD_TMA", "0")  # no TMA tiles: the one-warpgroup kernel
    names = fwd_kernel_names(kw)
    assert names and all(("wgmma" in nm) == (impl == "") for nm in names), names


@need_fwd
@pytest.mark.parametrize("g", [1, 2, 8])
def test_ngroups(rng, g):
    check(make(rng, 2, 150, 8, 32, 64, g=g))


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_seq_idx(rng, dtype):
    b, l = 2, 300
    kw = make(rng, b, l, 3, 64, 64, dtype=dtype, init=True)
    seq = torch.zeros(b, l, dtype=torch.int32, device=DEV)
    for t in (5, 64, 65, 128, 200, 201, 299):   # resets inside chunks, on boundaries, adjacent
        seq[0, t:] += 1
    seq[1, 128:] += 3                             # one reset exactly on a chunk boundary
    check(kw, seq_idx=seq)


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("init", [False, True])
def test_cu_seqlens(rng, dtype, init):
    lens = [1, 0, 70, 64, 0, 129, 3, 1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    l = sum(lens)
    kw = make(rng, 1, l, 3, 64, 32, dtype=dtype)
    if init:
        kw["initial_states"] = torch.randn(len(lens), 3, 64, 32, device=DEV,
                                           generator=gen(rng))
    check(kw, cu_seqlens=cu)


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_in_proj_slices(rng, dtype):
    kw = make(rng, 2, 190, 4, 64, 64, g=2, dtype=dtype, fused=True, init=True)
    assert not kw["x"].is_contiguous() and not kw["B"].is_contiguous()
    check(kw)


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_misaligned_and_strided(rng, dtype):
    """x with a p stride of 2, B/C at an odd element offset (bf16 takes a copy of these)."""
    kw = make(rng, 2, 100, 2, 64, 32, dtype=dtype, init=True)
    cg = gen(rng)
    kw["x"] = torch.randn(2, 100, 2, 128, device=DEV, generator=cg).to(dtype)[..., ::2]
    big = torch.randn(2, 100, 2 * 32 + 1, device=DEV, generator=cg).to(dtype)
    kw["B"], kw["C"] = big[..., 1:33].unsqueeze(2), big[..., 33:].unsqueeze(2)
    kw["z"] = torch.randn(2, 2, 64, 100, device=DEV, generator=cg).to(dtype).permute(0, 3, 1, 2)
    check(kw)


@need_fwd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extreme_dt_and_A(rng, dtype):
    b, l, h = 1, 300, 4
    kw = make(rng, b, l, h, 64, 64, dtype=dtype, softplus=False, dt_bias=False, init=True)
    u = torch.rand(b, l, h, device=DEV, generator=gen(rng))
    kw["dt"] = 10 ** (-4 + 6 * u)                                  # 1e-4 .. 1e2
    kw["A"] = torch.tensor([-1e-6, -1e-3, -1.0, -50.0], device=DEV)  # near 0 .. strong decay
    out, fin = run_ours(kw)
    assert torch.isfinite(out).all() and torch.isfinite(fin).all()
    want, wfin = run_ref(kw)
    assert rel_err(out, want) < TOL[dtype], "out"
    # The kernels' decays are exp of differences of fp32 running sums of A dt over a chunk of
    # 64, whose magnitude reaches kappa = |A| x (a chunk's dt sum): an exponent off by ~2^-24
    # kappa per addition. Each head's final state is judged against that floor too.
    pad = (-l) % 64
    sums = torch.nn.functional.pad(kw["dt"].double(), (0, 0, 0, pad)).unflatten(1, (-1, 64)).sum(2)
    kappa = kw["A"].double().abs() * sums.amax((0, 1))
    A = kw["A"].tolist()
    for i in range(h):
        e = rel_err(fin[:, i], wfin[:, i])
        bound = max(TOL_STATE[dtype], 16 * 2**-24 * kappa[i].item())
        assert e < bound, f"head {i}: final state rel err {e:.3g} > {bound:.3g} (A {A[i]:g})"


@need_fwd
def test_chaining_equals_one_call(rng):
    kw = make(rng, 2, 400, 4, 64, 64, dtype=torch.float32, init=True)
    out, fin = run_ours(kw)
    cut = 173
    part = lambda t, s: t[:, s] if t is not None and t.dim() >= 3 else t  # noqa: E731
    k1 = {k: part(v, slice(0, cut)) if k in ("x", "dt", "B", "C", "z") else v
          for k, v in kw.items()}
    k2 = {k: part(v, slice(cut, None)) if k in ("x", "dt", "B", "C", "z") else v
          for k, v in kw.items()}
    o1, f1 = run_ours(k1)
    k2["initial_states"] = f1
    o2, f2 = run_ours(k2)
    assert rel_err(torch.cat([o1, o2], 1), out) < 1e-5
    assert rel_err(f2, fin) < 1e-5


@need_fwd
def test_over_2_31_elements(rng):
    """b*l*h*p > 2^31: the second batch row lives past element 2^31. A seq_idx reset near the
    end makes its tail independent of the rest, so the tail is checked against the oracle."""
    b, h, p, n = 2, 64, 64, 16
    l = 2**31 // (b * h * p) + 1001
    tail = 200
    cg = gen(rng)
    x = torch.randn(b, l, h, p, device=DEV, generator=cg, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    B = torch.randn(b, l, 1, n, device=DEV, generator=cg, dtype=torch.bfloat16)
    C = torch.randn(b, l, 1, n, device=DEV, generator=cg, dtype=torch.bfloat16)
    dt = torch.rand(b, l, h, device=DEV, generator=cg) * 0.1
    A = -torch.rand(h, device=DEV, generator=cg) - 0.5
    D = torch.randn(h, device=DEV, generator=cg)
    seq = torch.zeros(b, l, dtype=torch.int32, device=DEV)
    seq[:, l - tail:] = 1
    out, fin = torch.ops.mlmamba.ssd_scan_fwd(x, dt, A, B, C, 256, D, None, None, None, seq,
                                              None, False, 0.0, math.inf, True)
    kw = dict(x=x[1:, -tail:], dt=dt[1:, -tail:], A=A, B=B[1:, -tail:], C=C[1:, -tail:], D=D)
    want, wfin = run_ref(kw, naive=True)
    assert rel_err(out[1:, -tail:], want) < TOL[torch.bfloat16]
    assert rel_err(fin[1:], wfin) < TOL_STATE[torch.bfloat16]


_ERRORS_SCRIPT = r"""
import math, torch
import mlmamba_kernels  # noqa: F401  (loads the extension)
x = torch.randn(1, 8, 6, 64, device="cuda")
dt, A = torch.rand(1, 8, 6, device="cuda"), -torch.rand(6, device="cuda")
for B in (torch.randn(1, 8, 4, 32, device="cuda"), torch.randn(1, 8, 1, 24, device="cuda")):
    try:
        torch.ops.mlmamba.ssd_scan_fwd(x, dt, A, B, B, 64, None, None, None, None, None, None,
                                       False, 0.0, math.inf, False)
    except RuntimeError as e:
        print("ERROR:", str(e).splitlines()[0])
s = torch.randn(2, 4, 8, 24, device="cuda")
try:
    torch.ops.mlmamba.ssd_state_update(s, torch.randn(2, 4, 8, device="cuda"),
                                       torch.rand(2, 4, device="cuda"), -torch.rand(4, device="cuda"),
                                       torch.randn(2, 1, 24, device="cuda"),
                                       torch.randn(2, 1, 24, device="cuda"), None, None, None, False)
except RuntimeError as e:
    print("ERROR:", str(e).splitlines()[0])
"""


@need_fwd
def test_errors():
    """Bad arguments raise errors naming the argument. Run in a subprocess: a JIT build of the
    extension once crashed (SIGSEGV) on its first C++ exception (docs/perf-log.md)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _ERRORS_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 3, r.stdout
    assert "B has 4 groups, which does not divide 6 heads" in lines[0]
    assert "dstate 16, 32, 64, 128 or 256, got 24" in lines[1]
    assert "ssd_state_update" in lines[2] and "got 24" in lines[2]


@need_fwd
def test_opcheck(rng):
    kw = make(rng, 1, 70, 2, 32, 16, dtype=torch.float32, init=True)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 64, kw["D"], kw["z"], kw["dt_bias"],
            kw["initial_states"], None, None, True, 0.0, math.inf, True)
    torch.library.opcheck(torch.ops.mlmamba.ssd_scan_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@need_fwd
def test_torch_compile_fullgraph(rng):
    kw = make(rng, 1, 90, 2, 64, 32, dtype=torch.bfloat16)

    def f(x, dt, A, B, C, D, z, bias):
        return mk.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True) * 2

    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"])
    got = torch.compile(f, fullgraph=True)(*args)
    torch.testing.assert_close(got, f(*args), rtol=0, atol=0)


# ---- decode step --------------------------------------------------------------------------

def upd_inputs(rng, b, h, p, n, g, xdtype=torch.float32):
    cg = gen(rng)
    r = lambda *s: torch.randn(*s, device=DEV, generator=cg)  # noqa: E731
    return dict(x=r(b, h, p).to(xdtype), dt=r(b, h) * 0.5, A=-torch.rand(h, device=DEV, generator=cg) - 0.3,
                B=r(b, g, n).to(xdtype), C=r(b, g, n).to(xdtype), D=r(h), z=r(b, h, p).to(xdtype),
                dt_bias=r(h) * 0.3 - 2)


@need_upd
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [16, 64, 128, 256])
def test_state_update(rng, state_dtype, n, xdtype):
    b, h, p, g = 3, 6, 32, 2
    kw = upd_inputs(rng, b, h, p, n, g, xdtype)
    state = torch.randn(b, h, p, n, device=DEV, generator=gen(rng)).to(state_dtype)
    s_ref = state.double()
    want = ref.ssd_state_update(s_ref, *(kw[k].double() for k in ("x", "dt", "A", "B", "C", "D",
                                                                  "z", "dt_bias")), True)
    got = torch.ops.mlmamba.ssd_state_update(state, kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"],
                                             kw["D"], kw["z"], kw["dt_bias"], True)
    exact = state_dtype == torch.float32 and xdtype == torch.float32   # else y rounds to 16 bits
    tol = 1e-5 if exact else 1e-2
    assert rel_err(got, want) < tol
    assert rel_err(state, s_ref) < (1e-6 if state_dtype == torch.float32 else 1e-2)


@need_upd
def test_state_update_strided_state(rng):
    b, h, p, n = 2, 4, 32, 64
    kw = upd_inputs(rng, b, h, p, n, 1)
    big = torch.randn(b, h, p, 2 * n, device=DEV, generator=gen(rng))
    state = big[..., ::2]                                  # n stride 2: works on a copy
    wide = torch.randn(b, 1, 4 * n, device=DEV, generator=gen(rng))
    kw["B"], kw["C"] = wide[..., ::4], wide[..., 1::4]     # strided B, C: scalar loads
    s_ref = state.double().clone()
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    want = ref.ssd_state_update(s_ref, *(a.double() for a in args), True)
    got = torch.ops.mlmamba.ssd_state_update(state, *args, True)
    assert rel_err(got, want) < 1e-5 and rel_err(big[..., ::2], s_ref) < 1e-6


@need_fwd
@need_upd
def test_decode_equals_scan(rng):
    b, l, h, p, n, g = 2, 37, 4, 64, 64, 2
    kw = make(rng, b, l, h, p, n, g=g, dtype=torch.float32, init=True)
    out, fin = run_ours(kw)
    state = kw["initial_states"].clone()
    for t in range(l):
        y = torch.ops.mlmamba.ssd_state_update(state, kw["x"][:, t], kw["dt"][:, t], kw["A"],
                                               kw["B"][:, t], kw["C"][:, t], kw["D"],
                                               kw["z"][:, t], kw["dt_bias"], True)
        assert rel_err(y, out[:, t]) < 1e-4, f"token {t}"
    assert rel_err(state, fin) < 1e-4


@need_upd
def test_state_update_cuda_graph(rng):
    b, h, p, n = 2, 8, 64, 128
    kw = upd_inputs(rng, b, h, p, n, 1, xdtype=torch.bfloat16)
    state = torch.randn(b, h, p, n, device=DEV, generator=gen(rng))
    s0 = state.clone()
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.mlmamba.ssd_state_update(state, *args, True)   # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.mlmamba.ssd_state_update(state, *args, True)
    state.copy_(s0)
    graph.replay()
    graph.replay()
    s_eager = s0.clone()
    torch.ops.mlmamba.ssd_state_update(s_eager, *args, True)
    y_eager = torch.ops.mlmamba.ssd_state_update(s_eager, *args, True)
    torch.testing.assert_close(state, s_eager, rtol=0, atol=0)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)


@need_upd
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_update_graph_chain(rng, state_dtype):
    """Steps that depend on each other in one graph: each reads the state the step before wrote
    (update after update) and an x a torch kernel just made; graph, eager and reference agree."""
    b, h, p, n = 3, 8, 64, 128
    kw = upd_inputs(rng, b, h, p, n, 1, xdtype=torch.bfloat16)
    s0 = torch.randn(b, h, p, n, device=DEV, generator=gen(rng)).to(state_dtype)
    rest = [kw[k] for k in ("dt", "A", "B", "C", "D", "z", "dt_bias")]

    def steps(state):
        x, ys = kw["x"], []
        for _ in range(6):
            x = x * 1.5 - 0.25                                   # a producer right before
            for _ in range(2):                                   # then update after update
                ys.append(torch.ops.mlmamba.ssd_state_update(state, x, *rest, True))
        return torch.stack(ys)

    s_eager = s0.clone()
    want = steps(s_eager)
    s_ref, x = s0.double(), kw["x"]
    for t in range(12):                                          # y is bf16: its rounding
        x = x * 1.5 - 0.25 if t % 2 == 0 else x
        y_ref = ref.ssd_state_update(s_ref, x.double(), *(a.double() for a in rest), True)
        assert rel_err(want[t], y_ref) < 1e-2, t
    state = s0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        steps(state.clone())                                     # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = steps(state)
    state.copy_(s0)
    graph.replay()
    torch.testing.assert_close(state, s_eager, rtol=0, atol=0)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@need_upd
def test_state_update_opcheck(rng):
    kw = upd_inputs(rng, 2, 4, 32, 16, 2)
    state = torch.randn(2, 4, 32, 16, device=DEV, generator=gen(rng))
    args = (state, kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"],
            True)
    torch.library.opcheck(torch.ops.mlmamba.ssd_state_update.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
