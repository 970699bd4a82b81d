// Pieces of the two sm_90a wgmma forward kernels (fwd_wgmma.cu: one warpgroup per CTA;
// fwd_ws.cu: a state and an output warpgroup). Written once, so both do the same arithmetic
// and give bitwise equal outputs. w: the thread's warp in its warpgroup (rows 16 w..), g / t:
// lane / 4 and lane % 4 (the mma fragment layout).
// State accumulators: sacc[np][4 j + e] is p row 16 w + g + 8 (e >> 1), n column
// 64 np + 8 j + 2 t + (e & 1).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "common/device_utils.cuh"
#include "ssd/fwd.h"
#include "ssd/fwd_vectors.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {
namespace wg {

constexpr int Q = kChunk, P = 64;

// Launch row `row` of a wgmma kernel: its batch row, first token and length (a batch row, a
// packed sequence with cu_seqlens, or a segment of the sequence split, fwd_split.cpp)
struct RowSpan {
  int64_t bidx, tstart, len;
};
__device__ __forceinline__ RowSpan row_span(const FwdParams& p, int row) {
  RowSpan r{row, 0, p.seqlen};
  if (p.cu_seqlens) {
    r.bidx = 0;
    r.tstart = p.cu_seqlens[row];
    r.len = p.cu_seqlens[row + 1] - r.tstart;
  }
  if (p.seg_len) {
    r.bidx = row / p.seg_rows;
    r.tstart = (row % p.seg_rows) * p.seg_len;
    r.len = p.seqlen - r.tstart < p.seg_len ? p.seqlen - r.tstart : p.seg_len;
  }
  return r;
}

// Chunk c of (row, head) in the chunk-vector pre-pass buffer: laid out per (batch row, head,
// chunk of the whole sequence), vec_nch chunks per run, so the split's segments and
// sub-segments (fwd_split.cpp) share one pre-pass. Assumes no cu_seqlens and tstart a multiple
// of 64 (the pre-pass is ruled out with cu_seqlens; the split, with seq_idx, whose resets make
// a chunk's vectors depend on its row).
__device__ __forceinline__ int64_t vec_index(const FwdParams& p, const RowSpan& s, int h,
                                             int64_t c) {
  return (s.bidx * p.nheads + h) * p.vec_nch + s.tstart / Q + c;
}

// The initial state of (row, h) into sacc, staged through st (fp32 [p][n], P x N floats) by
// the NTH threads of one warpgroup, 8 loads in flight per thread; sync() orders the staging
// stores before the reads.
template <int N, int NTH, typename Sync>
__device__ __forceinline__ void load_init_state(float (&sacc)[N / 64][32], const FwdParams& p,
                                                int64_t row, int h, float* st, int tid, int w,
                                                int g, int t, Sync sync) {
  const int64_t ib = row * p.init_b + h * p.init_h;
  auto stage = [&](auto zero) {
    using T = decltype(zero);
    const T* src = static_cast<const T*>(p.init) + ib;
    constexpr int PER = P * N / NTH, BATCH = 8;
#pragma unroll 1
    for (int k0 = 0; k0 < PER; k0 += BATCH) {
      float v[BATCH];
#pragma unroll
      for (int k = 0; k < BATCH; ++k) {
        const int e = tid + (k0 + k) * NTH;
        v[k] = static_cast<float>(src[(e / N) * p.init_p + (e % N) * p.init_n]);
      }
#pragma unroll
      for (int k = 0; k < BATCH; ++k) st[tid + (k0 + k) * NTH] = v[k];
    }
  };
  const DType it = static_cast<DType>(p.init_dtype);
  if (it == DType::f32) stage(0.f);
  else if (it == DType::bf16) stage(__float2bfloat16(0.f));
  else stage(__float2half(0.f));
  sync();
#pragma unroll
  for (int np = 0; np < N / 64; ++np)
#pragma unroll
    for (int i = 0; i < 32; ++i)
      sacc[np][i] = st[(16 * w + g + 8 * ((i & 3) >> 1)) * N + 64 * np + 8 * (i >> 2) + 2 * t + (i & 1)];
}

// S = 0 (no initial state; the MSC mode's start of each scan)
template <int NP>
__device__ __forceinline__ void zero_state(float (&sacc)[NP][32]) {
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int i = 0; i < 32; ++i) sacc[np][i] = 0.f;
}

