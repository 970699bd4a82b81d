// SSD backward, step 2 on sm_90a tensor cores (the default there for bf16, headdim 64,
// d_state 64 / 128, no z, no cu_seqlens; elsewhere bwd_chunk.cuh, whose header has the
// equations). One CTA per (chunk, batch row, group, head split): two warpgroups walk the
// split's heads. Each head's x, dy, S_prev, G_next tiles and its record (HeadRec: the chunk
// vectors, D, A; from vectors_kernel) arrive by TMA one head ahead (two stages; full: bytes,
// empty: all 256 threads).
//   WG0: CB = C B^T once (registers); per head W = dy x^T, then u = B G^T (the state part) and
//        v = C S^T; the masked T1 = L o CB and T2 = dt_j L o W to shared memory (while u, v
//        run) and the strict row / column sums of M; u = sout u + T1^T dy; dx = dt u + D dy;
//        the head's sums for the lambda pass.
//   WG1: the scaled tiles dt sout o x and sin o dy, the dD partials, and the sums over heads
//        in registers: dB += (dt sout x) G + T2^T C, dC += (sin dy) S + T2 B, written once at
//        the end (dB / dC themselves with one split, else the per-split fp32 workspace that
//        bwd_reduce.cu sums); its warp 1 runs the lambda pass of the previous head (ddt, the
//        dA / ddt_bias partials) and streams the next head's loads (it waits for T2 anyway).
// Handoffs by mbarrier: T2 ready (WG0 -> WG1), T2 free (WG1 -> WG0), sums written (WG0 -> WG1,
// two: head parity). Waits trap instead of hanging. Tiles are 128-byte-swizzled 64 x 64 bf16
// panels (wgmma.cuh); every product is m64n64k16. docs/perf-log.md has the measurements.
#include <cuda.h>
#include <cuda_runtime.h>

