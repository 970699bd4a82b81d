"""CUDA SSD scan backward (csrc/ssd/bwd*): gradients against float64 autograd through the
reference, determinism, extreme inputs, the op contract. GPU only (marked gpu).

The kernel multiplies bf16 operands on the tensor cores with fp32 accumulation, for every input
dtype, so each gradient is judged by its norm-wise relative error against a bound of a few bf16
roundings (TOL below).
"""
import math
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels  # noqa: F401  (defines the ops, loads _C)
    from mlmamba_kernels._loader import has_cuda_kernel
    from mlmamba_kernels.reference import ssd as ref
    HAVE = has_cuda_kernel("ssd_scan_bwd")
else:
    HAVE = False

needs_kernel = pytest.mark.skipif(not HAVE, reason="the CUDA ssd_scan_bwd kernel is not built")
NAMES = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinit")
INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# norm-wise relative error bound: bf16 operands (unit roundoff 2^-8) through ~4 roundings
TOL = {torch.bfloat16: 2.5e-2, torch.float16: 2.5e-2, torch.float32: 2e-2}


_last_seed = [None]


def _gen(seed=None):
    if seed is None:
        seed = int(os.environ.get("MLMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (MLMAMBA_TEST_SEED={seed} replays it)")
    _last_seed[0] = seed
    return torch.Generator(device="cuda").manual_seed(seed)


def _noncontig(t):
    """The same values in a strided view (a slice of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2 + 3, dtype=t.dtype, device=t.device)
    wide[..., 1:1 + t.shape[-1]] = t
    return wide[..., 1:1 + t.shape[-1]]


def make_case(gen, b=2, l=200, h=4, p=64, g=2, n=64, dtype=torch.bfloat16, dt_dtype=None,
              D="h", z=True, dt_bias=True, init=True, dfinal=True, seq_idx=False, cu=None,
              softplus=True, limit=(0.0, math.inf), noncontig=False, dt_shift=0.0, A_scale=1.0):
    dev = "cuda"
    r = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=torch.float32)
    nseq = b if cu is None else len(cu) - 1
    t = dict(x=r(b, l, h, p).to(dtype), dt=(r(b, l, h) + dt_shift).to(dt_dtype or dtype),
             A=-(torch.rand(h, generator=gen, device=dev) + 0.05) * A_scale,
             B=r(b, l, g, n).to(dtype), C=r(b, l, g, n).to(dtype),
             D=None if D is None else (r(h) if D == "h" else r(h, p)),
             z=r(b, l, h, p).to(dtype) if z else None,
             dt_bias=r(h) * 0.5 if dt_bias else None,
             initial_states=r(nseq, h, p, n) if init else None)
    if noncontig:
        for k in ("x", "B", "C", "z", "dt"):
            if t[k] is not None:
                t[k] = _noncontig(t[k])
    kw = dict(seq_idx=None, cu_seqlens=None, dt_softplus=softplus, dt_limit=limit)
    if seq_idx:
        si = torch.zeros(b, l, dtype=torch.int32, device=dev)
        for bb in range(b):
            for c in torch.randint(1, max(2, l), (3,), generator=gen, device=dev).tolist():
                si[bb, c:] += 1
        kw["seq_idx"] = si
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=dev)
    dout = r(b, l, h, p).to(dtype)
    dfin = r(nseq, h, p, n) if dfinal else None
    return t, kw, dout, dfin


def run_kernel(t, kw, dout, dfin, chunk_states=None):
    lo, hi = kw["dt_limit"]
    return torch.ops.mlmamba.ssd_scan_bwd(
        dout, dfin, t["x"], t["dt"], t["A"], t["B"], t["C"], 256, t["D"], t["z"], t["dt_bias"],
        t["initial_states"], kw["seq_idx"], kw["cu_seqlens"], kw["dt_softplus"], lo, hi,
        chunk_states)


def run_reference(t, kw, dout, dfin):
    leaves = {k: (None if v is None else v.detach().double().requires_grad_(True))
              for k, v in t.items()}
    out, fin = ref.ssd_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 64,
                            leaves["D"], leaves["z"], leaves["dt_bias"], leaves["initial_states"],
                            kw["seq_idx"], kw["cu_seqlens"], kw["dt_softplus"], kw["dt_limit"],
                            True)
    loss = (out * dout.double()).sum()
    if dfin is not None:
        loss = loss + (fin * dfin.double()).sum()
    used = [leaves[k] for k in INPUTS if leaves[k] is not None]
    grads = iter(torch.autograd.grad(loss, used, allow_unused=True))
    res = []
    for k in INPUTS:
        if leaves[k] is None:
            res.append(None)
        else:
            gk = next(grads)
            res.append(torch.zeros_like(leaves[k]) if gk is None else gk)
    return res


def dA_terms(t, kw, dout, dfin):
    """Per-token terms of dA in float64: the gradient of an A given per token (b, l, h), through
    the step-by-step oracle. dA[h] is their sum over tokens."""
    d = {k: (None if v is None else v.detach().double()) for k, v in t.items()}
    b, l, h = d["dt"].shape
    A = d["A"].expand(b, l, h).clone().requires_grad_(True)
    out, fin = ref.ssd_scan_naive(d["x"], d["dt"], A, d["B"], d["C"], 64, d["D"], d["z"],
                                  d["dt_bias"], d["initial_states"], kw["seq_idx"],
                                  kw["cu_seqlens"], kw["dt_softplus"], kw["dt_limit"], True)
    loss = (out * dout.double()).sum()
    if dfin is not None:
        loss = loss + (fin * dfin.double()).sum()
    return torch.autograd.grad(loss, A)[0]


def rel_err(a, r):
    return ((a.double() - r).norm() / r.norm().clamp(min=1e-30)).item()


def check(t, kw, dout, dfin, tol=None):
    got = run_kernel(t, kw, dout, dfin)
    want = run_reference(t, kw, dout, dfin)
    tol = tol or TOL[t["x"].dtype]
    errs = {}
    for name, inp, a, r in zip(NAMES, INPUTS, got, want):
        if r is None:
            assert a.numel() == 0, f"{name} should be empty"
            continue
        src = t[inp]
        assert a.shape == src.shape and a.dtype == src.dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        errs[name] = rel_err(a, r)
    if "ddt_bias" in errs:
        # ddt_bias[h] is the sum of ddt[..., h] over tokens: a sum of random-sign terms can
        # cancel to near zero, so its error is measured at the scale of the terms it sums
        a, r = got[NAMES.index("ddt_bias")], want[NAMES.index("ddt_bias")]
        scale = torch.maximum(r.norm(), want[NAMES.index("ddt")].norm()).clamp(min=1e-30)
        errs["ddt_bias"] = ((a.double() - r).norm() / scale).item()
    if errs.get("dA", 0.0) > tol:
        # dA[h] sums b*l random-sign terms (dA_terms) and can cancel far below them, like
        # ddt_bias: judged at the scale of the terms when the plain relative error is over
        a, r = got[NAMES.index("dA")], want[NAMES.index("dA")]
        scale = torch.maximum(r.norm(), dA_terms(t, kw, dout, dfin).norm()).clamp(min=1e-30)
        errs["dA"] = ((a.double() - r).norm() / scale).item()
    print({k: f"{v:.2e}" for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors over {tol}: {bad} (MLMAMBA_TEST_SEED={_last_seed[0]} replays it)"
    return got


@needs_kernel
def test_all_features_bf16():
    check(*make_case(_gen()))


@needs_kernel
@pytest.mark.parametrize("p,n", [(32, 16), (64, 128), (128, 256), (48, 100), (128, 32)])
def test_sizes(p, n):
    check(*make_case(_gen(), b=1, l=131, h=2, g=1, p=p, n=n))


@needs_kernel
@pytest.mark.parametrize("l", [1, 63, 64, 65, 127, 1000])
def test_lengths(l):
    check(*make_case(_gen(), b=2, l=l, h=3, g=1, p=32, n=32))


@needs_kernel
@pytest.mark.parametrize("dtype,dt_dtype", [(torch.float16, None), (torch.float32, None),
                                            (torch.bfloat16, torch.float32)])
def test_dtypes(dtype, dt_dtype):
    check(*make_case(_gen(), l=150, dtype=dtype, dt_dtype=dt_dtype))


@needs_kernel
def test_groups_and_D_per_channel():
    check(*make_case(_gen(), b=1, l=100, h=8, g=4, p=32, n=32, D="hp"))
    check(*make_case(_gen(), b=1, l=100, h=6, g=1, p=32, n=32, D=None, z=False, dt_bias=False))


@needs_kernel
def test_seq_idx():
    check(*make_case(_gen(), b=2, l=300, h=2, g=1, seq_idx=True))


@needs_kernel
@pytest.mark.parametrize("init", [True, False])
def test_cu_seqlens(init):
    cu = [0, 5, 5, 70, 200, 333]
    check(*make_case(_gen(), b=1, l=333, h=2, g=1, cu=cu, init=init))


@needs_kernel
def test_dt_limit_and_no_softplus():
    check(*make_case(_gen(), l=120, limit=(0.3, 1.2)))
    check(*make_case(_gen(), l=120, softplus=False, dt_shift=2.0, dt_bias=False))


@needs_kernel
def test_noncontiguous():
    check(*make_case(_gen(), l=97, noncontig=True))


@needs_kernel
def test_long_strong_decay():
    check(*make_case(_gen(), b=1, l=4096, h=2, g=1, p=64, n=64, dt_shift=2.0, A_scale=20.0))


@needs_kernel
def test_dinit_strong_first_decay():
    """Every head decays past e^-60 at its first token (a_1 = dt_1 A about -70 and -80):
    dinitial_states is then about e^a_1 |dy_1 C_1|, tiny but a normal fp32, and keeps its
    relative accuracy (a clamp of the log decay at -60 once gave e^-60 |dy_1 C_1|: 1e4 off)."""
    t, kw, dout, dfin = make_case(_gen(), b=1, l=200, h=2, g=1, p=64, n=64)
    t["A"] = torch.tensor([-14.0, -16.0], device="cuda")
    dt = t["dt"].float()
    dt[:, 0, :] = 5.0 - t["dt_bias"]  # softplus(5) = 5.007
    t["dt"] = dt.to(t["dt"].dtype)
    check(t, kw, dout, dfin)


@needs_kernel
def test_extreme_dt_and_A_near_zero():
    gen = _gen()
    t, kw, dout, dfin = make_case(gen, b=1, l=257, h=2, g=1, p=32, n=32)
    t["dt"] = (torch.randn_like(t["dt"], dtype=torch.float32) * 40).to(t["dt"].dtype)
    t["A"] = torch.tensor([-1e-7, 0.0], device="cuda")
    got = run_kernel(t, kw, dout, dfin)
    for name, a in zip(NAMES, got):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
    t["A"] = torch.tensor([-1e4, -3e3], device="cuda")
    for name, a in zip(NAMES, run_kernel(t, kw, dout, dfin)):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf (strong decay)"


@needs_kernel
@pytest.mark.parametrize("p,n,h,z", [(64, 128, 7, False), (32, 64, 5, True), (128, 128, 3, True),
                                     (48, 100, 6, True), (64, 256, 3, False)])
def test_partials_on_chip_match_global(p, n, h, z, monkeypatch):
    """Step 2 keeps the dB/dC sums over a split's heads on chip (two 8-warp groups taking
    alternate heads at headdim <= 64); MLMAMBA_SSD_BWD_PARTIALS=global forces the per-head
    global read-modify-write. Everything but dB/dC is computed the same way (bitwise equal);
    dB/dC may differ only by the grouping of the splits' fp32 sums. Long enough that a split
    holds several heads (odd counts: one group takes one head more). bwd_chunk.cuh forced
    (MLMAMBA_SSD_BWD_CHUNK=mma; the wgmma kernel keeps its sums in registers)."""
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", "mma")
    case = make_case(_gen(), b=4, l=1500, h=h, g=1, p=p, n=n, z=z, seq_idx=True)
    got = run_kernel(*case)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_PARTIALS", "global")
    want = run_kernel(*case)
    for name, a, b in zip(NAMES, got, want):
        if name in ("dB", "dC"):
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err <= 2e-3, (name, err)
        else:
            assert torch.equal(a, b), f"{name} differs between on-chip and global partials"


@needs_kernel
@pytest.mark.parametrize("p,n,h,dt_dtype,cu", [
    (64, 128, 7, torch.float32, None), (64, 64, 5, torch.bfloat16, None),
    (32, 64, 5, torch.float16, None), (128, 128, 3, torch.bfloat16, None),
    (48, 100, 6, torch.float32, None), (64, 128, 4, torch.bfloat16, [0, 70, 71, 900, 1500])])
def test_prefetch_matches_load_path(p, n, h, dt_dtype, cu, monkeypatch):
    """Step 2 (bwd_chunk.cuh, forced by MLMAMBA_SSD_BWD_CHUNK=mma) prefetches the next head's
    x/dy by cp.async only where the tile is the raw input (bf16, 16-byte aligned contiguous
    rows, no z, headdim % 8 == 0), else phase 0 loads them. The same values through a view at a
    2-byte offset (no vector rows: the load path) must give bitwise the same gradients. dt at
    an odd element offset exercises the upper half of the staged 32-bit dt words (16-bit dt)."""
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", "mma")
    case = make_case(_gen(), b=1 if cu else 3, l=1500, h=h, g=1, p=p, n=n, z=False,
                     dt_dtype=dt_dtype, seq_idx=cu is None, cu=cu)
    t, kw, dout, dfin = case
    got = run_kernel(t, kw, dout, dfin)
    t2 = dict(t, x=_noncontig(t["x"]), dt=_noncontig(t["dt"]))
    want = run_kernel(t2, kw, _noncontig(dout), dfin)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), f"{name} differs between the cp.async and the load path"


def kernel_names(case, part):
    """The gradients of one run, and the names of its CUDA kernels that contain `part`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = run_kernel(*case)
        torch.cuda.synchronize()
    return got, [e.name for e in prof.events() if part in e.name]


