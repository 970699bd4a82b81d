"""GPU tests of the CUDA causal conv1d ops (causal_conv1d_fwd / _bwd / _update) against the
float64 reference (mlmamba_kernels.reference.conv1d).

Tolerances: one table by dtype. The kernels read the same rounded inputs as the reference and
accumulate in fp32, so the error is the rounding of the output to its dtype (half an ulp, which
PyTorch's own kernels make too) plus fp32 arithmetic: we allow one ulp of the output dtype
relative, plus 5% of that times the tensor's largest value for entries that cancel to near
zero (in fp32 that is 1e-6 * max: a sum of up to 8 products loses ~16 fp32 ulps of its terms).
Reductions over the batch and sequence (dweight, dbias) are compared norm-wise.
"""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import mlmamba_kernels as mk
    from mlmamba_kernels import _loader
    from mlmamba_kernels.reference import conv1d as ref

    HAVE = all(_loader.has_cuda_kernel(op) for op in
               ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"))
else:
    HAVE = False

need = pytest.mark.skipif(not HAVE, reason="causal_conv1d CUDA kernels not built")
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one ulp of the output dtype (fp32: fp32 arithmetic and the fast exp in SiLU)
TOL = {torch.float32: 2e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
TOL_SUM = {torch.float32: 5e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
LENGTHS = [1, 2, 3, 7, 127, 128, 129, 1000, 4096]


def ops():
    return torch.ops.mlmamba


def gen(rng):
    return torch.Generator(DEV).manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))


def close(name, out, want, dtype):
    """Elementwise: |out - want| <= tol * (|want| + 0.05 * max|want|)."""
    assert out.shape == want.shape, f"{name}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    o, w = out.double(), want.double()
    assert torch.isfinite(o).all(), f"{name}: non-finite values"
    tol = TOL[dtype]
    bound = tol * (w.abs() + 0.05 * w.abs().max().clamp_min(1e-30))
    bad = (o - w).abs() > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} entries off; first at {i}: "
                             f"got {o[tuple(i)].item():.6g}, want {w[tuple(i)].item():.6g}")


def close_sum(name, out, want, dtype, terms=None):
    """A sum over tokens (dweight, dbias): relative error under TOL_SUM; where over, judged at
    the scale of its terms (`terms()`: their norm), since a sum of random-sign terms can cancel
    far below them while its rounding errs at their scale (the SSD tests judge dA so)."""
    assert out.shape == want.shape and out.dtype == dtype, f"{name}: {out.shape} {out.dtype}"
    o, w = out.double(), want.double()
    err = ((o - w).norm() / w.norm().clamp_min(1e-30)).item()
    if err > TOL_SUM[dtype] and terms is not None:
        err = ((o - w).norm() / max(w.norm().item(), terms(), 1e-30)).item()
    assert err <= TOL_SUM[dtype], f"{name}: relative error {err:.3g} > {TOL_SUM[dtype]:.3g}"


def make_x(g, b, d, l, dtype, layout):
    """x (b, d, l) in a layout: 'l' (l contiguous), 'cl' (d contiguous), 'l_slice' / 'cl_slice'
    (slices of larger tensors: unaligned rows), 'strided' (neither dim contiguous)."""
    r = lambda *s: torch.randn(*s, device=DEV, generator=g).to(dtype)  # noqa: E731
    if layout == "l":
        return r(b, d, l)
    if layout == "cl":
        return r(b, l, d).transpose(1, 2)
    if layout == "l_slice":
        return r(b, d + 3, l + 5)[:, 1:1 + d, 3:3 + l]
    if layout == "cl_slice":
        return r(b, l + 2, d + 7)[:, 1:1 + l, 3:3 + d].transpose(1, 2)
    if layout == "strided":
        return r(b, l, d, 2)[..., 1].transpose(1, 2)
    raise ValueError(layout)


