"""Check csrc/ssd/wgmma.cuh on an sm_90 GPU before any kernel uses it: every operand layout the
SSD forward needs (K-major, M/N-major, A from registers; K of 64 and 128 = two panels), one
64 x 64 product per case, against torch in fp32. Prints one line per case: ok / WRONG (max error).
Where a case is wrong it retries with LBO and SBO swapped and says if that fixes it.

    python3 scripts/dev/wgmma_check.py
"""
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]

SRC = r"""
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include "ssd/wgmma.cuh"
using namespace mlmamba::ssd;
using bf = __nv_bfloat16;

// A (64 x K) row-major [m][k], B (K x 64) row-major [k][n]; D (64 x 64) = A B.
// a_kind: 0 K-major smem, 1 M-major smem, 2 registers; b_kind: 0 K-major, 1 N-major.
template <int K>
__global__ void check_kernel(const bf* A, const bf* B, float* D, int a_kind, int b_kind,
                             int lbo, int sbo) {
  __shared__ __align__(1024) unsigned char sa[64 * K * 2];
  __shared__ __align__(1024) unsigned char sb[64 * K * 2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  for (int e = tid; e < 64 * K; e += 128) {
    const int m = e / K, k = e % K;  // A element (m, k)
    const int oa = a_kind == 1 ? sw128_offset<K>(k, m) : sw128_offset<64>(m, k);
    *reinterpret_cast<bf*>(sa + oa) = A[m * K + k];
    const int kk = e / 64, n = e % 64;  // B element (kk, n)
    const int ob = b_kind == 1 ? sw128_offset<K>(kk, n) : sw128_offset<64>(n, kk);
    *reinterpret_cast<bf*>(sb + ob) = B[kk * 64 + n];
  }
  __syncthreads();
  fence_async_smem();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  wgmma_fence();
  for (int s = 0; s < K / 16; ++s) {
    // K-major: panel s / 4, 32 bytes per k-step inside it; M/N-major: rows 16 s
    const unsigned char* pa = a_kind == 1 ? sa + s * 16 * 128 : sa + (s / 4) * 64 * 128 + (s % 4) * 32;
    const unsigned char* pb = b_kind == 1 ? sb + s * 16 * 128 : sb + (s / 4) * 64 * 128 + (s % 4) * 32;
    const uint64_t db = wgmma_desc(pb, lbo, sbo);
    if (a_kind == 2) {
      uint32_t a[4];
      const int r0 = 16 * warp + g, c0 = 16 * s + 2 * t;
      auto pk = [&](int r, int c) {
        __nv_bfloat162 v = __halves2bfloat162(A[r * K + c], A[r * K + c + 1]);
        return *reinterpret_cast<uint32_t*>(&v);
      };
      a[0] = pk(r0, c0); a[1] = pk(r0 + 8, c0); a[2] = pk(r0, c0 + 8); a[3] = pk(r0 + 8, c0 + 8);
      if (b_kind == 1) wgmma_m64n64_rs<1>(d, a, db, true);
      else wgmma_m64n64_rs<0>(d, a, db, true);
    } else {
      const uint64_t da = wgmma_desc(pa, lbo, sbo);
      if (a_kind == 1 && b_kind == 1) wgmma_m64n64_ss<1, 1>(d, da, db, true);
      else if (a_kind == 1) wgmma_m64n64_ss<1, 0>(d, da, db, true);
      else if (b_kind == 1) wgmma_m64n64_ss<0, 1>(d, da, db, true);
      else wgmma_m64n64_ss<0, 0>(d, da, db, true);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + g + (e >> 1) * 8, c = 8 * j + 2 * t + (e & 1);
      D[r * 64 + c] = d[4 * j + e];
    }
}

at::Tensor check(const at::Tensor& A, const at::Tensor& B, int64_t a_kind, int64_t b_kind,
                 int64_t lbo, int64_t sbo) {
  auto D = at::zeros({64, 64}, A.options().dtype(at::kFloat));
  const int K = static_cast<int>(A.size(1));
  auto pa = reinterpret_cast<const bf*>(A.data_ptr()), pb = reinterpret_cast<const bf*>(B.data_ptr());
  if (K == 64) check_kernel<64><<<1, 128>>>(pa, pb, D.data_ptr<float>(), a_kind, b_kind, lbo, sbo);
  else check_kernel<128><<<1, 128>>>(pa, pb, D.data_ptr<float>(), a_kind, b_kind, lbo, sbo);
  return D;
}
"""

CPP = "at::Tensor check(const at::Tensor& A, const at::Tensor& B, int64_t a_kind, int64_t b_kind, int64_t lbo, int64_t sbo);"

NAMES = {0: "K-major", 1: "MN-major", 2: "registers"}


def main():
    mod = cpp_extension.load_inline(
        "mlm_wgmma_check", cpp_sources=[CPP], cuda_sources=[SRC], functions=["check"],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cuda_cflags=["-O2", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a"],
        verbose=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    bad = 0
    for K in (64, 128):
        a = torch.randn(64, K, device="cuda", generator=g).bfloat16()
        b = torch.randn(K, 64, device="cuda", generator=g).bfloat16()
        want = a.float() @ b.float()
        for a_kind in (0, 1, 2):
            for b_kind in (0, 1):
                lbo = 64 * K * 2 if K > 64 else 16  # MN-major: next 64 columns (one panel here)
                res = []
                # the swapped try only where it stays inside the 64 x K tile (a stride past its
                # end is an illegal shared-memory access, not a wrong answer)
                tries = ((lbo, 1024), (1024, lbo)) if max(lbo, 1024) * 8 <= 64 * K * 2 else ((lbo, 1024),)
                for lo, so in tries:
                    got = mod.check(a, b, a_kind, b_kind, lo, so)
                    torch.cuda.synchronize()
                    res.append(((got - want).abs().max() / want.abs().max()).item())
                    if res[0] < 1e-2:
                        break
                ok = res[0] < 1e-2
                bad += not ok
                note = "" if ok else (" (swapping LBO and SBO fixes it)" if len(res) > 1 and res[1] < 1e-2 else "")
                print(f"K={K:<4} A {NAMES[a_kind]:<9} B {NAMES[b_kind]:<9} "
                      f"{'ok' if ok else 'WRONG'} rel err {res[0]:.2e}{note}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
