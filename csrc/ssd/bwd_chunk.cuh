// SSD backward, step 2: every gradient of one chunk (kQ = 64 steps) for the heads of one
// (group, head split), given the chunk's incoming state S_prev and the adjoint G_next arriving
// at its end (step 1). Notation of /work/shared/ssd-math.md; L_ij = exp(lam_i - lam_j) for
// j <= i in one segment, CB_ij = C_i . B_j, W_ij = dy_i . x_j, per head:
//   u_j   = G_j B_j = sum_i L_ij CB_ij dy_i + sout_j G_next B_j       dx_j = dt_j u_j + D dy_j
//   dB_j  = dt_j [ sum_i L_ij W_ij C_i + sout_j G_next^T x_j ]        (summed over heads)
//   dC_i  = sum_j L_ij W_ij dt_j B_j + sin_i S_prev^T dy_i            (summed over heads)
//   lam-gradient (all exponents <= 0):
//   l_t   = sum_{i>=t, j<t} M_ij + sum_{i>=t} sin_i dy_i.(S_prev C_i) + cont <G_next, S_prev>
//           + sum_{j<t} dt_j sout_j x_j.(G_next B_j),     M_ij = L_ij CB_ij dt_j W_ij
//   ddt_t = x_t . u_t + A l_t,   dA = sum_t dt_t l_t
// 8 warps: warp w owns rows 16*(w/2).. of every 64-row product and half (w%2) of its columns.
//
// dB/dC partial sums over the split's heads (kOnChip, the default where it fits):
// kept in fp32 shared memory across the head loop, in the mma accumulator layout (each thread
// reads and writes only its own 16 values per 64-column block: float4 accesses, no bank
// conflicts, no barrier), and written to the workspace once per CTA. They take 2 x 64 x npad
// x 4 B = 64 KB at n = 128, which does not fit beside two 8-warp CTAs per SM (112 KB each) and
// does not fit in registers either (64 more per thread at a 128-register cap). So for
// headdim <= 64 one CTA runs two groups of 8 warps (512 threads, the same 16 warps per SM as
// two CTAs before) that take alternate heads of the split, each with its own x/dy/T1/T2/S/G
// tiles and named barriers, sharing the B/C tiles and the partials. The heads are added in
// head order (fixed, deterministic: the same sums as the global path): before adding head k
// into a 64-column block, a group waits on a named barrier that the other group arrives at
// after adding head k-1 there. The fp32 CB tile (17 KB) is recomputed in registers per head
// (32 mma per warp, bitwise the same values) to make room. headdim 128 runs one group per
// CTA (its tiles are twice as large); where even that does not fit (large n), the partials
// go through the global workspace per head as before (kOnChip = false).
//
// Prefetch: a group's next head's dt and x/dy (staged in Sb/Gb, dead between phase 2 and the
// next phase 0) and the head's first S/G block arrive by cp.async while it computes (details at
// issue_a / issue_b in the kernel); the arithmetic is that of the plain loads, bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

#include "common/launch.h"
#include "ssd/bwd_common.cuh"

