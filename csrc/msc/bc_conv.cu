// B and C of each msc_scan scan, conv'd once (width 4, SiLU, fp32) along the scan's order and
// stored at raster positions, so the heads of a group share them (msc.h). Thread: 8 channels
// of one token; the 3 look-back rows come through the order (L2 hits).
#include "common/device_utils.cuh"
#include "msc/msc.h"
#include "ssd/common.cuh"

namespace mlmamba {
namespace msc {
namespace {

constexpr int kThreads = 256;

using ssd::pack_bf16;
using ssd::unpack_bf16;

__device__ __forceinline__ void unpack8(const uint4& u, float (&v)[8]) {
  const uint32_t q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = unpack_bf16(q[k]);
    v[2 * k] = f.x, v[2 * k + 1] = f.y;
  }
}

// grid: (token blocks, b, k); item e of a block: token blockIdx.x * per + e / cpr, chunk e % cpr
__global__ void __launch_bounds__(kThreads) bc_conv_kernel(const BcConvParams p) {
  const int cpr = p.nch / 8, per = kThreads / cpr > 0 ? kThreads / cpr : 1;
  const int64_t bi = blockIdx.y;
  const int s = blockIdx.z;
  const int* order = p.orders + s * p.seqlen;
  const __nv_bfloat16* rows = p.xBC + bi * p.x_b + p.col0;
  const float* w = p.w + s * p.conv_dim * 4;
  const float* bias = p.bias ? p.bias + s * p.conv_dim : nullptr;
  __nv_bfloat16* out = p.out + (s * p.batch + bi) * p.seqlen * p.nch;
  for (int e = threadIdx.x; e < per * cpr; e += kThreads) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * per + e / cpr;
    const int c8 = 8 * (e % cpr);
    if (t >= p.seqlen) continue;
    float acc[8];
    const int64_t gc = p.col0 + c8;
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = bias ? bias[gc + c] : 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // tap k: token t - 3 + k
      if (t - 3 + k < 0) continue;
      const int pos = order[t - 3 + k];
      if (pos < 0 || pos >= p.seqlen) continue;
      float v[8];
      unpack8(*reinterpret_cast<const uint4*>(rows + pos * p.x_l + c8), v);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = fmaf(w[(gc + c) * 4 + k], v[c], acc[c]);
    }
    const int pos = order[t];
    if (pos < 0 || pos >= p.seqlen) continue;
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = silu_fast(acc[c]);
    *reinterpret_cast<uint4*>(out + pos * p.nch + c8) =
        make_uint4(pack_bf16(acc[0], acc[1]), pack_bf16(acc[2], acc[3]),
                   pack_bf16(acc[4], acc[5]), pack_bf16(acc[6], acc[7]));
  }
}

}  // namespace

void launch_bc_conv(const BcConvParams& p, cudaStream_t stream) {
  const int cpr = p.nch / 8, per = kThreads / cpr > 0 ? kThreads / cpr : 1;
  // more channels than one block covers: one token per block, the block loops over chunks
  const dim3 grid(static_cast<unsigned>((p.seqlen + per - 1) / per),
                  static_cast<unsigned>(p.batch), static_cast<unsigned>(p.nscans));
  bc_conv_kernel<<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace msc
}  // namespace mlmamba
