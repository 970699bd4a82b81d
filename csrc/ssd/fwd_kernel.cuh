// SSD chunked scan forward: one CTA per (row, head, slice of PT head channels) walks the
// sequence in chunks of Q = 64 tokens, carrying the state S (PT x N, fp32) in registers as the
// accumulators of a tensor-core product. Per chunk (ssd-math.md, "Chunked form"):
//   dt phase   dt_j (bias, softplus, clamp), Lambda = cumsum(dt A), segment starts (seq_idx)
//   phase A    M = (C B^T) o exp(Lambda_i - Lambda_j) dt_j, masked causal / same segment -> smem
//   phase Y    y = exp(Lambda_i) C S_prev^T + M X + D x, then * silu(z)        (mma)
//   phase S    S = exp(Lambda_Q) S + (w o X)^T B,  w_j = exp(Lambda_Q - Lambda_j) dt_j  (mma)
// The dt phase of chunk c + 1 runs on warp 4 during phase A of chunk c (warp 4 has no phase A
// tile), into the second of two buffers of chunk vectors. bf16 inputs are copied into shared
// memory with cp.async, one chunk ahead. fp16 and fp32 inputs are split into bf16 hi + lo
// (three products per mma step, ~16 mantissa bits).
// Rows are read through a row map (token -> row of the tensor), so a later caller can feed a
// scan order instead of the identity.
#pragma once
#include <type_traits>

#include "common/device_utils.cuh"
#include "common/launch.h"
#include "ssd/common.cuh"
#include "ssd/fwd.h"
#include "ssd/fwd_vectors.cuh"

namespace mlmamba {
namespace ssd {

using bf16 = __nv_bfloat16;

template <typename T, int N_, int PT_>
struct FwdTraits {
  static constexpr int Q = 64, N = N_, PT = PT_, NT = 256, NW = 8;
  static constexpr bool SPLIT = !std::is_same_v<T, bf16>;
  static constexpr bool ASYNC = !SPLIT;
  static constexpr int NBUF = ASYNC ? 2 : 1, NSPL = SPLIT ? 2 : 1;
  // tiles, in bf16 elements
  static constexpr int X_EL = Q * PT, B_EL = Q * N, S_EL = PT * N, M_EL = Q * Q;
  static constexpr int LOAD_EL = X_EL + 2 * B_EL;  // one buffer of X, B, C
  static constexpr int BF_EL = NBUF * NSPL * LOAD_EL + NSPL * (S_EL + M_EL);
  // two buffers of the chunk vectors (fwd_vectors.cuh), then D
  static constexpr int SMEM = BF_EL * 2 + 2 * kVecBytes + 64 * 4;
  // state tile: WM_S m-tiles of 16 p rows, WN_S warps along n, NT_S n8 tiles each
  static constexpr int WM_S = PT / 16, WN_S = NW / WM_S;
  static constexpr int NCOL_S = N / WN_S >= 8 ? N / WN_S : 8;
  static constexpr int NT_S = NCOL_S / 8;
  // output tile: 4 m-tiles of 16 tokens x 2 halves of PT / 2 columns
  static constexpr int NT_Y = PT / 16;
  static_assert(PT == 32 || PT == 64, "PT must be 32 or 64");
  static_assert(N % 16 == 0 && N >= 16 && N <= 256, "N must be 16..256, a multiple of 16");
};

// token j of the chunk -> row of the tensor (identity plus offset here)
struct LinearRows {
  int64_t first;
  __device__ __forceinline__ int64_t operator()(int j) const { return first + j; }
};

template <typename T> struct CodeOf;
template <> struct CodeOf<float> { static constexpr DType v = DType::f32; };
template <> struct CodeOf<__half> { static constexpr DType v = DType::f16; };
template <> struct CodeOf<bf16> { static constexpr DType v = DType::bf16; };

template <typename T> __device__ __forceinline__ float tofl(T v);
template <> __device__ __forceinline__ float tofl(float v) { return v; }
template <> __device__ __forceinline__ float tofl(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float tofl(bf16 v) { return __bfloat162float(v); }

// Two consecutive outputs.
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__half* p, float a, float b) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b); }
__device__ __forceinline__ void store2(bf16* p, float a, float b) { *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b); }