def inputs(g, b, d, l, w, dtype, layout, bias=True, init=False, seq=False, wdtype=None):
    r = lambda *s, dt=dtype: torch.randn(*s, device=DEV, generator=g).to(dt)  # noqa: E731
    wdtype = wdtype or dtype
    x = make_x(g, b, d, l, dtype, layout)
    weight = r(w, d, dt=wdtype).t()  # non-contiguous (d, w)
    kw = dict(x=x, weight=weight, bias=r(2 * d, dt=wdtype)[::2] if bias else None,
              initial_states=r(b, w - 1, d).transpose(1, 2) if init else None, seq_idx=None)
    if seq:
        # a few random restarts per row; not monotone in general
        cuts = torch.rand(b, l, device=DEV, generator=g) < 0.05
        s = cuts.int().cumsum(1)
        s[:, l // 2:] = s[:, l // 2:] % 2  # values repeat after a change
        kw["seq_idx"] = s.to(torch.int32)
    return kw


def reference_fwd_bwd(kw, silu, dout, dfinal):
    """float64 reference output, final states and gradients of every input."""
    act = "silu" if silu else None
    leaves = {k: (v.detach().double().requires_grad_(True)
                  if v is not None and v.is_floating_point() else v) for k, v in kw.items()}
    out, fin = ref.causal_conv1d(leaves["x"], leaves["weight"], leaves["bias"], act,
                                 leaves["initial_states"], True, leaves["seq_idx"])
    names = [k for k in ("x", "weight", "bias", "initial_states") if leaves[k] is not None]
    grads = torch.autograd.grad([out, fin], [leaves[k] for k in names],
                                [dout.double(), dfinal.double()], allow_unused=True)
    gd = {k: (gr if gr is not None else torch.zeros_like(leaves[k])) for k, gr in zip(names, grads)}
    return out.detach(), fin.detach(), gd


def token_grads(kw, silu, dout):
    """float64 gradient of the loss at the conv's pre-activation, per token: the terms that
    dbias sums (and, times x, dweight's)."""
    k = {n: (v.double() if v is not None and v.is_floating_point() else v) for n, v in kw.items()}
    pre = ref.causal_conv1d(k["x"], k["weight"], k["bias"], None, k["initial_states"], False,
                            k["seq_idx"])
    sig = torch.sigmoid(pre)
    return dout.double() * (sig * (1 + pre * (1 - sig)) if silu else 1.0)


def check_case(kw, silu, dtype, g, with_final=True):
    """dout and dfinal come from g (the test's seed), so that a failure replays."""
    x = kw["x"]
    b, d, l = x.shape
    w = kw["weight"].shape[1]
    out, fin = ops().causal_conv1d_fwd(x, kw["weight"], kw["bias"], kw["initial_states"],
                                       kw["seq_idx"], silu, with_final)
    dout = torch.empty_like(out).copy_(torch.randn(out.shape, device=DEV, generator=g))
    dfinal = torch.randn(b, d, w - 1, device=DEV, generator=g).to(dtype)
    want, want_fin, gd = reference_fwd_bwd(kw, silu, dout, dfinal if with_final else
                                           torch.zeros_like(dfinal))
    close("out", out, want, dtype)
    # layout rule: channel-last output iff x.stride(1) == 1 and d > 1
    assert (out.stride(1) == 1 and d > 1) == (x.stride(1) == 1 and d > 1) or l == 1
    if with_final:
        assert fin.is_contiguous()
        close("final_states", fin, want_fin, dtype)
    else:
        assert fin.numel() == 0
    dx, dw, db, dinit = ops().causal_conv1d_bwd(
        x, kw["weight"], kw["bias"], kw["initial_states"], kw["seq_idx"], dout,
        dfinal if with_final else None, silu)
    close("dx", dx, gd["x"], dtype)
    assert (dx.stride(1) == 1) == (out.stride(1) == 1) or l == 1 or d == 1
    # the terms' scale, computed only where a sum is over its plain bound
    gnorm = functools.cache(lambda: token_grads(kw, silu, dout).norm().item())
    xmax = lambda: max(t.double().abs().max().item()  # noqa: E731
                       for t in (x, kw["initial_states"]) if t is not None and t.numel())
    close_sum("dweight", dw, gd["weight"], kw["weight"].dtype, lambda: gnorm() * xmax())
    if kw["bias"] is not None:
        close_sum("dbias", db, gd["bias"], kw["bias"].dtype, gnorm)
    else:
        assert db.numel() == 0
    if kw["initial_states"] is not None:
        close("dinitial_states", dinit, gd["initial_states"], kw["initial_states"].dtype)
    else:
        assert dinit.numel() == 0


FEATURES = {  # (bias, initial_states, seq_idx, return_final_states)
    "plain": (False, False, False, False),
    "bias_final": (True, False, False, True),
    "init_final": (True, True, False, True),
    "seq": (True, False, True, False),
    "seq_init_final": (False, True, True, True),
}


@need
@pytest.mark.parametrize("feat", list(FEATURES))
@pytest.mark.parametrize("layout", ["l", "cl"])
@pytest.mark.parametrize("width", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_bwd_matches_reference(rng, monkeypatch, dtype, width, layout, feat):
    set_impl(monkeypatch, "default")
    g = gen(rng)
    bias, init, seq, final = FEATURES[feat]
    for i, l in enumerate(LENGTHS):
        d = (37, 64)[i % 2]  # odd channel count, and one that takes the 16-byte paths
        kw = inputs(g, 2, d, l, width, dtype, layout, bias=bias, init=init, seq=seq)
        try:
            check_case(kw, g=g, silu=(i % 3 != 0), dtype=dtype, with_final=final)
        except AssertionError as e:
            raise AssertionError(f"l={l} d={d}: {e}") from None


IMPLS = {  # MLMAMBA_CONV1D_IMPL, _WAVES, _TUNE (, _CHUNK)
    "default": (None, None, None),  # the measured-best choice per op and layout (ops.cpp
                                    # use_pipe, use_oneshot)
    "v2": ("v2", None, None),       # the general kernels forced
    "pipe": ("pipe", None, None),   # the streaming kernels forced (channel-last backward and
                                    # l-contiguous forward too)
    # streaming kernels on a tiny persistent grid: every warp walks many tiles / rows, its
    # range crossing channel rows and batches (the look-back and dweight pieces across tiles)
    "pipe_small_grid": ("pipe", "0.01", None),
    # the launchers' tuning variants (bf16, width 4 only)
    "pipe_tune1": ("pipe", None, "1"),
    "pipe_tune2": ("pipe", None, "2"),
    "pipe_tune2_small_grid": ("pipe", "0.01", "2"),
    # v2 channel-last with long per-warp row chunks (the backward's default on large inputs)
    "v2_chunk128": ("v2", None, None, "128"),
    # the one-shot l-contiguous kernels forced (by default: the forward, and the backward where
    # a row fits one tile), their tuning variants
    "oneshot": ("oneshot", None, None),
    "oneshot_tune11": ("oneshot", None, "11"),
    "oneshot_tune13": ("oneshot", None, "13"),
    "oneshot_tune14": ("oneshot", None, "14"),
    # the channel-last forward's TMA kernel (the default on sm_90) with 32-row tiles
    "tma_rows32": (None, None, "31"),
    # the v2 channel-last backward's ring of 2 / 4 row groups (bf16 width 4) over long chunks
    "v2_ring2_tune41": ("v2", None, "41", "128"),
    "v2_ring4_tune42": ("v2", None, "42", "128"),
    # the v2 channel-last backward's two layouts (plan_bwd_chlast), 40-row chunks: one chunk a
    # warp (blocks span batch rows) and four a block (idle warps past a row's end)
    "v2_flat": ("v2", None, "46", "40"),
    "v2_blocked": ("v2", None, "47", "40"),
}


def set_impl(monkeypatch, impl):
    env = IMPLS[impl] + (None,) * (4 - len(IMPLS[impl]))
    for k, v in zip(("MLMAMBA_CONV1D_IMPL", "MLMAMBA_CONV1D_WAVES", "MLMAMBA_CONV1D_TUNE",
                     "MLMAMBA_CONV1D_CHUNK"), env):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)


@need
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", ["l", "cl"])
@pytest.mark.parametrize("width", [2, 4, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_impl_matches_reference(rng, monkeypatch, dtype, width, layout, impl):
    """Every implementation the dispatch can pick (the default, and each forced through
    MLMAMBA_CONV1D_IMPL) on 16-byte aligned inputs without seq_idx, where the streaming kernels
    apply: whole and partial tiles, initial and final states, against the float64 reference."""
    if "tune" in impl and (dtype != torch.bfloat16 or width != 4):
        pytest.skip("the tuning variants exist for bf16 width 4 only")
    set_impl(monkeypatch, impl)
    g = gen(rng)
    for i, (b, d, l) in enumerate(((2, 64, 128), (3, 64, 1000), (2, 72, 4096), (1, 8, 24),
                                   (5, 16, 200), (2, 264, 301), (1, 16, 6144), (1, 8, 6144))):
        kw = inputs(g, b, d, l, width, dtype, layout, bias=i != 3, init=i % 2 == 1)
        try:
            check_case(kw, g=g, silu=i % 2 == 0, dtype=dtype, with_final=i != 4)
        except AssertionError as e:
            raise AssertionError(f"b={b} d={d} l={l}: {e}") from None


@need
def test_bad_impl_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", "fast")
    x = torch.randn(1, 8, 16, device=DEV)
    with pytest.raises(RuntimeError, match="MLMAMBA_CONV1D_IMPL"):
        ops().causal_conv1d_fwd(x, torch.randn(8, 4, device=DEV), None, None, None, True, False)


@need
@pytest.mark.parametrize("layout", ["l_slice", "cl_slice", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(rng, dtype, layout):
    g = gen(rng)
    for l, d, w in ((1, 5, 4), (129, 37, 4), (1000, 29, 3), (513, 264, 8)):
        kw = inputs(g, 3, d, l, w, dtype, layout, bias=True, init=True, seq=True)
        check_case(kw, g=g, silu=True, dtype=dtype)


@need
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mixed_weight_dtype(rng, dtype, wdtype):
    g = gen(rng)
    for layout in ("l", "cl"):
        kw = inputs(g, 2, 40, 300, 4, dtype, layout, bias=True, init=True, wdtype=wdtype)
        check_case(kw, g=g, silu=True, dtype=dtype)


@need
@pytest.mark.parametrize("impl", ["default", "pipe", "v2", "oneshot", "oneshot_tune11",
                                  "oneshot_tune13"])
@pytest.mark.parametrize("layout", ["l", "cl"])
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_final_states_across_tiles(rng, monkeypatch, dtype, width, layout, impl):
    """Aligned slices of longer rows (the fast paths apply at any length) where the last w-1
    inputs straddle two tiles or row chunks: l = tile + 1, and lengths below w - 1."""
    if "tune" in impl and (dtype != torch.bfloat16 or width != 4):
        pytest.skip("the tuning variants exist for bf16 width 4 only")
    set_impl(monkeypatch, impl)
    g = gen(rng)
    for l in (1, 2, 9, 257, 513, 514, 1025, 1029, 2049):
        b, d, lp, dp = 2, 16, (l + 63) // 64 * 64, 24
        if layout == "l":
            x = torch.randn(b, d, lp, device=DEV, generator=g).to(dtype)[..., :l]
        else:
            x = torch.randn(b, l, dp, device=DEV, generator=g).to(dtype)[..., :d].transpose(1, 2)
        kw = inputs(g, b, d, l, width, dtype, layout, bias=True, init=True)
        kw["x"] = x
        try:
            check_case(kw, g=g, silu=True, dtype=dtype)
        except AssertionError as e:
            raise AssertionError(f"l={l}: {e}") from None


@need
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_off_16_byte_boundaries(rng, monkeypatch, dtype):
    """l-contiguous rows whose length is not a multiple of 16 bytes start at every offset from
    a 16-byte boundary; the one-shot kernels take them (their tiles start at the first boundary
    of a row, lane 0 computes the positions before it), the short-row kernels those of at most
    1017 elements (505 at fp32): lengths shorter than that offset and than w - 1, tile edges
    for each tile size, initial and final states, every gradient."""
    set_impl(monkeypatch, "default")
    g = gen(rng)
    lengths = (1, 2, 3, 5, 6, 7, 9, 13, 511, 513, 700, 1023, 1025, 2047, 2055, 4099)
    for i, l in enumerate(lengths):
        width = (2, 3, 4, 5, 8)[i % 5]
        kw = inputs(g, 2, 24, l, width, dtype, "l", bias=i % 3 != 0, init=i % 2 == 0)
        try:
            check_case(kw, g=g, silu=i % 4 != 1, dtype=dtype, with_final=i % 3 != 2)
        except AssertionError as e:
            raise AssertionError(f"l={l} w={width}: {e}") from None


@need
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_short_rows_several_a_warp(rng, monkeypatch, dtype):
    """l-contiguous rows of at most 1024 elements (512 at fp32) run several to a warp
    (fwd_lcontig_rows.cu, bwd_lcontig_rows.cu): a warp's rows across batches (d 13), the last
    warp part empty, one, two and four vectors a lane, two, four and eight rows a vector
    (aligned rows of at most 128 / 64 / 32 elements), widths 2-8, initial and final states,
    rows padded apart, rows off 16-byte boundaries (odd lengths: every offset, and shorter
    than w - 1); bitwise the one-row-a-warp kernels (MLMAMBA_CONV1D_TUNE=20), but for
    dweight / dbias on rows off 16-byte boundaries (there the one-row kernel sums a row's first
    positions apart)."""
    set_impl(monkeypatch, "default")
    g = gen(rng)
    lengths = (8, 16, 24, 136, 248, 256, 264, 400, 504, 512,
               1, 2, 3, 5, 7, 129, 201, 249, 250, 255, 257, 403, 505,
               520, 704, 1016, 1024, 513, 701, 1017, 1018,
               32, 40, 64, 72, 120, 128, 56, 96)
    # (length, row stride): rows shorter than w - 1 on 16-byte boundaries, several a vector
    strided = ((1, 16), (2, 16), (5, 16), (6, 16), (3, 8), (60, 64), (100, 128))
    for i, (l, stride) in enumerate([(l, l + 8 * (i % 2)) for i, l in enumerate(lengths)] + list(strided)):
        width = (2, 3, 4, 5, 8)[i % 5]
        kw = inputs(g, 3, 13, l, width, dtype, "l", bias=i % 3 != 0, init=i % 2 == 0)
        if stride != l:  # rows padded apart
            kw["x"] = torch.randn(3, 13, stride, device=DEV, generator=g).to(dtype)[..., :l]
        try:
            check_case(kw, g=g, silu=i % 4 != 1, dtype=dtype, with_final=i % 3 != 2)
        except AssertionError as e:
            raise AssertionError(f"l={l} w={width}: {e}") from None
        x, silu = kw["x"], i % 4 != 1
        args = (x, kw["weight"], kw["bias"], kw["initial_states"], None, silu, True)
        dout = torch.randn(x.shape, device=DEV, generator=g).to(dtype)
        dfin = torch.randn(3, 13, width - 1, device=DEV, generator=g).to(dtype)
        bargs = (x, kw["weight"], kw["bias"], kw["initial_states"], None, dout, dfin, silu)
        a = ops().causal_conv1d_fwd(*args) + ops().causal_conv1d_bwd(*bargs)
        monkeypatch.setenv("MLMAMBA_CONV1D_TUNE", "20")
        one = ops().causal_conv1d_fwd(*args) + ops().causal_conv1d_bwd(*bargs)
        monkeypatch.delenv("MLMAMBA_CONV1D_TUNE")
        aligned = all(st * x.element_size() % 16 == 0 for st in x.stride()[:2])
        for name, u, v in zip(("out", "final", "dx", "dweight", "dbias", "dinit"), a, one):
            if aligned or name not in ("dweight", "dbias"):
                assert torch.equal(u, v), f"l={l}: {name} differs between the kernels"
            else:
                tol = TOL_SUM[u.dtype]
                torch.testing.assert_close(u, v, rtol=tol, atol=tol, msg=lambda m: f"l={l} {name}: {m}")


@need
def test_single_channel_and_long_rows(rng):
    g = gen(rng)
    for b, d, l in ((1, 1, 5000), (2, 1, 3), (1, 3, 20000)):
        for layout in ("l", "cl"):
            kw = inputs(g, b, d, l, 4, torch.float32, layout, bias=True, init=True, seq=True)
            check_case(kw, g=g, silu=True, dtype=torch.float32)


@need
@pytest.mark.parametrize("impl", list(IMPLS))
def test_backward_bitwise_deterministic(rng, monkeypatch, impl):
    set_impl(monkeypatch, impl)
    g = gen(rng)
    for layout in ("l", "cl"):
        kw = inputs(g, 3, 304, 3000, 4, torch.bfloat16, layout, bias=True, init=True)
        dout = torch.randn(3, 304, 3000, device=DEV, generator=g).to(torch.bfloat16)
        args = (kw["x"], kw["weight"], kw["bias"], kw["initial_states"], None, dout, None, True)
        a = ops().causal_conv1d_bwd(*args)
        for _ in range(3):
            bb = ops().causal_conv1d_bwd(*args)
            for name, u, v in zip(("dx", "dweight", "dbias", "dinit"), a, bb):
                assert torch.equal(u, v), f"{layout}: {name} differs between runs"


@need
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chlast_tma_forward(rng, monkeypatch, dtype):
    """The channel-last forward's TMA kernel (the default on sm_90 where the streaming kernel
    applies) runs, writes every output (NaN-poisoned memory) and equals the streaming kernel
    bitwise (the same arithmetic in the same order), with each tile height (MLMAMBA_CONV1D_TUNE
    31-33): tile edges in l and in d (256 channels a tile at 16 bits, 128 at fp32), rows before
    t = 0 with and without initial states, lengths below w - 1, final states, widths 2-8, batch
    strides of a slice."""
    g = gen(rng)
    cases = ((3, 264, 1), (2, 8, 2), (2, 520, 33), (1, 256, 64), (2, 136, 95), (2, 5376, 97),
             (1, 16, 300), (4, 72, 7), (2, 24, 129), (1, 64, 161))
    tunes = ("", "31", "32", "33")
    for i, (b, d, l) in enumerate(cases):
        w = (2, 4, 5, 8)[i % 4]
        kw = inputs(g, b, d, l, w, dtype, "cl", bias=i % 3 != 2, init=i % 2 == 0)
        if i % 2:  # every other case a slice of a longer batch
            kw["x"] = torch.randn(b + 1, l + 5, d, device=DEV, generator=g).to(dtype)[1:, 2:l + 2].transpose(1, 2)
        args = (kw["x"], kw["weight"], kw["bias"], kw["initial_states"], None, i % 3 != 1, True)
        got = {}
        for impl, tune in [("pipe", "")] + [("", t) for t in tunes]:
            monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", impl)
            monkeypatch.setenv("MLMAMBA_CONV1D_TUNE", tune)
            junk = torch.full((1 << 22,), float("nan"), device=DEV)
            del junk
            got[impl + tune] = ops().causal_conv1d_fwd(*args)
        for key in tunes:
            for name, u, v in zip(("out", "final_states"), got[key], got["pipe"]):
                assert torch.equal(u, v), (f"b={b} d={d} l={l} w={w} tune={key!r}: {name} differs "
                                           "from the streaming kernel")
    if torch.cuda.get_device_capability()[0] == 9:
        monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", "")
        monkeypatch.setenv("MLMAMBA_CONV1D_TUNE", "")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops().causal_conv1d_fwd(*args)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any("fwd_chlast_tma" in n for n in names), f"the TMA kernel did not run: {names}"


@need
def test_chlast_bwd_ring_depths_bitwise(rng, monkeypatch):
    """The v2 channel-last backward's ring of 2, 3 (default) and 4 row groups (bf16 width 4,
    MLMAMBA_CONV1D_TUNE 41 / 42) gives bitwise the same gradients (the same arithmetic: only
    how far ahead the rows are copied changes), NaN-poisoned memory first: chunks of whole and
    partial groups, rows before t = 0 with initial states, final states' gradient, rows mode's
    cousin (a batch-strided slice)."""
    g = gen(rng)
    monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", "v2")
    for i, (b, d, l, chunk) in enumerate(((2, 264, 301, "24"), (3, 128, 1000, "128"), (1, 520, 37, "16"),
                                          (2, 256, 4099, ""))):
        kw = inputs(g, b, d, l, 4, torch.bfloat16, "cl", bias=True, init=i % 2 == 0)
        if i % 2:
            kw["x"] = torch.randn(b + 1, l + 3, d, device=DEV, generator=g).to(torch.bfloat16)[1:, 1:l + 1].transpose(1, 2)
        dout = torch.randn(b, l, d, device=DEV, generator=g).to(torch.bfloat16).transpose(1, 2)
        dfinal = torch.randn(b, d, 3, device=DEV, generator=g).to(torch.bfloat16)
        args = (kw["x"], kw["weight"], kw["bias"], kw["initial_states"], None, dout, dfinal, True)
        monkeypatch.setenv("MLMAMBA_CONV1D_CHUNK", chunk)
        got = {}
        for tune in ("", "41", "42"):
            monkeypatch.setenv("MLMAMBA_CONV1D_TUNE", tune)
            junk = torch.full((1 << 22,), float("nan"), device=DEV)
            del junk
            got[tune] = ops().causal_conv1d_bwd(*args)
        for tune in ("41", "42"):
            for name, u, v in zip(("dx", "dweight", "dbias", "dinit"), got[tune], got[""]):
                assert torch.equal(u, v), f"b={b} d={d} l={l} tune={tune}: {name} differs from the default ring"
        assert not got[""][0].isnan().any(), f"b={b} d={d} l={l}: dx not written"


@need
def test_chlast_bwd_layouts_agree(rng, monkeypatch):
    """The v2 channel-last backward one chunk a warp ("flat", MLMAMBA_CONV1D_TUNE 46) and four
    a block (47): dx and dinit bitwise equal (the same arithmetic per row), dweight and dbias
    equal to fp32 rounding (only the order of the chunk sums differs), each bitwise equal on a
    second run; NaN-poisoned memory first. Chunk counts that leave flat blocks spanning two or
    more batch rows and blocked rows with idle warps."""
    g = gen(rng)
    monkeypatch.setenv("MLMAMBA_CONV1D_IMPL", "v2")
    for i, (b, d, l, chunk) in enumerate(((3, 264, 301, "48"), (5, 128, 100, "40"), (4, 72, 37, "16"),
                                          (2, 256, 2049, ""))):
        dtype = (torch.bfloat16, torch.float32)[i % 2]
        kw = inputs(g, b, d, l, (4, 3)[i % 2], dtype, "cl", bias=True, init=i % 2 == 0)
        dout = torch.randn(b, l, d, device=DEV, generator=g).to(dtype).transpose(1, 2)
        args = (kw["x"], kw["weight"], kw["bias"], kw["initial_states"], None, dout, None, True)
        monkeypatch.setenv("MLMAMBA_CONV1D_CHUNK", chunk)
        got = {}
        for tune in ("46", "47"):
            monkeypatch.setenv("MLMAMBA_CONV1D_TUNE", tune)
            runs = []
            for _ in range(2):
                junk = torch.full((1 << 22,), float("nan"), device=DEV)
                del junk
                runs.append(ops().causal_conv1d_bwd(*args))
            for name, u, v in zip(("dx", "dweight", "dbias", "dinit"), *runs):
                assert torch.equal(u, v), f"case {i} tune={tune}: {name} differs between two runs"
            got[tune] = runs[0]
        for name, u, v in zip(("dx", "dweight", "dbias", "dinit"), got["46"], got["47"]):
            if name in ("dx", "dinit"):
                assert torch.equal(u, v), f"case {i}: {name} differs between the layouts"
            else:
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * v.abs().max().item(),
                                           msg=lambda m: f"case {i}: {name}: {m}")
        assert not got["46"][0].isnan().any() and not got["46"][1].isnan().any(), f"case {i}: not written"


@need
def test_staggered_start_changes_nothing(rng, monkeypatch):
    """The one-shot kernels' staggered first wave (MLMAMBA_CONV1D_STAGGER, pipe.cuh) only
    delays blocks: forward, final states and every gradient bitwise equal with it off ("1,0"),
    at the default and at 8 classes 400 ns apart, on grids of several waves (both layouts;
    NaN-poisoned memory first). A malformed setting is refused by name."""
    g = gen(rng)
    for layout in ("cl", "l"):  # l last: the malformed setting below goes to the one-shot kernel
        kw = inputs(g, 4, 4224, 2048, 4, torch.bfloat16, layout, bias=True)
        dout = torch.randn(4, 2048, 4224, device=DEV, generator=g).to(torch.bfloat16)
        dout = dout.transpose(1, 2) if layout == "cl" else dout.transpose(1, 2).contiguous()
        got = {}
        for st in ("1,0", "", "8,400"):
            monkeypatch.setenv("MLMAMBA_CONV1D_STAGGER", st)
            junk = torch.full((1 << 26,), float("nan"), device=DEV)
            del junk
            out, fin = ops().causal_conv1d_fwd(kw["x"], kw["weight"], kw["bias"], None, None, True, True)
            grads = ops().causal_conv1d_bwd(kw["x"], kw["weight"], kw["bias"], None, None, dout,
                                            None, True)
            got[st] = (out, fin) + tuple(grads)
        for st in ("", "8,400"):
            for i, (u, v) in enumerate(zip(got["1,0"], got[st])):
                if u is not None and u.numel():
                    assert torch.equal(u, v), f"{layout}: output {i} differs with stagger {st!r}"
        assert not got[""][0].isnan().any(), f"{layout}: out not written"
    monkeypatch.setenv("MLMAMBA_CONV1D_STAGGER", "8")
    with pytest.raises(RuntimeError, match="MLMAMBA_CONV1D_STAGGER"):
        ops().causal_conv1d_fwd(kw["x"], kw["weight"], kw["bias"], None, None, True, False)


@need
def test_blocks_knob_leaves_the_default_launchable(rng, monkeypatch):
    """MLMAMBA_CONV1D_BLOCKS (a cap on blocks per SM by unused dynamic shared memory) between
    two default launches: the default's cached pad (8 blocks where a 2048-element tile holds a
    16-bit row) must stay within the kernel's shared-memory limit after a smaller pad (session 25:
    "invalid argument" once the knob had lowered it). Outputs bitwise equal throughout."""
    g = gen(rng)
    kw = inputs(g, 2, 24, 2048, 4, torch.bfloat16, "l", bias=True)
    run = lambda: ops().causal_conv1d_fwd(kw["x"], kw["weight"], kw["bias"], None, None, True, False)[0]  # noqa: E731
    monkeypatch.delenv("MLMAMBA_CONV1D_BLOCKS", raising=False)
    want = run()
    for n in ("6", "10", "", "12", "7", ""):
        monkeypatch.setenv("MLMAMBA_CONV1D_BLOCKS", n)
        assert torch.equal(run(), want), f"MLMAMBA_CONV1D_BLOCKS={n!r}: output differs"
    torch.cuda.synchronize()


@need
def test_every_output_written(rng):
    """Outputs come from torch.empty: poison the allocator's memory first, then check that
    no NaN survives (every element written)."""
    g = gen(rng)
    for layout in ("l", "cl"):
        for l in (1, 7, 129, 2049):
            junk = torch.full((1 << 22,), float("nan"), device=DEV)
            del junk
            kw = inputs(g, 2, 37, l, 4, torch.bfloat16, layout, bias=True, init=True)
            out, fin = ops().causal_conv1d_fwd(kw["x"], kw["weight"], kw["bias"],
                                               kw["initial_states"], None, True, True)
            dx, dw, db, di = ops().causal_conv1d_bwd(kw["x"], kw["weight"], kw["bias"],
                                                     kw["initial_states"], None,
                                                     torch.randn_like(out), None, True)
            for name, t in (("out", out), ("final", fin), ("dx", dx), ("dw", dw), ("db", db),
                            ("dinit", di)):
                assert torch.isfinite(t).all(), f"{layout} l={l}: {name} has unwritten entries"


@need
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 4, 5, 8])
def test_update_matches_reference(rng, dtype, width):
    g = gen(rng)
    b, d = 3, 37
    for l in (None, 1, 3, 9):
        for sdtype in (dtype, torch.float32):
            x = (torch.randn(b, d, device=DEV, generator=g) if l is None else
                 torch.randn(b, l, d, device=DEV, generator=g).transpose(1, 2)).to(dtype)
            state = torch.randn(b, width - 1, d, device=DEV, generator=g).to(sdtype).transpose(1, 2)
            weight = torch.randn(d, width, device=DEV, generator=g).to(dtype)
            bias = torch.randn(d, device=DEV, generator=g).to(dtype)
            want_state = state.double().clone()
            want = ref.causal_conv1d_update(x.double(), want_state, weight.double(),
                                            bias.double(), "silu")
            out = ops().causal_conv1d_update(x, state, weight, bias, True)
            close(f"update out l={l}", out, want, dtype)
            assert out.shape == x.shape and out.is_contiguous()
            close(f"update state l={l}", state, want_state, sdtype)


@need
def test_update_in_cuda_graph(rng):
    g = gen(rng)
    b, d, w = 2, 5376, 4
    x = torch.randn(b, d, device=DEV, generator=g).to(torch.bfloat16)
    weight = torch.randn(d, w, device=DEV, generator=g).to(torch.bfloat16)
    bias = torch.randn(d, device=DEV, generator=g).to(torch.bfloat16)
    state0 = torch.randn(b, d, w - 1, device=DEV, generator=g).to(torch.bfloat16)
    state = state0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops().causal_conv1d_update(x, state, weight, bias, True)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops().causal_conv1d_update(x, state, weight, bias, True)
    eager_state = state0.clone()
    state.copy_(state0)
    for step in range(3):
        x.copy_(torch.randn(b, d, device=DEV, generator=g))
        graph.replay()
        want = ops().causal_conv1d_update(x, eager_state, weight, bias, True)
        assert torch.equal(out, want), f"step {step}: graph output differs from eager"
        assert torch.equal(state, eager_state), f"step {step}: graph state differs from eager"


@need
@pytest.mark.parametrize("channel_last", [False, True])
def test_opcheck_cuda(rng, channel_last):
    g = gen(rng)
    kw = inputs(g, 2, 19, 33, 4, torch.float32, "cl" if channel_last else "l", bias=True,
                init=True, seq=True)
    for k in ("x", "weight", "bias", "initial_states"):
        kw[k] = kw[k].detach().requires_grad_(True)
    torch.library.opcheck(ops().causal_conv1d_fwd,
                          (kw["x"], kw["weight"], kw["bias"], kw["initial_states"],
                           kw["seq_idx"], True, True))
    torch.library.opcheck(ops().causal_conv1d_fwd,
                          (kw["x"], kw["weight"], None, None, None, False, False))
    dout = torch.randn(2, 19, 33, device=DEV, generator=g)
    torch.library.opcheck(ops().causal_conv1d_bwd,
                          (kw["x"].detach(), kw["weight"].detach(), None, None, None, dout, None,
                           True), test_utils=("test_schema", "test_faketensor"))
    state = torch.randn(2, 19, 3, device=DEV, generator=g)
    torch.library.opcheck(ops().causal_conv1d_update,
                          (torch.randn(2, 19, device=DEV, generator=g), state,
                           kw["weight"].detach(), None, True))


@need
def test_public_api_autograd_and_compile(rng):
    g = gen(rng)
    kw = inputs(g, 2, 48, 257, 4, torch.bfloat16, "cl", bias=True, init=True)
    leaves = {k: (v.detach().requires_grad_(True) if v is not None else None)
              for k, v in kw.items() if k != "seq_idx"}
    out, fin = mk.causal_conv1d(**leaves, activation="silu", return_final_states=True)
    dout, dfin = torch.randn_like(out), torch.randn_like(fin)
    torch.autograd.backward([out, fin], [dout, dfin])
    want, want_fin, gd = reference_fwd_bwd(kw, True, dout, dfin)
    close("api out", out, want, torch.bfloat16)
    close("api dx", leaves["x"].grad, gd["x"], torch.bfloat16)
    close("api dinit", leaves["initial_states"].grad, gd["initial_states"], torch.bfloat16)
    close_sum("api dweight", leaves["weight"].grad, gd["weight"], torch.bfloat16)

    def f(x, weight, bias):
        return mk.causal_conv1d(x, weight, bias, activation="silu")

    comp = torch.compile(f, fullgraph=True)
    got = comp(kw["x"], kw["weight"], kw["bias"])
    assert torch.equal(got, f(kw["x"], kw["weight"], kw["bias"]))


# Run in a child process: a crash while raising (seen on one GPU box when the extension's C++
# ABI did not match torch's) then fails this test instead of killing the whole session.
ERROR_CASES = r"""
import torch, mlmamba_kernels
ops, dev = torch.ops.mlmamba, "cuda"
x, w = torch.randn(2, 8, 16, device=dev), torch.randn(8, 4, device=dev)
cases = [
    ("causal_conv1d_fwd: weight must have shape",
     lambda: ops.causal_conv1d_fwd(x, torch.randn(7, 4, device=dev), None, None, None, True, False)),
    ("causal_conv1d_fwd: width (weight.size(1)) must be 2..8",
     lambda: ops.causal_conv1d_fwd(x, torch.randn(8, 9, device=dev), None, None, None, True, False)),
    ("causal_conv1d_fwd: initial_states must have shape",
     lambda: ops.causal_conv1d_fwd(x, w, None, torch.randn(2, 8, 4, device=dev), None, True, False)),
    ("causal_conv1d_fwd: seq_idx must be int32",
     lambda: ops.causal_conv1d_fwd(x, w, None, None, torch.zeros(2, 16, device=dev), True, False)),
    ("causal_conv1d_bwd: dout must have shape",
     lambda: ops.causal_conv1d_bwd(x, w, None, None, None, x[:, :, :3], None, True)),
    ("causal_conv1d_update: conv_state must have shape",
     lambda: ops.causal_conv1d_update(x[:, :, 0], torch.randn(2, 8, 4, device=dev), w, None, True)),
]
for want, fn in cases:
    try:
        fn()
        print("NO-ERROR", want)
    except RuntimeError as e:
        print("OK" if want in str(e) else "WRONG " + str(e).splitlines()[0])
"""


@need
def test_bad_arguments_name_the_argument():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", ERROR_CASES], capture_output=True, text=True,
                       timeout=300, cwd=root, env=env)
    assert r.returncode == 0, f"crashed (rc {r.returncode}) raising argument errors:\n{r.stderr[-3000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6 and all(ln == "OK" for ln in lines), r.stdout
