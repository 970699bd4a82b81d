"""Developer script for the SSD backward (csrc/ssd/bwd*).

  python scripts/dev/ssd_bwd_dev.py emulate      # CPU: float64 emulation of the kernels' chunked
                                                 # algorithm vs autograd through the reference
  python scripts/dev/ssd_bwd_dev.py gpu [--bench] # GPU: JIT-build bwd + registration, check, time

The emulation follows csrc/ssd/bwd_states.cu and bwd_chunk.cuh step by step (same masks, same
lambda decomposition, same per-sequence chunking), so a math error shows up without a GPU.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------
# emulation (float64)

def _dt_vec(dt_raw, bias, softplus, lo, hi):
    v = dt_raw + (bias if bias is not None else 0.0)
    gf = torch.ones_like(v)
    if softplus:
        small = v <= 20
        gf = torch.where(small, torch.sigmoid(v), gf)
        v = torch.where(small, F.softplus(v), v)
    if (lo, hi) != (0.0, math.inf):
        gf = torch.where((v < lo) | (v > hi), 0.0, gf)
        v = v.clamp(lo, hi)
    return v, gf


def emulate(dout, dfinal, x, dt, A, B, C, D=None, z=None, dt_bias=None, init=None, seq_idx=None,
            cu=None, softplus=False, lo=0.0, hi=math.inf, Q=64):
    f = torch.float64
    x, dout, B, C, dt, A = (t.to(f) for t in (x, dout, B, C, dt, A))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    hpg = h // g
    z = None if z is None else z.to(f)
    dy = dout * F.silu(z) if z is not None else dout
    bias = None if dt_bias is None else dt_bias.to(f)
    dtp, gfac = _dt_vec(dt, bias, softplus, lo, hi)          # (b, l, h)
    dx = torch.zeros_like(x); ddt = torch.zeros_like(dt); dB = torch.zeros_like(B)
    dC = torch.zeros_like(C); dA = torch.zeros(h, dtype=f); ddtb = torch.zeros(h, dtype=f)
    dz = torch.zeros_like(x) if z is not None else None
    Dm = None if D is None else (D.to(f)[:, None].expand(h, p) if D.dim() == 1 else D.to(f))
    dDm = torch.zeros(h, p, dtype=f)
    if cu is not None:
        seqs = [(0, int(cu[s]), int(cu[s + 1])) for s in range(len(cu) - 1)]
    else:
        seqs = [(bb, 0, l) for bb in range(b)]
    nseq = len(seqs)
    dinit = torch.zeros(nseq, h, p, n, dtype=f)
    for s, (bb, beg, end) in enumerate(seqs):
        chunks = [(t0, min(Q, end - t0), t0 == beg) for t0 in range(beg, end, Q)]
        for hh in range(h):
            gg = hh // hpg
            Ah = A[hh]

            def vecs(t0, qc, first):
                d = torch.zeros(Q, dtype=f); gf = torch.zeros(Q, dtype=f)
                d[:qc] = dtp[bb, t0:t0 + qc, hh]; gf[:qc] = gfac[bb, t0:t0 + qc, hh]
                au = d * Ah
                a = au.clamp(min=-60.0)  # the kernels' clamp, for differences of lam only
                lam = a.cumsum(0)
                lu = au.cumsum(0)  # sin and cont: exponentials of the unclamped cumsum
                rs = torch.zeros(Q, dtype=torch.long)
                if seq_idx is not None and cu is None:
                    for i in range(qc):
                        t = t0 + i
                        if i > 0 or not first:
                            rs[i] = int(seq_idx[bb, t] != seq_idx[bb, t - 1])
                seg = rs.cumsum(0)
                sin = torch.where(seg == 0, lu.exp(), 0.0)
                sout = torch.where(seg == seg[-1], (lam[-1] - lam).exp(), 0.0)
                cont = lu[-1].exp() if seg[-1] == 0 else torch.tensor(0.0, dtype=f)
                return d, gf, lam, seg, sin, sout, cont

            def tile(t, t0, qc, hsel=None):
                out = torch.zeros((Q,) + t.shape[2:] if hsel is None else (Q, t.shape[-1]), dtype=f)
                out[:qc] = t[bb, t0:t0 + qc] if hsel is None else t[bb, t0:t0 + qc, hsel]
                return out

            # step 1: states and adjoints per chunk
            S = init[s, hh].to(f).clone() if init is not None else torch.zeros(p, n, dtype=f)
            Sprev = []
            for (t0, qc, first) in chunks:
                d, _, lam, seg, sin, sout, cont = vecs(t0, qc, first)
                Sprev.append(S.clone())
                xs = tile(x, t0, qc, hh) * (d * sout)[:, None]
                S = cont * S + xs.T @ tile(B, t0, qc, gg)
            G = dfinal[s, hh].to(f).clone() if dfinal is not None else torch.zeros(p, n, dtype=f)
            Gnext = [None] * len(chunks)
            for k in reversed(range(len(chunks))):
                t0, qc, first = chunks[k]
                d, _, lam, seg, sin, sout, cont = vecs(t0, qc, first)
                Gnext[k] = G.clone()
                ys = tile(dy, t0, qc, hh) * sin[:, None]
                G = cont * G + ys.T @ tile(C, t0, qc, gg)
            dinit[s, hh] = G
            # step 2: per chunk
            for k, (t0, qc, first) in enumerate(chunks):
                d, gf, lam, seg, sin, sout, cont = vecs(t0, qc, first)
                Sp, Gn = Sprev[k], Gnext[k]
                xc, dyc = tile(x, t0, qc, hh), tile(dy, t0, qc, hh)
                Bc, Cc = tile(B, t0, qc, gg), tile(C, t0, qc, gg)
                ii = torch.arange(Q)
                mask = (ii[None, :] <= ii[:, None]) & (seg[:, None] == seg[None, :])
                Lm = torch.where(mask, (lam[:, None] - lam[None, :]).exp(), 0.0)
                CB = Cc @ Bc.T
                W = dyc @ xc.T
                LCB, LW = Lm * CB, Lm * W
                M = LCB * W * d[None, :]
                strict = ii[None, :] < ii[:, None]
                Ms = torch.where(strict, M, 0.0)
                rows, cols = Ms.sum(1), Ms.sum(0)
                u_state = sout[:, None] * (Bc @ Gn.T)
                t4 = d * (xc * u_state).sum(1)
                u = u_state + LCB.T @ dyc
                din = (xc * u).sum(1)
                dxc = d[:, None] * u + (dyc * Dm[hh] if Dm is not None else 0.0)
                v = Cc @ Sp.T
                t2 = sin * (dyc * v).sum(1)
                dBc = (d[:, None] * LW.T) @ Cc + (xc * (d * sout)[:, None]) @ Gn
                dCc = (LW * d[None, :]) @ Bc + (dyc * sin[:, None]) @ Sp
                term3 = cont * (Gn * Sp).sum()
                R = torch.cat([torch.zeros(1, dtype=f), (cols - rows).cumsum(0)[:-1]])
                Suf = t2.flip(0).cumsum(0).flip(0)
                Pre = torch.cat([torch.zeros(1, dtype=f), t4.cumsum(0)[:-1]])
                lamg = R + Suf + term3 + Pre
                ddtc = din + Ah * lamg
                sl = slice(t0, t0 + qc)
                dx[bb, sl, hh] = dxc[:qc]
                ddt[bb, sl, hh] = (ddtc * gf)[:qc]
                dA[hh] += (d * lamg)[:qc].sum()
                ddtb[hh] += (ddtc * gf)[:qc].sum()
                dB[bb, sl, gg] += dBc[:qc]
                dC[bb, sl, gg] += dCc[:qc]
                dDm[hh] += (dyc * xc)[:qc].sum(0)
                if z is not None:
                    y = sin[:, None] * v + (LCB * d[None, :]) @ xc
                    if Dm is not None:
                        y = y + Dm[hh] * xc
                    zc = tile(z, t0, qc, hh)
                    sg = torch.sigmoid(zc)
                    dz[bb, sl, hh] = (tile(dout, t0, qc, hh) * y * sg * (1 + zc * (1 - sg)))[:qc]
    dD = None if D is None else (dDm.sum(1) if D.dim() == 1 else dDm)
    return dx, ddt, dA, dB, dC, dD, dz, (ddtb if dt_bias is not None else None), \
        (dinit if init is not None else None)


def _inputs(b, l, h, p, g, n, gen, dtype=torch.float64, z=True, D2=False, init=True, seq=False,
            cu=None, dev="cpu", strong=False):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dev)
    nseq = b if cu is None else len(cu) - 1
    t = dict(
        x=r(b, l, h, p).to(dtype), dt=(r(b, l, h) - (0 if not strong else -3)).to(dtype),
        A=-(torch.rand(h, generator=gen, dtype=torch.float64) * (8 if strong else 1) + 0.05).to(dev),
        B=r(b, l, g, n).to(dtype), C=r(b, l, g, n).to(dtype),
        D=r(h, p) if D2 else r(h), z=r(b, l, h, p).to(dtype) if z else None, dt_bias=r(h) * 0.5,
        initial_states=r(nseq, h, p, n) if init else None,
    )
    if seq:
        si = torch.zeros(b, l, dtype=torch.int32)
        for bb in range(b):
            cuts = sorted(torch.randint(1, max(2, l), (3,), generator=gen).tolist())
            for c in cuts:
                si[bb, c:] += 1
        t["seq_idx"] = si.to(dev)
    if cu is not None:
        t["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=dev)
    return t


def _ref_grads(t, dout, dfinal, softplus, lo, hi):
    from mlmamba_kernels.reference import ssd as ref
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    leaves = {k: (t[k].detach().to(torch.float64).requires_grad_(True) if t.get(k) is not None else None)
              for k in names}
    out, fin = ref.ssd_scan_naive(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                                  D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"],
                                  initial_states=leaves["initial_states"],
                                  seq_idx=t.get("seq_idx"), cu_seqlens=t.get("cu_seqlens"),
                                  dt_softplus=softplus, dt_limit=(lo, hi), return_final_states=True)
    loss = (out * dout.to(torch.float64)).sum() + (fin * dfinal.to(torch.float64)).sum()
    used = [leaves[k] for k in names if leaves[k] is not None]
    gr = iter(torch.autograd.grad(loss, used, allow_unused=True))
    return [next(gr) if leaves[k] is not None else None for k in names]


def run_emulate():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    cases = [
        dict(b=2, l=37, h=4, p=5, g=2, n=6, Q=8),
        dict(b=1, l=50, h=3, p=4, g=1, n=3, Q=16, seq=True),
        dict(b=1, l=45, h=2, p=3, g=1, n=4, Q=8, cu=[0, 3, 3, 20, 45]),
        dict(b=2, l=30, h=2, p=3, g=2, n=4, Q=8, strong=True, z=False, D2=True),
        dict(b=2, l=29, h=2, p=3, g=1, n=4, Q=8, clamp=(0.2, 1.5)),
        # every head's first decay below the kernels' -60 clamp (e^-70, e^-80: dinit tiny)
        dict(b=1, l=40, h=2, p=3, g=1, n=4, Q=8, first=True),
    ]
    worst = 0.0
    for cs in cases:
        cs = dict(cs)
        Q = cs.pop("Q"); cu = cs.pop("cu", None); seq = cs.pop("seq", False)
        strong = cs.pop("strong", False); zz = cs.pop("z", True); D2 = cs.pop("D2", False)
        lo, hi = cs.pop("clamp", (0.0, math.inf))
        first = cs.pop("first", False)
        t = _inputs(**cs, gen=gen, z=zz, D2=D2, seq=seq, cu=cu, strong=strong)
        if first:
            t["A"] = torch.tensor([-14.0, -16.0], dtype=torch.float64)
            t["dt"][:, 0] = 5.0 - (t["dt_bias"] if t["dt_bias"] is not None else 0.0)
        b, l, h, p = t["x"].shape
        nseq = b if cu is None else len(cu) - 1
        dout = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
        dfinal = torch.randn(nseq, h, p, cs["n"], generator=gen, dtype=torch.float64)
        ref = _ref_grads(t, dout, dfinal, True, lo, hi)
        em = emulate(dout, dfinal, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"],
                     t["dt_bias"], t["initial_states"], t.get("seq_idx"), cu, True, lo, hi, Q=Q)
        names = ["dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinit"]
        errs = {}
        for nm, a, r in zip(names, em, ref):
            if r is None:
                continue
            errs[nm] = ((a - r).norm() / r.norm().clamp(min=1e-30)).item()
        worst = max(worst, max(errs.values()))
        print({k: f"{v:.1e}" for k, v in errs.items()}, "case", cs, "Q", Q, "cu", cu, "seq", seq)
    print("worst rel err", worst)
    assert worst < 1e-9, worst


# ---------------------------------------------------------------------------------------------
# GPU: JIT build and check

def build():
    """JIT-build module.cpp + registration.cpp + the backward as mlmamba_kernels._C (forward ops
    fall back to the reference) and drop it into the package, so `import mlmamba_kernels` and
    the tests see our CUDA ssd_scan_bwd."""
    import shutil
    import sysconfig
    from torch.utils.cpp_extension import load
    srcs = ["csrc/module.cpp", "csrc/registration.cpp", "csrc/ssd/bwd_ops.cpp",
            "csrc/ssd/bwd_states.cu", "csrc/ssd/bwd_chunk_p32.cu", "csrc/ssd/bwd_chunk_p64.cu",
            "csrc/ssd/bwd_chunk_p128.cu", "csrc/ssd/bwd_reduce.cu"]
    std = os.environ.get("MLM_DEV_STD", "c++20")  # the host-code standard (CMake uses 20)
    bdir = os.path.join(ROOT, "build", "ssd_bwd_dev_" + std.replace("+", "p"))
    os.makedirs(bdir, exist_ok=True)
    t0 = time.time()
    mod = load(name="_C", sources=[os.path.join(ROOT, s) for s in srcs],
               extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=bdir,
               extra_cflags=["-O3", "-std=" + std],
               extra_cuda_cflags=["-O3", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a",
                                  "-Xptxas=-v", "--expt-relaxed-constexpr", "-lineinfo"],
               is_python_module=True, verbose=False)
    dst = os.path.join(ROOT, "mlmamba_kernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copyfile(mod.__file__, dst)
    print(f"built in {time.time() - t0:.0f} s -> {dst}", flush=True)


def profile_case(b=4, l=2048, h=80, p=64, n=128):
    """Per-kernel times of one backward (torch profiler), bf16, the issue's first case."""
    import math as _m
    sys.path.insert(0, ROOT)
    import mlmamba_kernels  # noqa: F401
    from bench.bench_ssd import fwd_inputs
    k = fwd_inputs(b, l, h, p, n, "cuda", 0)
    dout = torch.randn(b, l, h, p, device="cuda").bfloat16()
    args = (dout, None, k["x"], k["dt"], k["A"], k["B"], k["C"], 256, k["D"], None, k["dt_bias"],
            None, None, None, True, 0.0, _m.inf)
    for _ in range(3):
        torch.ops.mlmamba.ssd_scan_bwd(*args)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.ops.mlmamba.ssd_scan_bwd(*args)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    fn = getattr(torch.cuda, "get_device_name")
    print("device", fn(0))


def check_errors():
    """A failing argument check must raise a RuntimeError naming the argument."""
    import faulthandler
    faulthandler.enable()
    import mlmamba_kernels  # noqa: F401
    x = torch.randn(1, 10, 4, 32, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(1, 10, 3, 16, device="cuda", dtype=torch.bfloat16)
    dt = torch.randn(1, 10, 4, device="cuda")
    A = -torch.rand(4, device="cuda")
    for name, args in [("bad dt", (x, None, x, dt[..., :3], A, B[:, :, :1], B[:, :, :1])),
                       ("bad groups", (x, None, x, dt, A, B, B.clone()))]:
        try:
            torch.ops.mlmamba.ssd_scan_bwd(*args, 64, None, None, None, None, None, None, False,
                                           0.0, float("inf"))
            print(name, "no error!", flush=True)
        except RuntimeError as e:
            print(name, "->", str(e).splitlines()[0], flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "emulate"
    if mode == "emulate":
        run_emulate()
    elif mode == "build":
        build()
    elif mode == "profile":
        profile_case()
    elif mode == "errors":
        check_errors()
