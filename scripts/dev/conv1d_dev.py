"""Scratch driver for the conv1d kernels on a GPU box (not part of the library).

  python scripts/dev/conv1d_dev.py build   # JIT-build registration.cpp + csrc/conv1d into
                                           # mlmamba_kernels/_C.so (only the conv1d family)
  python scripts/dev/conv1d_dev.py sweep   # time fwd/bwd over channel-last chunk sizes
  python scripts/dev/conv1d_dev.py ptxas   # print the ptxas register report of the build log
  python scripts/dev/conv1d_dev.py pipe    # A/B: general (v2) vs streaming kernels, grid sizes,
                                           # against a plain copy of the same bytes

The real build is setup.py/CMake; this exists so the conv1d kernels can be tested while the
other families are still being written.
"""
import glob
import os
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
    # built in a child process: loading the library here would register the namespace twice
    code = (
        "from torch.utils.cpp_extension import load\n"
        f"load(name='_C', sources={[str(s) for s in srcs]!r}, build_directory={str(BUILD)!r},\n"
        f"     extra_include_paths=[{str(ROOT / 'csrc')!r}], is_python_module=False, verbose=True,\n"
        f"     extra_cflags=['-O3', '{abi}'],\n"
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


def pipe():
    """bf16 w4 silu bias: fwd and bwd, v2 kernels vs the streaming ones (MLMAMBA_CONV1D_IMPL,
    grid size MLMAMBA_CONV1D_WAVES), against torch's copy and SiLU of the same bytes. Three
    rounds with fresh buffers (one session's timings of the same kernel moved by 10-15%); per
    variant: the median of each round, and their minimum."""
    import torch
    import torch.nn.functional as F
    import mlmamba_kernels  # noqa: F401  (loads _C)
    from bench.common import time_variants
    ops = torch.ops.mlmamba
    dev = torch.device("cuda")
    d, w = 5376, 4
    variants = [("fwd", "v2", "1"), ("fwd", "pipe", "1"), ("fwd", "pipe", "2"),
                ("bwd", "v2", "1"), ("bwd", "pipe", "1"), ("bwd", "pipe", "2")]

    def env(impl, waves):
        os.environ["MLMAMBA_CONV1D_IMPL"] = impl
        os.environ["MLMAMBA_CONV1D_WAVES"] = waves

    for b, l in ((4, 2048), (1, 16384)):
        for cl in (False, True):
            n = b * d * l * 2
            res = {}
            for rnd in range(3):
                sets = []
                for _ in range(2):
                    x = (torch.randn(b, l, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) if cl
                         else torch.randn(b, d, l, device=dev, dtype=torch.bfloat16))
                    sets.append((x, torch.randn(d, w, device=dev, dtype=torch.bfloat16),
                                 torch.randn(d, device=dev, dtype=torch.bfloat16), torch.randn_like(x),
                                 torch.empty_like(x)))
                fns = {"copy": lambda i, sets=sets: sets[i][4].copy_(sets[i][0]),
                       "torch silu": lambda i, sets=sets: F.silu(sets[i][0])}
                for kind, impl, waves in variants:
                    def f(i, kind=kind, impl=impl, waves=waves, sets=sets):
                        env(impl, waves)
                        x_, w_, b_, do_, _ = sets[i]
                        if kind == "fwd":
                            return ops.causal_conv1d_fwd(x_, w_, b_, None, None, True, False)
                        return ops.causal_conv1d_bwd(x_, w_, b_, None, None, do_, None, True)
                    fns[f"{kind} {impl} w{waves}"] = f
                t = time_variants(fns, dev, nsets=2)
                env("", "")
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


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    {"build": build, "ptxas": ptxas, "sweep": sweep, "pipe": pipe}[sys.argv[1]]()