// S (bf16) as a K-major operand at Ss, rows p, columns n: stmatrix x4 of n8 blocks 2 jp,
// 2 jp + 1, rows 16 w.. (+8). Lane l addresses row 16 w + 8 (q & 1) + l % 8 of block
// 2 jp + (q >> 1) (q = l / 8); its 16-byte chunk index (2 jp + (q >> 1)) ^ (l % 8) is the
// lane's base chunk with bit 1 flipped by jp: one XOR per store.
__device__ __forceinline__ uint32_t state_store_base(const unsigned char* Ss, int w, int lane) {
  const int q = lane >> 3, rr = lane & 7;
  return smem_u32(Ss) + (16 * w + 8 * (q & 1) + rr) * 128 + (((q >> 1) ^ rr) << 4);
}
template <int NP>
__device__ __forceinline__ void store_state(const float (&sacc)[NP][32], uint32_t base) {
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      const float* a = sacc[np] + 8 * jp;
      stsm_x4((base + np * P * 128) ^ (jp << 5), pack_bf16(a[0], a[1]), pack_bf16(a[2], a[3]),
              pack_bf16(a[4], a[5]), pack_bf16(a[6], a[7]));
    }
}

// X^T scaled by w: the A operand of the state update (k-step s = tokens 16 s ..); k-step s
// reads rows 16 s..: the same swizzle phase, 2048 bytes further
__device__ __forceinline__ void scaled_xt(uint32_t (&xa)[4][4], const unsigned char* X,
                                          const ChunkVecs& cv, int w, int lane) {
  const int t = lane & 3;
  const uint32_t xr = smem_u32(X) + sw128_offset<Q>((lane & 7) + (lane >> 4) * 8,
                                                     16 * w + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    ldsm_x4_t(xa[s], xr + s * 16 * 128);
    const float2 wa = *reinterpret_cast<const float2*>(cv.w() + 16 * s + 2 * t);
    const float2 wb = *reinterpret_cast<const float2*>(cv.w() + 16 * s + 8 + 2 * t);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 f = unpack_bf16(xa[s][q]);
      xa[s][q] = q < 2 ? pack_bf16(f.x * wa.x, f.y * wa.y) : pack_bf16(f.x * wb.x, f.y * wb.y);
    }
  }
}

// S = decay S + (w o X)^T B: decay in registers, then the wgmma (A = X^T w from registers,
// B tile N-major, one m64n64 per 64 columns of S), issued (not committed or waited)
template <int NP>
__device__ __forceinline__ void state_update(float (&sacc)[NP][32], const uint32_t (&xa)[4][4],
                                             const unsigned char* B, const ChunkVecs& cv) {
  const float dec = *cv.decay();
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int i = 0; i < 32; ++i) sacc[np][i] *= dec;
  wgmma_fence();
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int s = 0; s < 4; ++s)
      wgmma_m64n64_rs<1>(sacc[np], xa[s], desc_mn(B + np * Q * 128, s), true);
}

// M = C B^T -> decay, dt, causal / segment masks -> A fragments (k-step s = key tokens 16 s ..)
__device__ __forceinline__ void mask_m(uint32_t (&ma)[4][4], const float (&macc)[32],
                                       const ChunkVecs& cv, int w, int g, int t) {
  const int i0 = 16 * w + g, i1 = i0 + 8;
  const float li[2] = {cv.lam()[i0] * kLog2e, cv.lam()[i1] * kLog2e};
  const int lri[2] = {cv.lr()[i0], cv.lr()[i1]};
#pragma unroll
  for (int j8 = 0; j8 < 8; ++j8) {
    // key tokens j, j + 1 of this lane: one 8-byte load of each vector
    const float2 lj = *reinterpret_cast<const float2*>(cv.lam() + 8 * j8 + 2 * t);
    const float2 dj = *reinterpret_cast<const float2*>(cv.dt() + 8 * j8 + 2 * t);
    float m[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e < 2 ? i0 : i1, j = 8 * j8 + 2 * t + (e & 1);
      const float lam_j = (e & 1) ? lj.y : lj.x, dt_j = (e & 1) ? dj.y : dj.x;
      const float v = macc[4 * j8 + e] * exp2_approx(fmaf(-lam_j, kLog2e, li[e >> 1])) * dt_j;
      m[e] = (j <= i && j >= lri[e >> 1]) ? v : 0.f;  // select, never multiply by the mask
    }
    // n8 block j8 of the accumulator = half (j8 & 1) of k-step j8 / 2
    ma[j8 >> 1][(j8 & 1) * 2 + 0] = pack_bf16(m[0], m[1]);
    ma[j8 >> 1][(j8 & 1) * 2 + 1] = pack_bf16(m[2], m[3]);
  }
}

