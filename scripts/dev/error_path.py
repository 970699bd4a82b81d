"""Bisect the crash seen on the device (torch 2.11): an argument error raised inside our CUDA
ops killed the process (SIGSEGV) instead of raising. Each case builds a minimal extension
and raises one error in a child process, so one run says which ingredient crashes.

    python scripts/dev/error_path.py            # prints one line per case: raised / CRASHED
"""
import os
import subprocess
import sys
import tempfile

CPP = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <stdexcept>
at::Tensor fail_check(const at::Tensor& x) { TORCH_CHECK(false, "errtest: x is bad, got ", x.sizes()); }
at::Tensor fail_std(const at::Tensor& x) { throw std::runtime_error("errtest: std error"); }
TORCH_LIBRARY(errtest, m) {
  m.def("fail_check(Tensor x) -> Tensor");
  m.def("fail_std(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(errtest, CompositeExplicitAutograd, m) {
  m.impl("fail_check", &fail_check);
  m.impl("fail_std", &fail_std);
}
"""

CASES = {  # name: (extra_cflags, op, device)
    "c10::Error, CPU tensor": ([], "fail_check", "cpu"),
    "c10::Error, CUDA tensor": ([], "fail_check", "cuda"),
    "std::runtime_error, CUDA tensor": ([], "fail_std", "cuda"),
    "c10::Error, -funwind-tables -fno-omit-frame-pointer": (
        ["-funwind-tables", "-fno-omit-frame-pointer"], "fail_check", "cuda"),
    "c10::Error, -O0": (["-O0"], "fail_check", "cuda"),
}

CHILD = r"""
import sys, torch, torch.utils.cpp_extension as ce
flags = sys.argv[2:-2]
ce.load_inline(name="errtest_" + str(abs(hash(tuple(flags)))), cpp_sources=[open(sys.argv[1]).read()],
               extra_cflags=["-std=c++20"] + flags, is_python_module=False, verbose=False)
op, dev = sys.argv[-2], sys.argv[-1]
try:
    getattr(torch.ops.errtest, op)(torch.zeros(2, device=dev))
except Exception as e:
    print("raised:", type(e).__name__, str(e).splitlines()[0][:80])
"""


def main():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "errtest.cpp")
        with open(src, "w") as f:
            f.write(CPP)
        for name, (flags, op, dev) in CASES.items():
            args = [sys.executable, "-c", CHILD, src, *flags, op, dev]
            r = subprocess.run(args, capture_output=True, text=True, timeout=300)
            verdict = r.stdout.strip() or f"CRASHED (rc {r.returncode}) {r.stderr.strip()[-200:]}"
            print(f"{name:<55} {verdict}", flush=True)


if __name__ == "__main__":
    main()