@needs_kernel
@pytest.mark.parametrize("p,n,h,dtype,dt_dtype,z,cu,l", [
    (64, 128, 5, torch.bfloat16, torch.bfloat16, False, None, 1111),
    (64, 128, 3, torch.bfloat16, torch.float32, True, None, 1111),
    (48, 104, 4, torch.float16, torch.float16, True, None, 1111),
    (32, 64, 3, torch.bfloat16, torch.bfloat16, False, [0, 70, 71, 900, 1500], 1500),
    (128, 256, 2, torch.bfloat16, torch.float32, False, None, 1111),
    (32, 32, 3, torch.bfloat16, torch.bfloat16, True, "no seq_idx", 127)])
def test_states_async_matches_sync(p, n, h, dtype, dt_dtype, z, cu, l, monkeypatch):
    """The mma.sync step 1 streams its tiles by cp.async in 2 or 3 stages (bf16 inputs, 16-byte
    aligned rows); MLMAMBA_SSD_BWD_STATES=sync keeps the one-chunk register prefetch. Same
    arithmetic, so bitwise equal gradients (odd lengths: the zero-filled tail rows too)."""
    seq, cu = cu is None, (None if isinstance(cu, str) else cu)
    case = make_case(_gen(), b=1 if cu else 2, l=l, h=h, g=1, p=p, n=n, z=z, dtype=dtype,
                     dt_dtype=dt_dtype, seq_idx=seq, cu=cu)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", "sync")
    assert all(k.endswith(", 0>(mlmamba::ssd_bwd::Params)")
               for k in kernel_names(case, "states_kernel")[1])
    want = run_kernel(*case)
    for mode, stages in (("s2", 2), ("s3", 3)):
        stages = stages if dtype == torch.bfloat16 else 0  # the async path takes bf16 only
        monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", mode)
        names = kernel_names(case, "states_kernel")[1]
        assert names and all(f", {stages}>" in k for k in names), (mode, names)
        for name, a, b in zip(NAMES, run_kernel(*case), want):
            assert torch.equal(a, b), f"{name} differs between the {stages}-stage and sync paths"
    check(*case)