namespace mlmamba {
namespace ssd_bwd {

constexpr int kThreads = 256;
constexpr int kLdQ = kQ + 8;   // pitch of 64-wide bf16 tiles
constexpr int kLdCB = kQ + 4;  // pitch of the fp32 CB tile

// warp groups per CTA: two for the on-chip partials at headdim <= 64 (see the top)
template <int kP, bool kOnChip>
constexpr int chunk_groups() { return kOnChip && kP <= 64 ? 2 : 1; }

template <int kP, bool kOnChip>
struct ChunkSmem {
  static constexpr int ldp = kP + 8;
  static constexpr int kGroups = chunk_groups<kP, kOnChip>();
  // per group: Xs, Ds [kQ][ldp], T1, T2 [kQ][kLdQ], Sb, Gb [kP][kLdQ] (bf16 elements)
  static constexpr size_t group_elems = 2 * kQ * ldp + 2 * kQ * kLdQ + 2 * kP * kLdQ;
  // Sb/Gb also stage the next head's x and dy (2 x kQ x kP, unpadded) between phases 2 and 0
  static_assert(2 * kQ * kP <= 2 * kP * kLdQ, "x/dy staging does not fit in Sb/Gb");
  static size_t bytes(int npad) {
    const size_t ldn = npad + 8;
    return sizeof(bf16) * (2 * kQ * ldn + kGroups * group_elems) +
           (kOnChip ? sizeof(float) * 2 * kQ * npad      // dB, dC partials
                    : sizeof(float) * kQ * kLdCB);       // CB
  }
};

// named barriers: 0 = __syncthreads, 1 + g = group g, kBarHand + 2 * block + g = "group g may
// add its head into 64-column block `block`" (ids up to 10 for npad <= 256)
constexpr int kBarHand = 3;
__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}
template <int kGroups>
__device__ __forceinline__ void group_sync(int gid) {
  if (kGroups == 1) __syncthreads();
  else bar_sync(1 + gid, kThreads);
}

// on-chip partials: float4 slot ((block * 2 + which) * 4 + t) * kThreads + tid holds acc[t][0..3]
__device__ __forceinline__ void onchip_add(float4* part, const float (&acc)[4][4], int blk,
                                           int which, int tid, bool first) {
  float4* q = part + (blk * 2 + which) * 4 * kThreads + tid;
  float4 prev[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) prev[t] = first ? make_float4(0.f, 0.f, 0.f, 0.f) : q[t * kThreads];
#pragma unroll
  for (int t = 0; t < 4; ++t)
    q[t * kThreads] = make_float4(acc[t][0] + prev[t].x, acc[t][1] + prev[t].y,
                                  acc[t][2] + prev[t].z, acc[t][3] + prev[t].w);
}

// v unchanged, but opaque to the compiler: the prefetch addresses below are rebuilt at the
// issue point instead of being hoisted out of the head loop (live registers across phase 2/3)
__device__ __forceinline__ int opaque(int v) {
  asm volatile("" : "+r"(v));
  return v;
}
__device__ __forceinline__ int64_t opaque(int64_t v) {
  asm volatile("" : "+l"(v));
  return v;
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, int64_t i, float v0, float v1, bool two) {
  p[i] = from_f<T>(v0);
  if (two) p[i + 1] = from_f<T>(v1);
}

// dst rows (r0, r0 + 8) += acc: the split's running sum over heads (the first head stores).
// A row's four previous values (written by this thread one head earlier, so in L1) are loaded
// before its stores: one round trip per row instead of one per pair.
__device__ __forceinline__ void add_partial(float* ws, const float (&acc)[4][4], int bb, int64_t t0,
                                            int qc, int r0, int split, int gg, int col, int npad,
                                            const Params& P, bool first) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = r0 + 8 * hf;
    if (j >= qc) continue;
    float2* dst = reinterpret_cast<float2*>(
        ws + (((int64_t(bb) * P.l + t0 + j) * P.nsplit + split) * P.g + gg) * npad + col);
    float2 prev[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) prev[t] = first ? make_float2(0.f, 0.f) : dst[t * 4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
      dst[t * 4] = make_float2(acc[t][2 * hf] + prev[t].x, acc[t][2 * hf + 1] + prev[t].y);
  }
}