// Rows x COLS tile from global (row stride rs, column stride cs) into bf16 hi (+ lo) tiles,
// converting through registers. Rows >= nvalid are zero.
template <typename T, int ROWS, int COLS, bool SPLIT, int NT, class RowMap>
__device__ __forceinline__ void load_tile_sync(bf16* hi, bf16* lo, const T* base, int64_t rs,
                                               int64_t cs, RowMap rows, int nvalid, bool vec,
                                               int tid) {
  constexpr int CPR = COLS / 8, TOTAL = ROWS * CPR, ITERS = (TOTAL + NT - 1) / NT;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int ch = tid + k * NT;
    if (TOTAL % NT != 0 && ch >= TOTAL) break;
    const int r = ch / CPR, c = (ch % CPR) * 8;
    float v[8];
    if (r < nvalid) {
      const T* src = base + rows(r) * rs + c * cs;
      if (vec) {
        constexpr int NV = sizeof(T) * 8 / 16;
        uint4 raw[NV];
#pragma unroll
        for (int q = 0; q < NV; ++q) raw[q] = __ldg(reinterpret_cast<const uint4*>(src) + q);
        const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = tofl(e[q]);
      } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = tofl(src[q * cs]);
      }
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = 0.f;
    }
    uint4 h, l;
    uint32_t* hp = reinterpret_cast<uint32_t*>(&h);
    uint32_t* lp = reinterpret_cast<uint32_t*>(&l);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if constexpr (SPLIT) split_bf16(v[2 * q], v[2 * q + 1], hp[q], lp[q]);
      else hp[q] = pack_bf16(v[2 * q], v[2 * q + 1]);
    }
    *reinterpret_cast<uint4*>(hi + swz<COLS>(r, c)) = h;
    if constexpr (SPLIT) *reinterpret_cast<uint4*>(lo + swz<COLS>(r, c)) = l;
  }
}

// bf16 rows (contiguous, 16-byte aligned) straight into shared memory with cp.async.
template <int ROWS, int COLS, int NT, class RowMap>
__device__ __forceinline__ void load_tile_async(bf16* dst, const bf16* base, int64_t rs,
                                                RowMap rows, int nvalid, int tid) {
  constexpr int CPR = COLS / 8, TOTAL = ROWS * CPR, ITERS = (TOTAL + NT - 1) / NT;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int ch = tid + k * NT;
    if (TOTAL % NT != 0 && ch >= TOTAL) break;
    const int r = ch / CPR, c = (ch % CPR) * 8;
    const bool ok = r < nvalid;
    const bf16* src = ok ? base + rows(r) * rs + c : base;
    cp_async16(dst + swz<COLS>(r, c), src, ok ? 16 : 0);
  }
}

// The same, issued by one warp in a rolled loop: the row addresses are recomputed per
// iteration instead of being hoisted out of the chunk loop into (spilled) registers.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile_async_warp(bf16* dst, const bf16* base, int64_t rs,
                                                     int64_t first, int nvalid, int lane) {
  constexpr int CPR = COLS / 8, TOTAL = ROWS * CPR;
  static_assert(TOTAL % 64 == 0, "tile must split into pairs of warp-wide steps");
#pragma unroll 1
  for (int ch = lane; ch < TOTAL; ch += 64) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int r = (ch + 32 * u) / CPR, c = ((ch + 32 * u) % CPR) * 8;
      const bool ok = r < nvalid;
      cp_async16(dst + swz<COLS>(r, c), ok ? base + (first + r) * rs + c : base,
                 ok ? 16 : 0);
    }
  }
}

