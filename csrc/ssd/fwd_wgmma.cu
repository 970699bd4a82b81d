// SSD chunked scan forward on sm_90a warpgroup MMA (wgmma): one CTA = one warpgroup per
// (row, head), headdim 64, bf16 x/B/C, d_state 64 or 128. The default on sm_90 where it
// applies (fwd_ops.cpp); docs/perf-log.md, "ssd_scan forward", has its measurements.
// Per 64-token chunk (the same math as fwd_kernel.cuh):
//   batch 1  M = C B^T and Y = C S_prev^T                          (shared x shared, async)
//            meanwhile warp 0 computes the next chunk's vectors
//   between  M -> decay mask, dt, causal / segment mask, bf16 A fragments (while Y computes);
//            Y *= e_i
//   batch 2  S = decay S + (w o X)^T B (A: X^T scaled by w); Y += M X (A from registers);
//            S (bf16) -> shared for the next chunk's batch 1 while Y += M X computes
//   then     y = Y + D x, * silu(z), stored.
// Tiles: 128-byte-swizzled panels (wgmma.cuh); X, B, C land by cp.async one chunk ahead.
// MSC mode (msc_scan, fwd_msc.cuh): k scans per CTA through their orders, x conv'd in the load.
#include <cuda_runtime.h>

#include "common/device_utils.cuh"
#include "common/launch.h"
#include "ssd/fwd.h"
#include "ssd/fwd_msc.cuh"
#include "ssd/fwd_vectors.cuh"
#include "ssd/tma.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {
namespace {

using bf16 = __nv_bfloat16;
constexpr int Q = kChunk, P = 64, NT = 128;

// MSC adds the raw x rows (single: the conv reads them at the top of the chunk, the next
// chunk's land after it) and three buffers of positions
template <int N, bool MSC>
struct WgLayout {
  static constexpr int NP = N / 64;             // panels of a 64 x N tile
  static constexpr int X_B = Q * P * 2;         // bytes of one X tile
  static constexpr int BC_B = Q * N * 2;        // of one B or C tile
  static constexpr int STAGE_B = X_B + 2 * BC_B;
  static constexpr int S_B = P * N * 2;         // the state, bf16
  static constexpr int S_OFF = 2 * STAGE_B;
  static constexpr int VEC_OFF = S_OFF + S_B;
  static constexpr int D_OFF = VEC_OFF + 2 * kVecBytes;
  static constexpr int BAR_OFF = D_OFF + P * 4;  // two mbarriers (TMA stages)
  static constexpr int RAW_OFF = BAR_OFF + 16;
  static constexpr int ORD_OFF = RAW_OFF + (MSC ? MscRaw<P>::BYTES : 0);
  static constexpr int SMEM = ORD_OFF + (MSC ? 3 * kMscOrd * 4 : 0) + 1024;  // + alignment slack
};

// 16-byte chunks of a 64-row tile, COLS wide, from global rows first.. into the panel layout.
// Thread tid copies column chunk tid % CPR of rows tid / CPR + k RSTEP: RSTEP is a multiple of
// 8, so the swizzle phase is the same for all k and both addresses advance by constants.
template <int COLS>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* base, int64_t rs,
                                          int64_t first, int nvalid, int tid) {
  constexpr int CPR = COLS / 8, RSTEP = NT / CPR;
  static_assert(RSTEP % 8 == 0, "row step must keep the swizzle phase");
  const int r0 = tid / CPR, c = (tid % CPR) * 8;
  const bf16* src = base + (first + r0) * rs + c;
  const uint32_t d = dst + sw128_offset<Q>(r0, c);
#pragma unroll
  for (int k = 0; k < Q / RSTEP; ++k) {
    const bool ok = r0 + k * RSTEP < nvalid;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d + k * RSTEP * 128),
                 "l"(ok ? src + k * RSTEP * rs : base), "r"(ok ? 16 : 0));
  }
}

