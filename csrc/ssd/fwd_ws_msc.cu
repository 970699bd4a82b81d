// msc_scan forward on the warp-specialized kernel (sm_90a; the default where it can run,
// MLMAMBA_MSC_WS=0 keeps the one-warpgroup kernel; docs/perf-log.md "msc_scan"). The split of
// fwd_ws.cu (v11) for the k scans of a patch grid, one CTA per (row, head), one scan after
// another (merge none may split them: a CTA per (row, head, scan), MscParams::split):
//   WG0 (mask, state, loads): M = C B^T -> mask -> Mbuf; then chunk g + 1's positions and its
//                 gathered loads (cp.async, completed on the stage's mbarrier) once WG1 is done
//                 with g - 1; S = decay S + (w o X)^T B -> Sbuf (zeroed at each scan's start;
//                 stored by TMA for the backward where asked: MscParams::save_states)
//   WG1 (conv, output): the conv of the raw x rows in place into the X tile (stored by TMA
//                 for the backward where asked: MscParams::save_x), Y = C S^T,
//                 Y += M X, the epilogue with the scans' merge (msc_store)
// The chunk counter g runs over all scans (stages, parities and loads continue across a scan
// boundary). Operation for operation the one-warpgroup MSC kernel's arithmetic (fwd_wgmma.cu):
// bitwise equal outputs.
// mbarriers (completion k waited with parity k & 1; none runs two completions ahead of its
// waiter): full[s] (128 WG0 cp.async arrivals for the raw x rows + one arrival with the TMA /
// bulk bytes of B, C and the vectors, made after the positions were written: WG1 reads them),
// empty[s] (256), sready / sfree, mready / mfree
// (as fwd_ws.cu), xready (128 WG1 arrivals: chunk g's X tile written; arrived only after WG1
// waited sready of g, which WG0 arrives after its wait of xready of g - 1).
#include <cuda_runtime.h>

#include "common/device_utils.cuh"
#include "common/launch.h"
#include "common/tma.cuh"
#include "ssd/fwd.h"
#include "ssd/fwd_msc.cuh"
#include "ssd/fwd_vectors.cuh"
#include "ssd/fwd_wg_parts.cuh"
#include "ssd/wgmma.cuh"
#include "ssd/ws_sync.cuh"

