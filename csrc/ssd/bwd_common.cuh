// Device helpers of the SSD backward: bf16 mma.sync fragments read from padded shared-memory
// tiles with ldmatrix, typed global loads, and the per-chunk vectors (dt, cumulative decay,
// segment masks) that every kernel recomputes from the raw inputs.
//
// mma.m16n8k16 fragments (r = lane / 4, c = 2 * (lane % 4)):
//   A 16x16  a0 (r, c..c+1)  a1 (r+8, c..)  a2 (r, c+8..)  a3 (r+8, c+8..)
//   B 16x8   b0 (k c..c+1, n r)   b1 (k c+8..c+9, n r)
//   C 16x8   c0,c1 (r, c..c+1)    c2,c3 (r+8, c..c+1)
// Tiles are stored with a row pitch of (cols + 8) bf16, which keeps every fragment read below
// free of bank conflicts for the pitches used here (40, 72, 136, 264).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstddef>
#include <cstdint>

#include "common/cp_async.cuh"
#include "ssd/bwd.h"
#include "ssd/common.cuh"  // ldmatrix helpers

namespace mlmamba {
namespace ssd_bwd {

using bf16 = __nv_bfloat16;

// ---- typed global loads / stores -----------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float ldg_f(const void* p, int64_t i) {
  return to_f(static_cast<const T*>(p)[i]);
}

// small tensors whose dtype is only known at run time
__device__ __forceinline__ float ld_code(const void* p, int code, int64_t i) {
  if (code == kF32) return static_cast<const float*>(p)[i];
  if (code == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const bf16*>(p)[i]);
}
__device__ __forceinline__ void st_code(void* p, int code, int64_t i, float v) {
  if (code == kF32) static_cast<float*>(p)[i] = v;
  else if (code == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);
}

// __expf's value (ex2.approx of x log2 e, denormal results kept, as __expf compiles here) as
// volatile asm: the compiler cannot sink it under the branch of a later select
__device__ __forceinline__ float expf_kept(float x) {
  float r;
  asm volatile("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
}
__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }
__device__ __forceinline__ float silu_f(float v) { return v * sigmoid_f(v); }

// ---- mma and fragments --------------------------------------------------------------------
// bf16 m16n8k16 mma and bf16x2 packing: the forward's helpers (ssd/common.cuh)
using ssd::mma_bf16;
using ssd::pack_bf16;
using ssd::unpack_bf16;

__device__ __forceinline__ uint32_t scale_pair(uint32_t v, float s) {
  float2 f = unpack_bf16(v);
  return pack_bf16(f.x * s, f.y * s);
}

// Fragments by ldmatrix (rows 16-byte aligned: every pitch here is a multiple of 8 elements).
// A (16x16 at m0,k0) from row-major storage [m][k]
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  ssd::ldsm_x4(a, ssd::smem_u32(s + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 +
                                (lane >> 4) * 8));
}
// the same with rows scaled: row m0+r by s_lo, row m0+r+8 by s_hi
__device__ __forceinline__ void frag_a_rs(uint32_t (&a)[4], const bf16* s, int ld, int m0, int k0,
                                          float s_lo, float s_hi) {
  frag_a(a, s, ld, m0, k0);
  a[0] = scale_pair(a[0], s_lo);
  a[1] = scale_pair(a[1], s_hi);
  a[2] = scale_pair(a[2], s_lo);
  a[3] = scale_pair(a[3], s_hi);
}
// A (16x16 at m0,k0) from transposed storage [k][m]
__device__ __forceinline__ void frag_a_t(uint32_t (&a)[4], const bf16* s, int ld, int m0,
                                         int k0) {
  const int lane = threadIdx.x & 31;
  ssd::ldsm_x4_t(a, ssd::smem_u32(s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 +
                                  ((lane >> 3) & 1) * 8));
}
// B (16x8 at k0,n0) from storage [n][k]
__device__ __forceinline__ void frag_b_nk(uint32_t& b0, uint32_t& b1, const bf16* s, int ld,
                                          int n0, int k0) {
  const int lane = threadIdx.x & 31;
  uint32_t b[2];
  ssd::ldsm_x2(b, ssd::smem_u32(s + (n0 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8));
  b0 = b[0];
  b1 = b[1];
}
// B (16x8 at k0,n0) from storage [k][n]
__device__ __forceinline__ void frag_b_kn(uint32_t& b0, uint32_t& b1, const bf16* s, int ld,
                                          int n0, int k0) {
  const int lane = threadIdx.x & 31;
  uint32_t b[2];
  ssd::ldsm_x2_t(b, ssd::smem_u32(s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0));
  b0 = b[0];
  b1 = b[1];
}
// the same with each k row scaled by sc[k]
__device__ __forceinline__ void frag_b_kn_ks(uint32_t& b0, uint32_t& b1, const bf16* s, int ld,
                                             int n0, int k0, const float* sc) {
  const int lane = threadIdx.x & 31;
  const int k = k0 + 2 * (lane & 3);
  const bf16* q = s + k * ld + n0 + (lane >> 2);
  b0 = pack_bf16(__bfloat162float(q[0]) * sc[k], __bfloat162float(q[ld]) * sc[k + 1]);
  b1 = pack_bf16(__bfloat162float(q[8 * ld]) * sc[k + 8], __bfloat162float(q[9 * ld]) * sc[k + 9]);
}

// ---- warp scans -------------------------------------------------------------------------
// Each lane holds two consecutive values (v0 at 2*lane, v1 at 2*lane+1). Returns the exclusive
// prefix sums e0, e1 and the warp total. Fixed order: deterministic.
__device__ __forceinline__ void warp_scan2(float v0, float v1, float& e0, float& e1,
                                           float& total) {
  const int lane = threadIdx.x & 31;
  float s = v0 + v1, inc = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    float t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  e0 = inc - s;
  e1 = e0 + v0;
  total = __shfl_sync(0xffffffffu, inc, 31);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- per-chunk vectors ------------------------------------------------------------------
// Positions i >= qc (past the sequence end) get dt = 0: no decay, no input, nothing written.
struct ChunkVec {
  float dt[kQ];    // dt after bias, softplus and clamp
  float gfac[kQ];  // d dt / d dt_raw (0 where clamped)
  float lam[kQ];   // inclusive cumulative log-decay inside the chunk (all <= 0 for A <= 0)
  float sin[kQ];   // state-in weight: exp(lam_i) where the incoming state reaches i, else 0
  float sout[kQ];  // state-out weight: exp(lam_last - lam_i) where i reaches the chunk end
  int seg[kQ];     // resets seen up to i (inclusive); same value = same segment
  float cont;      // exp(lam_last) when the incoming state reaches the chunk end, else 0
};

// The sm_90a chunk kernel's per-(slot, head) inputs, one record of kHeadRecB bytes (bwd.h)
struct HeadRec {
  ChunkVec cv;
  float pad;    // D 8-byte aligned: the chunk kernel reads it as float2
  float D[kQ];  // D per channel (0 without D)
  float A;
};
static_assert(sizeof(HeadRec) <= kHeadRecB && kHeadRecB % 16 == 0, "kHeadRecB");
static_assert(offsetof(HeadRec, D) % 8 == 0, "HeadRec::D alignment");

// Where a states walk's carried tile starts: initial_states (forward walk, dir 0) or
// dfinal_states (backward walk, dir 1); element (s, hh, pp, nn) in fp32, 0 without one.
struct CarriedSrc {
  bool has;
  const void* src;
  int code;
  int64_t ss, sh, sp, sn;
  __device__ __forceinline__ float at(int s, int hh, int pp, int nn) const {
    return ld_code(src, code, s * ss + hh * sh + pp * sp + nn * sn);
  }
};
__device__ __forceinline__ CarriedSrc carried_src(const Params& P, int dir) {
  return dir == 0 ? CarriedSrc{P.has_init, P.init, P.init_code, P.i_ss, P.i_sh, P.i_sp, P.i_sn}
                  : CarriedSrc{P.has_dfinal, P.dfinal, P.dfinal_code, P.f_ss, P.f_sh, P.f_sp, P.f_sn};
}

// Raw per-lane inputs of chunk_vectors_from (lane holds positions 2*lane and 2*lane+1), so the
// loads of the next chunk can be issued early.
struct DtRaw {
  float v[2];
  int s_prev, s[2];  // seq_idx at 2*lane-1, 2*lane, 2*lane+1
};

// dt staged in shared memory by cp.async: one 32-bit word per position. A 16-bit dt element is
// copied as the aligned word that contains it (cp.async moves at least 4 bytes; the word lies
// inside the element's allocation) and its half picked here.
__device__ __forceinline__ const void* dt_word_src(const Params& P, int64_t idx) {
  const char* base = static_cast<const char*>(P.dt);
  if (P.dt_code == kF32) return base + 4 * idx;
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base + 2 * idx) &
                                       ~uintptr_t(3));
}
__device__ __forceinline__ float dt_from_word(const Params& P, uint32_t w, int64_t idx) {
  if (P.dt_code == kF32) return __uint_as_float(w);
  const bool hi = (reinterpret_cast<uintptr_t>(static_cast<const char*>(P.dt) + 2 * idx) & 2) != 0;
  const unsigned short bits = static_cast<unsigned short>(hi ? (w >> 16) : (w & 0xffffu));
  if (P.dt_code == kF16) return __half2float(__ushort_as_half(bits));
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
// dt (and seq_idx) of positions 2 lane, 2 lane + 1: from global memory, or from the words a
// cp.async staged in shared memory (dtw, by position in the chunk)
__device__ __forceinline__ void fetch_dt(const Params& P, DtRaw& d, int bb, int64_t t0, int qc,
                                         bool first, int hh, const uint32_t* dtw = nullptr) {
  const int lane = threadIdx.x & 31;
  const int* si = P.seq_idx + bb * P.si_sb;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = 2 * lane + u;
    d.v[u] = 0.f;
    d.s[u] = 0;
    if (i < qc) {
      const int64_t t = t0 + i;
      const int64_t o = bb * P.dt_sb + t * P.dt_sl + hh * P.dt_sh;
      d.v[u] = dtw ? dt_from_word(P, dtw[i], o) : ld_code(P.dt, P.dt_code, o);
      if (P.has_seq_idx) d.s[u] = si[t * P.si_sl];
    }
  }
  d.s_prev = d.s[0];
  if (P.has_seq_idx && 2 * lane < qc && (lane > 0 || !first))
    d.s_prev = si[(t0 + 2 * lane - 1) * P.si_sl];
}