template <typename T, int kP, bool kOnChip>
__global__ void __launch_bounds__(kThreads * chunk_groups<kP, kOnChip>(),
                                  (kP >= 128 || kOnChip) ? 1 : 2) chunk_kernel(Params P) {
  constexpr int LDP = kP + 8;
  constexpr int NTP = kP / 16;  // 8-column tiles per warp in the p-wide products
  constexpr int kGroups = chunk_groups<kP, kOnChip>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ ChunkVec cv_g[kGroups];
  __shared__ float rowpart_g[kGroups][2][kQ], colpart_g[kGroups][4][kQ], t2part_g[kGroups][2][kQ],
      t4part_g[kGroups][2][kQ], dinpart_g[kGroups][2][kQ];
  __shared__ float dDw_g[kGroups][kThreads / 32][kP];
  __shared__ float red_g[kGroups][kThreads / 32];
  __shared__ uint32_t dtw_g[kGroups][kQ];  // the group's next head's dt words (cp.async)

  const ChunkPos cp = chunk_pos(P);
  if (!cp.valid) return;
  // gid: warp group (alternate heads); tid, warp: the thread's place inside its group
  const int gid = kGroups == 1 ? 0 : int(threadIdx.x) / kThreads;
  ChunkVec& cv = cv_g[gid];
  float(&rowpart)[2][kQ] = rowpart_g[gid];
  float(&colpart)[4][kQ] = colpart_g[gid];
  float(&t2part)[2][kQ] = t2part_g[gid];
  float(&t4part)[2][kQ] = t4part_g[gid];
  float(&dinpart)[2][kQ] = dinpart_g[gid];
  float(&dDw)[kThreads / 32][kP] = dDw_g[gid];
  float(&red)[kThreads / 32] = red_g[gid];
  uint32_t* dtw = dtw_g[gid];
  const int npad = P.npad, LDN = npad + 8;
  bf16* Bs = reinterpret_cast<bf16*>(smem_raw);  // [j][n]
  bf16* Cs = Bs + kQ * LDN;                       // [i][n]
  bf16* Xs = Cs + kQ * LDN + gid * ChunkSmem<kP, kOnChip>::group_elems;  // [t][p]
  bf16* Ds = Xs + kQ * LDP;                       // [t][p] dy
  bf16* T1 = Ds + kQ * LDP;                       // [j][i] L.CB
  bf16* T2 = T1 + kQ * kLdQ;                      // [j][i] dt_j L.W
  bf16* Sb = T2 + kQ * kLdQ;                      // [p][n] S_prev block
  bf16* Gb = Sb + kP * kLdQ;                      // [p][n] G_next block
  // after the groups' tiles: CB [i][j] (global partials) or the dB/dC partials (on chip)
  float* after = reinterpret_cast<float*>(Cs + kQ * LDN + kGroups * ChunkSmem<kP, kOnChip>::group_elems);
  float* CB = after;
  float4* part = reinterpret_cast<float4*>(after);

  const int tid = kGroups == 1 ? int(threadIdx.x) : int(threadIdx.x) % kThreads;
  const int warp = tid >> 5, lane = tid & 31;
  const int rw = warp >> 1, cw = warp & 1;
  const int r = lane >> 2, c2 = 2 * (lane & 3);
  const int m0 = rw * 16;  // first row of this warp
  const int gg = blockIdx.z / P.nsplit, split = blockIdx.z % P.nsplit;
  const int hbeg = gg * P.hpg + split * P.hsplit;
  const int hend = min(hbeg + P.hsplit, (gg + 1) * P.hpg);
  const int bb = cp.bb, qc = cp.qc, slot = cp.slot;
  const int64_t t0 = cp.t0;
  const int nh = hend - hbeg;

  // ---- prefetch (cp.async) of a head's inputs while the group computes ----
  // Shared memory at p64 n128 (219 KB per CTA, limit 227 KB) has no room for a second set of
  // x/dy or S/G tiles (18 KB per group each), so the prefetch borrows Sb/Gb, which are dead
  // from the end of phase 2 to the next head's phase 0. Per thread, two commit groups per head:
  //   A(hn): dt words of head hn (warp 0) and, where pfx, x and dy of hn staged unpadded in
  //          Sb/Gb (each thread stages the 16-byte words it converts itself in phase 0);
  //          issued after phase 2 of the group's previous head (or before the B/C loads)
  //   B(hn): S_prev / G_next of state columns 0..63 into Sb/Gb, issued once phase 0 of hn has
  //          read the staged x/dy out (after its barrier): lands during phase 1
  // Phase 0 waits for A, the first block of phase 2 for B (wait_group 0 both: one group is in
  // flight at a time). Columns 64.. (n > 64) are still loaded at their block in phase 2. x/dy go
  // by cp.async only where the staged words are the raw tile (bf16, rows contiguous and 16-byte
  // aligned, no z, p % 8 == 0); otherwise phase 0 loads them as before.
  // (re-evaluated from the parameters at each use: not a predicate held across the loop)
  auto pfx_on = [&]() -> bool {
    if constexpr (std::is_same<T, bf16>::value)
      return opaque(int(P.vec_x && P.vec_o && !P.has_z && P.p % 8 == 0)) != 0;
    return false;
  };
  auto issue_a = [&](int hn) {
    const int tid_ = opaque(tid), bb_ = opaque(bb), qc_ = opaque(qc);
    const int64_t t0_ = opaque(t0);
    if (warp == 0) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int i = 2 * (tid_ & 31) + u;
        if (i < qc_)
          cp_async4(dtw + i, dt_word_src(P, bb_ * P.dt_sb + (t0_ + i) * P.dt_sl + hn * P.dt_sh));
      }
    }
    if (pfx_on()) {
      constexpr int G8 = kP / 8, NG = kQ * G8 / kThreads;
#pragma unroll
      for (int u = 0; u < NG; ++u) {
        const int q = tid_ + kThreads * u, i = q / G8, c8 = (q % G8) * 8;
        const int64_t t = t0_ + i;
        const bool ok = i < qc_ && c8 < P.p;
        const bf16* xsrc = static_cast<const bf16*>(P.x);
        const bf16* osrc = static_cast<const bf16*>(P.dout);
        if (ok) {
          xsrc += bb_ * P.x_sb + t * P.x_sl + hn * P.x_sh + c8 * P.x_sp;
          osrc += bb_ * P.o_sb + t * P.o_sl + hn * P.o_sh + c8 * P.o_sp;
        }
        cp_async16(Sb + q * 8, xsrc, ok ? 16 : 0);
        cp_async16(Sb + kQ * kP + q * 8, osrc, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };
  auto issue_b = [&](int hn) {
    constexpr int NV = kP * (kNB / 8) / kThreads;
    const int tid_ = opaque(tid);
    const int64_t base = (int64_t(opaque(slot)) * P.h + hn) * P.p * npad;
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      const int e = tid_ + kThreads * u, pp = e >> 3, q = e & 7;
      const bool ok = pp < P.p;
      const int64_t off = ok ? base + int64_t(pp) * npad + q * 8 : 0;
      cp_async16(Sb + pp * kLdQ + q * 8, static_cast<const bf16*>(P.wsS) + off, ok ? 16 : 0);
      cp_async16(Gb + pp * kLdQ + q * 8, static_cast<const bf16*>(P.wsG) + off, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  if (gid < nh) issue_a(hbeg + gid);

  // ---- B, C tiles of the group and CB = C B^T ----
  for (int e = threadIdx.x; e < kQ * npad; e += kThreads * kGroups) {
    const int i = e / npad, nn = e % npad;
    float bv = 0.f, cvv = 0.f;
    if (i < qc && nn < P.n) {
      const int64_t t = t0 + i;
      bv = ldg_f<T>(P.B, bb * P.B_sb + t * P.B_sl + gg * P.B_sg + nn * P.B_sn);
      cvv = ldg_f<T>(P.C, bb * P.C_sb + t * P.C_sl + gg * P.C_sg + nn * P.C_sn);
    }
    Bs[i * LDN + nn] = __float2bfloat16_rn(bv);
    Cs[i * LDN + nn] = __float2bfloat16_rn(cvv);
  }
  __syncthreads();
  const bool qq_on = !(rw == 0 && cw == 1);  // 16x32 tiles of a 64x64 lower triangle
  // CB = C B^T in this warp's 16x32 tile (the phase-1 layout), fp32
  auto cb_tile = [&](float (&acc)[4][4]) {
    for (int kk = 0; kk < npad / 16; ++kk) {
      uint32_t a[4];
      frag_a(a, Cs, LDN, m0, kk * 16);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        uint32_t b0, b1;
        frag_b_nk(b0, b1, Bs, LDN, cw * 32 + t * 8, kk * 16);
        mma_bf16(acc[t], a, b0, b1);
      }
    }
  };
  if (!kOnChip && qq_on) {
    float acc[4][4] = {};
    cb_tile(acc);
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        *reinterpret_cast<float2*>(CB + (m0 + r + 8 * hf) * kLdCB + cw * 32 + t * 8 + c2) =
            make_float2(acc[t][2 * hf], acc[t][2 * hf + 1]);
  }

  for (int k = gid; k < nh; k += kGroups) {
    const int hh = hbeg + k;
    // ---- phase 0: chunk vectors, x and dy tiles, dD partials ----
    cp_async_wait<0>();  // A(hh): dt words, x/dy (pfx)
    if (warp == 0) {
      DtRaw d;
      fetch_dt(P, d, bb, t0, qc, cp.first, hh, dtw);
      chunk_vectors_from(P, cv, d, qc, hh, ld_code(P.A, P.A_code, hh * P.A_s));
    }
    {
      // thread owns 8-column groups q = tid + 256 k: row q / (kP/8), columns 8 (q % (kP/8)) ..
      constexpr int G8 = kP / 8, NG = kQ * G8 / kThreads;
      float dd[8] = {};
      bool loaded = false;
      // dx starts as D * dy (exact inputs) for row i, columns c8..; phase 3 adds dt * u
      auto dx_from_D = [&](int i, int c8, const float (&dv)[8]) {
        if (!P.has_D || i >= qc) return;
        const int64_t o = ((int64_t(bb) * P.l + t0 + i) * P.h + hh) * P.p;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (c8 + e < P.p)
            static_cast<T*>(P.dx)[o + c8 + e] =
                from_f<T>(ld_code(P.D, P.D_code, hh * P.D_sh + (c8 + e) * P.D_sp) * dv[e]);
      };
      if constexpr (std::is_same<T, bf16>::value) {
        if (pfx_on()) {
          // x/dy staged by cp.async in Sb/Gb (this thread's own 16-byte words, zero where
          // masked): the same values, arithmetic and order as the load path below
#pragma unroll
          for (int u = 0; u < NG; ++u) {
            const int q = tid + kThreads * u, i = q / G8, c8 = (q % G8) * 8;
            const uint4 xw = *reinterpret_cast<const uint4*>(Sb + q * 8);
            const uint4 dw = *reinterpret_cast<const uint4*>(Sb + kQ * kP + q * 8);
            const uint32_t xa[4] = {xw.x, xw.y, xw.z, xw.w}, da[4] = {dw.x, dw.y, dw.z, dw.w};
            float xv[8], dv[8];
#pragma unroll
            for (int z = 0; z < 4; ++z) {
              const float2 xf = unpack_bf16(xa[z]), df = unpack_bf16(da[z]);
              xv[2 * z] = xf.x; xv[2 * z + 1] = xf.y;
              dv[2 * z] = df.x; dv[2 * z + 1] = df.y;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) dd[e] += xv[e] * dv[e];
            st_bf16x8(Xs + i * LDP + c8, xv);
            st_bf16x8(Ds + i * LDP + c8, dv);
            dx_from_D(i, c8, dv);
          }
          loaded = true;
        }
      }
      if (!loaded) {
        Vec8<T> xr[NG], orr[NG], zr[NG];
#pragma unroll
        for (int u = 0; u < NG; ++u) {
          const int q = tid + kThreads * u, i = q / G8, c8 = (q % G8) * 8;
          const int64_t t = t0 + i;
          const int pc = max(0, min(8, P.p - c8));
          if (i >= qc) {
            xr[u].zero(); orr[u].zero(); zr[u].zero();
            continue;
          }
          xr[u].load(P.x, bb * P.x_sb + t * P.x_sl + hh * P.x_sh + c8 * P.x_sp, P.x_sp, pc, P.vec_x);
          orr[u].load(P.dout, bb * P.o_sb + t * P.o_sl + hh * P.o_sh + c8 * P.o_sp, P.o_sp, pc,
                      P.vec_o);
          if (P.has_z)
            zr[u].load(P.z, bb * P.z_sb + t * P.z_sl + hh * P.z_sh + c8 * P.z_sp, P.z_sp, pc,
                       P.vec_z);
        }
#pragma unroll
        for (int u = 0; u < NG; ++u) {
          const int q = tid + kThreads * u, i = q / G8, c8 = (q % G8) * 8;
          float xv[8], dv[8];
          const bool row_ok = i < qc;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const bool ok = row_ok && c8 + e < P.p;
            xv[e] = ok ? xr[u].get(e) : 0.f;
            dv[e] = ok ? orr[u].get(e) : 0.f;
            if (P.has_z && ok) dv[e] *= silu_f(zr[u].get(e));
            dd[e] += xv[e] * dv[e];
          }
          st_bf16x8(Xs + i * LDP + c8, xv);
          st_bf16x8(Ds + i * LDP + c8, dv);
          dx_from_D(i, c8, dv);
        }
      }  // !loaded
      // dD: reduce over the lanes that own the same columns, then per warp
#pragma unroll
      for (int e = 0; e < 8; ++e) {
#pragma unroll
        for (int o = G8; o < 32; o <<= 1) dd[e] += __shfl_xor_sync(0xffffffffu, dd[e], o);
      }
      if (lane < G8 && lane < 32) {
#pragma unroll
        for (int e = 0; e < 8; ++e) dDw[warp][lane * 8 + e] = dd[e];
      }
    }
    group_sync<kGroups>(gid);
    // B(hh): the staged x/dy are read out; S/G columns 0..63 land in Sb/Gb during phase 1
    issue_b(hh);

    // ---- phase 1: W = dy x^T, the masked tiles T1, T2 and the strict sums of M ----
    {
      float w[4][4] = {}, cbr[4][4];
      if constexpr (kOnChip) {
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) cbr[t][e] = 0.f;
        if (qq_on) cb_tile(cbr);
      }
      if (qq_on) {
#pragma unroll
        for (int kk = 0; kk < kP / 16; ++kk) {
          uint32_t a[4];
          frag_a(a, Ds, LDP, m0, kk * 16);
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            uint32_t b0, b1;
            frag_b_nk(b0, b1, Xs, LDP, cw * 32 + t * 8, kk * 16);
            mma_bf16(w[t], a, b0, b1);
          }
        }
      }
      float rs[2] = {0.f, 0.f};
      float cs[4][2] = {};
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = m0 + r + (e >> 1) * 8, j = cw * 32 + t * 8 + c2 + (e & 1);
          // the decay computed on every element and the masked ones selected to 0 (a branch
          // around it made each element its own basic block: serial exp latencies)
          const bool on = (j <= i) & (cv.seg[i] == cv.seg[j]);  // both read: no branch
          const float l = expf_kept(on ? cv.lam[i] - cv.lam[j] : 0.f);
          const float lcb = on ? l * (kOnChip ? cbr[t][e] : CB[i * kLdCB + j]) : 0.f;
          const float lw = on ? l * w[t][e] : 0.f;
          const float dtj = cv.dt[j];
          T1[j * kLdQ + i] = __float2bfloat16_rn(lcb);
          T2[j * kLdQ + i] = __float2bfloat16_rn(dtj * lw);
          if (j < i) {
            const float m = lcb * w[t][e] * dtj;
            rs[e >> 1] += m;
            cs[t][e & 1] += m;
          }
        }
      // rows: reduce over the 4 lanes of a quad
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v = rs[hf];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if ((lane & 3) == 0) rowpart[cw][m0 + r + 8 * hf] = v;
      }
      // columns: reduce over the 8 row groups
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float v = cs[t][q];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (lane < 4) colpart[rw][cw * 32 + t * 8 + c2 + q] = v;
        }
    }

    // ---- phase 2: per 64-column block of the state: u, v (= C S_prev^T), dB, dC ----
    float u[NTP][4] = {}, v[NTP][4] = {};
    float gs = 0.f;  // <G_next, S_prev> partial
    const int64_t wsbase = (int64_t(slot) * P.h + hh) * P.p * npad;
    const bool first_head = k == 0;
    const float sin_lo = cv.sin[m0 + r], sin_hi = cv.sin[m0 + r + 8];
    for (int nb = 0; nb < npad; nb += kNB) {
      const int blk = nb / kNB;
      {
        constexpr int NV = kP * (kNB / 8) / kThreads;
        uint4 sv[NV], gv[NV];
        if (blk == 0) {
          // columns 0..63 landed by cp.async (B(hh)): this thread's own words, for gs
          cp_async_wait<0>();
#pragma unroll
          for (int u = 0; u < NV; ++u) {
            const int e = tid + kThreads * u, pp = e >> 3, q = e & 7;
            sv[u] = *reinterpret_cast<const uint4*>(Sb + pp * kLdQ + q * 8);
            gv[u] = *reinterpret_cast<const uint4*>(Gb + pp * kLdQ + q * 8);
          }
        } else {
          group_sync<kGroups>(gid);  // the previous block's Sb/Gb reads are done
#pragma unroll
          for (int u = 0; u < NV; ++u) {
            const int e = tid + kThreads * u, pp = e >> 3, q = e & 7;
            sv[u] = gv[u] = make_uint4(0, 0, 0, 0);
            if (pp < P.p) {
              const int64_t off = wsbase + int64_t(pp) * npad + nb + q * 8;
              sv[u] = __ldg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(P.wsS) + off));
              gv[u] = __ldg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(P.wsG) + off));
            }
          }
        }