// The same, rows at positions pos[r] (< 0: zeros): the MSC mode's B and C.
template <int COLS>
__device__ __forceinline__ void load_tile_at(uint32_t dst, const bf16* base, int64_t rs,
                                             const int* pos, int tid) {
  constexpr int CPR = COLS / 8, RSTEP = NT / CPR;
  const int r0 = tid / CPR, c = (tid % CPR) * 8;
  const uint32_t d = dst + sw128_offset<Q>(r0, c);
#pragma unroll
  for (int k = 0; k < Q / RSTEP; ++k) {
    const int ps = pos[r0 + k * RSTEP];
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d + k * RSTEP * 128),
                 "l"(ps >= 0 ? base + ps * rs + c : base), "r"(ps >= 0 ? 16 : 0));
  }
}

// K-major operand tile (64 rows): k-step s of 16 columns; MN-major: rows 16 s of panel 0
__device__ __forceinline__ uint64_t desc_k(const unsigned char* t, int s) {
  return wgmma_desc(t + (s >> 2) * (Q * 128) + (s & 3) * 32, 16, 1024);
}
__device__ __forceinline__ uint64_t desc_mn(const unsigned char* t, int s) {
  return wgmma_desc(t + s * 16 * 128, Q * 128, 1024);
}

// SO (state only): the segment end state alone (fwd_split.cpp, step 1): no C, no outputs.
// MSC: the k scans of msc_scan (fwd_msc.cuh) one after another, y merged in the epilogue.
template <int N, bool SO, bool MSC>
__global__ void __launch_bounds__(NT, 1) ssd_fwd_wgmma_kernel(const __grid_constant__ FwdParams p) {
  using Lt = WgLayout<N, MSC>;
  constexpr int NP = Lt::NP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // 1024-byte aligned by offsetting the array itself: accesses stay in the shared window
  // (LDS / STS), which casting through an integer address would lose (generic LD / ST)
  unsigned char* sm = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  auto Xs = [&](int b) { return sm + b * Lt::STAGE_B; };
  auto Bs = [&](int b) { return sm + b * Lt::STAGE_B + Lt::X_B; };
  auto Cs = [&](int b) { return sm + b * Lt::STAGE_B + Lt::X_B + Lt::BC_B; };
  unsigned char* Ss = sm + Lt::S_OFF;
  unsigned char* vec0 = sm + Lt::VEC_OFF;
  float* Dsm = reinterpret_cast<float*>(sm + Lt::D_OFF);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, row = blockIdx.y, grp = h / p.heads_per_group;
  int64_t bidx = row, tstart = 0, len = p.seqlen;
  if (p.cu_seqlens) {
    bidx = 0;
    tstart = p.cu_seqlens[row];
    len = p.cu_seqlens[row + 1] - tstart;
  }
  if (p.seg_len) {  // row = (batch row, segment) of the sequence split (fwd_split.cpp)
    bidx = row / p.seg_rows;
    tstart = (row % p.seg_rows) * p.seg_len;
    len = p.seqlen - tstart < p.seg_len ? p.seqlen - tstart : p.seg_len;
  }
  const bf16* xg = static_cast<const bf16*>(p.x) + bidx * p.x_b + h * p.x_h;
  const bf16* Bg = static_cast<const bf16*>(p.B) + bidx * p.B_b + grp * p.B_g;
  const bf16* Cg = static_cast<const bf16*>(p.C) + bidx * p.C_b + grp * p.C_g;
  const bool has_D = p.D != nullptr, has_z = p.z != nullptr;
  bf16* out_head = static_cast<bf16*>(p.out) + bidx * p.out_b + h * p.out_h;
  // MSC: the raw x rows, the positions (buffer c % 3 for chunk c), this row of xBC
  unsigned char* rawsm = sm + Lt::RAW_OFF;
  int* ordsm = reinterpret_cast<int*>(sm + Lt::ORD_OFF);
  const bf16* rows = static_cast<const bf16*>(p.x) + bidx * p.x_b;
  // TMA: stage b's tiles complete mbarrier b (initialised before any load is issued)
  const bool tma = !MSC && p.tma;
  const uint32_t bar0 = smem_u32(sm + Lt::BAR_OFF);
  if (tma) {
    if (tid == 0) {
      mbar_init(bar0, 1);
      mbar_init(bar0 + 8, 1);
      mbar_init_fence();
    }
    __syncthreads();
  }

  // state accumulators: warp w holds p rows 16 w + g (+ 8); sacc[np][4 j + e] is column
  // 64 np + 8 j + 2 t + (e & 1) of row 16 w + g + 8 (e >> 1)
  float sacc[NP][32];
  const int nscans = MSC ? p.msc.nscans : 1;
#pragma unroll 1
  for (int sc = 0; sc < nscans; ++sc) {
    if (MSC && sc > 0) __syncthreads();  // scan sc - 1 is done with the buffers and the sums
    const int hs = MSC ? sc * static_cast<int>(p.nheads) + h : h;  // A, D, dt_bias: (k, h) in MSC
    const int* order = MSC ? p.msc.orders + sc * p.seqlen : nullptr;
    const float Ah = p.A[hs];
    const float dtb = p.dt_bias ? p.dt_bias[hs] : 0.f;
    if (tid < P) Dsm[tid] = p.D ? p.D[hs * p.D_h + tid * p.D_p] : 0.f;
    if (!MSC && p.init) {  // staged through stage 0 as fp32 [p][n], 8 loads in flight per thread
      float* st = reinterpret_cast<float*>(Xs(0));
      const int64_t ib = row * p.init_b + h * p.init_h;
      auto stage = [&](auto zero) {
        using T = decltype(zero);
        const T* src = static_cast<const T*>(p.init) + ib;
        constexpr int PER = P * N / NT, BATCH = 8;
#pragma unroll 1
        for (int k0 = 0; k0 < PER; k0 += BATCH) {
          float v[BATCH];
#pragma unroll
          for (int k = 0; k < BATCH; ++k) {
            const int e = tid + (k0 + k) * NT;
            v[k] = static_cast<float>(src[(e / N) * p.init_p + (e % N) * p.init_n]);
          }
#pragma unroll
          for (int k = 0; k < BATCH; ++k) st[tid + (k0 + k) * NT] = v[k];
        }
      };
      const DType it = static_cast<DType>(p.init_dtype);
      if (it == DType::f32) stage(0.f);
      else if (it == DType::bf16) stage(__float2bfloat16(0.f));
      else stage(__float2half(0.f));
      __syncthreads();
#pragma unroll
      for (int np = 0; np < NP; ++np)
#pragma unroll
        for (int i = 0; i < 32; ++i)
          sacc[np][i] = st[(16 * warp + g + 8 * ((i & 3) >> 1)) * N + 64 * np + 8 * (i >> 2) + 2 * t + (i & 1)];
      fence_async_smem();  // the generic stores above, then stage 0's loads (maybe TMA: async proxy)
      __syncthreads();     // stage 0 is overwritten by the first chunk's loads
    } else {
#pragma unroll
      for (int np = 0; np < NP; ++np)
#pragma unroll
        for (int i = 0; i < 32; ++i) sacc[np][i] = 0.f;
    }
    // S (bf16) as a K-major operand, rows p, columns n: stmatrix x4 of n8 blocks 2 jp, 2 jp + 1,
    // rows 16 w.. (+8). Lane l addresses row 16 w + 8 (q & 1) + l % 8 of block 2 jp + (q >> 1)
    // (q = l / 8); its 16-byte chunk index (2 jp + (q >> 1)) ^ (l % 8) is the lane's base
    // chunk with bit 1 flipped by jp: one XOR per store.
    const uint32_t st_base = [&] {
      const int q = lane >> 3, rr = lane & 7;
      return smem_u32(Ss) + (16 * warp + 8 * (q & 1) + rr) * 128 + (((q >> 1) ^ rr) << 4);
    }();
    auto store_state = [&]() {
#pragma unroll
      for (int np = 0; np < NP; ++np)
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          const float* a = sacc[np] + 8 * jp;
          stsm_x4((st_base + np * P * 128) ^ (jp << 5), pack_bf16(a[0], a[1]), pack_bf16(a[2], a[3]),
                  pack_bf16(a[4], a[5]), pack_bf16(a[6], a[7]));
        }
    };
    store_state();

    const int nchunks = static_cast<int>((len + Q - 1) / Q);
    auto issue = [&](int c) {
      if constexpr (MSC) {  // raw x rows; B, C (conv'd per scan) at the chunk's positions
        const int* ord = ordsm + (c % 3) * kMscOrd;
        const int64_t bc = sc * p.msc.bc_s;
        msc_issue_raw<P, NT>(smem_u32(rawsm), ord, rows, p.x_l, h * p.x_h, tid);
        load_tile_at<N>(smem_u32(Bs(c & 1)), Bg + bc, p.B_l, ord + kMscLB, tid);
        load_tile_at<N>(smem_u32(Cs(c & 1)), Cg + bc, p.C_l, ord + kMscLB, tid);
        cp_async_commit();
        return;
      }
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      if (tma) {  // one thread: the stage's boxes, counted in bytes on its mbarrier
        if (tid == 0) {
          const uint32_t bar = bar0 + 8 * (c & 1);
          const int tok = static_cast<int>(tstart + c0), hb = static_cast<int>(bidx);
          mbar_arrive_expect_tx(bar, Lt::X_B + (SO ? 1 : 2) * Lt::BC_B);
          tma_load_4d(smem_u32(Xs(c & 1)), &p.tm_x, 0, tok, h, hb, bar);
#pragma unroll
          for (int np = 0; np < NP; ++np) {
            tma_load_4d(smem_u32(Bs(c & 1)) + np * Q * 128, &p.tm_B, 64 * np, tok, grp, hb, bar);
            if (!SO) tma_load_4d(smem_u32(Cs(c & 1)) + np * Q * 128, &p.tm_C, 64 * np, tok, grp, hb, bar);
          }
        }
        return;
      }
      const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      load_tile<P>(smem_u32(Xs(c & 1)), xg, p.x_l, tstart + c0, nv, tid);
      load_tile<N>(smem_u32(Bs(c & 1)), Bg, p.B_l, tstart + c0, nv, tid);
      if (!SO) load_tile<N>(smem_u32(Cs(c & 1)), Cg, p.C_l, tstart + c0, nv, tid);
      cp_async_commit();
    };
    RawDt raw;
    auto fetch = [&](int64_t c0) {  // warp 0: raw dt (MSC: and positions) of the chunk at c0
      if constexpr (MSC)
        msc_fetch(raw, ordsm + (c0 / Q % 3) * kMscOrd, p, order, bidx, len, h, c0, lane);
      else
        raw.fetch(p, bidx, tstart, len, h, c0, lane);
    };
    auto vectors = [&](int c) {  // warp 0: chunk c's vectors into buffer c & 1, then fetch c + 1
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      chunk_vectors(ChunkVecs(vec0 + (c & 1) * kVecBytes), raw, p, Ah, dtb, c0, nv, lane);
      if (c + 1 < nchunks) fetch(c0 + Q);
    };
    if (nchunks > 0) {
      if (!MSC) issue(0);
      if (warp == 0) {
        fetch(0);
        vectors(0);
      }
      if (MSC) {  // chunk 0's positions -> all threads
        __syncthreads();
        issue(0);
      }
    }

    // X^T scaled by w: the A operand of the state update (k-step s = tokens 16 s ..); k-step s
    // reads rows 16 s..: the same swizzle phase, 2048 bytes further
    auto scaled_xt = [&](uint32_t (&xa)[4][4], const unsigned char* X, const ChunkVecs& cv) {
      const uint32_t xr = smem_u32(X) + sw128_offset<Q>((lane & 7) + (lane >> 4) * 8,
                                                         16 * warp + ((lane >> 3) & 1) * 8);
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
    };
    // S += (w o X)^T B: A = X^T w from registers, B tile N-major, one m64n64 per 64 columns of S
    auto state_update = [&](const uint32_t (&xa)[4][4], const unsigned char* B) {
#pragma unroll
      for (int np = 0; np < NP; ++np)
#pragma unroll
        for (int s = 0; s < 4; ++s)
          wgmma_m64n64_rs<1>(sacc[np], xa[s], desc_mn(B + np * Q * 128, s), true);
    };
    auto decay_state = [&](const ChunkVecs& cv) {
      const float dec = *cv.decay();
#pragma unroll
      for (int np = 0; np < NP; ++np)
#pragma unroll
        for (int i = 0; i < 32; ++i) sacc[np][i] *= dec;
    };

    for (int c = 0; c < nchunks; ++c) {
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      const ChunkVecs cv(vec0 + (c & 1) * kVecBytes);
      unsigned char *X = Xs(c & 1), *B = Bs(c & 1), *C = Cs(c & 1);
      if (tma) mbar_wait(bar0 + 8 * (c & 1), (c >> 1) & 1);  // the (c / 2)-th fill of stage c & 1
      else cp_async_wait<0>();
      if constexpr (MSC) {  // raw x rows of chunk c -> conv + SiLU -> X
        __syncthreads();
        const int64_t cd = p.msc.conv_dim;
        msc_conv_x<P, NT>(X, rawsm, p.msc.conv_w + sc * cd * kMscW,
                          p.msc.conv_b ? p.msc.conv_b + sc * cd : nullptr, h * p.x_h, nvalid, tid);
      }
      fence_async_smem();  // this thread's cp.async and S stores -> the async proxy
      __syncthreads();     // tiles, vectors and S_prev of chunk c visible to all
      if (c + 1 < nchunks) issue(c + 1);

      if constexpr (SO) {  // S = decay S + (w o X)^T B, nothing else
        if (warp == 0 && c + 1 < nchunks) vectors(c + 1);
        uint32_t xa[4][4];
        scaled_xt(xa, X, cv);
        decay_state(cv);
        wgmma_fence();
        state_update(xa, B);
        wgmma_commit();
        wgmma_wait<0>();
        continue;
      }

      // ---- batch 1: M = C B^T, Y = C S_prev^T ----
      float macc[32], yacc[32];
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < N / 16; ++s) wgmma_m64n64_ss<0, 0>(macc, desc_k(C, s), desc_k(B, s), s > 0);
      wgmma_commit();  // group: M
#pragma unroll
      for (int s = 0; s < N / 16; ++s) wgmma_m64n64_ss<0, 0>(yacc, desc_k(C, s), desc_k(Ss, s), s > 0);
      wgmma_commit();  // group: Y; the M mask and X^T w below run while it computes
      if (warp == 0 && c + 1 < nchunks) vectors(c + 1);  // overlaps the tensor cores
      wgmma_wait<1>();

      // ---- M: decay, dt, masks -> A fragments (k-step s = key tokens 16 s ..) ----
      uint32_t ma[4][4];
      {
        const int i0 = 16 * warp + g, i1 = i0 + 8;
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
      uint32_t xa[4][4];
      scaled_xt(xa, X, cv);
      decay_state(cv);
      wgmma_wait<0>();  // Y = C S_prev^T done: scale row i by e_i
      {
        const float e0 = cv.e()[16 * warp + g], e1 = cv.e()[16 * warp + g + 8];
#pragma unroll
        for (int j8 = 0; j8 < 8; ++j8) {
          yacc[4 * j8] *= e0; yacc[4 * j8 + 1] *= e0;
          yacc[4 * j8 + 2] *= e1; yacc[4 * j8 + 3] *= e1;
        }
      }

      // ---- batch 2: Y += M X, S += (w o X)^T B ----
      wgmma_fence();
      state_update(xa, B);
      wgmma_commit();  // group: S
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_m64n64_rs<1>(yacc, ma[s], desc_mn(X, s), true);
      wgmma_commit();  // group: Y
      wgmma_wait<1>();
      store_state();   // S for the next chunk (batch 1, its only reader, is done) while Y computes
      wgmma_wait<0>();

      // ---- epilogue: + D x, * silu(z), store; S for the next chunk ----
      // lane: rows i = 16 w + g (+8), columns 8 j8 + 2 t (+1); the swizzled X row i holds
      // them at byte (i * 128 + 4 t) ^ (((i & 7) ^ j8) << 4), i & 7 = g
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * warp + g + 8 * hf;
        if (i >= nvalid) continue;
        const int64_t tok = tstart + c0 + i;
        float* y = yacc + 2 * hf;  // y[4 j8], y[4 j8 + 1]
        if (has_D) {
          const unsigned char* xrow = X + i * 128 + (g << 4) + 4 * t;
#pragma unroll
          for (int j8 = 0; j8 < 8; ++j8) {
            const float2 xv = unpack_bf16(*reinterpret_cast<const uint32_t*>(
                X + ((xrow - X) ^ (j8 << 4))));
            const float2 dv = *reinterpret_cast<const float2*>(Dsm + 8 * j8 + 2 * t);
            y[4 * j8] = fmaf(dv.x, xv.x, y[4 * j8]);
            y[4 * j8 + 1] = fmaf(dv.y, xv.y, y[4 * j8 + 1]);
          }
        }
        if (has_z) {
          const int64_t zo = bidx * p.z_b + tok * p.z_l + h * p.z_h + 2 * t * p.z_p;
          const DType zt = static_cast<DType>(p.z_dtype);
#pragma unroll
          for (int j8 = 0; j8 < 8; ++j8) {
            y[4 * j8] *= silu(load_as_float(p.z, zo + 8 * j8 * p.z_p, zt));
            y[4 * j8 + 1] *= silu(load_as_float(p.z, zo + (8 * j8 + 1) * p.z_p, zt));
          }
        }
        if constexpr (MSC) {
          msc_store(y, ordsm[(c % 3) * kMscOrd + kMscLB + i], sc, nscans, bidx, h, t, p);
          continue;
        }
        bf16* o = out_head + tok * p.out_l + 2 * t;
#pragma unroll
        for (int j8 = 0; j8 < 8; ++j8)
          *reinterpret_cast<__nv_bfloat162*>(o + 8 * j8) = __floats2bfloat162_rn(y[4 * j8], y[4 * j8 + 1]);
      }
    }
  }  // scans

  if (!MSC && p.final_states) {
    float* f = p.final_states + (static_cast<int64_t>(row) * p.nheads + h) * P * N;
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int pr = 16 * warp + g + 8 * hf, nc = 64 * np + 8 * j + 2 * t;
          *reinterpret_cast<float2*>(f + static_cast<int64_t>(pr) * N + nc) =
              make_float2(sacc[np][4 * j + 2 * hf], sacc[np][4 * j + 2 * hf + 1]);
        }
  }
}