// Called by one whole warp.
__device__ __forceinline__ void chunk_vectors_from(const Params& P, ChunkVec& cv, const DtRaw& d,
                                                   int qc, int hh, float Ah) {
  const int lane = threadIdx.x & 31;
  const float bias = P.has_dt_bias ? ld_code(P.dt_bias, P.dtb_code, hh * P.dtb_s) : 0.f;
  float a[2], au[2];
  int rs[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = 2 * lane + u;
    float dv = 0.f, gf = 0.f;
    if (i < qc) {
      float v = d.v[u] + bias;
      gf = 1.f;
      if (P.softplus && v <= 20.f) {
        gf = sigmoid_f(v);
        v = log1pf(__expf(v));
      }
      if (P.clamp) {
        if (v < P.dt_min || v > P.dt_max) gf = 0.f;
        v = fminf(fmaxf(v, P.dt_min), P.dt_max);
      }
      dv = v;
    }
    cv.dt[i] = dv;
    cv.gfac[i] = gf;
    // the log decay as the forward takes it; __fmul_rn: no fma contraction into the scan's
    // adds, which nvcc decides per call site (the sync and async walks must agree bitwise)
    au[u] = __fmul_rn(dv, Ah);
    a[u] = fmaxf(au[u], kMinLogDecay);  // clamped: differences of its cumsum stay precise
    rs[u] = (i < qc) ? int(d.s[u] != (u == 0 ? d.s_prev : d.s[0])) : 0;
  }
  float e0, e1, tot;
  warp_scan2(a[0], a[1], e0, e1, tot);
  const float lam0 = e0 + a[0], lam1 = e1 + a[1];
  float r0, r1, rtot;
  warp_scan2(float(rs[0]), float(rs[1]), r0, r1, rtot);
  const int seg0 = int(r0) + rs[0], seg1 = int(r1) + rs[1];
  const float lam_last = __shfl_sync(0xffffffffu, lam1, 31);
  const int seg_last = __shfl_sync(0xffffffffu, seg1, 31);
  // sin and cont are exponentials of cumsums from the chunk's start, never differences, so
  // they take the unclamped decays: with the clamp, a head whose first decay is below -60
  // got dinitial_states ~ e^-60 |dy C| instead of its true e^a (docs/perf-log.md)
  float f0, f1, ftot;
  warp_scan2(au[0], au[1], f0, f1, ftot);
  const float lu0 = f0 + au[0], lu1 = f1 + au[1];
  const float lu_last = __shfl_sync(0xffffffffu, lu1, 31);
  cv.lam[2 * lane] = lam0;
  cv.lam[2 * lane + 1] = lam1;
  cv.seg[2 * lane] = seg0;
  cv.seg[2 * lane + 1] = seg1;
  cv.sin[2 * lane] = seg0 == 0 ? __expf(lu0) : 0.f;
  cv.sin[2 * lane + 1] = seg1 == 0 ? __expf(lu1) : 0.f;
  cv.sout[2 * lane] = seg0 == seg_last ? __expf(lam_last - lam0) : 0.f;
  cv.sout[2 * lane + 1] = seg1 == seg_last ? __expf(lam_last - lam1) : 0.f;
  if (lane == 0) cv.cont = seg_last == 0 ? __expf(lu_last) : 0.f;
  (void)tot;
  (void)rtot;
  (void)ftot;
}