#include "common/launch.h"
#include "common/tma.cuh"
#include "ssd/bwd.h"
#include "ssd/bwd_common.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd_bwd {
namespace {

using ssd::desc_k;
using ssd::desc_mn;
using ssd::wgmma_m64n64_ss;

constexpr int kThr = 256, kWg = 128;
constexpr int kTileB = kQ * 64 * 2;  // one 64 x 64 bf16 panel

// what WG0's warps hand WG1's lambda pass per head (two sets: head parity)
struct HeadSums {
  float rowp[kQ];     // strict row sums of M
  float colp[4][kQ];  // strict column sums of M, per warp
  float t2[kQ];       // sin_i dy_i . v_i
  float t4[kQ];       // dt_j x_j . (sout_j G_next B_j)
  float din[kQ];      // x_j . u_j
  float gs[4];        // <G_next, S_prev>, per warp
};

// B, C (NP panels each, once per CTA); two stages of x, dy, S_prev, G_next and the head's
// record (HeadRec: chunk vectors, D, A); T1, T2, the scaled tiles; head sums (two sets); WG1's
// dD partials (two sets); the barriers.
template <int NP>
struct CkLayout {
  static constexpr int B_OFF = 0, C_OFF = NP * kTileB, STG_OFF = 2 * NP * kTileB;
  // in a stage
  static constexpr int X = 0, Y = kTileB, S = 2 * kTileB, G = (2 + NP) * kTileB, REC = (2 + 2 * NP) * kTileB;
  static constexpr int STAGE_TX = REC + kHeadRecB;                  // bytes the loads bring
  static constexpr int STAGE_B = REC + (kHeadRecB + 1023) / 1024 * 1024;  // tiles 1024-aligned
  static constexpr int T1_OFF = STG_OFF + 2 * STAGE_B, T2_OFF = T1_OFF + kTileB;
  static constexpr int XS_OFF = T2_OFF + kTileB, DS_OFF = XS_OFF + kTileB;
  static constexpr int SUM_OFF = DS_OFF + kTileB;
  static constexpr int DD_OFF = SUM_OFF + 2 * int(sizeof(HeadSums));
  static constexpr int BAR_OFF = DD_OFF + 2 * 4 * kQ * 4;
  static constexpr int SMEM = BAR_OFF + 9 * 8 + 1024;  // 9 barriers; alignment slack
  static_assert(sizeof(HeadSums) % 16 == 0 && BAR_OFF % 8 == 0, "alignment");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};

__device__ __forceinline__ float2 bf2_at(const unsigned char* tile, int off) {
  return ssd::unpack_bf16(*reinterpret_cast<const uint32_t*>(tile + off));
}

template <int NP>
__global__ void __launch_bounds__(kThr, 1) chunk_wg_kernel(const __grid_constant__ Params P,
                                                           const __grid_constant__ StatesMaps M) {
  using Lt = CkLayout<NP>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024u - (ssd::smem_u32(smem_raw) & 1023u)) & 1023u);
  const ChunkPos cp = chunk_pos(P);  // no cu_seqlens here: every block is a chunk
  const int tid = threadIdx.x, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int gg = blockIdx.z / P.nsplit, split = blockIdx.z % P.nsplit;
  const int hbeg = gg * P.hpg + split * P.hsplit;
  const int nh = min(hbeg + P.hsplit, (gg + 1) * P.hpg) - hbeg;
  const int bb = cp.bb, qc = cp.qc, slot = cp.slot, t0 = int(cp.t0);
  const unsigned char* Bs = sm + Lt::B_OFF;
  const unsigned char* Cs = sm + Lt::C_OFF;
  unsigned char* T1 = sm + Lt::T1_OFF;
  unsigned char* T2 = sm + Lt::T2_OFF;
  unsigned char* Xs = sm + Lt::XS_OFF;
  unsigned char* Ds = sm + Lt::DS_OFF;
  // WG1's per-warp dD partials of head k (set k % 2: one barrier per head orders them)
  auto ddw = [&](int k) { return reinterpret_cast<float(*)[kQ]>(sm + Lt::DD_OFF + (k & 1) * 4 * kQ * 4); };
  auto sums = [&](int k) {
    return reinterpret_cast<HeadSums*>(sm + Lt::SUM_OFF + (k & 1) * int(sizeof(HeadSums)));
  };
  auto stage = [&](int k) { return sm + Lt::STG_OFF + (k & 1) * Lt::STAGE_B; };
  auto rec = [&](int k) { return reinterpret_cast<const HeadRec*>(stage(k) + Lt::REC); };
  const uint32_t bar0 = ssd::smem_u32(sm + Lt::BAR_OFF);
  auto full = [&](int k) { return bar0 + 8 * (k & 1); };
  auto empty = [&](int k) { return bar0 + 16 + 8 * (k & 1); };
  const uint32_t bc = bar0 + 32, t2r = bar0 + 40, t2f = bar0 + 48;
  auto srd = [&](int k) { return bar0 + 56 + 8 * (k & 1); };  // head k's sums written
  if (tid == 0) {
    for (int s = 0; s < 2; ++s) {
      mlmamba::mbar_init(full(s), 1);
      mlmamba::mbar_init(empty(s), kThr);
    }
    mlmamba::mbar_init(bc, 1);
    mlmamba::mbar_init(t2r, kWg);
    mlmamba::mbar_init(t2f, kWg);
    mlmamba::mbar_init(srd(0), kWg);
    mlmamba::mbar_init(srd(1), kWg);
    mlmamba::mbar_init_fence();
  }
  __syncthreads();

  // one thread (thread 0 for heads 0 and 1, then WG1's warp 1): head k's loads into stage k % 2
  auto issue = [&](int k) {
    unsigned char* base = stage(k);
    const uint32_t bar = full(k);
    const int hn = hbeg + k, row = slot * P.h + hn;
    mlmamba::mbar_arrive_expect_tx(bar, Lt::STAGE_TX);
    mlmamba::bulk_load(ssd::smem_u32(base + Lt::REC),
                   static_cast<const char*>(P.hrec) + int64_t(row) * kHeadRecB, kHeadRecB, bar);
    mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::X), &M.x, 0, t0, hn, bb, bar);
    mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::Y), &M.o, 0, t0, hn, bb, bar);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::S + np * kTileB), &M.wsS, 64 * np, 0, 0, row, bar);
      mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::G + np * kTileB), &M.wsG, 64 * np, 0, 0, row, bar);
    }
  };
  if (tid == 0) {
    mlmamba::mbar_arrive_expect_tx(bc, 2 * NP * kTileB);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      mlmamba::tma_load_4d(ssd::smem_u32(sm + Lt::B_OFF + np * kTileB), &M.B, 64 * np, t0, gg, bb, bc);
      mlmamba::tma_load_4d(ssd::smem_u32(sm + Lt::C_OFF + np * kTileB), &M.C, 64 * np, t0, gg, bb, bc);
    }
    issue(0);
    if (nh > 1) issue(1);
  }

  if (tid < kWg) {
    // ================= WG0 =================
    // accumulator layout (wgmma.cuh): rows i0 = 16 w + g and i0 + 8, d[4 jj + 2 hf + e] at
    // column 8 jj + 2 t + e of row i0 + 8 hf
    const int i0 = 16 * w + g;
    float cb[32];
    mlmamba::wait_phase(bc, 0);
    __syncwarp();
    ssd::wgmma_fence();
#pragma unroll
    for (int s4 = 0; s4 < 4 * NP; ++s4) wgmma_m64n64_ss<0, 0>(cb, desc_k(Cs, s4), desc_k(Bs, s4), s4 > 0);
    ssd::wgmma_commit();
    ssd::wgmma_wait<0>();
#pragma unroll 1
    for (int k = 0; k < nh; ++k) {
      const int hh = hbeg + k;
      mlmamba::wait_phase(full(k), (k >> 1) & 1);
      const ChunkVec& cv = rec(k)->cv;
      HeadSums& hs = *sums(k);
      const unsigned char* X = stage(k) + Lt::X;
      const unsigned char* Y = stage(k) + Lt::Y;
      const unsigned char* S = stage(k) + Lt::S;
      const unsigned char* G = stage(k) + Lt::G;
      float wa[32], u[32], v[32];
      __syncwarp();  // converged before the warpgroup's wgmma
      ssd::wgmma_fence();
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) wgmma_m64n64_ss<0, 0>(wa, desc_k(Y, s4), desc_k(X, s4), s4 > 0);
      ssd::wgmma_commit();  // W first: T1 / T2 need only W, while u and v run
#pragma unroll
      for (int s4 = 0; s4 < 4 * NP; ++s4) wgmma_m64n64_ss<0, 0>(u, desc_k(Bs, s4), desc_k(G, s4), s4 > 0);
#pragma unroll
      for (int s4 = 0; s4 < 4 * NP; ++s4) wgmma_m64n64_ss<0, 0>(v, desc_k(Cs, s4), desc_k(S, s4), s4 > 0);
      ssd::wgmma_commit();
      float gs = 0.f;  // <G_next, S_prev> while the products run (both tiles in one layout)
      {
#pragma unroll
        for (int q = 0; q < 4 * NP; ++q) {
          const uint4 a = reinterpret_cast<const uint4*>(S)[tid + kWg * q];
          const uint4 b = reinterpret_cast<const uint4*>(G)[tid + kWg * q];
          const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int z = 0; z < 4; ++z) {
            const float2 fa = ssd::unpack_bf16(aw[z]), fb = ssd::unpack_bf16(bw[z]);
            gs += fa.x * fb.x + fa.y * fb.y;
          }
        }
      }
      gs = warp_sum(gs);
      ssd::wgmma_wait<1>();

      // T1 = L o CB, T2 = dt_j L o W (j <= i, one segment), and the strict sums of M
      float rs[2] = {0.f, 0.f}, cs[8][2] = {};
      uint32_t t1p[16], t2p[16];
      {
        const float lam_i[2] = {cv.lam[i0], cv.lam[i0 + 8]};
        const int seg_i[2] = {cv.seg[i0], cv.seg[i0 + 8]};
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          // columns j0, j0 + 1: one 8-byte load per vector
          const int j0 = 8 * jj + 2 * t;
          const float2 lam2 = *reinterpret_cast<const float2*>(cv.lam + j0);
          const float2 dt2 = *reinterpret_cast<const float2*>(cv.dt + j0);
          const int2 seg2 = *reinterpret_cast<const int2*>(cv.seg + j0);
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = i0 + 8 * hf;
            float a1[2], a2[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              // selects, no branches: accumulator registers read in a divergent path make
              // ptxas serialize the wgmma (C7520)
              const int j = j0 + e, idx = 4 * jj + 2 * hf + e;
              const bool in = j <= i && (e ? seg2.y : seg2.x) == seg_i[hf];
              const float l = __expf(in ? lam_i[hf] - (e ? lam2.y : lam2.x) : 0.f);
              const float lcb = in ? l * cb[idx] : 0.f, lw = in ? l * wa[idx] : 0.f;
              const float dtj = e ? dt2.y : dt2.x;
              a1[e] = lcb;
              a2[e] = dtj * lw;
              const float m = j < i ? lcb * wa[idx] * dtj : 0.f;
              rs[hf] += m;
              cs[jj][e] += m;
            }
            t1p[2 * jj + hf] = ssd::pack_bf16(a1[0], a1[1]);
            t2p[2 * jj + hf] = ssd::pack_bf16(a2[0], a2[1]);
          }
        }
      }
      ssd::wgmma_wait<0>();  // u, v: retired before the wait loop below (C7520)
      // WG1's products with head k - 1's T2 are done, and so is its lambda pass of head k - 2
      // (the sums' set this head writes)
      if (k > 0) mlmamba::wait_phase(t2f, (k - 1) & 1);
      if (lane == 0) hs.gs[w] = gs;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int off = ssd::sw128_offset<kQ>(i0 + 8 * hf, 8 * jj + 2 * t);
          *reinterpret_cast<uint32_t*>(T1 + off) = t1p[2 * jj + hf];
          *reinterpret_cast<uint32_t*>(T2 + off) = t2p[2 * jj + hf];
        }
      mlmamba::fence_async_smem();
      mlmamba::mbar_arrive(t2r);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float s = rs[hf];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (t == 0) hs.rowp[i0 + 8 * hf] = s;
      }
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float s = cs[jj][e];
          s += __shfl_xor_sync(0xffffffffu, s, 4);
          s += __shfl_xor_sync(0xffffffffu, s, 8);
          s += __shfl_xor_sync(0xffffffffu, s, 16);
          if (g == 0) hs.colp[w][8 * jj + 2 * t + e] = s;
        }

      // u's state part scaled by sout; its x.u (lambda's term 4) and sin dy.v (term 2) row sums
      float t4[2] = {0.f, 0.f}, t2[2] = {0.f, 0.f};
      {
        const float so[2] = {cv.sout[i0], cv.sout[i0 + 8]};
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int off = ssd::sw128_offset<kQ>(i0 + 8 * hf, 8 * jj + 2 * t), q = 4 * jj + 2 * hf;
            u[q] *= so[hf];
            u[q + 1] *= so[hf];
            const float2 xv = bf2_at(X, off), yv = bf2_at(Y, off);
            t4[hf] += xv.x * u[q] + xv.y * u[q + 1];
            t2[hf] += yv.x * v[q] + yv.y * v[q + 1];
          }
      }
      mlmamba::bar_sync_n(1, kWg);  // every T1 store (fenced) before the wgmma reads the tile
      __syncwarp();
      ssd::wgmma_fence();
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) wgmma_m64n64_ss<1, 1>(u, desc_mn(T1, s4), desc_mn(Y, s4), true);
      ssd::wgmma_commit();
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float a = t4[hf], b = t2[hf];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        b += __shfl_xor_sync(0xffffffffu, b, 1);
        b += __shfl_xor_sync(0xffffffffu, b, 2);
        const int i = i0 + 8 * hf;
        if (t == 0) {
          hs.t4[i] = a * cv.dt[i];
          hs.t2[i] = b * cv.sin[i];
        }
      }
      ssd::wgmma_wait<0>();

      // dx = dt u + D dy, and x.u
      {
        float din[2] = {0.f, 0.f};
        const float dtr[2] = {cv.dt[i0], cv.dt[i0 + 8]};
        bf16* dxp = static_cast<bf16*>(P.dx);
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int pc = 8 * jj + 2 * t;
          const float2 dd = *reinterpret_cast<const float2*>(rec(k)->D + pc);
          const float d0 = dd.x, d1 = dd.y;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int j = i0 + 8 * hf, off = ssd::sw128_offset<kQ>(j, pc), q = 4 * jj + 2 * hf;
            const float2 xv = bf2_at(X, off), yv = bf2_at(Y, off);
            din[hf] += xv.x * u[q] + xv.y * u[q + 1];
            const __nv_bfloat162 o =
                __floats2bfloat162_rn(dtr[hf] * u[q] + d0 * yv.x, dtr[hf] * u[q + 1] + d1 * yv.y);
            if (j < qc)
              *reinterpret_cast<__nv_bfloat162*>(dxp + ((int64_t(bb) * P.l + t0 + j) * P.h + hh) * P.p + pc) = o;
          }
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float d = din[hf];
          d += __shfl_xor_sync(0xffffffffu, d, 1);
          d += __shfl_xor_sync(0xffffffffu, d, 2);
          if (t == 0) hs.din[i0 + 8 * hf] = d;
        }
      }
      mlmamba::mbar_arrive(empty(k));  // this thread's reads of the stage (and its wgmma) are done
      mlmamba::mbar_arrive(srd(k));    // the head's sums: WG1's lambda pass
    }
    return;
  }

  // ================= WG1 =================
  const int tid1 = tid - kWg;
  float db[NP][32], dc[NP][32];
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int q = 0; q < 32; ++q) db[np][q] = dc[np][q] = 0.f;
  // lambda (exclusive scans of WG0's sums), ddt, and the (chunk, head) partials of dA and
  // ddt_bias of head k: one warp, once WG0 has written the sums
  auto lambda_pass = [&](int k) {
    const int hh = hbeg + k;
    const ChunkVec& cv = rec(k)->cv;
    const HeadSums& hs = *sums(k);
    mlmamba::wait_phase(srd(k), (k >> 1) & 1);
    const float term3 = cv.cont * (hs.gs[0] + hs.gs[1] + hs.gs[2] + hs.gs[3]);
    float dlt[2], t2v[2], t4v[2], din[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int i = 2 * lane + q;
      dlt[q] = (hs.colp[0][i] + hs.colp[1][i] + hs.colp[2][i] + hs.colp[3][i]) - hs.rowp[i];
      t2v[q] = hs.t2[i];
      t4v[q] = hs.t4[i];
      din[q] = hs.din[i];
    }
    lambda_tail(P, cv, dlt, t2v, t4v, din, term3, rec(k)->A, bb, t0, qc, slot, hh);
  };
  mlmamba::wait_phase(bc, 0);