@needs_kernel
@pytest.mark.skipif(not HAVE or torch.cuda.get_device_capability()[0] != 9, reason="sm_90 only")
@pytest.mark.parametrize("b,l,h,g,n,z,seq,ends", [
    (2, 1000, 4, 2, 128, True, True, True),    # 64 state columns per CTA; gated dy, resets, a tail
    (8, 300, 24, 1, 64, False, False, True),
    (4, 256, 80, 1, 128, False, False, True),  # 128 columns per CTA
    (4, 257, 40, 1, 128, True, True, True),
    (1, 40, 3, 1, 64, False, False, False)])   # one chunk, no initial / final states
def test_states_wgmma(b, l, h, g, n, z, seq, ends, monkeypatch):
    """Step 1 on sm_90a tensor cores (bwd_states_wg.cu, the default there). Its fp32 sums run
    in another order than the mma.sync walk's (MLMAMBA_SSD_BWD_STATES=s2), so a stored bf16
    state can differ in its last bit: gradients are held to the reference and close to s2's."""
    case = make_case(_gen(), b=b, l=l, h=h, g=g, p=64, n=n, z=z, seq_idx=seq, init=ends,
                     dfinal=ends)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", "s2")
    want = run_kernel(*case)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", "")  # the default on sm_90
    got, names = kernel_names(case, "states_wg_kernel")
    assert names, "the wgmma states walk did not run"
    for name, a, r in zip(NAMES, got, want):
        if name in ("dx", "dB", "dC", "dz", "dinit") and r.numel():
            assert rel_err(a, r.double()) < 1e-2, name
    check(*case)


