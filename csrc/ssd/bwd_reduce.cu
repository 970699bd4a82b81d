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

// grid (blocks, 2: dB, dC); tpr threads (a power of two up to 256) per (batch, token, group)
// row, 4 states per thread step: one 64-bit division per row
template <typename T>
__global__ void __launch_bounds__(256) reduce_bc_kernel(Params P, int tpr) {
  const float* ws = blockIdx.y ? P.wsdC : P.wsdB;
  T* out = static_cast<T*>(blockIdx.y ? P.dC : P.dB);
  const int64_t rows = int64_t(P.b) * P.l * P.g;
  const int64_t split_stride = int64_t(P.g) * P.npad;
  const int per_block = blockDim.x / tpr;
  for (int64_t row = int64_t(blockIdx.x) * per_block + threadIdx.x / tpr; row < rows;
       row += int64_t(gridDim.x) * per_block) {
    const int64_t bt = P.g == 1 ? row : row / P.g;
    const int gg = int(row - bt * P.g);
    const float* src = ws + (bt * P.nsplit * P.g + gg) * P.npad;
    // 4 states per step (npad is a multiple of kNB: 16-byte aligned workspace rows)
    for (int n4 = 4 * (threadIdx.x % tpr); n4 < P.n; n4 += 4 * tpr) {
      float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int q = 0; q < P.nsplit; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(src + q * split_stride + n4);
        s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
      }
      const float o[4] = {s.x, s.y, s.z, s.w};
      for (int j = 0; j < 4 && n4 + j < P.n; ++j) out[row * P.n + n4 + j] = from_f<T>(o[j]);
    }
  }
}

constexpr int kHeadThreads = 256;

// one block per head, fixed order (deterministic). dD: thread (pp, part) sums column pp over
// the slots part, part + nparts, ..., then the parts are added in order. dA, ddt_bias: the
// last warp, lane l over the slots l, l + 32, ..., then warp_sum. The slots' loads are
// independent, so a thread keeps several in flight (the serial walk over b * chunks slots was
// latency-bound: 45 us at b32 L576 h32, H200). warp_sum (bwd_common.cuh) is a fixed tree.
__global__ void __launch_bounds__(kHeadThreads) reduce_head_kernel(Params P) {
  __shared__ float colsum[kHeadThreads];
  __shared__ float dDs[128];
  const int hh = blockIdx.x, t = threadIdx.x;
  const int nslots = P.varlen ? P.offs[P.nseq] : P.nslots;
  const int nparts = kHeadThreads / P.p;  // p <= 128: at least 2
  const int pp = t % P.p, part = t / P.p;
  if (part < nparts) {
    const int64_t step = int64_t(nparts) * P.h * P.p;
    const float* src = P.part_dD + (int64_t(part) * P.h + hh) * P.p + pp;
    float s = 0.f;
#pragma unroll 8
    for (int k = part; k < nslots; k += nparts, src += step) s += *src;
    colsum[t] = s;
  }
  if (t >= kHeadThreads - 32) {
    const int lane = t % 32;
    float a = 0.f, d = 0.f;
#pragma unroll 4
    for (int k = lane; k < nslots; k += 32) {
      a += P.part_dA[int64_t(k) * P.h + hh];
      d += P.part_ddtb[int64_t(k) * P.h + hh];
    }
    a = warp_sum(a);
    d = warp_sum(d);
    if (lane == 0) {
      P.dA[hh] = a;
      if (P.has_dt_bias) P.ddtb[hh] = d;
    }
  }
  __syncthreads();
  if (t < P.p) {
    float s = 0.f;
    for (int q = 0; q < nparts; ++q) s += colsum[q * P.p + t];
    if (P.D_per_p) P.dD[hh * P.p + t] = s;
    else dDs[t] = s;
  }
  __syncthreads();
  if (P.has_D && !P.D_per_p && t < 32) {
    float s = 0.f;
    for (int q = t; q < P.p; q += 32) s += dDs[q];
    s = warp_sum(s);
    if (t == 0) P.dD[hh] = s;
  }
}

void launch_reduce(const Params& prm, int tcode, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  int tpr = 1;  // threads per row, each 4 states
  while (tpr < 256 && 4 * tpr < prm.n) tpr *= 2;
  const int64_t rows = int64_t(prm.b) * prm.l * prm.g, per_block = 256 / tpr;
  const int blocks = int(std::min<int64_t>((rows + per_block - 1) / per_block, 4096));
  // on-chip partials with one split per group: step 2 wrote dB/dC itself
  if (blocks > 0 && !(prm.onchip && prm.nsplit == 1)) {
    dim3 grid(blocks, 2);
    if (tcode == kF32) reduce_bc_kernel<float><<<grid, 256, 0, st>>>(prm, tpr);
    else if (tcode == kF16) reduce_bc_kernel<__half><<<grid, 256, 0, st>>>(prm, tpr);
    else reduce_bc_kernel<bf16><<<grid, 256, 0, st>>>(prm, tpr);
  }
  reduce_head_kernel<<<prm.h, kHeadThreads, 0, st>>>(prm);
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
