// B and C of each msc_scan scan, conv'd once (width 4, SiLU, fp32) along the scan's order and
// stored in scan order (row t: scan token t; zeros where the order has no valid position), so
// the heads of a group share them and the scan kernel loads them as plain tiles (msc.h): out
// (b, L, 2, k, g n), B then C, the scans side by side (the SSD backward takes them as k g groups).
// Thread: 8 channels of kSeg consecutive scan tokens, with its 32 weights and the conv window
// in registers: one 16-byte row load per token (the window's 3 look-back rows first).
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

constexpr int kSeg = 16;  // scan tokens per thread

// grid: (token blocks, b, k); item e of a block: segment blockIdx.x * per + e / cpr of kSeg
// tokens, channels 8 (e % cpr) ..
__global__ void __launch_bounds__(kThreads) bc_conv_kernel(const BcConvParams p) {
  const int cpr = p.nch / 8, per = kThreads / cpr > 0 ? kThreads / cpr : 1;
  const int64_t bi = blockIdx.y;
  const int s = blockIdx.z;
  const int* order = p.orders + s * p.seqlen;
  const __nv_bfloat16* rows = p.xBC + bi * p.x_b + p.col0;
  const int half = p.nch / 2;  // B's channels, then C's (a multiple of 8: c8 stays in one)
  __nv_bfloat16* out = p.out + bi * p.seqlen * p.nch * p.nscans + s * half;
  for (int e = threadIdx.x; e < per * cpr; e += kThreads) {
    const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * per + e / cpr) * kSeg;
    if (t0 >= p.seqlen) continue;
    const int c8 = 8 * (e % cpr);
    const int64_t gc = p.col0 + c8;
    const int64_t oc = c8 < half ? c8 : static_cast<int64_t>(p.nscans) * half + c8 - half;
    float w[4][8], bias[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float4 wc = *reinterpret_cast<const float4*>(p.w + (s * p.conv_dim + gc + c) * 4);
      w[0][c] = wc.x, w[1][c] = wc.y, w[2][c] = wc.z, w[3][c] = wc.w;
      bias[c] = p.bias ? p.bias[s * p.conv_dim + gc + c] : 0.f;
    }
    // the row of scan token t (zeros before the sequence or at an invalid position)
    auto row = [&](int64_t t, float (&v)[8]) {
      const int pos = t >= 0 ? order[t] : -1;
      if (pos < 0 || pos >= p.seqlen) {
#pragma unroll
        for (int c = 0; c < 8; ++c) v[c] = 0.f;
        return pos;
      }
      unpack8(*reinterpret_cast<const uint4*>(rows + pos * p.x_l + c8), v);
      return pos;
    };
    float win[3][8];  // tokens t - 3, t - 2, t - 1
#pragma unroll
    for (int k = 0; k < 3; ++k) row(t0 - 3 + k, win[k]);
    const int64_t t1 = t0 + kSeg < p.seqlen ? t0 + kSeg : p.seqlen;
    for (int64_t t = t0; t < t1; ++t) {
      float cur[8];
      const int pos = row(t, cur);
      float acc[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) {  // taps in order t - 3 .. t, as the reference sums them
        float a = bias[c];
        a = fmaf(w[0][c], win[0][c], a);
        a = fmaf(w[1][c], win[1][c], a);
        a = fmaf(w[2][c], win[2][c], a);
        acc[c] = silu_fast(fmaf(w[3][c], cur[c], a));
        win[0][c] = win[1][c], win[1][c] = win[2][c], win[2][c] = cur[c];
      }
      // a token without a valid position reads zeros in the scan (as its gathered row did)
      const bool ok = pos >= 0 && pos < p.seqlen;
      *reinterpret_cast<uint4*>(out + t * p.nch * p.nscans + oc) =
          ok ? make_uint4(pack_bf16(acc[0], acc[1]), pack_bf16(acc[2], acc[3]),
                          pack_bf16(acc[4], acc[5]), pack_bf16(acc[6], acc[7]))
             : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

}  // namespace

void launch_bc_conv(const BcConvParams& p, cudaStream_t stream) {
  const int cpr = p.nch / 8, per = kThreads / cpr > 0 ? kThreads / cpr : 1;
  // more channels than one block covers: one segment per block, the block loops over chunks
  const int64_t segs = (p.seqlen + kSeg - 1) / kSeg;
  const dim3 grid(static_cast<unsigned>((segs + per - 1) / per),
                  static_cast<unsigned>(p.batch), static_cast<unsigned>(p.nscans));
  bc_conv_kernel<<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace msc
}  // namespace mlmamba