def entry_states(t, kw):
    """The state entering each 64-token chunk, (b, ceil(l / 64), h, p, n) bf16: the reference
    scan's final state over the tokens before it."""
    d = {k: (None if v is None else v.detach().double()) for k, v in t.items()}
    b, l, h, p = d["x"].shape
    s = [d["initial_states"] if d["initial_states"] is not None else
         d["x"].new_zeros(b, h, p, d["B"].shape[-1])]
    for c in range(64, l, 64):
        s.append(ref.ssd_scan(d["x"][:, :c], d["dt"][:, :c], d["A"], d["B"][:, :c],
                              d["C"][:, :c], 64, None, None, d["dt_bias"], d["initial_states"],
                              None, None, kw["dt_softplus"], kw["dt_limit"], True)[1])
    return torch.stack(s, 1).to(torch.bfloat16).contiguous()


@needs_kernel
@pytest.mark.skipif(not HAVE or torch.cuda.get_device_capability()[0] != 9, reason="sm_90 only")
@pytest.mark.parametrize("b,l,h,g,n,z,ends", [
    (2, 1000, 4, 2, 128, True, True),
    (3, 257, 40, 1, 64, False, True),
    (1, 40, 3, 1, 128, False, False)])
@pytest.mark.parametrize("walk", ["", "s2"])
def test_given_chunk_states(monkeypatch, b, l, h, g, n, z, ends, walk):
    """chunk_states (the states entering each chunk, from a forward that kept them: msc_scan):
    the sm_90a walk runs the adjoint alone and the chunk kernel reads the given states. The
    gradients are close to those without (a state may differ in its last bit) and the caller's
    tensor is not written; zero states in their place change the gradients (they are read).
    walk s2 (MLMAMBA_SSD_BWD_STATES): the mma.sync walk, which cannot take them, writes a
    workspace of its own and the given states are ignored."""
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", walk)
    case = make_case(_gen(), b=b, l=l, h=h, g=g, p=64, n=n, z=z, init=ends, dfinal=ends)
    cs = entry_states(case[0], case[1])
    keep = cs.clone()
    want = run_kernel(*case)
    got = run_kernel(*case, chunk_states=cs)
    assert torch.equal(cs, keep)
    for name, a, r in zip(NAMES, got, want):
        if r.numel():
            assert torch.isfinite(a).all(), name
            assert rel_err(a, r.double()) < 1e-2, name
    if l > 64:  # (dC reads S_prev; dx does not)
        wrong = run_kernel(*case, chunk_states=torch.zeros_like(cs))
        err = rel_err(wrong[NAMES.index("dC")], want[NAMES.index("dC")].double())
        assert err < 1e-2 if walk else err > 1e-2
    with pytest.raises(RuntimeError, match="chunk_states must be a contiguous bfloat16"):
        run_kernel(*case, chunk_states=cs[:, :-1] if l > 64 else cs.float())