namespace mlmamba {
namespace ssd {
namespace {

using bf16 = __nv_bfloat16;
using wg::P;
using wg::Q;
constexpr int NT = kWsThreads, NW = kWsWgThreads;  // threads, threads of a warpgroup
constexpr int kBarWg0 = 1, kBarWg1 = 2;  // named barriers of one warpgroup's 128 threads

template <int N>
struct WsMscLayout {
  static constexpr int X_B = Q * P * 2, BC_B = Q * N * 2;
  static constexpr int STAGE_B = X_B + 2 * BC_B;
  static constexpr int S_OFF = 2 * STAGE_B;
  static constexpr int M_OFF = S_OFF + P * N * 2;
  static constexpr int VEC_OFF = M_OFF + Q * Q * 2;
  static constexpr int D_OFF = VEC_OFF + 2 * kVecBytes;
  static constexpr int LB_OFF = D_OFF + P * 4;           // look-back raw rows, per stage
  static constexpr int ORD_OFF = LB_OFF + 2 * kMscLB * 128;  // positions, 3 buffers
  static constexpr int CW_OFF = ORD_OFF + 3 * kMscOrd * 4;   // conv weights, bias (this scan)
  static constexpr int BAR_OFF = CW_OFF + P * (kMscW + 1) * 4;
  static constexpr int SMEM = BAR_OFF + 9 * 8 + 1024;  // + alignment slack
  static_assert(M_OFF % 1024 == 0 && CW_OFF % 16 == 0 && BAR_OFF % 8 == 0, "alignment");
  static_assert(SMEM + 1024 <= 233472 / 2, "two CTAs per SM");
};

__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// SAVE: the variant that may store what the backward would recompute (MscParams::save_x /
// save_states); without it that code is compiled out (its checks alone cost 1.5-2%: H200)
template <int N, bool SAVE>
__global__ void __launch_bounds__(NT, 2) ssd_fwd_ws_msc_kernel(const __grid_constant__ FwdParams p) {
  using Lt = WsMscLayout<N>;
  constexpr int NP = N / 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  auto Xs = [&](int s) { return sm + s * Lt::STAGE_B; };
  auto Bs = [&](int s) { return sm + s * Lt::STAGE_B + Lt::X_B; };
  auto Cs = [&](int s) { return sm + s * Lt::STAGE_B + Lt::X_B + Lt::BC_B; };
  auto LBs = [&](int s) { return sm + Lt::LB_OFF + s * kMscLB * 128; };
  unsigned char* Ss = sm + Lt::S_OFF;
  unsigned char* Ms = sm + Lt::M_OFF;
  unsigned char* vec0 = sm + Lt::VEC_OFF;
  float* Dsm = reinterpret_cast<float*>(sm + Lt::D_OFF);
  int* ordsm = reinterpret_cast<int*>(sm + Lt::ORD_OFF);
  float* cwsm = reinterpret_cast<float*>(sm + Lt::CW_OFF);
  const uint32_t full0 = smem_u32(sm + Lt::BAR_OFF), empty0 = full0 + 16;
  const uint32_t sready = full0 + 32, sfree = full0 + 40, mready = full0 + 48, mfree = full0 + 56;
  const uint32_t xready = full0 + 64;

  const int tid = threadIdx.x, lane = tid & 31, wq = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, row = blockIdx.y, grp = h / p.heads_per_group;
  const int64_t bidx = row, len = p.seqlen;
  const int nchunks = static_cast<int>((len + Q - 1) / Q);
  const int nscans = p.msc.nscans;
  // MscParams::split: this CTA runs scan sc0 alone; sc0 + gn / nchunks is chunk gn's scan
  const int sc0 = p.msc.split ? static_cast<int>(blockIdx.z) : 0;
  const int total = (p.msc.split ? 1 : nscans) * nchunks;  // this CTA's chunks over its scans

  if (tid == 0) {
    mbar_init(full0, NW + 1);
    mbar_init(full0 + 8, NW + 1);
    mbar_init(empty0, NT);
    mbar_init(empty0 + 8, NT);
    mbar_init(sready, NW);
    mbar_init(sfree, NW);
    mbar_init(mready, NW);
    mbar_init(mfree, NW);
    mbar_init(xready, NW);
    mbar_init_fence();
  }
  __syncthreads();

  // Chunk gn's positions (warp 0 of WG0, into buffer gn % 3), then its gathered loads into
  // stage gn & 1 (all WG0 threads). Calls run gn = 0, 1, 2, ...: warp 0 loads the next chunk's
  // positions into registers (nxt) a call ahead, so no global round trip sits before the
  // barrier. Addresses are rebuilt from p at each call.
  MscPos nxt;
  auto load_chunk = [&](int gn) {
    const int ls = gn / nchunks, sc = sc0 + ls, c = gn - ls * nchunks, s = gn & 1;
    int* ord = ordsm + (gn % 3) * kMscOrd;
    if (wq == 0) {
      if (gn == 0) nxt = msc_load_positions(p.msc.orders + sc0 * p.seqlen, len, 0, lane);
      msc_store_positions(ord, nxt, len, lane);
      if (gn + 1 < total) {
        const int sn = (gn + 1) / nchunks, cn = gn + 1 - sn * nchunks;
        nxt = msc_load_positions(p.msc.orders + (sc0 + sn) * p.seqlen, len,
                                 static_cast<int64_t>(cn) * Q, lane);
      }
    }
    bar_sync_n(kBarWg0, NW);  // the positions, for every WG0 thread
    const bf16* rows = static_cast<const bf16*>(p.x) + bidx * p.x_b;
    msc_issue_raw_inplace<P, NW>(smem_u32(Xs(s)), smem_u32(LBs(s)), ord, rows, p.x_l, h * p.x_h, tid);
    cp_async_arrive(full0 + 8 * s);
    if (tid == 0) {  // after the barrier: the positions go with this arrival
      // B, C (conv'd per scan, in scan order: group sc g + grp of the map's (b, l, k g, n)) by
      // TMA, the vectors by a bulk copy, counted in bytes on the same barrier
      const uint32_t bar = full0 + 8 * s;
      mbar_arrive_expect_tx(bar, 2 * Lt::BC_B + kVecBytes);
      const int64_t v = ((static_cast<int64_t>(sc) * p.nrows + row) * p.nheads + h) * p.vec_nch + c;
      bulk_load(smem_u32(vec0 + s * kVecBytes), p.vecs + v * kVecBytes, kVecBytes, bar);
      const int tok = c * Q, sg = sc * static_cast<int>(p.ngroups) + grp;
#pragma unroll
      for (int np = 0; np < NP; ++np) {
        tma_load_4d(smem_u32(Bs(s)) + np * Q * 128, &p.tm_B, 64 * np, tok, sg, row, bar);
        tma_load_4d(smem_u32(Cs(s)) + np * Q * 128, &p.tm_C, 64 * np, tok, sg, row, bar);
      }
    }
  };

  if (tid < NW) {
    // ================= WG0: the mask and the state =================
    setmaxnreg_inc<kWsRegsState>();
    const bool save_s = SAVE && p.msc.save_states;
    // where asked: the state entering chunk gn (just written to Ss) to the saved states by
    // TMA at slot ((row nchunks + chunk) k + scan) h + head, each warp its own 16 rows (which
    // only its lanes write: no barrier across the warpgroup)
    auto store_saved_state = [&](int gn) {
      __syncwarp();  // the lanes' writes, each fenced, before lane 0's copy reads them
      if (lane == 0) {
        const int ls = gn / nchunks, sc = sc0 + ls, c = gn - ls * nchunks;
        const int slot = ((row * nchunks + c) * nscans + sc) * static_cast<int>(p.nheads) + h;
#pragma unroll
        for (int np = 0; np < NP; ++np)
          tma_store_4d(&p.tm_S, smem_u32(Ss) + np * P * 128 + wq * 16 * 128, 64 * np, 16 * wq,
                       0, slot);
        bulk_commit();
      }
    };
    float sacc[NP][32];
    wg::zero_state(sacc);
    const uint32_t st_base = wg::state_store_base(Ss, wq, lane);
    const uint32_t m_base = wg::state_store_base(Ms, wq, lane);
    wg::store_state(sacc, st_base);  // scan 0's S_{-1}: sready's completion 0
    fence_async_smem();
    if (save_s) store_saved_state(0);
    mbar_arrive(sready);
    if (total > 0) load_chunk(0);
    if (total > 1) load_chunk(1);

#pragma unroll 1
    for (int gc = 0; gc < total; ++gc) {
      const int s = gc & 1;
      const ChunkVecs cv(vec0 + s * kVecBytes);
      const unsigned char *X = Xs(s), *B = Bs(s), *C = Cs(s);
      wait_phase(full0 + 8 * s, (gc >> 1) & 1);  // the stage's loads (load_chunk)
      fence_async_smem();                         // ... for the wgmma (async proxy) below
      __syncwarp();
      float macc[32];
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < N / 16; ++k) wgmma_m64n64_ss<0, 0>(macc, desc_k(C, k), desc_k(B, k), k > 0);
      wgmma_commit();
      wgmma_wait<0>();
      uint32_t ma[4][4];
      wg::mask_m(ma, macc, cv, wq, g, t);
      hand_over_m(ma, m_base, mfree, mready, gc);  // M of chunk gc to WG1
      if (gc >= 1 && gc + 1 < total) {
        // chunk gc + 1's loads, after M (WG1 waits for M; the loads have a chunk to land):
        // stage (gc + 1) & 1 once both warpgroups are done with chunk gc - 1 (WG1 arrives after
        // its Y += M X, and after chunk gc - 2's epilogue, whose positions buffer this reuses)
        wait_phase(empty0 + 8 * (s ^ 1), ((gc - 1) >> 1) & 1);
        __syncwarp();
        load_chunk(gc + 1);
      }
      wait_phase(xready, gc & 1);     // the X tile (conv'd by WG1)
      __syncwarp();
      uint32_t xa[4][4];
      wg::scaled_xt(xa, X, cv, wq, lane);
      wg::state_update(sacc, xa, B, cv);
      wgmma_commit();
      wgmma_wait<0>();
      mbar_arrive(empty0 + 8 * s);  // done with X, B, C and the vectors of stage s
      if (gc + 1 == total) break;   // nobody reads the last state
      if ((gc + 1) % nchunks == 0) wg::zero_state(sacc);  // the next scan starts from zero
      wait_phase(sfree, gc & 1);    // WG1 has read the previous state (sfree completion gc)
      if (save_s && lane == 0) bulk_wait_read<0>();  // ... and the warp's previous store
      __syncwarp();
      wg::store_state(sacc, st_base);
      fence_async_smem();
      if (save_s) store_saved_state(gc + 1);
      mbar_arrive(sready);  // completion gc + 1
    }
    if (save_s && lane == 0) bulk_wait_read<0>();  // Ss stays valid until the stores read it
    return;
  }