#pragma unroll
        for (int u = 0; u < NV; ++u) {
          const int e = tid + kThreads * u, pp = e >> 3, q = e & 7;
          const uint32_t* s4 = reinterpret_cast<const uint32_t*>(&sv[u]);
          const uint32_t* g4 = reinterpret_cast<const uint32_t*>(&gv[u]);
#pragma unroll
          for (int z = 0; z < 4; ++z) {
            const float2 a = unpack_bf16(s4[z]), b = unpack_bf16(g4[z]);
            gs += a.x * b.x + a.y * b.y;
          }
          if (blk != 0) {
            *reinterpret_cast<uint4*>(Sb + pp * kLdQ + q * 8) = sv[u];
            *reinterpret_cast<uint4*>(Gb + pp * kLdQ + q * 8) = gv[u];
          }
        }
      }
      group_sync<kGroups>(gid);  // T1/T2 (phase 1) and Sb/Gb written
#pragma unroll
      for (int kk = 0; kk < kNB / 16; ++kk) {
        uint32_t ab[4], ac[4];
        frag_a(ab, Bs, LDN, m0, nb + kk * 16);
        frag_a(ac, Cs, LDN, m0, nb + kk * 16);
#pragma unroll
        for (int t = 0; t < NTP; ++t) {
          uint32_t b0, b1;
          const int pc = cw * (kP / 2) + t * 8;
          frag_b_nk(b0, b1, Gb, kLdQ, pc, kk * 16);
          mma_bf16(u[t], ab, b0, b1);
          frag_b_nk(b0, b1, Sb, kLdQ, pc, kk * 16);
          mma_bf16(v[t], ac, b0, b1);
        }
      }
      // dB rows j: intra (T2 [j][i] times C) + state (dt sout x times G_next)
      {
        float acc[4][4] = {};
        for (int kk = rw; kk < kQ / 16; ++kk) {
          uint32_t a[4];
          frag_a(a, T2, kLdQ, m0, kk * 16);
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            uint32_t b0, b1;
            frag_b_kn(b0, b1, Cs, LDN, nb + cw * 32 + t * 8, kk * 16);
            mma_bf16(acc[t], a, b0, b1);
          }
        }
        const float so_lo = cv.dt[m0 + r] * cv.sout[m0 + r];
        const float so_hi = cv.dt[m0 + r + 8] * cv.sout[m0 + r + 8];