#pragma unroll 1
  for (int k = 0; k < nh; ++k) {
    const int hh = hbeg + k;
    mlmamba::wait_phase(full(k), (k >> 1) & 1);
    const ChunkVec& cv = rec(k)->cv;
    const unsigned char* X = stage(k) + Lt::X;
    const unsigned char* Y = stage(k) + Lt::Y;
    const unsigned char* S = stage(k) + Lt::S;
    const unsigned char* G = stage(k) + Lt::G;
    {
      // dt sout o x and sin o dy (each product rounded to bf16 once, as bwd_chunk.cuh); the
      // thread's 16-byte chunks: logical chunk lc of rows tid1 / 8 + 16 q; dD's column sums
      const int lc = tid1 & 7;
      float dd[8] = {};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = (tid1 >> 3) + 16 * q, off = r * 128 + ((lc ^ (r & 7)) << 4);
        const uint4 xw = *reinterpret_cast<const uint4*>(X + off);
        const uint4 yw = *reinterpret_cast<const uint4*>(Y + off);
        const float sx = cv.dt[r] * cv.sout[r], sy = cv.sin[r];
        const uint32_t xa[4] = {xw.x, xw.y, xw.z, xw.w}, ya[4] = {yw.x, yw.y, yw.z, yw.w};
        uint32_t xo[4], yo[4];
#pragma unroll
        for (int z = 0; z < 4; ++z) {
          const float2 xf = ssd::unpack_bf16(xa[z]), yf = ssd::unpack_bf16(ya[z]);
          dd[2 * z] += xf.x * yf.x;
          dd[2 * z + 1] += xf.y * yf.y;
          xo[z] = ssd::pack_bf16(xf.x * sx, xf.y * sx);
          yo[z] = ssd::pack_bf16(yf.x * sy, yf.y * sy);
        }
        *reinterpret_cast<uint4*>(Xs + off) = make_uint4(xo[0], xo[1], xo[2], xo[3]);
        *reinterpret_cast<uint4*>(Ds + off) = make_uint4(yo[0], yo[1], yo[2], yo[3]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dd[e] += __shfl_xor_sync(0xffffffffu, dd[e], 8);
        dd[e] += __shfl_xor_sync(0xffffffffu, dd[e], 16);
      }
      if (lane < 8)
#pragma unroll
        for (int e = 0; e < 8; ++e) ddw(k)[w][8 * lane + e] = dd[e];
    }
    mlmamba::fence_async_smem();
    mlmamba::bar_sync_n(2, kWg);  // the scaled tiles and the dD partials written
    if (tid1 < kQ)
      P.part_dD[(int64_t(slot) * P.h + hh) * P.p + tid1] =
          ddw(k)[0][tid1] + ddw(k)[1][tid1] + ddw(k)[2][tid1] + ddw(k)[3][tid1];
    __syncwarp();
    ssd::wgmma_fence();
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) {
        wgmma_m64n64_ss<0, 1>(db[np], desc_k(Xs, s4), desc_mn(G + np * kTileB, s4), true);
        wgmma_m64n64_ss<0, 1>(dc[np], desc_k(Ds, s4), desc_mn(S + np * kTileB, s4), true);
      }
    ssd::wgmma_commit();
    // retired before the waits: accumulators in flight across their loops make ptxas insert a
    // warpgroup.arrive there and serialize the wgmma (C7519 / C7520)
    ssd::wgmma_wait<0>();
    // warp 1, while the warpgroup waits for T2: the lambda pass of head k - 1 (WG0 cannot
    // write its sums' set again before WG1's t2f of head k, which follows); then its share
    // of head k - 1's empty, and lane 0 streams head k + 1 into that stage (a producer here
    // stalls only this warpgroup)
    if (w == 1 && k > 0) {
      lambda_pass(k - 1);
      mlmamba::mbar_arrive(empty(k - 1));
      if (lane == 0 && k + 1 < nh) {
        mlmamba::wait_phase(empty(k - 1), ((k - 1) >> 1) & 1);
        issue(k + 1);
      }
      __syncwarp();
    }
    mlmamba::wait_phase(t2r, k & 1);
    __syncwarp();
    ssd::wgmma_fence();
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) {
        wgmma_m64n64_ss<1, 1>(db[np], desc_mn(T2, s4), desc_mn(Cs + np * kTileB, s4), true);
        wgmma_m64n64_ss<0, 1>(dc[np], desc_k(T2, s4), desc_mn(Bs + np * kTileB, s4), true);
      }
    ssd::wgmma_commit();
    ssd::wgmma_wait<0>();
    if (k + 1 < nh) mlmamba::mbar_arrive(t2f);
    if (w != 1) mlmamba::mbar_arrive(empty(k));  // warp 1's after its lambda pass of head k
  }
  if (w == 1) lambda_pass(nh - 1);

  // the split's sums: dB / dC themselves with one split, else the fp32 workspace
