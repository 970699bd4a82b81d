// SSD backward, step 3: fixed-order sums (deterministic, no atomics).
//   dB, dC: over the head splits of each group, into the input dtype (unless step 2 wrote
//           them: on-chip partials and one split).
//   dA, ddt_bias, dD: over every chunk slot, in fp32 (the host casts to the input dtype).
// Also the dispatch of step 2 by headdim.
#include <cuda_runtime.h>

#include <algorithm>

#include "ssd/bwd_common.cuh"

namespace mlmamba {
namespace ssd_bwd {

void launch_chunk_p32(const Params& prm, int tcode, cudaStream_t st);
void launch_chunk_p64(const Params& prm, int tcode, cudaStream_t st);
void launch_chunk_p128(const Params& prm, int tcode, cudaStream_t st);
size_t chunk_smem_p32(int npad, bool onchip);
size_t chunk_smem_p64(int npad, bool onchip);
size_t chunk_smem_p128(int npad, bool onchip);
bool chunk_onchip_fits_p32(int npad, size_t optin);
bool chunk_onchip_fits_p64(int npad, size_t optin);
bool chunk_onchip_fits_p128(int npad, size_t optin);

template <typename T>
__global__ void reduce_bc_kernel(Params P) {
  const float* ws = blockIdx.y ? P.wsdC : P.wsdB;
  T* out = static_cast<T*>(blockIdx.y ? P.dC : P.dB);
  const int64_t total = int64_t(P.b) * P.l * P.g * P.n;
  const int64_t split_stride = int64_t(P.g) * P.npad;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int nn = int(e % P.n);
    const int64_t rest = e / P.n;
    const int gg = int(rest % P.g);
    const int64_t bt = rest / P.g;
    const float* src = ws + (bt * P.nsplit * P.g + gg) * P.npad + nn;
    float s = 0.f;
    for (int q = 0; q < P.nsplit; ++q) s += src[q * split_stride];
    out[e] = from_f<T>(s);
  }
}

// one block per head
__global__ void reduce_head_kernel(Params P) {
  __shared__ float dDs[128];
  const int hh = blockIdx.x;
  const int nslots = P.varlen ? P.offs[P.nseq] : P.nslots;
  for (int pp = threadIdx.x; pp < P.p; pp += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < nslots; ++k) s += P.part_dD[(int64_t(k) * P.h + hh) * P.p + pp];
    if (P.D_per_p) P.dD[hh * P.p + pp] = s;
    else dDs[pp] = s;
  }
  if (threadIdx.x == 0) {
    float a = 0.f, d = 0.f;
    for (int k = 0; k < nslots; ++k) {
      a += P.part_dA[int64_t(k) * P.h + hh];
      d += P.part_ddtb[int64_t(k) * P.h + hh];
    }
    P.dA[hh] = a;
    if (P.has_dt_bias) P.ddtb[hh] = d;
  }
  if (P.has_D && !P.D_per_p) {
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int pp = 0; pp < P.p; ++pp) s += dDs[pp];
      P.dD[hh] = s;
    }
  }
}

void launch_reduce(const Params& prm, int tcode, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t total = int64_t(prm.b) * prm.l * prm.g * prm.n;
  const int blocks = int(std::min<int64_t>((total + 255) / 256, 4096));
  // on-chip partials with one split per group: step 2 wrote dB/dC itself
  if (blocks > 0 && !(prm.onchip && prm.nsplit == 1)) {
    dim3 grid(blocks, 2);
    if (tcode == kF32) reduce_bc_kernel<float><<<grid, 256, 0, st>>>(prm);
    else if (tcode == kF16) reduce_bc_kernel<__half><<<grid, 256, 0, st>>>(prm);
    else reduce_bc_kernel<bf16><<<grid, 256, 0, st>>>(prm);
  }
  reduce_head_kernel<<<prm.h, 128, 0, st>>>(prm);
}

void launch_chunk(const Params& prm, int tcode, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (prm.p <= 32) launch_chunk_p32(prm, tcode, st);
  else if (prm.p <= 64) launch_chunk_p64(prm, tcode, st);
  else launch_chunk_p128(prm, tcode, st);
}

size_t chunk_smem_bytes(const Params& prm) {
  if (prm.p <= 32) return chunk_smem_p32(prm.npad, prm.onchip);
  if (prm.p <= 64) return chunk_smem_p64(prm.npad, prm.onchip);
  return chunk_smem_p128(prm.npad, prm.onchip);
}

bool chunk_onchip_fits(const Params& prm, size_t optin) {
  if (prm.p <= 32) return chunk_onchip_fits_p32(prm.npad, optin);
  if (prm.p <= 64) return chunk_onchip_fits_p64(prm.npad, optin);
  return chunk_onchip_fits_p128(prm.npad, optin);
}

int chunk_groups(const Params& prm) { return prm.onchip && prm.p <= 64 ? 2 : 1; }

}  // namespace ssd_bwd
}  // namespace mlmamba