// The end of a (chunk, head)'s lambda-gradient, one warp (lane: positions 2 lane, 2 lane + 1):
// from the strict column-minus-row sums of M (dlt), the sin dy.v (t2) and dt x.(sout G B)
// (t4) terms, x.u (din) and term3 = cont <G_next, S_prev>: lambda's gradient by exclusive
// scans, ddt (stored), and the (slot, head) partials of dA and ddt_bias.
__device__ __forceinline__ void lambda_tail(const Params& P, const ChunkVec& cv,
                                            const float (&dlt)[2], const float (&t2v)[2],
                                            const float (&t4v)[2], const float (&din)[2],
                                            float term3, float Ah, int bb, int64_t t0, int qc,
                                            int slot, int hh) {
  const int lane = threadIdx.x & 31;
  float R0, R1, Rt, S0, S1, St, F0, F1, Ft;
  warp_scan2(dlt[0], dlt[1], R0, R1, Rt);
  warp_scan2(t2v[0], t2v[1], S0, S1, St);
  warp_scan2(t4v[0], t4v[1], F0, F1, Ft);
  const float lam_g[2] = {R0 + (St - S0) + term3 + F0, R1 + (St - S1) + term3 + F1};
  float da = 0.f, db = 0.f;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int i = 2 * lane + q;
    if (i < qc) {
      const float graw = (din[q] + Ah * lam_g[q]) * cv.gfac[i];
      st_code(P.ddt, P.dt_code, (int64_t(bb) * P.l + t0 + i) * P.h + hh, graw);
      da += cv.dt[i] * lam_g[q];
      db += graw;
    }
  }
  da = warp_sum(da);
  db = warp_sum(db);
  if (lane == 0) {
    P.part_dA[int64_t(slot) * P.h + hh] = da;
    P.part_ddtb[int64_t(slot) * P.h + hh] = db;
  }
  (void)Rt;
  (void)Ft;
}

