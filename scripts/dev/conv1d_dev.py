"""Scratch driver for the conv1d kernels on a GPU box (not part of the library).

  python scripts/dev/conv1d_dev.py build   # JIT-build registration.cpp + csrc/conv1d into
                                           # mlmamba_kernels/_C.so (only the conv1d family)
  python scripts/dev/conv1d_dev.py sweep   # time fwd/bwd over channel-last chunk sizes
  python scripts/dev/conv1d_dev.py ptxas   # print the ptxas register report of the build log
  python scripts/dev/conv1d_dev.py pipe    # A/B: default dispatch, v2, streaming kernels, their
                                           # variants, against a plain copy of the same bytes
  python scripts/dev/conv1d_dev.py prof    # one call per variant, to run under ncu
  python scripts/dev/conv1d_dev.py graph   # forward l-contig variants (GRAPH_VARIANTS) timed
                                           # from CUDA graphs against copy_ and silu
  python scripts/dev/conv1d_dev.py placement  # the forward on fresh buffers per trial: eager
                                           # (the bench's method) and graph, with addresses

The real build is setup.py/CMake; this exists so the conv1d kernels can be tested while the
other families are still being written.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("CONV1D_BUILD_DIR", "/tmp/conv1d_build"))


def build():
    import torch
    srcs = [ROOT / "csrc/module.cpp", ROOT / "csrc/registration.cpp"]
    srcs += sorted(Path(p) for p in glob.glob(str(ROOT / "csrc/conv1d/*.cu")))
    srcs += [ROOT / "csrc/conv1d/ops.cpp"]
    BUILD.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # The C++ ABI flag explicitly: without it a compiler whose default differs from torch's
    # build passes std::string across the boundary wrongly, which crashes on error paths.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # The shared C++ runtime by its full path, as CMakeLists.txt does: where the toolchain has
    # no libstdc++.so dev link, -lstdc++ takes libstdc++.a, and a c10::Error unwinding through
    # our frames then crashed the process (test_bad_arguments_name_the_argument).
    try:
        stdcxx = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.so.6"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        stdcxx = ""
    ldflags = [stdcxx] if os.path.isabs(stdcxx) and os.path.exists(stdcxx) else []
    # built in a child process: loading the library here would register the namespace twice
    code = (
        "from torch.utils.cpp_extension import load\n"
        f"load(name='_C', sources={[str(s) for s in srcs]!r}, build_directory={str(BUILD)!r},\n"
        f"     extra_include_paths=[{str(ROOT / 'csrc')!r}], is_python_module=False, verbose=True,\n"
        f"     extra_cflags=['-O3', '{abi}'],\n"
        f"     extra_ldflags={ldflags!r},\n"
        f"     extra_cuda_cflags=['-O3', '{abi}', '-lineinfo', '--expt-relaxed-constexpr',\n"
        "                        '-gencode=arch=compute_90a,code=sm_90a', '-Xptxas=-v'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    (BUILD / "build_stdout.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(r.stdout[-6000:], r.stderr[-6000:])
        sys.exit(f"build failed ({time.time() - t0:.0f}s)")
    so = BUILD / "_C.so"
    shutil.copy(so, ROOT / "mlmamba_kernels" / "_C.so")
    print(f"built {so} in {time.time() - t0:.0f}s -> mlmamba_kernels/_C.so")


def ptxas():
    import re
    txt = (BUILD / "build_stdout.txt").read_text()
    name = None
    for line in txt.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name and ("Li4E" in name or "update" in name or "reduce" in name):
            print(m.group(1), name[:90])
        if "spill stores" in line and not line.strip().startswith("0 bytes stack"):
            print("   ", line.strip())


def sweep():
    """fwd and bwd times over channel-last chunk sizes (MLMAMBA_CONV1D_CHUNK), bf16 w4 silu."""
    import torch
    import mlmamba_kernels  # noqa: F401  (loads _C)
    from bench.common import time_variants
    ops = torch.ops.mlmamba
    dev = torch.device("cuda")
    d, w = 5376, 4
    for b, l in ((4, 2048), (1, 16384)):
        sets = []
        for _ in range(2):
            x = torch.randn(b, l, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
            sets.append((x, torch.randn(d, w, device=dev, dtype=torch.bfloat16),
                         torch.randn(d, device=dev, dtype=torch.bfloat16), torch.randn_like(x)))
        n = b * d * l * 2
        for chunk in ("16", "32", "64", "128", ""):
            os.environ["MLMAMBA_CONV1D_CHUNK"] = chunk
            if not chunk:
                del os.environ["MLMAMBA_CONV1D_CHUNK"]
            t = time_variants({
                "fwd": lambda i: ops.causal_conv1d_fwd(sets[i][0], sets[i][1], sets[i][2], None,
                                                       None, True, False),
                "bwd": lambda i: ops.causal_conv1d_bwd(sets[i][0], sets[i][1], sets[i][2], None,
                                                       None, sets[i][3], None, True)},
                dev, nsets=2)
            print(f"b{b} L{l} chunk {chunk or 'auto':>4}: fwd {t['fwd'] * 1e6:7.1f} us "
                  f"({2 * n / t['fwd'] / 1e9:5.0f} GB/s)  bwd {t['bwd'] * 1e6:7.1f} us "
                  f"({3 * n / t['bwd'] / 1e9:5.0f} GB/s)", flush=True)


# (kind, label, MLMAMBA_CONV1D_IMPL, MLMAMBA_CONV1D_WAVES, MLMAMBA_CONV1D_TUNE); "" = unset.
# The tuning variants (bf16 width 4; see the *_pipe.cu launchers): fwd l-contig 1 = 1 KB tiles
# at 6 blocks/SM, 2 = 4 stages; fwd channel-last (default: 4 channels per lane, 8 stages, 5
# blocks/SM) 1 = 6 stages, 2 = 8 channels per lane at 3 blocks/SM; bwd l-contig 1 = the earlier
# 1 KB tiles (K 2, 3 stages, 5 blocks/SM).
# Caution: these are host-side timings (events around ~10 Python calls), which add host launch
# cost to ~50 us kernels: ncu put the same fwd l-contig kernel at 50 us where this reads 57-62.
VARIANTS = [("fwd", "default", "", "", ""), ("fwd", "v2", "v2", "", ""),
            ("fwd", "pipe w1", "pipe", "1", ""), ("fwd", "tune1", "pipe", "", "1"),
            ("fwd", "pipe", "pipe", "", ""),
            ("fwd", "tune2", "pipe", "", "2"),
            ("bwd", "default", "", "", ""), ("bwd", "v2", "v2", "", ""),
            ("bwd", "pipe", "pipe", "", ""), ("bwd", "tune1", "pipe", "", "1"),
            ("bwd", "oneshot", "oneshot", "", ""),
            # the same bytes without SiLU: how much of the time the activation costs
            ("fwd", "default nosilu", "", "", ""), ("bwd", "default nosilu", "", "", "")]


def _env(impl, waves, tune):
    os.environ["MLMAMBA_CONV1D_IMPL"] = impl
    os.environ["MLMAMBA_CONV1D_WAVES"] = waves
    os.environ["MLMAMBA_CONV1D_TUNE"] = tune
    os.environ["MLMAMBA_CONV1D_BLOCKS"] = ""
    os.environ["MLMAMBA_CONV1D_PREFETCH"] = ""


def _sets(b, l, d, w, cl, dev):
    import torch
    sets = []
    for _ in range(2):
        x = (torch.randn(b, l, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) if cl
             else torch.randn(b, d, l, device=dev, dtype=torch.bfloat16))
        sets.append((x, torch.randn(d, w, device=dev, dtype=torch.bfloat16),
                     torch.randn(d, device=dev, dtype=torch.bfloat16), torch.randn_like(x),
                     torch.empty_like(x)))
    return sets


def _call(ops, kind, st, silu=True):
    x_, w_, b_, do_, _ = st
    if kind == "fwd":
        return ops.causal_conv1d_fwd(x_, w_, b_, None, None, silu, False)
    return ops.causal_conv1d_bwd(x_, w_, b_, None, None, do_, None, silu)


def pipe():
    """bf16 w4 silu bias: fwd and bwd, the default dispatch, v2 and the streaming kernels
    (MLMAMBA_CONV1D_IMPL), grid size (MLMAMBA_CONV1D_WAVES) and kernel variants
    (MLMAMBA_CONV1D_TUNE, see the *_pipe.cu launchers), against torch's copy of the same bytes.
    Three rounds with fresh buffers (one session's timings of the same kernel moved by 10-15%);
    per variant: the median of each round, and their minimum."""
    import torch
    import mlmamba_kernels  # noqa: F401  (loads _C)
    from bench.common import time_variants
    ops = torch.ops.mlmamba
    dev = torch.device("cuda")
    d, w = 5376, 4
    for b, l in ((4, 2048), (1, 16384)):
        for cl in (False, True):
            n = b * d * l * 2
            res = {}
            for rnd in range(3):
                sets = _sets(b, l, d, w, cl, dev)
                fns = {"copy": lambda i, sets=sets: sets[i][4].copy_(sets[i][0])}
                for kind, label, impl, waves, tune in VARIANTS:
                    def f(i, kind=kind, impl=impl, waves=waves, tune=tune, sets=sets,
                          silu="nosilu" not in label):
                        _env(impl, waves, tune)
                        return _call(ops, kind, sets[i], silu)
                    fns[f"{kind} {label}"] = f
                t = time_variants(fns, dev, nsets=2)
                _env("", "", "")
                for k, v in t.items():
                    res.setdefault(k, []).append(v)
                del sets, fns
                torch.cuda.empty_cache()
            tc = min(res["copy"])
            print(f"b{b} L{l} {'channel-last' if cl else 'l-contig'} (us per round; min; % of the "
                  f"same-size copy {tc * 1e6:.1f} us = {2 * n / tc / 1e9:.0f} GB/s)", flush=True)
            for k, v in res.items():
                nb = (3 if k.startswith("bwd") else 2) * n
                print(f"  {k:<18} {' '.join(f'{u * 1e6:7.1f}' for u in v)}  min {min(v) * 1e6:7.1f}"
                      f"  {100 * nb / min(v) / (2 * n / tc):5.1f}%", flush=True)


def prof():
    """One call of each variant of VARIANTS (b4 L2048, both layouts), then F.silu on the same
    x (a plain elementwise kernel over the same bytes), for ncu:
    ncu --kernel-name regex:'pipe_kernel|chlast_kernel|lcontig_kernel' ... conv1d_dev.py prof
    PROF_ONLY="fwd default,silu" limits the calls; PROF_SHAPE="1x16384" sets batch x length."""
    import torch
    import mlmamba_kernels  # noqa: F401
    ops = torch.ops.mlmamba
    dev = torch.device("cuda")
    only = os.environ.get("PROF_ONLY", "")
    b, l = (int(v) for v in os.environ.get("PROF_SHAPE", "4x2048").split("x"))
    for cl in (False, True):
        sets = _sets(b, l, 5376, 4, cl, dev)
        for kind, label, impl, waves, tune in VARIANTS:
            if only and f"{kind} {label}" not in only.split(","):
                continue
            _env(impl, waves, tune)
            _call(ops, kind, sets[0], "nosilu" not in label)
            torch.cuda.synchronize()
            print(f"{'cl' if cl else 'l'} {kind} {label}", flush=True)
        _env("", "", "")
        if not only or "silu" in only.split(","):
            torch.nn.functional.silu(sets[0][0])
            torch.cuda.synchronize()
            print(f"{'cl' if cl else 'l'} silu", flush=True)


# (label, {env}) of the forward timed by `graph`, per layout. Session 14 also timed tuning
# modes 3-7 here (L2 prefetch hint, streaming stores, grid-stride tiles; commit f6ca864,
# removed after: docs/perf-log.md, causal_conv1d / Session 14), session 15 the pipe kernel's
# tune 1 and one-shot grid, and one-shot variants (causal_conv1d v6).
_ONE = {"MLMAMBA_CONV1D_IMPL": "oneshot"}


def _stagger(prefix):
    """GRAPH_STAGGER="classes,ns;...": the one-shot kernels' staggered start (pipe.cuh), "1,0" off."""
    return [(f"{prefix}stagger {v}", {"MLMAMBA_CONV1D_STAGGER": v})
            for v in os.environ.get("GRAPH_STAGGER", "").split(";") if v]


GRAPH_VARIANTS = {
    False: [("default", {}), ("pipe", {"MLMAMBA_CONV1D_IMPL": "pipe"})]
    + [(f"oneshot t{t}", dict(_ONE, MLMAMBA_CONV1D_TUNE=t))
       for t in os.environ.get("GRAPH_TUNES", "11,13").split(",") if t]
    + [(f"blocks {n}", {"MLMAMBA_CONV1D_BLOCKS": str(n)})
       for n in os.environ.get("GRAPH_BLOCKS", "").split(",") if n] + _stagger(""),
    True: [("default", {}), ("pipe", {"MLMAMBA_CONV1D_IMPL": "pipe"}), ("v2", {"MLMAMBA_CONV1D_IMPL": "v2"})]
    + [(f"tma rows {n}", {"MLMAMBA_CONV1D_TUNE": t}) for t, n in (("31", 32), ("32", 64), ("33", 80))]
    + [(f"pipe tune{t}", {"MLMAMBA_CONV1D_IMPL": "pipe", "MLMAMBA_CONV1D_TUNE": str(t)}) for t in (1, 2)]
    + _stagger(""),
}
# (label, {env}) of the backward timed by `graph`, per layout. Session 15 also timed the
# streaming kernel on a one-shot grid (MLMAMBA_CONV1D_WAVES=100000: one tile per warp) and 4
# waves (docs/perf-log.md, causal_conv1d v6).
GRAPH_BWD_VARIANTS = {
    False: [("bwd default", {}), ("bwd pipe", {"MLMAMBA_CONV1D_IMPL": "pipe"}),
            ("bwd tune1", {"MLMAMBA_CONV1D_IMPL": "pipe", "MLMAMBA_CONV1D_TUNE": "1"}),
            ("bwd oneshot", _ONE), ("bwd v2", {"MLMAMBA_CONV1D_IMPL": "v2"})] + [
        (f"bwd oneshot t{t}", dict(_ONE, MLMAMBA_CONV1D_TUNE=str(t))) for t in (11, 13, 14, 20, 21)]
    + [(f"bwd blocks {n}", {"MLMAMBA_CONV1D_BLOCKS": str(n)})
       for n in os.environ.get("GRAPH_BWD_BLOCKS", "").split(",") if n] + _stagger("bwd "),
    True: [("bwd default", {}), ("bwd pipe", {"MLMAMBA_CONV1D_IMPL": "pipe"}),
           ("bwd v2", {"MLMAMBA_CONV1D_IMPL": "v2"}),
           ("bwd ring 2", {"MLMAMBA_CONV1D_TUNE": "41"}), ("bwd ring 4", {"MLMAMBA_CONV1D_TUNE": "42"}),
           ("bwd flat", {"MLMAMBA_CONV1D_TUNE": "46"}), ("bwd blocked", {"MLMAMBA_CONV1D_TUNE": "47"})]
    + [(f"bwd chunk {n}", {"MLMAMBA_CONV1D_CHUNK": str(n)})  # v2's rows per warp
       for n in os.environ.get("GRAPH_CHUNKS", "").split(",") if n],
}
_KNOBS = ("MLMAMBA_CONV1D_IMPL", "MLMAMBA_CONV1D_WAVES", "MLMAMBA_CONV1D_TUNE",
          "MLMAMBA_CONV1D_BLOCKS", "MLMAMBA_CONV1D_PREFETCH", "MLMAMBA_CONV1D_CHUNK",
          "MLMAMBA_CONV1D_STAGGER")


def _replay_us(g, inner):
    """µs per call of a graph replay g of `inner` calls, timed after one untimed replay."""
    import torch
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g()
    st.record()
    g()
    en.record()
    en.synchronize()
    return st.elapsed_time(en) * 1e3 / inner


def graph():
    """bf16 w4 silu bias forward and backward, both layouts (GRAPH_VARIANTS,
    GRAPH_BWD_VARIANTS; the backward's % of copy for 1.5 copies of bytes): each variant captured
    as a CUDA graph of 20 calls over two input sets (no host cost), rounds alternating the
    variants; against torch's copy_ and F.silu of the same bytes. (A 1 GiB copy_ captured in a
    graph read ~2.7 TB/s in session 14, against 4.26 for the bench's copy: not a reference.)"""
    import statistics
    import torch
    import torch.nn.functional as F
    import mlmamba_kernels  # noqa: F401
    from bench.common import cuda_graph_fn
    ops = torch.ops.mlmamba
    dev = torch.device("cuda")
    d, w, reps, inner = 5376, 4, 7, 20

    # GRAPH_CASES: which of lfwd, lbwd (l-contig), cfwd, cbwd (channel-last) to time
    cases = set(os.environ.get("GRAPH_CASES", "lfwd,lbwd,cfwd,cbwd").split(","))
    # GRAPH_SHAPES="b,l,cl;...": the shapes (cl 1: channel-last), default issue 3's four
    shapes = [tuple(int(v) for v in sh.split(",")) for sh in
              os.environ.get("GRAPH_SHAPES", "4,2048,0;1,16384,0;4,2048,1;1,16384,1").split(";")]
    for b, l, cl in shapes:
        cl = bool(cl)
        lay = "c" if cl else "l"
        variants = [v for v in GRAPH_VARIANTS[cl] if lay + "fwd" in cases]
        variants += [v for v in GRAPH_BWD_VARIANTS[cl] if lay + "bwd" in cases]
        if os.environ.get("GRAPH_SKIP"):  # a regex of variant labels not to time
            variants = [v for v in variants if not re.search(os.environ["GRAPH_SKIP"], v[0])]
        if not variants:
            continue
        sets = _sets(b, l, d, w, cl, dev)
        n = b * d * l * 2
        graphs = {"copy": cuda_graph_fn(lambda: [sets[i % 2][4].copy_(sets[i % 2][0]) for i in range(inner)]),
                  "silu": cuda_graph_fn(lambda: [F.silu(sets[i % 2][0]) for i in range(inner)])}
        for label, env in variants:
            for k in _KNOBS:
                os.environ[k] = env.get(k, "")
            kind = "bwd" if label.startswith("bwd") else "fwd"
            graphs[label] = cuda_graph_fn(lambda kind=kind: [_call(ops, kind, sets[i % 2]) for i in range(inner)])
        _env("", "", "")
        res = {k: [] for k in graphs}
        for _ in range(reps):
            for k, g in graphs.items():
                res[k].append(_replay_us(g, inner))
        tc = statistics.median(res["copy"])
        print(f"b{b} L{l} {'channel-last' if cl else 'l-contig'}: {2 * n / 1e6:.1f} MB; µs median "
              f"(min) of {reps} graph replays, GB/s, % of the same-size copy", flush=True)
        for k, v in res.items():
            m, nb = statistics.median(v), (3 if k.startswith("bwd") else 2) * n  # bytes moved
            print(f"  {k:<22} {m:7.1f} ({min(v):6.1f})  {nb / m / 1e3:6.0f}  "
                  f"{100 * nb / m / (2 * n / tc):5.1f}%", flush=True)
        del graphs, sets
        torch.cuda.empty_cache()


def placement():
    """Does the forward's time depend on where its tensors sit? The bench's eager rows read 0-35%
    above the graphs, a different row in each process (docs/perf-log.md, causal_conv1d v17).
    PLACE_TRIALS (8) trials, each with fresh input sets behind a spacer of random size (so they
    land elsewhere): the forward timed eager by the bench's own method (time_variants, alone)
    and as a graph of 20 calls, and copy_ of the same bytes; with the buffers' addresses.
    PLACE_SHAPES="b,l,cl;..." (default b4 L2048 in both layouts)."""
    import random
    import statistics
    import torch
    import mlmamba_kernels  # noqa: F401
    from bench.common import cuda_graph_fn, time_variants
    ops, dev, d, w, inner = torch.ops.mlmamba, torch.device("cuda"), 5376, 4, 20
    shapes = [tuple(int(v) for v in sh.split(",")) for sh in
              os.environ.get("PLACE_SHAPES", "4,2048,0;4,2048,1").split(";")]
    rng = random.Random(int(os.environ.get("PLACE_SEED", "0")))

    def graph_us(fn):
        g = cuda_graph_fn(fn)
        return statistics.median(_replay_us(g, inner) for _ in range(5))

    for b, l, cl in shapes:
        print(f"b{b} L{l} {'channel-last' if cl else 'l-contig'}: trial, µs eager / graph / copy_ "
              f"graph, and x, out (eager) addresses mod 2^30", flush=True)
        for trial in range(int(os.environ.get("PLACE_TRIALS", "8"))):
            spacer = torch.empty(rng.randrange(1, 512) << 20, dtype=torch.uint8, device=dev)
            sets = _sets(b, l, d, w, bool(cl), dev)
            eager = time_variants({"ours": lambda i: _call(ops, "fwd", sets[i])}, dev, nsets=2)["ours"]
            out = _call(ops, "fwd", sets[0])
            gr = graph_us(lambda: [_call(ops, "fwd", sets[i % 2]) for i in range(inner)])
            cp = graph_us(lambda: [sets[i % 2][4].copy_(sets[i % 2][0]) for i in range(inner)])
            print(f"  {trial}: {eager * 1e6:6.1f} / {gr:6.1f} / {cp:6.1f}   "
                  f"x {sets[0][0].data_ptr() % (1 << 30):#011x} out {out.data_ptr() % (1 << 30):#011x}",
                  flush=True)
            del spacer, sets, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    {"build": build, "ptxas": ptxas, "sweep": sweep, "pipe": pipe, "prof": prof,
     "graph": graph, "placement": placement}[sys.argv[1]]()
