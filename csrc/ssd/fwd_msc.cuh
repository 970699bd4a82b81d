// The MSC mode of the wgmma SSD forward (fwd_wgmma.cu; msc_scan, issue 8): a scan's tokens are
// raster rows taken through its order. x is the causal conv (width 4, SiLU) of the head's xBC
// channels, computed from raw rows staged in shared memory; B and C, which every head of a
// group shares, come conv'd once per scan (csrc/msc/bc_conv.cu) in scan order, loaded as
// plain tiles. No permuted copy of xBC, dt or the output exists.
#pragma once
#include <cuda_bf16.h>

#include "common/device_utils.cuh"
#include "common/tma.cuh"
#include "ssd/fwd.h"
#include "ssd/fwd_vectors.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {

constexpr int kMscW = 4, kMscLB = kMscW - 1;  // conv width, look-back rows
constexpr int kMscOrd = kChunk + kMscLB + 1;  // positions of tokens c0 - 3 .. c0 + 63 (+ pad)

// v, computed even where a select drops it: without this the compiler wraps each conv row's
// SiLU in a branch on `i < nvalid`, and the rows' dependency chains run one after another.
__device__ __forceinline__ float computed(float v) {
  asm volatile("" : "+f"(v));
  return v;
}

// The raw x rows of one chunk: row r is token c0 - 3 + r, the head's P channels.
template <int P>
struct MscRaw {
  static constexpr int CPR = P / 8, ROWS = kChunk + kMscLB, BYTES = ROWS * P * 2;
};

// One warp, in two steps: the raster positions of chunk c0's tokens and of its look-back tokens
// into registers (-1 outside the sequence or past len: an unchecked order reads zeros there
// and writes nothing), then into ord. Apart, the loads can run a chunk ahead of their use.
struct MscPos {
  int v[3];  // tokens c0 + 2 lane, c0 + 2 lane + 1; look-back token c0 - 3 + lane (lane < 3)
};
__device__ __forceinline__ MscPos msc_load_positions(const int* order, int64_t len, int64_t c0,
                                                     int lane) {
  MscPos r;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t tk = c0 + 2 * lane + k;
    r.v[k] = tk < len ? __ldg(order + tk) : -1;
  }
  r.v[2] = lane < kMscLB && c0 - kMscLB + lane >= 0 ? __ldg(order + c0 - kMscLB + lane) : -1;
  return r;
}
__device__ __forceinline__ void msc_store_positions(int* ord, const MscPos& r, int64_t len, int lane) {
#pragma unroll
  for (int k = 0; k < 2; ++k) ord[kMscLB + 2 * lane + k] = r.v[k] < len ? r.v[k] : -1;
  if (lane < kMscLB) ord[lane] = r.v[2] < len ? r.v[2] : -1;
}
__device__ __forceinline__ void msc_fetch_positions(int* ord, const int* order, int64_t len,
                                                    int64_t c0, int lane) {
  msc_store_positions(ord, msc_load_positions(order, len, c0, lane), len, lane);
}

// Warp 0: the positions (above) and, with_dt (when no pre-pass made the vectors), the raw dt
// of the lane's two tokens through them.
__device__ __forceinline__ void msc_fetch(RawDt& r, int* ord, const FwdParams& p,
                                          const int* order, int64_t bidx, int64_t len, int h,
                                          int64_t c0, int lane, bool with_dt = true) {
  msc_fetch_positions(ord, order, len, c0, lane);
  if (!with_dt) return;
  const DType dt_t = static_cast<DType>(p.dt_dtype);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int pos = ord[kMscLB + 2 * lane + k];  // this lane's own write above
    r.dt[k] = pos >= 0 ? load_as_float(p.dt, bidx * p.dt_b + pos * p.dt_l + h * p.dt_h, dt_t) : 0.f;
  }
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

// All threads, once per scan: the head's conv weights (P x 4) and bias (P; zeros without)
// into shared memory, so the per-chunk conv reads no global memory. w: (conv_dim, 4) of the
// scan, bias: (conv_dim) or nullptr, xcol: the head's first channel.
template <int P, int NT>
__device__ __forceinline__ void msc_stage_weights(float* wsm, const float* w, const float* bias,
                                                  int64_t xcol, int tid) {
  for (int i = tid; i < P * kMscW; i += NT) wsm[i] = __ldg(w + xcol * kMscW + i);
  for (int i = tid; i < P; i += NT) wsm[P * kMscW + i] = bias ? __ldg(bias + xcol + i) : 0.f;
}