// MINB: CTAs per SM the registers are budgeted for (2 caps them at 128 per thread).
template <typename T, int N, int PT, int MINB>
__global__ void __launch_bounds__(256, MINB) ssd_fwd_kernel(const FwdParams p) {
  using K = FwdTraits<T, N, PT>;
  constexpr int Q = K::Q, NT = K::NT;
  constexpr bool SPLIT = K::SPLIT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sm = reinterpret_cast<bf16*>(smem_raw);
  auto Xs = [&](int buf, int s) { return sm + (buf * K::NSPL + s) * K::LOAD_EL; };
  auto Bs = [&](int buf, int s) { return Xs(buf, s) + K::X_EL; };
  auto Cs = [&](int buf, int s) { return Xs(buf, s) + K::X_EL + K::B_EL; };
  bf16* Ss[2] = {sm + K::NBUF * K::NSPL * K::LOAD_EL, nullptr};
  Ss[1] = Ss[0] + K::S_EL;
  bf16* Ms[2] = {Ss[0] + K::NSPL * K::S_EL, nullptr};
  Ms[1] = Ms[0] + K::M_EL;
  unsigned char* vec0 = smem_raw + K::BF_EL * 2;  // two buffers of chunk vectors
  float* Dsm = reinterpret_cast<float*>(vec0 + 2 * kVecBytes);  // D of this CTA's channels
  constexpr int kDtWarp = 4;  // idle in phase A: computes the next chunk's vectors there

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int npt = static_cast<int>(p.headdim / PT);
  const int h = blockIdx.x / npt, p0 = (blockIdx.x % npt) * PT;
  const int row = blockIdx.y;
  const int grp = h / p.heads_per_group;
  int64_t bidx, tstart, len;
  if (p.cu_seqlens) {
    bidx = 0;
    tstart = p.cu_seqlens[row];
    len = p.cu_seqlens[row + 1] - tstart;
  } else {
    bidx = row;
    tstart = 0;
    len = p.seqlen;
  }
  const T* xg = static_cast<const T*>(p.x) + bidx * p.x_b + h * p.x_h + p0 * p.x_p;
  const T* Bg = static_cast<const T*>(p.B) + bidx * p.B_b + grp * p.B_g;
  const T* Cg = static_cast<const T*>(p.C) + bidx * p.C_b + grp * p.C_g;
  const float Ah = p.A[h];
  const float dtb = p.dt_bias ? p.dt_bias[h] : 0.f;
  if (tid < PT) Dsm[tid] = p.D ? p.D[h * p.D_h + (p0 + tid) * p.D_p] : 0.f;

  // ---- state accumulators (phase S tiling) ----
  const int mS = warp % K::WM_S, nS0 = (warp / K::WM_S) * K::NCOL_S;
  const bool s_active = nS0 < N;
  float sacc[K::NT_S][4];
#pragma unroll
  for (int nt = 0; nt < K::NT_S; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = 0.f;
      if (p.init && s_active) {
        const int pr = p0 + mS * 16 + g8 + (e >> 1) * 8, nc = nS0 + nt * 8 + 2 * t4 + (e & 1);
        v = load_as_float(p.init, row * p.init_b + h * p.init_h + pr * p.init_p + nc * p.init_n,
                          static_cast<DType>(p.init_dtype));
      }
      sacc[nt][e] = v;
    }
  auto store_state = [&]() {
    if (!s_active) return;
#pragma unroll
    for (int nt = 0; nt < K::NT_S; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int off = swz<N>(mS * 16 + g8 + hf * 8, nS0 + nt * 8 + 2 * t4);
        uint32_t hi, lo;
        if constexpr (SPLIT) {
          split_bf16(sacc[nt][2 * hf], sacc[nt][2 * hf + 1], hi, lo);
          *reinterpret_cast<uint32_t*>(Ss[1] + off) = lo;
        } else {
          hi = pack_bf16(sacc[nt][2 * hf], sacc[nt][2 * hf + 1]);
        }
        *reinterpret_cast<uint32_t*>(Ss[0] + off) = hi;
      }
  };
  store_state();

  const int nchunks = static_cast<int>((len + Q - 1) / Q);

  RawDt raw;  // raw dt and seq_idx of the next chunk (warp kDtWarp)
  auto fetch_dt = [&](int c) { raw.fetch(p, bidx, tstart, len, h, static_cast<int64_t>(c) * Q, lane); };

  // Tiles of chunk c into buffer c & 1. With registers for two CTAs per SM (MINB 2), the two
  // warps idle in phase A issue them (warp kDtWarp X, the next B and C) in rolled loops: issued
  // by every thread, the per-thread row pointers were hoisted out of the chunk loop and spilled.
  // With one CTA per SM nothing spills and every thread issues right after the chunk barrier
  // (faster there: the two warps' copy loops would sit on the critical path of phase A).
  constexpr bool kWarpCopy = MINB > 1;
  auto issue_async = [&](int c) {
    if constexpr (K::ASYNC) {
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      const int buf = c & 1;
      if constexpr (!kWarpCopy) {
        const LinearRows rows{tstart + c0};
        load_tile_async<Q, PT, NT>(Xs(buf, 0), reinterpret_cast<const bf16*>(xg), p.x_l, rows,
                                   nv, tid);
        load_tile_async<Q, N, NT>(Bs(buf, 0), reinterpret_cast<const bf16*>(Bg), p.B_l, rows, nv,
                                  tid);
        load_tile_async<Q, N, NT>(Cs(buf, 0), reinterpret_cast<const bf16*>(Cg), p.C_l, rows, nv,
                                  tid);
      } else if (warp == kDtWarp) {
        load_tile_async_warp<Q, PT>(Xs(buf, 0), reinterpret_cast<const bf16*>(xg), p.x_l,
                                    tstart + c0, nv, lane);
      } else {
        load_tile_async_warp<Q, N>(Bs(buf, 0), reinterpret_cast<const bf16*>(Bg), p.B_l,
                                   tstart + c0, nv, lane);
        load_tile_async_warp<Q, N>(Cs(buf, 0), reinterpret_cast<const bf16*>(Cg), p.C_l,
                                   tstart + c0, nv, lane);
      }
      cp_async_commit();
    }
  };

  // dt phase of chunk c (one warp) into buffer c & 1, then the raw dt of chunk c + 1
  auto dt_phase = [&](int c) {
    const int64_t c0 = static_cast<int64_t>(c) * Q;
    const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
    chunk_vectors(ChunkVecs(vec0 + (c & 1) * kVecBytes), raw, p, Ah, dtb, c0, nvalid, lane);
    if (c + 1 < nchunks) fetch_dt(c + 1);
  };

  if (nchunks > 0) {
    if (!kWarpCopy || warp == kDtWarp || warp == kDtWarp + 1) issue_async(0);
    if (warp == kDtWarp) {
      fetch_dt(0);
      dt_phase(0);
    }
  }

  for (int c = 0; c < nchunks; ++c) {
    const int64_t c0 = static_cast<int64_t>(c) * Q;
    const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
    const int buf = K::ASYNC ? (c & 1) : 0;
    const ChunkVecs cv(vec0 + (c & 1) * kVecBytes);
    const float* dts = cv.dt();
    const float* lam = cv.lam();
    const float* wv = cv.w();
    const float* ev = cv.e();
    const int* lr = cv.lr();
    const float* chunk_decay = cv.decay();

    if constexpr (K::ASYNC) {
      cp_async_wait<0>();
    } else {
      const LinearRows rows{tstart + c0};
      load_tile_sync<T, Q, PT, SPLIT, NT>(Xs(0, 0), Xs(0, 1), xg, p.x_l, p.x_p, rows, nvalid,
                                          p.vec_loads, tid);
      load_tile_sync<T, Q, N, SPLIT, NT>(Bs(0, 0), Bs(0, 1), Bg, p.B_l, p.B_n, rows, nvalid,
                                         p.vec_loads, tid);
      load_tile_sync<T, Q, N, SPLIT, NT>(Cs(0, 0), Cs(0, 1), Cg, p.C_l, p.C_n, rows, nvalid,
                                         p.vec_loads, tid);
    }
    __syncthreads();  // chunk c tiles, chunk vectors and S_prev visible
    if (!kWarpCopy && c + 1 < nchunks) issue_async(c + 1);

    const bf16* Xh = Xs(buf, 0);
    const bf16* Xl = Xs(buf, SPLIT ? 1 : 0);
    const bf16* Bh = Bs(buf, 0);
    const bf16* Bl = Bs(buf, SPLIT ? 1 : 0);
    const bf16* Ch = Cs(buf, 0);
    const bf16* Cl = Cs(buf, SPLIT ? 1 : 0);

    // ---- phase A: M = (C B^T) o decay o dt, rows 16 mt.., columns 32 ch.. ----
    {
      const int mt = warp & 3, ch = warp >> 2;
      if ((warp == kDtWarp || warp == kDtWarp + 1) && c + 1 < nchunks) {  // off the critical path
        if (kWarpCopy) issue_async(c + 1);
        if (warp == kDtWarp) dt_phase(c + 1);
      }
      if (ch * 32 <= mt * 16 + 15) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll 4
        for (int k = 0; k < N; k += 16) {
          uint32_t ah[4], al[4] = {};
          load_a<N>(ah, Ch, mt * 16, k, lane);
          if constexpr (SPLIT) load_a<N>(al, Cl, mt * 16, k, lane);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            uint32_t bh[4], bl[4] = {};
            load_b2<N>(bh, Bh, ch * 32 + q * 16, k, lane);
            if constexpr (SPLIT) load_b2<N>(bl, Bl, ch * 32 + q * 16, k, lane);
            mma_split<SPLIT>(acc[2 * q], ah, al, bh[0], bh[1], bl[0], bl[1]);
            mma_split<SPLIT>(acc[2 * q + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
          }
        }
        float lj[8], dj[8];  // this thread's 8 key columns
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int j = ch * 32 + (q >> 1) * 8 + 2 * t4 + (q & 1);
          lj[q] = lam[j];
          dj[q] = dts[j];
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = mt * 16 + g8 + hf * 8;
          const float li = lam[i];
          const int lri = lr[i];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int j = ch * 32 + nt * 8 + 2 * t4;
            float m[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // exponent <= 0 where kept; select, never multiply
              const float v = acc[nt][2 * hf + e] * exp2_approx((li - lj[2 * nt + e]) * kLog2e) *
                              dj[2 * nt + e];
              m[e] = (j + e <= i && j + e >= lri) ? v : 0.f;
            }
            const int off = swz<Q>(i, j);
            uint32_t hi, lo;
            if constexpr (SPLIT) {
              split_bf16(m[0], m[1], hi, lo);
              *reinterpret_cast<uint32_t*>(Ms[1] + off) = lo;
            } else {
              hi = pack_bf16(m[0], m[1]);
            }
            *reinterpret_cast<uint32_t*>(Ms[0] + off) = hi;
          }
        }
      }
    }
    __syncthreads();  // M visible

    // ---- phase Y: out rows 16 mt.., columns pc0 .. pc0 + PT/2 ----
    {
      const int mt = warp & 3, pc0 = (warp >> 2) * (PT / 2);
      float acc[K::NT_Y][4];
#pragma unroll
      for (int i = 0; i < K::NT_Y; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll 4
      for (int k = 0; k < N; k += 16) {  // C S_prev^T
        uint32_t ah[4], al[4] = {};
        load_a<N>(ah, Ch, mt * 16, k, lane);
        if constexpr (SPLIT) load_a<N>(al, Cl, mt * 16, k, lane);
#pragma unroll
        for (int q = 0; q < K::NT_Y / 2; ++q) {
          uint32_t bh[4], bl[4] = {};
          load_b2<N>(bh, Ss[0], pc0 + q * 16, k, lane);
          if constexpr (SPLIT) load_b2<N>(bl, Ss[1], pc0 + q * 16, k, lane);
          mma_split<SPLIT>(acc[2 * q], ah, al, bh[0], bh[1], bl[0], bl[1]);
          mma_split<SPLIT>(acc[2 * q + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
        }
      }
      const float e0 = ev[mt * 16 + g8], e1 = ev[mt * 16 + g8 + 8];
#pragma unroll
      for (int nt = 0; nt < K::NT_Y; ++nt) {
        acc[nt][0] *= e0; acc[nt][1] *= e0;
        acc[nt][2] *= e1; acc[nt][3] *= e1;
      }
      for (int kj = 0; kj <= mt; ++kj) {  // + M X (causal: key blocks up to the diagonal)
        uint32_t ah[4], al[4] = {};
        load_a<Q>(ah, Ms[0], mt * 16, kj * 16, lane);
        if constexpr (SPLIT) load_a<Q>(al, Ms[1], mt * 16, kj * 16, lane);
#pragma unroll
        for (int q = 0; q < K::NT_Y / 2; ++q) {
          uint32_t bh[4], bl[4] = {};
          load_b2_t<PT>(bh, Xh, pc0 + q * 16, kj * 16, lane);
          if constexpr (SPLIT) load_b2_t<PT>(bl, Xl, pc0 + q * 16, kj * 16, lane);
          mma_split<SPLIT>(acc[2 * q], ah, al, bh[0], bh[1], bl[0], bl[1]);
          mma_split<SPLIT>(acc[2 * q + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
        }
      }
      // epilogue: + D x, * silu(z), store
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = mt * 16 + g8 + hf * 8;
        if (i >= nvalid) continue;
        const int64_t tok = tstart + c0 + i;
#pragma unroll
        for (int nt = 0; nt < K::NT_Y; ++nt) {
          const int pc = pc0 + nt * 8 + 2 * t4;
          float y0 = acc[nt][2 * hf], y1 = acc[nt][2 * hf + 1];
          if (p.D) {
            float2 xv = unpack_bf16(*reinterpret_cast<const uint32_t*>(Xh + swz<PT>(i, pc)));
            if constexpr (SPLIT) {
              const float2 xl = unpack_bf16(*reinterpret_cast<const uint32_t*>(Xl + swz<PT>(i, pc)));
              xv.x += xl.x;
              xv.y += xl.y;
            }
            y0 += Dsm[pc] * xv.x;
            y1 += Dsm[pc + 1] * xv.y;
          }
          if (p.z) {
            const int64_t zo = bidx * p.z_b + tok * p.z_l + h * p.z_h + (p0 + pc) * p.z_p;
            const DType zt = static_cast<DType>(p.z_dtype);
            y0 *= silu(load_as_float(p.z, zo, zt));
            y1 *= silu(load_as_float(p.z, zo + p.z_p, zt));
          }
          T* o = static_cast<T*>(p.out) + bidx * p.out_b + tok * p.out_l + h * p.out_h + (p0 + pc);
          store2(o, y0, y1);
        }
      }
    }

    // ---- phase S: S = decay S + (w o X)^T B ----
    if (s_active) {
      const float dec = *chunk_decay;
#pragma unroll
      for (int nt = 0; nt < K::NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[nt][e] *= dec;
#pragma unroll
      for (int kk = 0; kk < Q; kk += 16) {
        uint32_t ah[4], al[4] = {};
        load_a_t<PT>(ah, Xh, mS * 16, kk, lane);
        if constexpr (SPLIT) load_a_t<PT>(al, Xl, mS * 16, kk, lane);
        const float w0 = wv[kk + 2 * t4], w1 = wv[kk + 2 * t4 + 1];
        const float w2 = wv[kk + 2 * t4 + 8], w3 = wv[kk + 2 * t4 + 9];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float wa = r < 2 ? w0 : w2, wb = r < 2 ? w1 : w3;
          float2 f = unpack_bf16(ah[r]);
          if constexpr (SPLIT) {
            const float2 fl = unpack_bf16(al[r]);
            split_bf16((f.x + fl.x) * wa, (f.y + fl.y) * wb, ah[r], al[r]);
          } else {
            ah[r] = pack_bf16(f.x * wa, f.y * wb);
          }
        }
#pragma unroll
        for (int q = 0; q < K::NT_S / 2; ++q) {
          uint32_t bh[4], bl[4] = {};
          load_b2_t<N>(bh, Bh, nS0 + q * 16, kk, lane);
          if constexpr (SPLIT) load_b2_t<N>(bl, Bl, nS0 + q * 16, kk, lane);
          mma_split<SPLIT>(sacc[2 * q], ah, al, bh[0], bh[1], bl[0], bl[1]);
          mma_split<SPLIT>(sacc[2 * q + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
        }
        if constexpr (K::NT_S % 2 == 1) {
          uint32_t bh[2], bl[2] = {};
          load_b1_t<N>(bh, Bh, nS0 + (K::NT_S - 1) * 8, kk, lane);
          if constexpr (SPLIT) load_b1_t<N>(bl, Bl, nS0 + (K::NT_S - 1) * 8, kk, lane);
          mma_split<SPLIT>(sacc[K::NT_S - 1], ah, al, bh[0], bh[1], bl[0], bl[1]);
        }
      }
    }
    __syncthreads();  // every read of S_prev, M and this chunk's tiles is done
    store_state();
  }

  if (p.final_states && s_active) {
    float* f = p.final_states + (static_cast<int64_t>(row) * p.nheads + h) * p.headdim * N;
#pragma unroll
    for (int nt = 0; nt < K::NT_S; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t pr = p0 + mS * 16 + g8 + hf * 8;
        const int nc = nS0 + nt * 8 + 2 * t4;
        *reinterpret_cast<float2*>(f + pr * N + nc) = make_float2(sacc[nt][2 * hf], sacc[nt][2 * hf + 1]);
      }
  }
}

template <typename T, int N, int PT, int MINB = (N <= 128 ? 2 : 1)>
void launch_fwd_typed(const FwdParams& p, cudaStream_t stream) {
  using K = FwdTraits<T, N, PT>;
  static_assert(K::SMEM == ssd_fwd_smem_bytes(!K::SPLIT, N, PT), "smem formula out of sync");
  auto kern = ssd_fwd_kernel<T, N, PT, MINB>;
  ensure_max_dynamic_smem(reinterpret_cast<const void*>(kern), K::SMEM);
  dim3 grid(static_cast<unsigned>(p.nheads * (p.headdim / PT)), static_cast<unsigned>(p.nrows));
  kern<<<grid, K::NT, K::SMEM, stream>>>(p);
}

}  // namespace ssd
}  // namespace mlmamba

// One file per input dtype instantiates every (N, PT): N in {16, 32, 64, 128, 256}, PT in {32, 64}.
#define MLM_SSD_FWD_INSTANTIATE(T, SUFFIX)                                                 \
  namespace mlmamba { namespace ssd {                                                      \
  template <int PT>                                                                        \
  static bool fwd_by_n_##SUFFIX(const FwdParams& p, int n, cudaStream_t s) {               \
    switch (n) {                                                                           \
      case 16: launch_fwd_typed<T, 16, PT>(p, s); return true;                             \
      case 32: launch_fwd_typed<T, 32, PT>(p, s); return true;                             \
      case 64: launch_fwd_typed<T, 64, PT>(p, s); return true;                             \
      case 128:                                                                            \
        if (p.one_cta_regs) launch_fwd_typed<T, 128, PT, 1>(p, s);                         \
        else launch_fwd_typed<T, 128, PT, 2>(p, s);                                        \
        return true;                                                                       \
      case 256: launch_fwd_typed<T, 256, PT>(p, s); return true;                           \
      default: return false;                                                               \
    }                                                                                      \
  }                                                                                        \
  bool launch_ssd_fwd_##SUFFIX(const FwdParams& p, int n, int pt, cudaStream_t s) {        \
    return pt == 32 ? fwd_by_n_##SUFFIX<32>(p, n, s) : fwd_by_n_##SUFFIX<64>(p, n, s);     \
  }                                                                                        \
  }}
