// Step 2 of the sequence split (fwd_split.cpp) in one launch: the incoming state of every
// segment from the sub-segment end states E of step 1 and the sub-segments' decays, which are
// the products of their chunks' decays from the chunk-vector pre-pass.
//   S_{k+1} = decay_k S_k + E_k over the sub-segments k; S at every m-th boundary is a segment's
// incoming state. One thread per (row, head, state element), sub-segments in order.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "ssd/fwd_split.h"

namespace mlmamba {
namespace ssd {
namespace {

constexpr int kThreads = 256, kRaw = 2048;  // decay values staged per round (floats)

// Chunks of every sub-segment staged per round: at most kRaw values, at most a sub-segment.
__host__ __device__ inline int chunks_per_round(int nsub, int64_t sub_nch) {
  const int t = kRaw / nsub > 0 ? kRaw / nsub : 1;
  return sub_nch < t ? static_cast<int>(sub_nch) : t;
}

__global__ void __launch_bounds__(kThreads) split_states_kernel(const float* __restrict__ E,
                                                                const unsigned char* __restrict__ vecs,
                                                                int64_t vec_nch, int64_t sub_nch,
                                                                float* S, int64_t h, int64_t pn,
                                                                int nsub, int m, bool zero0) {
  extern __shared__ float dec[];  // nsub decays of this (row, head), then kRaw staged values
  float* raw = dec + nsub;
  const int64_t bb = blockIdx.z, hh = blockIdx.y;
  const int tid = threadIdx.x;
  // decay_k = product of sub-segment k's chunk decays, in chunk order; the values are loaded
  // by all threads at once (T chunks of every sub-segment per round), multiplied by thread k
  const unsigned char* v0 = vecs + (bb * h + hh) * vec_nch * kFwdVecBytes + kFwdVecDecayOff;
  const int T = chunks_per_round(nsub, sub_nch);
  for (int k = tid; k < nsub; k += kThreads) dec[k] = 1.f;
  for (int64_t c0 = 0; c0 < sub_nch; c0 += T) {
    __syncthreads();  // the previous round's values are used
    for (int i = tid; i < nsub * T; i += kThreads) {
      const int k = i / T;
      const int64_t c = c0 + i % T;
      raw[i] = c < sub_nch
                   ? *reinterpret_cast<const float*>(v0 + (k * sub_nch + c) * kFwdVecBytes)
                   : 1.f;  // exact: pads the last round
    }
    __syncthreads();
    for (int k = tid; k < nsub; k += kThreads) {
      float d = dec[k];
#pragma unroll 8
      for (int j = 0; j < T; ++j) d *= raw[k * T + j];
      dec[k] = d;
    }
  }
  __syncthreads();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  if (e >= pn) return;
  const int nseg = nsub / m + 1;
  float* Sp = S + (bb * nseg * h + hh) * pn + e;  // S[bb, j, hh, e] at Sp[j * h * pn]
  const float* Ep = E + (bb * nsub * h + hh) * pn + e;
  float s = 0.f;
  if (zero0) Sp[0] = 0.f;  // no initial state: segment 0 starts from zeros
  else s = Sp[0];
  for (int k0 = 0; k0 < nsub; k0 += 8) {  // 8 loads in flight, then their chain
    float ev[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) ev[j] = k0 + j < nsub ? Ep[(k0 + j) * h * pn] : 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int k = k0 + j;
      if (k < nsub) {
        s = fmaf(dec[k], s, ev[j]);
        if ((k + 1) % m == 0) Sp[(k + 1) / m * h * pn] = s;
      }
    }
  }
}

}  // namespace

void split_combine_states(const float* E, const unsigned char* vecs, int64_t vec_nch,
                          int64_t sub_nch, float* S, int64_t b, int64_t h, int64_t pn, int nsub,
                          int m, bool zero0, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((pn + kThreads - 1) / kThreads),
                  static_cast<unsigned>(h), static_cast<unsigned>(b));
  const int T = chunks_per_round(nsub, sub_nch);
  const size_t smem = (nsub + static_cast<size_t>(nsub) * T) * sizeof(float);  // <= ~8.5 KB
  split_states_kernel<<<grid, kThreads, smem, stream>>>(E, vecs, vec_nch, sub_nch, S, h, pn, nsub,
                                                        m, zero0);
  MLM_CHECK_LAUNCH();
}

}  // namespace ssd
}  // namespace mlmamba