#pragma unroll
  for (int np = 0; np < NP; ++np)
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int j = 16 * w + g + 8 * hf, col = 64 * np + 8 * jj + 2 * t, q = 4 * jj + 2 * hf;
        const float2 vb = make_float2(db[np][q], db[np][q + 1]);
        const float2 vc = make_float2(dc[np][q], dc[np][q + 1]);
        if (j >= qc) continue;
        const int64_t row = int64_t(bb) * P.l + t0 + j;
        if (P.nsplit == 1) {
          const int64_t o = (row * P.g + gg) * P.n + col;
          *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(P.dB) + o) = __float22bfloat162_rn(vb);
          *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(P.dC) + o) = __float22bfloat162_rn(vc);
        } else {
          const int64_t o = ((row * P.nsplit + split) * P.g + gg) * P.npad + col;
          *reinterpret_cast<float2*>(P.wsdB + o) = vb;
          *reinterpret_cast<float2*>(P.wsdC + o) = vc;
        }
      }
}

template <int NP>
bool reserve_smem() {
  if (ensure_max_dynamic_smem(reinterpret_cast<const void*>(chunk_wg_kernel<NP>), CkLayout<NP>::SMEM) ==
      cudaSuccess)
    return true;
  cudaGetLastError();
  return false;
}

}  // namespace

bool chunk_wg_ok(const Params& P, int tcode) {
  if (!wg_shape_ok(P, tcode) || P.has_z) return false;
  static const bool image =
      !sm90_image_missing(reinterpret_cast<const void*>(chunk_wg_kernel<1>));
  return image && (P.npad == 128 ? reserve_smem<2>() : reserve_smem<1>());
}

void launch_chunk_wg(const Params& P, const StatesMaps& M, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(P.nch, P.b, P.g * P.nsplit);
  if (P.npad == 128) chunk_wg_kernel<2><<<grid, kThr, CkLayout<2>::SMEM, st>>>(P, M);
  else chunk_wg_kernel<1><<<grid, kThr, CkLayout<1>::SMEM, st>>>(P, M);
}

}  // namespace ssd_bwd
}  // namespace mlmamba