// Y = C S_prev^T: row i scaled by e_i
__device__ __forceinline__ void scale_y(float (&yacc)[32], const ChunkVecs& cv, int w, int g) {
  const float e0 = cv.e()[16 * w + g], e1 = cv.e()[16 * w + g + 8];
#pragma unroll
  for (int j8 = 0; j8 < 8; ++j8) {
    yacc[4 * j8] *= e0; yacc[4 * j8 + 1] *= e0;
    yacc[4 * j8 + 2] *= e1; yacc[4 * j8 + 3] *= e1;
  }
}

// y[4 j8], y[4 j8 + 1] += D x for the lane's X word j8 of a chunk row (columns 8 j8 + 2 t, +1)
__device__ __forceinline__ void add_dx(float* y, uint32_t xw, const float* Dsm, int t, int j8) {
  const float2 xv = unpack_bf16(xw);
  const float2 dv = *reinterpret_cast<const float2*>(Dsm + 8 * j8 + 2 * t);
  y[4 * j8] = fmaf(dv.x, xv.x, y[4 * j8]);
  y[4 * j8 + 1] = fmaf(dv.y, xv.y, y[4 * j8 + 1]);
}

// Epilogue of chunk row i (token tok) in y[4 j8], y[4 j8 + 1] (columns 8 j8 + 2 t, +1): + D x,
// * silu(z). The swizzled X row i holds the lane's columns at byte (i * 128 + 4 t) ^
// (((i & 7) ^ j8) << 4), i & 7 = g.
__device__ __forceinline__ void finish_row(float* y, const unsigned char* X, const float* Dsm,
                                           const FwdParams& p, int64_t bidx, int64_t tok, int h,
                                           int i, int g, int t) {
  if (p.D != nullptr) {
    const unsigned char* xrow = X + i * 128 + (g << 4) + 4 * t;
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
      add_dx(y, *reinterpret_cast<const uint32_t*>(X + ((xrow - X) ^ (j8 << 4))), Dsm, t, j8);
  }
  if (p.z != nullptr) {
    const int64_t zo = bidx * p.z_b + tok * p.z_l + h * p.z_h + 2 * t * p.z_p;
    const DType zt = static_cast<DType>(p.z_dtype);
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) {
      y[4 * j8] *= silu(load_as_float(p.z, zo + 8 * j8 * p.z_p, zt));
      y[4 * j8 + 1] *= silu(load_as_float(p.z, zo + (8 * j8 + 1) * p.z_p, zt));
    }
  }
}

// y[4 j8], y[4 j8 + 1] -> bf16 at o + 8 j8 (o: the row's output, column 2 t)
__device__ __forceinline__ void store_row(__nv_bfloat16* o, const float* y) {
#pragma unroll
  for (int j8 = 0; j8 < 8; ++j8)
    *reinterpret_cast<__nv_bfloat162*>(o + 8 * j8) = __floats2bfloat162_rn(y[4 * j8], y[4 * j8 + 1]);
}

// The final state (fp32 [p][n]) of (row, h)
template <int N>
__device__ __forceinline__ void store_final_state(const float (&sacc)[N / 64][32], const FwdParams& p,
                                                  int64_t row, int h, int w, int g, int t) {
  float* f = p.final_states + (row * p.nheads + h) * P * N;
#pragma unroll
  for (int np = 0; np < N / 64; ++np)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int pr = 16 * w + g + 8 * hf, nc = 64 * np + 8 * j + 2 * t;
        *reinterpret_cast<float2*>(f + static_cast<int64_t>(pr) * N + nc) =
            make_float2(sacc[np][4 * j + 2 * hf], sacc[np][4 * j + 2 * hf + 1]);
      }
}

}  // namespace wg
}  // namespace ssd
}  // namespace mlmamba