@needs_kernel
@pytest.mark.skipif(not HAVE or torch.cuda.get_device_capability()[0] != 9, reason="sm_90 only")
@pytest.mark.parametrize("b,l,h,g,n,seq,ends,D,dt32", [
    (2, 1000, 4, 2, 128, True, True, "h", False),    # two groups, resets, a tail
    (8, 300, 24, 1, 64, False, False, "hp", False),  # d_state 64, D per channel
    (4, 256, 80, 1, 128, False, True, "h", False),   # 80 heads walked by one CTA
    (3, 257, 40, 1, 128, True, True, None, False),   # a one-row last chunk, no D
    (1, 40, 3, 1, 64, False, False, "h", False),     # one partial chunk
    (16, 576, 8, 1, 128, False, True, "h", False),   # two head splits on 132 SMs: fp32 workspace
    (2, 700, 6, 3, 64, True, True, "h", True)])      # fp32 dt with dt_limit (ddt 0 where clamped)
def test_chunk_wgmma(b, l, h, g, n, seq, ends, D, dt32, monkeypatch):
    """Step 2 on sm_90a tensor cores (bwd_chunk_wg.cu, the default there for bf16, headdim 64,
    no z). Its fp32 sums run in another order than bwd_chunk.cuh's (MLMAMBA_SSD_BWD_CHUNK=mma):
    gradients are held to the reference and close to the mma.sync kernel's; two runs are
    bitwise equal."""
    case = make_case(_gen(), b=b, l=l, h=h, g=g, p=64, n=n, z=False, D=D, seq_idx=seq,
                     init=ends, dfinal=ends, dt_dtype=torch.float32 if dt32 else None,
                     limit=(0.05, 1.5) if dt32 else (0.0, math.inf))
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", "mma")
    want, names = kernel_names(case, "chunk_")
    assert names and not any("chunk_wg_kernel" in k for k in names), names
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", "")  # the default on sm_90
    got, names = kernel_names(case, "chunk_wg_kernel")
    assert names, "the wgmma chunk kernel did not run"
    for name, a, r in zip(NAMES, got, want):
        if name in ("dx", "dB", "dC", "dinit") and r.numel():
            assert rel_err(a, r.double()) < 1e-2, name
    for name, a, r in zip(NAMES, run_kernel(*case), got):
        assert torch.equal(a, r), f"{name} differs between two runs"
    check(*case)