  // ================= WG1: conv, output =================
  setmaxnreg_dec<kWsRegsOutput>();
  const int wt = tid - NW;  // thread in WG1
  const int64_t xcol = h * p.x_h;

#pragma unroll 1
  for (int gc = 0; gc < total; ++gc) {
    const int ls = gc / nchunks, sc = sc0 + ls, c = gc - ls * nchunks, s = gc & 1;
    const int64_t c0 = static_cast<int64_t>(c) * Q;
    const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
    const ChunkVecs cv(vec0 + s * kVecBytes);
    unsigned char *X = Xs(s), *C = Cs(s);
    if (c == 0) {  // this scan's conv weights and D, once the previous scan's readers are done
      if (gc > 0) bar_sync_n(kBarWg1, NW);
      const int hs = sc * static_cast<int>(p.nheads) + h;
      const int64_t cd = p.msc.conv_dim;
      msc_stage_weights<P, NW>(cwsm, p.msc.conv_w + sc * cd * kMscW,
                               p.msc.conv_b ? p.msc.conv_b + sc * cd : nullptr, xcol, wt);
      if (wt < P) Dsm[wt] = p.D ? p.D[hs * p.D_h + wt * p.D_p] : 0.f;
      bar_sync_n(kBarWg1, NW);  // staged; the previous scan's running-sum writes are ordered
    }
    wait_phase(full0 + 8 * s, (gc >> 1) & 1);
    __syncwarp();  // converged before the barriers (bar.sync is .aligned)
    // raw x rows -> conv + SiLU -> the swizzled X tile, in place
    msc_conv_inplace(X, LBs(s), cwsm, nvalid, wq, lane, [] { bar_sync_n(kBarWg1, NW); });
    fence_async_smem();       // the X tile and the landed B / C -> the async proxy
    bar_sync_n(kBarWg1, NW);  // the whole X tile written (WG1 reads it below)
    if (SAVE && p.msc.save_x && wt == 0) {  // the tile for the backward, by TMA (rows past len clipped)
      tma_store_4d(&p.tm_x, smem_u32(X), 0, static_cast<int>(c0),
                   sc * static_cast<int>(p.nheads) + h, row);
      bulk_commit();
    }
    wait_phase(sready, gc & 1);  // the state WG1 reads (completion gc)
    mbar_arrive(xready);         // completion gc (after sready gc: never two ahead of WG0)
    {  // rows of the running sum to L2: this chunk's (or the next one's in the scan)
      const int ahead = p.msc.prefetch == 2 ? 1 : 0;
      const int64_t n0 = c0 + ahead * Q;
      if (p.msc.prefetch > 0 && n0 < len)
        msc_prefetch_acc(ordsm + ((gc + ahead) % 3) * kMscOrd + kMscLB, sc, nscans,
                         static_cast<int>(len - n0 < Q ? len - n0 : Q), bidx, h, wt, p);
    }
    __syncwarp();  // converged before the wgmma (.sync.aligned)

    // ---- Y = C S^T ----
    float yacc[32];
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < N / 16; ++k) wgmma_m64n64_ss<0, 0>(yacc, desc_k(C, k), desc_k(Ss, k), k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    mbar_arrive(sfree);  // completion gc
    wg::scale_y(yacc, cv, wq, g);

    // ---- Y += M X ----
    wait_phase(mready, gc & 1);
    __syncwarp();
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) wgmma_m64n64_ss<0, 1>(yacc, desc_k(Ms, k), desc_mn(X, k), true);
    wgmma_commit();
    uint32_t xd[2][8];  // D x's words of X (finish_row's), read while the products run
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j8 = 0; j8 < 8; ++j8) {  // row i = 16 wq + g + 8 hf (i & 7 = g), word (g ^ j8)
        const unsigned char* w = X + (16 * wq + g + 8 * hf) * 128 + ((g ^ j8) << 4) + 4 * t;
        xd[hf][j8] = *reinterpret_cast<const uint32_t*>(w);
      }
    wgmma_wait<0>();
    mbar_arrive(mfree);  // completion gc
    // done with C, X and the vectors of stage s: WG0 loads chunk gc + 2 during the epilogue
    // (its positions sit in buffer (gc + 2) % 3; this chunk's stay until chunk gc + 1 is done)
    if (SAVE && p.msc.save_x && wt == 0) bulk_wait_read<0>();  // the X tile's store has read it
    mbar_arrive(empty0 + 8 * s);

