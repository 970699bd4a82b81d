"""Bisect the crash seen on the device (torch 2.11): an argument error raised inside our C++
ops killed the process (SIGSEGV) instead of raising. One minimal extension is built once; each
case raises one error in a child process (optionally with an environment change), so one run
says which ingredient crashes.

    python scripts/dev/error_path.py     # prints the loaded C++ runtimes, then one line per case
"""
import os
import re
import subprocess
import sys
import tempfile

CPP = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <stdexcept>
at::Tensor fail_check(const at::Tensor& x) { TORCH_CHECK(false, "errtest: x is bad, got ", x.sizes()); }
at::Tensor fail_std(const at::Tensor& x) { throw std::runtime_error("errtest: std error"); }
// c10::Error thrown by libc10 with no cleanup (no std::string temporaries) in this frame
at::Tensor fail_plain(const at::Tensor& x) { c10::detail::torchCheckFail("f", "e.cpp", 1, "errtest: plain"); }
// std::runtime_error with a std::string temporary (a cleanup landing pad in this frame)
at::Tensor fail_std_str(const at::Tensor& x) { throw std::runtime_error(std::string("errtest: ") + std::to_string(x.numel())); }
// c10::Error constructed and caught in this frame, rethrown as std::runtime_error
at::Tensor fail_caught(const at::Tensor& x) {
  try { TORCH_CHECK(false, "errtest: caught"); } catch (const c10::Error& e) { throw std::runtime_error(e.what_without_backtrace()); }
}
// c10::Error constructed here, never thrown
at::Tensor make_error(const at::Tensor& x) { c10::Error e(c10::SourceLocation{"f", "e.cpp", 1}, std::string("errtest: made")); return x; }
TORCH_LIBRARY(errtest, m) {
  for (const char* n : {"fail_check", "fail_std", "fail_plain", "fail_std_str", "fail_caught", "make_error"})
    m.def((std::string(n) + "(Tensor x) -> Tensor").c_str());
}
TORCH_LIBRARY_IMPL(errtest, CompositeExplicitAutograd, m) {
  m.impl("fail_check", &fail_check); m.impl("fail_std", &fail_std); m.impl("fail_plain", &fail_plain);
  m.impl("fail_std_str", &fail_std_str); m.impl("fail_caught", &fail_caught); m.impl("make_error", &make_error);
}
"""

BUILD = r"""
import sys, torch.utils.cpp_extension as ce
ce.load_inline(name=sys.argv[3], cpp_sources=[open(sys.argv[1]).read()], extra_cflags=["-std=c++20"],
               extra_ldflags=sys.argv[4:], is_python_module=False, build_directory=sys.argv[2],
               verbose=False)
"""

CHILD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    getattr(torch.ops.errtest, sys.argv[2])(torch.zeros(2))
    print("returned")
except Exception as e:
    print("raised:", type(e).__name__, str(e).splitlines()[0][:60])
"""


PROVIDERS = r"""
import ctypes, os, sys, torch
class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
libc = ctypes.CDLL(None)
libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
handles = {"global": libc, "errtest.so": ctypes.CDLL(sys.argv[1]),
           "libc10.so": ctypes.CDLL(os.path.join(lib, "libc10.so"))}
for name in ("_Unwind_Resume", "_Unwind_RaiseException", "__gxx_personality_v0", "__cxa_throw"):
    for hn, h in handles.items():
        try:
            addr = ctypes.cast(getattr(h, name), ctypes.c_void_p).value
            info = Info()
            libc.dladdr(addr, ctypes.byref(info))
            where = os.path.basename(info.fname.decode())
        except AttributeError:
            where = "-"
        print(f"{name} via {hn}: {where}")
"""


def cxx(*args):
    r = subprocess.run(["c++", *args], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else ""


def main():
    code = ("import torch, re; import mlmamba_kernels; m = open('/proc/self/maps').read(); "
            "print(sorted(set(re.findall(r'\\S*lib(?:stdc\\+\\+|gcc_s)[^\\s]*', m))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print("loaded runtimes:", r.stdout.strip() or r.stderr.strip()[-300:])
    libstdcxx, libgcc = cxx("-print-file-name=libstdc++.so.6"), cxx("-print-file-name=libgcc_s.so.1")
    print("c++:", cxx("--version"), "|", libstdcxx, "|", libgcc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "errtest.cpp")
        with open(src, "w") as f:
            f.write(CPP)
        subprocess.run([sys.executable, "-c", BUILD, src, tmp, "errtest"], check=True)
        # the same, linked to the shared C++ runtime by its full path (what CMakeLists.txt does)
        subprocess.run([sys.executable, "-c", BUILD, src, tmp, "errtest_rt", libstdcxx], check=True)
        so_rt = os.path.join(tmp, "errtest_rt.so")
        so = os.path.join(tmp, "errtest.so")
        import torch
        c10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
        for cmd in (["readelf", "-d", so], ["readelf", "-d", so_rt], ["readelf", "-d", c10]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            print(os.path.basename(cmd[-1]), "NEEDED:",
                  " ".join(l.split()[-1] for l in r.stdout.splitlines() if "NEEDED" in l))
        r = subprocess.run([sys.executable, "-c", PROVIDERS, so], capture_output=True, text=True)
        print("providers after import torch:", r.stdout.replace(chr(10), "; "), r.stderr[-300:])
        r = subprocess.run(["nm", "-D", "--defined-only", c10], capture_output=True, text=True)
        print("libc10.so defines:", [l.split()[-1] for l in r.stdout.splitlines()
                                     if re.search("_Unwind_|__cxa_throw|personality", l)])
        r = subprocess.run(["ldd", so], capture_output=True, text=True)
        print("ldd:", " ".join(l.split()[0] + "=>" + (l.split()[2] if len(l.split()) > 2 else "")
                              for l in r.stdout.splitlines() if re.search("stdc|gcc_s|c10", l)))
        cases = [("c10::Error (TORCH_CHECK)", "fail_check", {}),
                 ("c10::Error, no cleanup in our frame", "fail_plain", {}),
                 ("c10::Error caught here, rethrown std", "fail_caught", {}),
                 ("c10::Error constructed, not thrown", "make_error", {}),
                 ("std::runtime_error", "fail_std", {}),
                 ("std::runtime_error with string cleanup", "fail_std_str", {}),
                 ("TORCH_CHECK, TORCH_SHOW_CPP_STACKTRACES=1", "fail_check",
                  {"TORCH_SHOW_CPP_STACKTRACES": "1"}),
                 ("TORCH_CHECK, LD_PRELOAD compiler's libstdc++ + libgcc_s", "fail_check",
                  {"LD_PRELOAD": f"{libstdcxx}:{libgcc}"}),
                 ("TORCH_CHECK, shared libstdc++ named on the link line", "fail_check", "rt")]
        for name, op, env in cases:
            lib = so_rt if env == "rt" else so
            env = {} if env == "rt" else env
            r = subprocess.run([sys.executable, "-c", CHILD, lib, op], capture_output=True,
                               text=True, timeout=120, env={**os.environ, **env})
            verdict = r.stdout.strip() or f"CRASHED (rc {r.returncode}) {r.stderr.strip()[-200:]}"
            print(f"{name:<58} {verdict}", flush=True)


if __name__ == "__main__":
    main()