// All threads: conv (fp32) + SiLU of the staged raw x rows into the swizzled X tile; rows at
// or past nvalid are zero. Thread: 8 channels (one 16-byte column chunk) of a strip of rows,
// the 3 previous raw rows in registers. wsm: the head's weights and bias (msc_stage_weights).
template <int P, int NT>
__device__ __forceinline__ void msc_conv_x(unsigned char* X, const unsigned char* raw,
                                           const float* wsm, int nvalid, int tid) {
  using R = MscRaw<P>;
  constexpr int STRIPS = NT / R::CPR, RPS = kChunk / STRIPS;
  static_assert(kChunk % STRIPS == 0, "strips must tile the chunk");
  const int cg = tid % R::CPR, strip = tid / R::CPR, c8 = 8 * cg;
  float wt[8][4], bs[8];
  const float4* wp = reinterpret_cast<const float4*>(wsm + c8 * kMscW);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float4 v = wp[c];
    wt[c][0] = v.x, wt[c][1] = v.y, wt[c][2] = v.z, wt[c][3] = v.w;
    bs[c] = wsm[P * kMscW + c8 + c];
  }
  auto row8 = [&](int r, float (&v)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(raw + (r * R::CPR + cg) * 16);
    const uint32_t q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = unpack_bf16(q[k]);
      v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
  };
  const int i0 = strip * RPS;
  float win[RPS + kMscLB][8];  // raw rows i0 .. i0 + RPS + 2 (tokens i0 - 3 ..)
#pragma unroll
  for (int r = 0; r < RPS + kMscLB; ++r) row8(i0 + r, win[r]);
#pragma unroll
  for (int k = 0; k < RPS; ++k) {
    const int i = i0 + k;
    float o[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float a = fmaf(wt[c][0], win[k][c], fmaf(wt[c][1], win[k + 1][c],
                           fmaf(wt[c][2], win[k + 2][c], fmaf(wt[c][3], win[k + 3][c], bs[c]))));
      const float sa = computed(silu_fast(a));
      o[c] = i < nvalid ? sa : 0.f;
    }
    *reinterpret_cast<uint4*>(X + sw128_offset<kChunk>(i, c8)) =
        make_uint4(pack_bf16(o[0], o[1]), pack_bf16(o[2], o[3]), pack_bf16(o[4], o[5]),
                   pack_bf16(o[6], o[7]));
  }
}

// ---- the warp-specialized MSC kernel (fwd_ws_msc.cu): the raw rows land in place ----
// A chunk's raw x rows go straight into its stage's X region (token c0 + r at row r, 128 bytes,
// not swizzled) and the 3 look-back rows into lb (3 x 128 bytes); the conv then rewrites the
// X region as the swizzled tile. NT threads, cp.async, no commit (the caller completes an
// mbarrier with cp.async.mbarrier.arrive).
template <int P, int NT>
__device__ __forceinline__ void msc_issue_raw_inplace(uint32_t xlin, uint32_t lb, const int* ord,
                                                      const __nv_bfloat16* rows, int64_t rs,
                                                      int64_t xcol, int tid) {
  using R = MscRaw<P>;
  static_assert(P == 64, "one 128-byte row per token");
#pragma unroll 2
  for (int e = tid; e < R::ROWS * R::CPR; e += NT) {
    const int r = e / R::CPR, cg = e - r * R::CPR;
    const int pos = ord[r];
    const __nv_bfloat16* src = pos >= 0 ? rows + pos * rs + xcol + 8 * cg : rows;
    const uint32_t dst = (r < kMscLB ? lb + r * 128 : xlin + (r - kMscLB) * 128) + cg * 16;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(pos >= 0 ? 16 : 0));
  }
}

// 128 threads (one warpgroup, warp w rows 16 w.., lane = channel pair 2 lane, 2 lane + 1): the
// conv + SiLU of the raw rows staged by msc_issue_raw_inplace, written back over them as the
// swizzled X tile; rows at or past nvalid are zero. The same operations as msc_conv_x, so the
// same bf16 values. sync(): a barrier of the 128 threads (every raw word read before any write).
template <typename Sync>
__device__ __forceinline__ void msc_conv_inplace(unsigned char* X, const unsigned char* lb,
                                                 const float* wsm, int nvalid, int w, int lane,
                                                 Sync sync) {
  constexpr int P = 64, RW = 16;
  uint32_t raw[RW + kMscLB];  // tokens 16 w - 3 .. 16 w + 15, channels 2 lane, 2 lane + 1
#pragma unroll
  for (int k = 0; k < RW + kMscLB; ++k) {
    const int r = 16 * w + k - kMscLB;
    const unsigned char* row = r < 0 ? lb + (r + kMscLB) * 128 : X + r * 128;
    raw[k] = *reinterpret_cast<const uint32_t*>(row + 4 * lane);
  }
  float wt[2][4], bs[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const float4 v = *reinterpret_cast<const float4*>(wsm + (2 * lane + c) * kMscW);
    wt[c][0] = v.x, wt[c][1] = v.y, wt[c][2] = v.z, wt[c][3] = v.w;
    bs[c] = wsm[P * kMscW + 2 * lane + c];
  }
  sync();
#pragma unroll
  for (int k = 0; k < RW; ++k) {
    const int i = 16 * w + k;
    float o[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float x[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = unpack_bf16(raw[k + q]);
        x[q] = c == 0 ? f.x : f.y;
      }
      const float a = fmaf(wt[c][0], x[0], fmaf(wt[c][1], x[1], fmaf(wt[c][2], x[2],
                           fmaf(wt[c][3], x[3], bs[c]))));
      const float sa = computed(silu_fast(a));
      o[c] = i < nvalid ? sa : 0.f;
    }
    *reinterpret_cast<uint32_t*>(X + sw128_offset<kChunk>(i, 2 * lane)) = pack_bf16(o[0], o[1]);
  }
}