    // ---- epilogue: + D x, merge ----
    int pos[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = 16 * wq + g + 8 * hf;
      pos[hf] = i < nvalid ? ordsm[(gc % 3) * kMscOrd + kMscLB + i] : -1;
    }
    if (p.D != nullptr) {  // rows past nvalid are not stored
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int j8 = 0; j8 < 8; ++j8) wg::add_dx(yacc + 2 * hf, xd[hf][j8], Dsm, t, j8);
    }
    msc_store(yacc, pos, sc, nscans, bidx, h, t, p);
  }
}

template <int N>
const char* launch_ws_msc(const FwdParams& p, cudaStream_t stream) {
  if (p.msc.save_x || p.msc.save_states)
    return launch_ws_grid<ssd_fwd_ws_msc_kernel<N, true>>(p, WsMscLayout<N>::SMEM,
                                                          "it needs the chunk-vector pre-pass", stream);
  return launch_ws_grid<ssd_fwd_ws_msc_kernel<N, false>>(p, WsMscLayout<N>::SMEM,
                                                         "it needs the chunk-vector pre-pass", stream);
}

}  // namespace

const char* launch_msc_fwd_ws(const FwdParams& p, int dstate, cudaStream_t stream) {
  if (p.headdim != P) return "headdim must be 64";
  if (p.z != nullptr) return "it does not take z";
  if (!p.tma) return "it needs TMA maps of the conv'd B and C";
  if (!p.vec_buf) return "it needs the chunk-vector pre-pass (not with MLMAMBA_SSD_FWD_VEC=0)";
  if (dstate == 64) return launch_ws_msc<64>(p, stream);
  if (dstate == 128) return launch_ws_msc<128>(p, stream);
  return "dstate must be 64 or 128";
}

}  // namespace ssd
}  // namespace mlmamba