#pragma unroll
        for (int kk = 0; kk < kP / 16; ++kk) {
          uint32_t a[4];
          frag_a_rs(a, Xs, LDP, m0, kk * 16, so_lo, so_hi);
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            uint32_t b0, b1;
            frag_b_kn(b0, b1, Gb, kLdQ, cw * 32 + t * 8, kk * 16);
            mma_bf16(acc[t], a, b0, b1);
          }
        }
        if constexpr (kOnChip) {
          // head k - 1 (the other group) has added its share into this block
          if (kGroups == 2 && k > 0) bar_sync(kBarHand + 2 * blk + gid, 2 * kThreads);
          onchip_add(part, acc, blk, 0, tid, first_head);
        } else {
          add_partial(P.wsdB, acc, bb, t0, qc, m0 + r, split, gg, nb + cw * 32 + c2, npad, P,
                      first_head);
        }
      }
      // dC rows i: intra (T2^T times B) + state (sin dy times S_prev)
      {
        float acc[4][4] = {};
        for (int kk = 0; kk <= rw; ++kk) {
          uint32_t a[4];
          frag_a_t(a, T2, kLdQ, m0, kk * 16);
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            uint32_t b0, b1;
            frag_b_kn(b0, b1, Bs, LDN, nb + cw * 32 + t * 8, kk * 16);
            mma_bf16(acc[t], a, b0, b1);
          }
        }