@needs_kernel
def test_chunk_mode_checked(monkeypatch):
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", "fast")
    with pytest.raises(RuntimeError, match="MLMAMBA_SSD_BWD_CHUNK"):
        run_kernel(*make_case(_gen(), l=70, h=2))


@needs_kernel
def test_states_mode_checked(monkeypatch):
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", "fast")
    with pytest.raises(RuntimeError, match="MLMAMBA_SSD_BWD_STATES"):
        run_kernel(*make_case(_gen(), l=70, h=2))


@needs_kernel
@pytest.mark.parametrize("nsplit", ["1", "3", "16"])
@pytest.mark.parametrize("chunk", ["", "mma"])
def test_forced_head_splits(nsplit, chunk, monkeypatch):
    """MLMAMBA_SSD_BWD_NSPLIT (developer A/B) changes only how step 2 splits the heads (16 is
    capped at the 8 heads per group)."""
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", chunk)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_NSPLIT", nsplit)
    check(*make_case(_gen(), b=3, l=300, h=8, g=1, p=64, n=128, z=False, init=True, dfinal=True))


@needs_kernel
def test_many_heads_per_split():
    check(*make_case(_gen(), b=4, l=1500, h=7, g=1, p=64, n=128, z=False))


@needs_kernel
@pytest.mark.parametrize("mode,chunk", [("", ""), ("s2", "mma")])
def test_over_2_31_elements(mode, chunk, monkeypatch):
    """b*l*h*p > 2^31: the second batch row's tail lives past element 2^31. A seq_idx reset
    near the end makes the tail's gradients (dfinal's path included) independent of the rest,
    so they are checked against the reference on the tail. "" takes the wgmma kernels on
    sm_90a (states walk and chunk kernel), s2 / mma the mma.sync ones."""
    if torch.cuda.mem_get_info()[0] < 30 * 2**30:
        pytest.skip("needs ~30 GB of free GPU memory")
    monkeypatch.setenv("MLMAMBA_SSD_BWD_STATES", mode)
    monkeypatch.setenv("MLMAMBA_SSD_BWD_CHUNK", chunk)
    b, h, p, n, tail = 2, 64, 64, 64, 200
    l = 2**31 // (b * h * p) + 1001
    gen = _gen()

    def r(*s, dtype=torch.bfloat16):
        return torch.randn(*s, generator=gen, device="cuda", dtype=dtype)

    t = dict(x=r(b, l, h, p), dt=r(b, l, h, dtype=torch.float32),
             A=-(torch.rand(h, generator=gen, device="cuda") + 0.05), B=r(b, l, 1, n),
             C=r(b, l, 1, n), D=r(h, dtype=torch.float32), z=None, dt_bias=None,
             initial_states=None)
    assert t["x"].numel() > 2**31
    seq = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq[:, l - tail:] = 1
    kw = dict(seq_idx=seq, cu_seqlens=None, dt_softplus=True, dt_limit=(0.0, math.inf))
    dout, dfin = r(b, l, h, p), r(b, h, p, n, dtype=torch.float32)
    got = run_kernel(t, kw, dout, dfin)

    def tail_of(v):
        return v[1:, l - tail:]

    ts = {k: tail_of(v) if k in ("x", "dt", "B", "C") else v for k, v in t.items()}
    want = run_reference(ts, dict(kw, seq_idx=None), tail_of(dout), dfin[1:])
    for name in ("dx", "ddt", "dB", "dC"):
        i = NAMES.index(name)
        assert rel_err(tail_of(got[i]), want[i]) < TOL[torch.bfloat16], name