template <int N, bool SO, bool MSC = false>
const char* launch_n(const FwdParams& p, cudaStream_t stream) {
  auto kern = ssd_fwd_wgmma_kernel<N, SO, MSC>;
  // the image check once per process; the shared-memory limit once per device (launch.h)
  static const char* const image = [kern]() -> const char* {
    cudaFuncAttributes attr;
    const char* why = nullptr;
    if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess) why = "no sm_90a kernel image in this build";
    else if (attr.binaryVersion != 90) why = "the kernel image is not for sm_90";
    if (why) cudaGetLastError();  // not sticky: clear it, the caller falls back or reports
    return why;
  }();
  if (image) return image;
  constexpr int smem = WgLayout<N, MSC>::SMEM;
  if (ensure_max_dynamic_smem(reinterpret_cast<const void*>(kern), smem) != cudaSuccess) {
    cudaGetLastError();
    return "cannot reserve its shared memory";
  }
  dim3 grid(static_cast<unsigned>(p.nheads), static_cast<unsigned>(p.nrows));
  kern<<<grid, NT, smem, stream>>>(p);
  return nullptr;
}

}  // namespace

const char* launch_ssd_fwd_wgmma(const FwdParams& p, int dstate, cudaStream_t stream,
                                 bool state_only) {
  if (p.headdim != P) return "headdim must be 64";
  if (!p.vec_loads) return "x, B and C rows must be 16-byte aligned";
  if (dstate == 64) return state_only ? launch_n<64, true>(p, stream) : launch_n<64, false>(p, stream);
  if (dstate == 128) return state_only ? launch_n<128, true>(p, stream) : launch_n<128, false>(p, stream);
  return "dstate must be 64 or 128";
}

const char* launch_msc_fwd_wgmma(const FwdParams& p, int dstate, cudaStream_t stream) {
  if (p.headdim != P) return "headdim must be 64";
  if (dstate == 64) return launch_n<64, false, true>(p, stream);
  if (dstate == 128) return launch_n<128, false, true>(p, stream);
  return "dstate must be 64 or 128";
}

}  // namespace ssd
}  // namespace mlmamba