#pragma unroll
        for (int kk = 0; kk < kP / 16; ++kk) {
          uint32_t a[4];
          frag_a_rs(a, Ds, LDP, m0, kk * 16, sin_lo, sin_hi);
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            uint32_t b0, b1;
            frag_b_kn(b0, b1, Sb, kLdQ, cw * 32 + t * 8, kk * 16);
            mma_bf16(acc[t], a, b0, b1);
          }
        }
        if constexpr (kOnChip) {
          onchip_add(part, acc, blk, 1, tid, first_head);
          if (kGroups == 2 && k + 1 < nh) {
            __threadfence_block();
            bar_arrive(kBarHand + 2 * blk + (gid ^ 1), 2 * kThreads);  // head k + 1 may add
          }
        } else {
          add_partial(P.wsdC, acc, bb, t0, qc, m0 + r, split, gg, nb + cw * 32 + c2, npad, P,
                      first_head);
        }
      }
    }

    // A(next head): dt words, and x/dy staged in Sb/Gb once every warp of the group is done
    // reading them (the barrier is only needed for x/dy, but kept unconditional: a predicate
    // held across the loop costs registers)
    if (k + kGroups < nh) {
      group_sync<kGroups>(gid);
      issue_a(hh + kGroups);
    }

    // ---- phase 3: u (-> dx, ddt input term), v (-> state-in lambda term, y for dz) ----
    {
      const int jl = m0 + r, jh = m0 + r + 8;
      const float sol = cv.sout[jl], soh = cv.sout[jh];
      float t4[2] = {0.f, 0.f}, t2[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < NTP; ++t) {
        const int pc = cw * (kP / 2) + t * 8 + c2;
        u[t][0] *= sol; u[t][1] *= sol; u[t][2] *= soh; u[t][3] *= soh;
        const float2 xl = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Xs + jl * LDP + pc));
        const float2 xh = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Xs + jh * LDP + pc));
        t4[0] += xl.x * u[t][0] + xl.y * u[t][1];
        t4[1] += xh.x * u[t][2] + xh.y * u[t][3];
        const float2 yl = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Ds + jl * LDP + pc));
        const float2 yh = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Ds + jh * LDP + pc));
        t2[0] += yl.x * v[t][0] + yl.y * v[t][1];
        t2[1] += yh.x * v[t][2] + yh.y * v[t][3];
      }
      // intra part of u: sum_i L_ij CB_ij dy_i  (T1[j][i], i >= j)
      for (int kk = rw; kk < kQ / 16; ++kk) {
        uint32_t a[4];
        frag_a(a, T1, kLdQ, m0, kk * 16);
#pragma unroll
        for (int t = 0; t < NTP; ++t) {
          uint32_t b0, b1;
          frag_b_kn(b0, b1, Ds, LDP, cw * (kP / 2) + t * 8, kk * 16);
          mma_bf16(u[t], a, b0, b1);
        }
      }
      float din[2] = {0.f, 0.f};
      const float dtl = cv.dt[jl], dth = cv.dt[jh];
      T* dxp = static_cast<T*>(P.dx);
      // D * dy, written in phase 0 (read back first, all loads in flight together)
      float dprev[NTP][4];
