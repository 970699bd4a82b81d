// Step 2 of the sequence split (fwd_split.cpp) in one launch: the incoming state of every
// segment from the sub-segment end states E of step 1 and the sub-segments' decays (the
// products of their chunks' decays, multiplied by step 1's walk).
//   S_{k+1} = decay_k S_k + E_k over the sub-segments k; S at every m-th boundary is a segment's
// incoming state. One thread per (row, head, 4 state elements), sub-segments in order.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "ssd/fwd_split.h"

namespace mlmamba {
namespace ssd {
namespace {

constexpr int kThreads = 256;

// One thread per 4 state elements of a (row, head); decays: (b * nsub, h) from step 1's walk.
__global__ void __launch_bounds__(kThreads) split_states_kernel(const float4* __restrict__ E,
                                                                const float* __restrict__ decay,
                                                                float4* S, int64_t h, int64_t pn4,
                                                                int nsub, int m, bool zero0) {
  const int64_t bb = blockIdx.z, hh = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= pn4) return;
  const int nseg = nsub / m + 1;
  float4* Sp = S + (bb * nseg * h + hh) * pn4 + e;  // S[bb, j, hh, e] at Sp[j * h * pn4]
  const float4* Ep = E + (bb * nsub * h + hh) * pn4 + e;
  const float* dp = decay + bb * nsub * h + hh;     // decay_k at dp[k * h]
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  if (zero0) Sp[0] = s;  // no initial state: segment 0 starts from zeros
  else s = Sp[0];
  for (int k0 = 0; k0 < nsub; k0 += 4) {  // 4 sub-segments' loads in flight, then their chain
    float4 ev[4];
    float dv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      ev[j] = k0 + j < nsub ? Ep[(k0 + j) * h * pn4] : s;
      dv[j] = k0 + j < nsub ? dp[(k0 + j) * h] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + j;
      if (k < nsub) {
        s.x = fmaf(dv[j], s.x, ev[j].x);
        s.y = fmaf(dv[j], s.y, ev[j].y);
        s.z = fmaf(dv[j], s.z, ev[j].z);
        s.w = fmaf(dv[j], s.w, ev[j].w);
        if ((k + 1) % m == 0) Sp[(k + 1) / m * h * pn4] = s;
      }
    }
  }
}

}  // namespace

void split_combine_states(const float* E, const float* decay, float* S, int64_t b, int64_t h,
                          int64_t pn, int nsub, int m, bool zero0, cudaStream_t stream) {
  MLM_CHECK(pn % 4 == 0, "ssd split: p * n must be a multiple of 4, got ", pn);
  const int64_t pn4 = pn / 4;
  const dim3 grid(static_cast<unsigned>((pn4 + kThreads - 1) / kThreads),
                  static_cast<unsigned>(h), static_cast<unsigned>(b));
  split_states_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const float4*>(E), decay,
                                                     reinterpret_cast<float4*>(S), h, pn4, nsub, m,
                                                     zero0);
  MLM_CHECK_LAUNCH();
}

}  // namespace ssd
}  // namespace mlmamba