@needs_kernel
def test_deterministic():
    case = make_case(_gen(), b=2, l=700, h=8, g=2, p=64, n=128)
    a = run_kernel(*case)
    b = run_kernel(*case)
    for name, u, v in zip(NAMES, a, b):
        assert torch.equal(u, v), f"{name} differs between two runs"


@needs_kernel
def test_autograd_through_op_matches_finite_difference():
    """Gradients by autograd through the registered forward op (its backward is our kernel)
    against central differences of the float64 reference forward along random directions."""
    gen = _gen()
    t, kw, dout, dfin = make_case(gen, b=1, l=90, h=2, g=1, p=32, n=16, dtype=torch.float32)
    lo, hi = kw["dt_limit"]
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_(True))
              for k, v in t.items()}
    out, fin = torch.ops.mlmamba.ssd_scan_fwd(
        leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 64, leaves["D"],
        leaves["z"], leaves["dt_bias"], leaves["initial_states"], None, None, True, lo, hi, True)
    ((out * dout).sum() + (fin * dfin).sum()).backward()

    def f64(d):
        o, s = ref.ssd_scan(*(d[k] for k in ("x", "dt", "A", "B", "C")), 64, d["D"], d["z"],
                            d["dt_bias"], d["initial_states"], None, None, True, (lo, hi), True)
        return ((o * dout.double()).sum() + (s * dfin.double()).sum()).item()

    base = {k: v.detach().double() for k, v in t.items() if v is not None}
    base.setdefault("D", None)
    # dA and ddt_bias are sums over tokens that can cancel far below their terms (the kernel's
    # bf16 operands err at the terms' scale): judged at that scale, as check() judges them
    ddt = run_reference(t, kw, dout, dfin)[INPUTS.index("dt")]
    terms = {"A": dA_terms(t, kw, dout, dfin).norm().item(), "dt_bias": ddt.norm().item()}
    eps = 1e-4
    for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"):
        v = torch.randn(t[k].shape, generator=gen, device="cuda", dtype=torch.float64)
        fd = (f64({**base, k: base[k] + eps * v}) - f64({**base, k: base[k] - eps * v})) / (2 * eps)
        an = (leaves[k].grad.double() * v).sum().item()
        bound = 3e-2 * abs(fd) + 1e-2 * leaves[k].grad.norm().item()
        bound += TOL[torch.float32] * terms.get(k, 0.0) * v.norm().item()
        assert abs(fd - an) <= bound, (k, fd, an, bound, _last_seed[0])


@needs_kernel
def test_opcheck_bwd():
    t, kw, dout, dfin = make_case(_gen(), b=1, l=70, h=2, g=1, p=32, n=16)
    lo, hi = kw["dt_limit"]
    torch.library.opcheck(
        torch.ops.mlmamba.ssd_scan_bwd,
        (dout, dfin, t["x"], t["dt"], t["A"], t["B"], t["C"], 64, t["D"], t["z"], t["dt_bias"],
         t["initial_states"], None, None, True, lo, hi),
        test_utils=("test_schema", "test_faketensor"))


_BAD_GROUPS = """
import torch, mlmamba_kernels
x = torch.randn(1, 10, 4, 32, device="cuda", dtype=torch.bfloat16)
B = torch.randn(1, 10, 3, 16, device="cuda", dtype=torch.bfloat16)
dt, A = torch.randn(1, 10, 4, device="cuda"), -torch.rand(4, device="cuda")
try:
    torch.ops.mlmamba.ssd_scan_bwd(x, None, x, dt, A, B, B.clone(), 64, None, None, None, None,
                                   None, None, False, 0.0, float("inf"))
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
"""


@needs_kernel
def test_errors_name_the_argument():
    # in a child process: a crash on the error path (seen once on a device build) fails this
    # test instead of the whole session
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _BAD_GROUPS], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, f"crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    assert "RAISED" in res.stdout and "3 groups, which does not divide 4 heads" in res.stdout, \
        res.stdout