#pragma unroll
      for (int t = 0; t < NTP; ++t) {
        const int pc = cw * (kP / 2) + t * 8 + c2;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = e < 2 ? jl : jh, pq = pc + (e & 1);
          dprev[t][e] = (P.has_D && j < qc && pq < P.p)
                            ? to_f(dxp[((int64_t(bb) * P.l + t0 + j) * P.h + hh) * P.p + pq])
                            : 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < NTP; ++t) {
        const int pc = cw * (kP / 2) + t * 8 + c2;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int j = hf ? jh : jl;
          const float dtj = hf ? dth : dtl;
          const float u0 = u[t][2 * hf], u1 = u[t][2 * hf + 1];
          const float2 xv =
              __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Xs + j * LDP + pc));
          din[hf] += xv.x * u0 + xv.y * u1;
          if (j < qc && pc < P.p) {
            store_pair(dxp, ((int64_t(bb) * P.l + t0 + j) * P.h + hh) * P.p + pc,
                       dtj * u0 + dprev[t][2 * hf], dtj * u1 + dprev[t][2 * hf + 1],
                       pc + 1 < P.p);
          }
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float a = t4[hf], d = din[hf], s = t2[hf];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if ((lane & 3) == 0) {
          const int j = hf ? jh : jl;
          t4part[cw][j] = a * cv.dt[j];
          dinpart[cw][j] = d;
          t2part[cw][j] = s * cv.sin[j];
        }
      }

      if (P.has_z) {
        // y = sin_i S_prev C_i + sum_j L_ij CB_ij dt_j x_j + D x_i;  dz = dout y silu'(z)
#pragma unroll
        for (int t = 0; t < NTP; ++t) {
          v[t][0] *= sin_lo; v[t][1] *= sin_lo; v[t][2] *= sin_hi; v[t][3] *= sin_hi;
        }
        for (int kk = 0; kk <= rw; ++kk) {
          uint32_t a[4];
          frag_a_t(a, T1, kLdQ, m0, kk * 16);
#pragma unroll
          for (int t = 0; t < NTP; ++t) {
            uint32_t b0, b1;
            frag_b_kn_ks(b0, b1, Xs, LDP, cw * (kP / 2) + t * 8, kk * 16, cv.dt);
            mma_bf16(v[t], a, b0, b1);
          }
        }
#pragma unroll
        for (int t = 0; t < NTP; ++t) {
          const int pc = cw * (kP / 2) + t * 8 + c2;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = hf ? jh : jl;
            if (i >= qc || pc >= P.p) continue;
            const int64_t tt = t0 + i;
            const bool two = pc + 1 < P.p;
            float dz[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              dz[q] = 0.f;
              if (q == 1 && !two) continue;
              const int pq = pc + q;
              float y = v[t][2 * hf + q];
              if (P.has_D)
                y += ld_code(P.D, P.D_code, hh * P.D_sh + pq * P.D_sp) *
                     ldg_f<T>(P.x, bb * P.x_sb + tt * P.x_sl + hh * P.x_sh + pq * P.x_sp);
              const float o = ldg_f<T>(P.dout, bb * P.o_sb + tt * P.o_sl + hh * P.o_sh + pq * P.o_sp);
              const float zz = ldg_f<T>(P.z, bb * P.z_sb + tt * P.z_sl + hh * P.z_sh + pq * P.z_sp);
              const float sg = sigmoid_f(zz);
              dz[q] = o * y * sg * (1.f + zz * (1.f - sg));
            }
            store_pair(static_cast<T*>(P.dz), ((int64_t(bb) * P.l + tt) * P.h + hh) * P.p + pc,
                       dz[0], dz[1], two);
          }
        }
      }
    }
    gs = warp_sum(gs);
    if (lane == 0) red[warp] = gs;
    group_sync<kGroups>(gid);

    // ---- phase 4: lambda, ddt, and the per-(chunk, head) partials of dA, ddt_bias, dD ----
    if (warp == 0) {
      // A[hh] loaded again here (an L1 hit) rather than held in a register across the head
      const float Ah = ld_code(P.A, P.A_code, hh * P.A_s);
      float g3 = 0.f;
#pragma unroll
      for (int q = 0; q < kThreads / 32; ++q) g3 += red[q];
      const float term3 = cv.cont * g3;
      float dlt[2], t2v[2], t4v[2], din[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int i = 2 * lane + q;
        dlt[q] = (colpart[0][i] + colpart[1][i] + colpart[2][i] + colpart[3][i]) -
                 (rowpart[0][i] + rowpart[1][i]);
        t2v[q] = t2part[0][i] + t2part[1][i];
        t4v[q] = t4part[0][i] + t4part[1][i];
        din[q] = dinpart[0][i] + dinpart[1][i];
      }
      lambda_tail(P, cv, dlt, t2v, t4v, din, term3, Ah, bb, t0, qc, slot, hh);
    } else if (warp >= 4 && tid - 128 < kP) {
      const int pp = tid - 128;
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < kThreads / 32; ++q) s += dDw[q][pp];
      if (pp < P.p) P.part_dD[(int64_t(slot) * P.h + hh) * P.p + pp] = s;
    }
    group_sync<kGroups>(gid);
  }

  if constexpr (kOnChip) {
    // the split's sums, once: group g writes dB (g = 0) or dC (g = 1); one group writes both.
    // With one split per group they are the final dB/dC (the reduce skips them, bwd_reduce.cu).
    __syncthreads();
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      if (kGroups == 2 && which != gid) continue;
      float* ws = which ? P.wsdC : P.wsdB;
      T* out = static_cast<T*>(which ? P.dC : P.dB);
      for (int blk = 0; blk < npad / kNB; ++blk) {
        const float4* q = part + (blk * 2 + which) * 4 * kThreads + tid;
        float4 v[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = q[t * kThreads];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int j = m0 + r + 8 * hf;
          if (j >= qc) continue;
          const int col = blk * kNB + cw * 32 + c2;
          if (P.nsplit == 1) {
            const int64_t o = ((int64_t(bb) * P.l + t0 + j) * P.g + gg) * P.n;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              const int c = col + t * 8;
              if (c < P.n)
                store_pair(out, o + c, hf ? v[t].z : v[t].x, hf ? v[t].w : v[t].y, c + 1 < P.n);
            }
            continue;
          }
          float2* dst = reinterpret_cast<float2*>(
              ws + (((int64_t(bb) * P.l + t0 + j) * P.nsplit + split) * P.g + gg) * npad + col);
#pragma unroll
          for (int t = 0; t < 4; ++t)
            dst[t * 4] = hf ? make_float2(v[t].z, v[t].w) : make_float2(v[t].x, v[t].y);
        }
      }
    }
  }
}

