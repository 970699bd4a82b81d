// Deterministic reduction of the backward's dweight/dbias partial sums (see bwd_lcontig.cuh).
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "conv1d/conv1d.h"

namespace mlmamba {
namespace conv1d {

// Column j = c * (w+1) + k of the (nslots, d*(w+1)) workspace: 8 threads each add every 8th
// slot, then one adds their 8 sums, always in the same order. Writes dweight[c, w-1-k] (k < w)
// or dbias[c] (k == w). blockIdx.y: the scan of a k-scan launch (its nslots slots, its
// (d, w) dweight and (d,) dbias, one after another).
__global__ void __launch_bounds__(256) reduce_dweight_kernel(
    const float* partial, int64_t nslots, int64_t D, int W, void* dweight, int w_dtype,
    void* dbias, int b_dtype) {
  __shared__ float part[8][33];
  const int64_t ncols = D * (W + 1);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  partial += static_cast<int64_t>(blockIdx.y) * nslots * ncols;
  float acc = 0.f;
  if (col < ncols)
    for (int64_t s = threadIdx.y; s < nslots; s += 8) acc += partial[s * ncols + col];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= ncols) return;
  float total = 0.f;
  #pragma unroll
  for (int j = 0; j < 8; ++j) total += part[j][threadIdx.x];
  const int64_t c = col / (W + 1);
  const int k = static_cast<int>(col - c * (W + 1));
  const int64_t z = blockIdx.y;
  if (k < W) store_any(dweight, (z * D + c) * W + (W - 1 - k), w_dtype, total);
  else if (dbias != nullptr) store_any(dbias, z * D + c, b_dtype, total);
}

void reduce_dweight(const ConvParams& p, int64_t nslots, void* dweight, void* dbias, cudaStream_t s,
                    int64_t scans) {
  const int64_t blocks = (p.dim * (p.width + 1) + 31) / 32;
  MLM_CHECK(scans >= 1 && scans < 65536, "reduce_dweight: too many scans");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(scans));
  reduce_dweight_kernel<<<grid, dim3(32, 8), 0, s>>>(p.partial, nslots, p.dim, p.width, dweight,
                                                     p.w_dtype, dbias, p.bias_dtype);
  MLM_CHECK_LAUNCH();
}

}  // namespace conv1d
}  // namespace mlmamba
