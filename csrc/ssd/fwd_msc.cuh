// The MSC mode of the wgmma SSD forward (fwd_wgmma.cu; msc_scan, issue 8): a scan's tokens are
// raster rows taken through its order. x is the causal conv (width 4, SiLU) of the head's xBC
// channels, computed from raw rows staged in shared memory; B and C, which every head of a
// group shares, come conv'd once per scan (csrc/msc/bc_conv.cu) at raster positions. No
// permuted copy of xBC, dt or the output exists.
#pragma once
#include <cuda_bf16.h>

#include "ssd/fwd.h"
#include "ssd/fwd_vectors.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {

constexpr int kMscW = 4, kMscLB = kMscW - 1;  // conv width, look-back rows
constexpr int kMscOrd = kChunk + kMscLB + 1;  // positions of tokens c0 - 3 .. c0 + 63 (+ pad)
constexpr int kMscOrdBufs = 4;  // chunk c's positions: written in c - 2, last read in c

// The raw x rows of one chunk: row r is token c0 - 3 + r, the head's P channels.
template <int P>
struct MscRaw {
  static constexpr int CPR = P / 8, ROWS = kChunk + kMscLB, BYTES = ROWS * P * 2;
};

// Positions (raster rows) of the tokens c0 - 3 .. c0 + 63 into ord: -1 outside the sequence
// or the grid (unchecked orders read zeros and write nothing). One warp.
__device__ __forceinline__ void msc_positions(int* ord, const int* order, int64_t len, int64_t c0,
                                              int lane) {
  for (int r = lane; r < kChunk + kMscLB; r += 32) {
    const int64_t tk = c0 - kMscLB + r;
    int pos = tk >= 0 && tk < len ? order[tk] : -1;
    ord[r] = pos < len ? pos : -1;
  }
}

// Warp 0: the raw dt of chunk c0 through its positions (ord_cur, one chunk old) and the positions
// of the next chunk into ord_next: two independent loads per lane, one round trip.
__device__ __forceinline__ void msc_fetch(RawDt& r, const int* ord_cur, int* ord_next,
                                          const FwdParams& p, const int* order, int64_t bidx,
                                          int64_t len, int h, int64_t c0, int lane) {
  __syncwarp();  // ord_cur was written by other lanes of this warp
  const DType dt_t = static_cast<DType>(p.dt_dtype);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int pos = ord_cur[kMscLB + 2 * lane + k];
    r.dt[k] = pos >= 0 ? load_as_float(p.dt, bidx * p.dt_b + pos * p.dt_l + h * p.dt_h, dt_t) : 0.f;
  }
  msc_positions(ord_next, order, len, c0 + kChunk, lane);
}

// All threads: cp.async of the chunk's raw x rows (zeros outside the sequence); no commit.
template <int P, int NT>
__device__ __forceinline__ void msc_issue_raw(uint32_t raw, const int* ord,
                                              const __nv_bfloat16* rows, int64_t rs, int64_t xcol,
                                              int tid) {
  using R = MscRaw<P>;
#pragma unroll 2
  for (int e = tid; e < R::ROWS * R::CPR; e += NT) {
    const int r = e / R::CPR, cg = e - r * R::CPR;
    const int pos = ord[r];
    const __nv_bfloat16* src = pos >= 0 ? rows + pos * rs + xcol + 8 * cg : rows;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(raw + e * 16), "l"(src),
                 "r"(pos >= 0 ? 16 : 0));
  }
}

__device__ __forceinline__ float silu_fast(float v) { return __fdividef(v, 1.f + __expf(-v)); }

