"""Drives CMake to build mlmamba_kernels._C, or installs pure Python.

CMakeLists.txt is the build description. This file only finds the toolchain and hands CMake
what torch.utils.cpp_extension computes (include/library paths, ABI defines), so the build
does not depend on CMake's find_package(Torch), which fails on machines whose CUDA libraries
live in pip's NVIDIA packages.

Environment:
  MLMAMBA_SKIP_CUDA_BUILD=1   install pure Python (every op then runs its PyTorch reference)
  MLMAMBA_CUDA_ARCHS          e.g. "90a;80" (default; TORCH_CUDA_ARCH_LIST is honoured too)
  MAX_JOBS                    parallel compile jobs (default: all cores)
  CUDA_HOME                   the toolkit (folder with bin/nvcc), found automatically otherwise
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg):
    print(f"[mlmamba setup] {msg}", file=sys.stderr)


def find_cuda_home():
    """The CUDA toolkit folder: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or nvcc's folder."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    cands += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda.h").is_file():
            return Path(c)
    return None


def cuda_archs():
    """CUDA archs as CMake-style tokens, e.g. ["90a", "80"]."""
    spec = os.environ.get("MLMAMBA_CUDA_ARCHS")
    if not spec and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        spec = os.environ["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "")
    spec = spec or "90a;80"
    toks = [t.strip().replace(".", "") for t in spec.replace(",", ";").replace(" ", ";").split(";")]
    return [t for t in toks if t]


def pip_nvidia_dirs(sub):
    """include/ or lib/ folders of pip-installed NVIDIA packages (nvidia/cu13/include, ...),
    wherever the `nvidia` namespace package lives (a venv's site-packages, or the system's
    beside torch in a venv with --system-site-packages)."""
    import importlib.util
    bases = set()
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        bases.update(spec.submodule_search_locations)
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        bases.add(str(Path(sp) / "nvidia"))
    out = []
    for base in sorted(bases):
        if Path(base).is_dir():
            out += sorted(str(p) for p in Path(base).glob(f"*/{sub}") if p.is_dir())
    return out


def cuda_build_plan():
    """Why the CUDA build is skipped (str), or the CMake cache entries (dict)."""
    if os.environ.get("MLMAMBA_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "MLMAMBA_SKIP_CUDA_BUILD is set"
    try:
        import torch
        import torch.utils.cpp_extension as ce
    except ImportError:
        return "torch is not importable at build time"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit (bin/nvcc and include/cuda.h) was found; set CUDA_HOME"
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    defines = [f"_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "TORCH_EXTENSION_NAME=_C", "TORCH_API_INCLUDE_EXTENSION_H"]
    abi = getattr(ce, "_get_pybind11_abi_build_flags", lambda: [])()
    defines += [f[2:] for f in abi if f.startswith("-D")]
    archs = cuda_archs()
    return {
        "CMAKE_CUDA_COMPILER": str(cuda_home / "bin" / "nvcc"),
        "CUDAToolkit_ROOT": str(cuda_home),
        "MLM_TORCH_INCLUDE_DIRS": ";".join(ce.include_paths()),
        "MLM_TORCH_LIBRARY_DIRS": ";".join(ce.library_paths()),
        "MLM_EXTRA_INCLUDE_DIRS": ";".join([str(cuda_home / "include")] + pip_nvidia_dirs("include")),
        "MLM_EXTRA_LIBRARY_DIRS": ";".join([str(cuda_home / "lib64")] + pip_nvidia_dirs("lib")),
        "MLM_PYTHON_INCLUDE_DIR": sysconfig.get_paths()["include"],
        "MLM_DEFINES": ";".join(defines),
        "MLM_CUDA_ARCHS": ";".join(archs),
        "MLM_TORCH_VERSION": torch.__version__,
        "MLM_EXT_SUFFIX": sysconfig.get_config_var("EXT_SUFFIX"),
    }


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        plan = cuda_build_plan()
        if isinstance(plan, str):
            _log(f"skipping the CUDA extension: {plan}; every op will run its PyTorch reference")
            return
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        cache = dict(plan, CMAKE_BUILD_TYPE="Release", MLM_OUTPUT_DIR=str(out.parent))
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build_dir), *gen,
               *[f"-D{k}={v}" for k, v in cache.items()]]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _log(f"CUDA archs {plan['MLM_CUDA_ARCHS']}, {jobs} jobs, build dir {build_dir}")
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        if not out.is_file():
            raise RuntimeError(f"CMake finished but {out} was not produced")


setup(ext_modules=[CMakeExtension("mlmamba_kernels._C")], cmdclass={"build_ext": CMakeBuild})
