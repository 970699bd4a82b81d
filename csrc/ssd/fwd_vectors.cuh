// The per-chunk vectors of the SSD forward (ssd-math.md, "Chunked form"), computed by one warp
// for a 64-token chunk: lane l holds tokens 2 l and 2 l + 1. Shared by the mma.sync kernel
// (fwd_kernel.cuh) and the wgmma kernel (fwd_wgmma.cu).
#pragma once
#include <cstdint>

#include "ssd/common.cuh"
#include "ssd/fwd.h"

namespace mlmamba {
namespace ssd {

constexpr int kChunk = 64;
// one buffer: dt_j, Lambda_j, w_j, e_i (floats), last reset (ints), chunk decay, padding
constexpr int kVecBytes = 5 * kChunk * 4 + 16;
static_assert(kVecBytes == kFwdVecBytes && kVecBytes % 16 == 0, "fwd.h's kFwdVecBytes");

struct ChunkVecs {  // views of one buffer
  unsigned char* base;
  __device__ explicit ChunkVecs(unsigned char* b) : base(b) {}
  __device__ float* dt() const { return reinterpret_cast<float*>(base); }  // 0 past the end
  __device__ float* lam() const { return dt() + kChunk; }  // inclusive cumsum of dt A
  __device__ float* w() const { return dt() + 2 * kChunk; }  // weight of token j in S_end
  __device__ float* e() const { return dt() + 3 * kChunk; }  // weight of S_prev in y_i
  __device__ int* lr() const { return reinterpret_cast<int*>(dt() + 4 * kChunk); }  // last reset
  __device__ float* decay() const { return dt() + 5 * kChunk; }  // of S_prev over the chunk
};

// raw dt and seq_idx of a chunk, loaded by one warp one chunk ahead of their use
struct RawDt {
  float dt[2] = {0.f, 0.f};
  int sq[2] = {0, 0};
  int sqprev = 0;

  __device__ void fetch(const FwdParams& p, int64_t bidx, int64_t tstart, int64_t len, int h,
                        int64_t c0, int lane) {
    const DType dt_t = static_cast<DType>(p.dt_dtype);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t tk = c0 + 2 * lane + k;
      const bool ok = tk < len;
      dt[k] = ok ? load_as_float(p.dt, bidx * p.dt_b + (tstart + tk) * p.dt_l + h * p.dt_h, dt_t)
                 : 0.f;
      sq[k] = (ok && p.seq_idx) ? p.seq_idx[bidx * p.seq_b + (tstart + tk) * p.seq_l] : 0;
    }
    sqprev = (p.seq_idx && c0 > 0) ? p.seq_idx[bidx * p.seq_b + (tstart + c0 - 1) * p.seq_l] : 0;
  }
};

// The vectors of the chunk starting at token c0 (nvalid tokens) into v.
__device__ __forceinline__ void chunk_vectors(const ChunkVecs& v, const RawDt& r,
                                              const FwdParams& p, float Ah, float dtb, int64_t c0,
                                              int nvalid, int lane) {
  float d[2], a[2];
  bool rs[2];
  const int prev_of_first = __shfl_up_sync(0xffffffffu, r.sq[1], 1);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int j = 2 * lane + k;
    float x = r.dt[k] + dtb;
    if (p.dt_softplus) x = x <= 20.f ? log1pf(expf(x)) : x;
    if (p.has_dt_limit) x = fminf(fmaxf(x, p.dt_min), p.dt_max);
    d[k] = j < nvalid ? x : 0.f;
    a[k] = __fmul_rn(d[k], Ah);  // rounded here: no FMA contraction into the sums below, so
                                 // every kernel that inlines this computes the same values
    const int prev = k == 1 ? r.sq[0] : (lane == 0 ? r.sqprev : prev_of_first);
    rs[k] = p.seq_idx != nullptr && j < nvalid && (c0 + j) > 0 && r.sq[k] != prev;
  }
  // inclusive scans over the 64 tokens: sum of a, max of reset positions
  const float s = a[0] + a[1];
  float inc = s;
  const int v0 = rs[0] ? 2 * lane : -1;
  const int v1 = rs[1] ? 2 * lane + 1 : v0;
  int mx = v1;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float tf = __shfl_up_sync(0xffffffffu, inc, off);
    const int ti = __shfl_up_sync(0xffffffffu, mx, off);
    if (lane >= off) {
      inc += tf;
      mx = max(mx, ti);
    }
  }
  int ex_mx = __shfl_up_sync(0xffffffffu, mx, 1);
  if (lane == 0) ex_mx = -1;
  const float l0 = (inc - s) + a[0], l1 = l0 + a[1];
  const int lr0 = max(ex_mx, v0), lr1 = max(ex_mx, v1);
  const float lamQ = __shfl_sync(0xffffffffu, l1, 31);
  const int lrQ = __shfl_sync(0xffffffffu, lr1, 31);
  const float lv[2] = {l0, l1};
  const int lrv[2] = {lr0, lr1};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int j = 2 * lane + k;
    v.dt()[j] = d[k];
    v.lam()[j] = lv[k];
    v.lr()[j] = lrv[k];
    v.w()[j] = j >= lrQ ? expf(lamQ - lv[k]) * d[k] : 0.f;
    v.e()[j] = lrv[k] < 0 ? expf(lv[k]) : 0.f;
  }
  if (lane == 0) *v.decay() = lrQ < 0 ? expf(lamQ) : 0.f;
}

}  // namespace ssd
}  // namespace mlmamba