// All threads, at a chunk's top (or a chunk ahead, MscParams::prefetch), in scan sc > 0 with
// a running sum: pull the chunk's rows of acc (written by scan sc - 1) into L2, so the
// epilogue's read of them is an L2 hit. ord: the chunk's positions. Thread: one 128-byte line
// (half a row of P = 64 fp32).
__device__ __forceinline__ void msc_prefetch_acc(const int* ord, int sc, int nscans, int nvalid,
                                                 int64_t bidx, int h, int tid,
                                                 const FwdParams& p) {
  const MscParams& m = p.msc;
  if (sc == 0 || m.merge == 0 || nscans == 1 || p.headdim != 64) return;
  const int i = tid >> 1;
  if (i >= kChunk || i >= nvalid || ord[i] < 0) return;
  const float* a = m.acc + ((bidx * p.seqlen + ord[i]) * p.nheads + h) * p.headdim + 32 * (tid & 1);
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a));
}

// The epilogue of a thread's two output rows of a scan: yacc[4 j8 + 2 hf], yacc[4 j8 + 2 hf + 1]
// are head channels 8 j8 + 2 t (+1) of row hf, landing at raster position pos[hf] (< 0: not
// stored). Merge 0: out[sc]; sum / mean: a running fp32 sum in acc that only this CTA touches,
// scans in order (deterministic): scan 0 stores it, the middle scans add to it at L2
// (red_add_f32x2: no round trip; the same fp32 sum, subnormals flushed), the last scan reads
// it from L2 (ld.cg: this SM's L1 may hold a line older than the reductions; both rows'
// sixteen loads in flight together) and writes out.
__device__ __forceinline__ void msc_store(const float* yacc, const int (&pos)[2], int sc,
                                          int nscans, int64_t bidx, int h, int t,
                                          const FwdParams& p) {
  const MscParams& m = p.msc;
  auto out_at = [&](int ps) {
    return static_cast<__nv_bfloat16*>(p.out) + bidx * p.out_b + ps * p.out_l + h * p.out_h +
           2 * t;
  };
  if (m.merge == 0 || nscans == 1) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (pos[hf] < 0) continue;
      __nv_bfloat16* out = out_at(pos[hf]) + (m.merge == 0 ? sc * m.out_s : 0);
#pragma unroll
      for (int j8 = 0; j8 < 8; ++j8)
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * j8) =
            __floats2bfloat162_rn(yacc[4 * j8 + 2 * hf], yacc[4 * j8 + 2 * hf + 1]);
    }
    return;
  }
  auto acc_at = [&](int ps) {
    return m.acc + ((bidx * p.seqlen + ps) * p.nheads + h) * p.headdim + 2 * t;
  };
  if (sc + 1 < nscans) {  // scan 0 stores the sum, the middle scans add to it
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (pos[hf] < 0) continue;
      float* a = acc_at(pos[hf]);
#pragma unroll
      for (int j8 = 0; j8 < 8; ++j8) {
        const float2 v = make_float2(yacc[4 * j8 + 2 * hf], yacc[4 * j8 + 2 * hf + 1]);
        if (sc == 0) *reinterpret_cast<float2*>(a + 8 * j8) = v;
        else red_add_f32x2(a + 8 * j8, v);
      }
    }
    return;
  }
  float2 o[2][8];  // the last scan: the sum so far
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float* a = acc_at(pos[hf] < 0 ? 0 : pos[hf]);
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
      o[hf][j8] = pos[hf] < 0 ? make_float2(0.f, 0.f) : __ldcg(reinterpret_cast<const float2*>(a + 8 * j8));
  }
  const float scale = m.merge == 2 ? 1.f / nscans : 1.f;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if (pos[hf] < 0) continue;
    __nv_bfloat16* out = out_at(pos[hf]);
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * j8) =
          __floats2bfloat162_rn((yacc[4 * j8 + 2 * hf] + o[hf][j8].x) * scale,
                                (yacc[4 * j8 + 2 * hf + 1] + o[hf][j8].y) * scale);
  }
}

}  // namespace ssd
}  // namespace mlmamba