template <int kP, bool kOnChip>
void launch_chunk_variant(const Params& prm, int tcode, cudaStream_t st) {
  const size_t smem = ChunkSmem<kP, kOnChip>::bytes(prm.npad);
  dim3 grid(prm.varlen ? prm.nslots : prm.nch, prm.varlen ? 1 : prm.b, prm.g * prm.nsplit);
  const int threads = kThreads * chunk_groups<kP, kOnChip>();
  auto go = [&](auto kernel) {
    ensure_max_dynamic_smem(reinterpret_cast<const void*>(kernel), int(smem));
    kernel<<<grid, threads, smem, st>>>(prm);
  };
  if (tcode == kF32) go(chunk_kernel<float, kP, kOnChip>);
  else if (tcode == kF16) go(chunk_kernel<__half, kP, kOnChip>);
  else go(chunk_kernel<bf16, kP, kOnChip>);
}

template <int kP>
void launch_chunk_impl(const Params& prm, int tcode, cudaStream_t st) {
  if (prm.onchip) launch_chunk_variant<kP, true>(prm, tcode, st);
  else launch_chunk_variant<kP, false>(prm, tcode, st);
}

// Dynamic shared memory of the variant; for the on-chip one, whether it fits in `optin` bytes
// with its static shared memory.
template <int kP>
size_t chunk_smem_impl(int npad, bool onchip) {
  return onchip ? ChunkSmem<kP, true>::bytes(npad) : ChunkSmem<kP, false>::bytes(npad);
}
template <int kP>
bool chunk_onchip_fits_impl(int npad, size_t optin) {
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, reinterpret_cast<const void*>(chunk_kernel<bf16, kP, true>)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.sharedSizeBytes + ChunkSmem<kP, true>::bytes(npad) <= optin;
}

}  // namespace ssd_bwd
}  // namespace mlmamba