// Eight consecutive elements of a row: one or two 16-byte loads when the row is contiguous and
// aligned (vec), else eight independent scalar loads. Missing elements read as 0.
template <typename T>
struct Vec8 {
  T e[8];
  __device__ __forceinline__ void load(const void* base, int64_t off, int64_t stride, int count,
                                       bool vec) {
    const T* q = static_cast<const T*>(base) + off;
    if (vec && count == 8) {
      constexpr int kWords = 8 * int(sizeof(T)) / 16;
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(q) + k);
        memcpy(&e[k * 16 / int(sizeof(T))], &v, 16);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) e[k] = k < count ? q[k * stride] : from_f<T>(0.f);
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int k = 0; k < 8; ++k) e[k] = from_f<T>(0.f);
  }
  __device__ __forceinline__ float get(int k) const { return to_f(e[k]); }
};

// 8 floats -> 8 bf16 in one 16-byte shared-memory store
__device__ __forceinline__ void st_bf16x8(bf16* dst, const float (&v)[8]) {
  uint4 o;
  o.x = pack_bf16(v[0], v[1]);
  o.y = pack_bf16(v[2], v[3]);
  o.z = pack_bf16(v[4], v[5]);
  o.w = pack_bf16(v[6], v[7]);
  *reinterpret_cast<uint4*>(dst) = o;
}

// Where chunk slot / block coordinates land in the sequence.
struct ChunkPos {
  int bb, seq, slot, qc;
  int64_t t0;
  bool first, valid;
};

// Chunk x (slot with cu_seqlens) of batch row y (0 with cu_seqlens).
__device__ __forceinline__ ChunkPos chunk_pos_at(const Params& P, int x, int y) {
  ChunkPos c;
  if (!P.varlen) {
    const int k = x;
    c.bb = y;
    c.seq = c.bb;
    c.slot = c.bb * P.nch + k;
    c.t0 = int64_t(k) * kQ;
    c.qc = int(min(int64_t(kQ), P.l - c.t0));
    c.first = k == 0;
    c.valid = true;
    return c;
  }
  const int slot = x;
  c.bb = 0;
  c.slot = slot;
  c.valid = slot < P.offs[P.nseq];
  if (!c.valid) return c;
  int lo = 0, hi = P.nseq - 1;  // last s with offs[s] <= slot
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (P.offs[mid] <= slot) lo = mid; else hi = mid - 1;
  }
  // skip empty sequences that share the offset
  while (lo + 1 <= P.nseq - 1 && P.offs[lo + 1] <= slot) ++lo;
  const int k = slot - P.offs[lo];
  c.seq = lo;
  c.t0 = int64_t(P.cu[lo * P.cu_s]) + int64_t(k) * kQ;
  c.qc = int(min(int64_t(kQ), int64_t(P.cu[(lo + 1) * P.cu_s]) - c.t0));
  c.first = k == 0;
  return c;
}
// Kernel-2 block: blockIdx.x = chunk (or slot with cu_seqlens), blockIdx.y = batch row.
__device__ __forceinline__ ChunkPos chunk_pos(const Params& P) {
  return chunk_pos_at(P, blockIdx.x, blockIdx.y);
}

}  // namespace ssd_bwd
}  // namespace mlmamba
