"""Scratch device script for the SSD forward (issue 4): JIT-builds csrc/ssd forward sources with
csrc/registration.cpp, makes mlmamba_kernels use them, runs the GPU tests and the benchmark.
  python3 scripts/dev/ssd_fwd_dev.py [build|test|bench|sweep]...   (default: all; logs in $OUT)
"""
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", "/tmp/ssd_dev_out"))
OUT.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
os.environ.setdefault("MAX_JOBS", "16")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def build():
    t0 = time.time()
    src = ["csrc/registration.cpp", "csrc/ssd/fwd_ops.cpp", "csrc/ssd/update.cu",
           "csrc/ssd/fwd_bf16.cu", "csrc/ssd/fwd_fp16.cu", "csrc/ssd/fwd_fp32.cu"]
    bdir = Path("/tmp/mlm_ssd_dev_build")
    bdir.mkdir(exist_ok=True)
    cpp_extension.load(
        name="mlm_ssd_dev", sources=[str(ROOT / s) for s in src],
        extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"],
        build_directory=str(bdir), is_python_module=False, verbose=False)
    print(f"build {time.time() - t0:.0f}s", flush=True)
    # mlmamba_kernels imports _C: hand it a stub so the schemas are not defined twice
    stub = types.ModuleType("mlmamba_kernels._C")
    stub.build_info = lambda: {"cuda_archs": "90a (dev JIT)", "torch_version": torch.__version__,
                               "cuda_version": torch.version.cuda}
    sys.modules["mlmamba_kernels._C"] = stub
    import mlmamba_kernels as mk
    print(mk.build_info()["backends"]["ssd_scan"], mk.build_info()["backends"]["ssd_state_update"])


def test(extra=()):
    import pytest
    t0 = time.time()
    rc = pytest.main(["-q", "-rfE", "--no-header", "-p", "no:cacheprovider", "--durations=8",
                      str(ROOT / "tests/test_ssd_fwd_gpu.py"), *extra])
    print(f"tests rc {rc} in {time.time() - t0:.0f}s", flush=True)


def bench():
    sys.argv = ["bench"]
    from bench.__main__ import main
    main(["--only", "ssd", "--json", str(OUT / "bench.json")])


def sweep():
    """Channel-slice width per CTA (PT) and register budget (MINB) for the forward cases;
    the split (fp16 / fp32) path on the first case."""
    from bench.bench_ssd import FWD_CASES, fwd_inputs
    from bench.common import time_variants
    from mlmamba_kernels import ssd_scan
    for ci, (name, b, l, h, p, n, _) in enumerate(FWD_CASES):
        sets = [fwd_inputs(b, l, h, p, n, "cuda", s) for s in range(2)]
        dtypes = [torch.bfloat16] + ([torch.float16, torch.float32] if ci == 0 else [])
        for dt in dtypes:
            ss = [{k: (v.to(dt) if v.dtype == torch.bfloat16 else v) for k, v in st.items()}
                  for st in sets]
            res = {}
            for pt in ("32", "64"):
                for minb in (("2", "1") if dt == torch.bfloat16 else ("2",)):
                    os.environ["MLMAMBA_SSD_FWD_PT"] = pt
                    os.environ["MLMAMBA_SSD_FWD_MINB"] = minb
                    f = lambda i: ssd_scan(ss[i]["x"], ss[i]["dt"], ss[i]["A"], ss[i]["B"],  # noqa
                                           ss[i]["C"], D=ss[i]["D"], dt_bias=ss[i]["dt_bias"],
                                           dt_softplus=True)
                    res[f"PT{pt}/MINB{minb}"] = time_variants(
                        {"k": f}, torch.device("cuda"), nsets=2)["k"] * 1e6
            os.environ.pop("MLMAMBA_SSD_FWD_PT")
            os.environ.pop("MLMAMBA_SSD_FWD_MINB")
            print(f"sweep {name:<34} {str(dt)[6:]:<8} " +
                  "  ".join(f"{k} {v:7.1f}us" for k, v in res.items()), flush=True)


def one_call():
    """One forward call of the first bench case (for ncu)."""
    from bench.bench_ssd import FWD_CASES, fwd_inputs
    from mlmamba_kernels import ssd_scan
    _, b, l, h, p, n, _ = FWD_CASES[0]
    k = fwd_inputs(b, l, h, p, n, "cuda", 0)
    for _ in range(2):
        ssd_scan(k["x"], k["dt"], k["A"], k["B"], k["C"], D=k["D"], dt_bias=k["dt_bias"],
                 dt_softplus=True)
    torch.cuda.synchronize()


def errdiag():
    """Run the op's error path in subprocesses (the first device run segfaulted there)."""
    import subprocess
    lib = "/tmp/mlm_ssd_dev_build/mlm_ssd_dev.so"
    call = ("import torch, math; x = torch.randn(1, 8, 6, 64, device='cuda'); "
            "dt = torch.rand(1, 8, 6, device='cuda'); A = -torch.rand(6, device='cuda'); "
            "B = torch.randn(1, 8, 4, 32, device='cuda')\n"
            "try:\n torch.ops.mlmamba.ssd_scan_fwd(x, dt, A, B, B, 64, None, None, None, None, "
            "None, None, False, 0.0, math.inf, False)\n"
            "except RuntimeError as e: print('caught:', str(e)[:120])\n")
    stub = ("import sys, types; m = types.ModuleType('mlmamba_kernels._C'); "
            "sys.modules['mlmamba_kernels._C'] = m; sys.path.insert(0, '%s'); "
            "import mlmamba_kernels\n" % ROOT)
    codes = {
        "core torch error": "import torch\ntry:\n torch.ones(2, device='cuda') + "
                            "torch.ones(3, device='cuda')\nexcept RuntimeError as e: print('caught')",
        "our op, plain": f"import torch; torch.ops.load_library('{lib}')\n" + call,
        "our op, with mlmamba_kernels": f"import torch; torch.ops.load_library('{lib}')\n" + stub + call,
        "our op, update error": f"import torch; torch.ops.load_library('{lib}')\n" +
            "s = torch.randn(2, 4, 8, 24, device='cuda'); x = torch.randn(2, 4, 8, device='cuda')\n"
            "try:\n torch.ops.mlmamba.ssd_state_update(s, x, torch.rand(2, 4, device='cuda'), "
            "-torch.rand(4, device='cuda'), torch.randn(2, 1, 24, device='cuda'), "
            "torch.randn(2, 1, 24, device='cuda'), None, None, None, False)\n"
            "except RuntimeError as e: print('caught:', str(e)[:120])\n",
    }
    for name, code in codes.items():
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(f"errdiag {name}: rc {r.returncode} | {r.stdout.strip()[-160:]} | "
              f"{r.stderr.strip()[-300:]}", flush=True)


if __name__ == "__main__":
    steps = sys.argv[1:] or ["build", "test", "errdiag", "bench", "sweep"]
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    build()
    for s in steps:
        if s == "test":
            test()
        elif s.startswith("test:"):
            test(["-k", s[5:]])
        elif s == "bench":
            bench()
        elif s == "sweep":
            sweep()
        elif s == "one_call":
            one_call()
        elif s == "errdiag":
            errdiag()
        elif s.startswith("minb1:"):
            os.environ["MLMAMBA_SSD_FWD_MINB"] = "1"
            test(["-k", s[6:]])
            os.environ.pop("MLMAMBA_SSD_FWD_MINB")