// All threads: conv (fp32) + SiLU of the staged raw x rows into the swizzled X tile; rows at
// or past nvalid are zero. Thread: 8 channels (one 16-byte column chunk) of RPS rows, in two
// halves of 4 channels to keep registers low (it runs while batch 1's accumulators are in
// flight). wsm: this head's weights [P][4] then bias [P], fp32.
template <int P, int NT>
__device__ __forceinline__ void msc_conv_x(unsigned char* X, const unsigned char* raw,
                                           const float* wsm, int nvalid, int tid) {
  using R = MscRaw<P>;
  constexpr int STRIPS = NT / R::CPR, RPS = kChunk / STRIPS;
  static_assert(kChunk % STRIPS == 0, "strips must tile the chunk");
  const int cg = tid % R::CPR, strip = tid / R::CPR, c8 = 8 * cg, i0 = strip * RPS;
  uint32_t packed[RPS][4];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {  // channels c8 + 4 hf ..
    const int ch = c8 + 4 * hf;
    float wt[4][4], bs[4], win[RPS + kMscLB][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float4 v = *reinterpret_cast<const float4*>(wsm + (ch + c) * kMscW);
      wt[c][0] = v.x, wt[c][1] = v.y, wt[c][2] = v.z, wt[c][3] = v.w;
      bs[c] = wsm[P * kMscW + ch + c];
    }
#pragma unroll
    for (int r = 0; r < RPS + kMscLB; ++r) {  // raw rows i0 + r: tokens i0 - 3 + r
      const uint2 u = *reinterpret_cast<const uint2*>(raw + ((i0 + r) * R::CPR + cg) * 16 + 8 * hf);
      const float2 a = unpack_bf16(u.x), b = unpack_bf16(u.y);
      win[r][0] = a.x, win[r][1] = a.y, win[r][2] = b.x, win[r][3] = b.y;
    }
#pragma unroll
    for (int k = 0; k < RPS; ++k) {
      float o[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float a = fmaf(wt[c][0], win[k][c], fmaf(wt[c][1], win[k + 1][c],
                             fmaf(wt[c][2], win[k + 2][c], fmaf(wt[c][3], win[k + 3][c], bs[c]))));
        o[c] = i0 + k < nvalid ? silu_fast(a) : 0.f;
      }
      packed[k][2 * hf] = pack_bf16(o[0], o[1]);
      packed[k][2 * hf + 1] = pack_bf16(o[2], o[3]);
    }
  }
#pragma unroll
  for (int k = 0; k < RPS; ++k)
    *reinterpret_cast<uint4*>(X + sw128_offset<kChunk>(i0 + k, c8)) =
        make_uint4(packed[k][0], packed[k][1], packed[k][2], packed[k][3]);
}

// The epilogue of one output row of a scan: y[4 j8], y[4 j8 + 1] are head channels
// 8 j8 + 2 t (+1), landing at raster position pos. Merge 0: out[sc]; sum / mean: a running fp32
// sum in acc that only this CTA touches, scans in order (deterministic); the last scan writes out.
__device__ __forceinline__ void msc_store(const float* y, int pos, int sc, int nscans,
                                          int64_t bidx, int h, int t, const FwdParams& p) {
  if (pos < 0) return;
  const MscParams& m = p.msc;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + bidx * p.out_b + pos * p.out_l +
                       h * p.out_h + 2 * t;
  if (m.merge == 0 || nscans == 1) {
    if (m.merge == 0) out += sc * m.out_s;
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j8) = __floats2bfloat162_rn(y[4 * j8], y[4 * j8 + 1]);
    return;
  }
  float* a = m.acc + ((bidx * p.seqlen + pos) * p.nheads + h) * p.headdim + 2 * t;
  const float scale = m.merge == 2 ? 1.f / nscans : 1.f;
  float2 v[8];
#pragma unroll
  for (int j8 = 0; j8 < 8; ++j8) v[j8] = make_float2(y[4 * j8], y[4 * j8 + 1]);
  if (sc > 0) {  // all eight loads in flight before the first add (one round trip)
    float2 o[8];
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) o[j8] = *reinterpret_cast<const float2*>(a + 8 * j8);
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) v[j8].x += o[j8].x, v[j8].y += o[j8].y;
  }
#pragma unroll
  for (int j8 = 0; j8 < 8; ++j8) {
    if (sc + 1 < nscans) *reinterpret_cast<float2*>(a + 8 * j8) = v[j8];
    else *reinterpret_cast<__nv_bfloat162*>(out + 8 * j8) = __floats2bfloat162_rn(v[j8].x * scale, v[j8].y * scale);
  }
}

}  // namespace ssd
}  // namespace mlmamba
