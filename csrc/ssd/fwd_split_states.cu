// Step 2 of the sequence split (fwd_split.cpp) in one launch: the incoming state of every
// segment from the sub-segment end states E of step 1 and the sub-segments' decays, which are
// the products of their chunks' decays from step 1's chunk-vector pre-pass.
//   S_{k+1} = decay_k S_k + E_k over the sub-segments k; S at every m-th boundary is a segment's
// incoming state. One thread per (row, head, state element), sub-segments in order.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "ssd/fwd_split.h"

namespace mlmamba {
namespace ssd {
namespace {

__global__ void __launch_bounds__(256) split_states_kernel(const float* __restrict__ E,
                                                           const unsigned char* __restrict__ vecs,
                                                           int64_t vec_nch, float* S, int64_t h,
                                                           int64_t pn, int nsub, int m) {
  extern __shared__ float dec[];  // nsub decays of this (row, head)
  const int64_t bb = blockIdx.z, hh = blockIdx.y;
  for (int k = threadIdx.x; k < nsub; k += blockDim.x) {
    const unsigned char* v = vecs + ((bb * nsub + k) * h + hh) * vec_nch * kFwdVecBytes;
    float d = 1.f;
    for (int64_t c = 0; c < vec_nch; ++c)
      d *= *reinterpret_cast<const float*>(v + c * kFwdVecBytes + kFwdVecDecayOff);
    dec[k] = d;
  }
  __syncthreads();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= pn) return;
  const int nseg = nsub / m + 1;
  float* Sp = S + (bb * nseg * h + hh) * pn + e;  // S[bb, j, hh, e] at Sp[j * h * pn]
  const float* Ep = E + (bb * nsub * h + hh) * pn + e;
  float s = Sp[0];
  for (int k = 0; k < nsub; ++k) {
    s = fmaf(dec[k], s, Ep[k * h * pn]);
    if ((k + 1) % m == 0) Sp[(k + 1) / m * h * pn] = s;
  }
}

}  // namespace

void split_combine_states(const float* E, const unsigned char* vecs, int64_t vec_nch, float* S,
                          int64_t b, int64_t h, int64_t pn, int nsub, int m, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((pn + 255) / 256), static_cast<unsigned>(h),
                  static_cast<unsigned>(b));
  split_states_kernel<<<grid, 256, nsub * sizeof(float), stream>>>(E, vecs, vec_nch, S, h, pn,
                                                                   nsub, m);
  MLM_CHECK_LAUNCH();
}

}  // namespace ssd
}  // namespace mlmamba
