// SSD chunked scan forward, warp-specialized (sm_90a; the default where it can run, fwd_ops.cpp;
// docs/perf-log.md "ssd_scan forward", v9). One CTA of two warpgroups per (row, head),
// bf16, headdim 64, d_state 64 / 128, TMA tiles and the pre-pass's chunk vectors. The wgmma
// kernel (fwd_wgmma.cu) runs one chain per chunk: M, Y -> mask -> S update, M X -> epilogue.
// Here the chain is split:
//   WG0 (state, mask): M = C_c B_c^T -> decay / dt / causal mask -> Mbuf (bf16); S_c = decay
//                 S_{c-1} + (w o X_c)^T B_c in registers, then S_c (bf16) -> Sbuf
//   WG1 (output): Y = C_c S_{c-1}^T (from Sbuf), Y += M X_c (M from Mbuf) -> epilogue; its
//                 thread 0 issues the TMA loads two chunks ahead
// so a chunk costs the longer chain, not the sum, and two CTAs (four warpgroups) share an SM
// (setmaxnreg: WG0 kWsRegsState registers, WG1 kWsRegsOutput). Operation for operation the wgmma
// kernel's arithmetic: bitwise equal outputs and final states.
// mbarriers (completion k waited with parity k & 1; none can run two completions ahead of its
// waiter, see the loops): full[s] (stage s landed: TMA bytes), empty[s] (stage s read by all
// 256 threads), sready (Sbuf holds the state WG1 reads next: 128 WG0 arrivals), sfree (WG1's
// batch 1 has read Sbuf: 128 WG1 arrivals), mready (Mbuf holds chunk c's masked M: 128 WG0
// arrivals), mfree (WG1's Y += M X has read Mbuf: 128 WG1 arrivals).
#include <cuda_runtime.h>

#include "common/device_utils.cuh"
#include "common/launch.h"
#include "common/tma.cuh"
#include "ssd/fwd.h"
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
constexpr int NT = kWsThreads;

template <int N>
struct WsLayout {
  static constexpr int NP = N / 64;
  static constexpr int X_B = Q * P * 2, BC_B = Q * N * 2;
  static constexpr int STAGE_B = X_B + 2 * BC_B;
  static constexpr int S_OFF = 2 * STAGE_B;      // Sbuf: the state, bf16 [p][n] panels
  static constexpr int M_OFF = S_OFF + P * N * 2;  // Mbuf: masked M, bf16 [i][j], one panel
  static constexpr int VEC_OFF = M_OFF + Q * Q * 2;
  static constexpr int D_OFF = VEC_OFF + 2 * kVecBytes;
  static constexpr int BAR_OFF = D_OFF + P * 4;  // full[2], empty[2], sready, sfree, mready, mfree
  static constexpr int SMEM = BAR_OFF + 8 * 8 + 1024;  // + alignment slack
  static_assert(M_OFF % 1024 == 0, "Mbuf is a 128-byte-swizzled panel");
  static_assert(P * N * 4 <= STAGE_B, "initial states are staged through stage 0");
};

template <int N>
__global__ void __launch_bounds__(NT, 2) ssd_fwd_ws_kernel(const __grid_constant__ FwdParams p) {
  using Lt = WsLayout<N>;
  constexpr int NP = Lt::NP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  auto Xs = [&](int s) { return sm + s * Lt::STAGE_B; };
  auto Bs = [&](int s) { return sm + s * Lt::STAGE_B + Lt::X_B; };
  auto Cs = [&](int s) { return sm + s * Lt::STAGE_B + Lt::X_B + Lt::BC_B; };
  unsigned char* Ss = sm + Lt::S_OFF;
  unsigned char* Ms = sm + Lt::M_OFF;
  unsigned char* vec0 = sm + Lt::VEC_OFF;
  float* Dsm = reinterpret_cast<float*>(sm + Lt::D_OFF);
  const uint32_t full0 = smem_u32(sm + Lt::BAR_OFF), empty0 = full0 + 16;
  const uint32_t sready = full0 + 32, sfree = full0 + 40, mready = full0 + 48, mfree = full0 + 56;

  const int tid = threadIdx.x, lane = tid & 31, wq = (tid >> 5) & 3;  // warp in its warpgroup
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, row = blockIdx.y, grp = h / p.heads_per_group;
  const wg::RowSpan span = wg::row_span(p, row);  // never cu_seqlens here
  const int64_t bidx = span.bidx, tstart = span.tstart, len = span.len;
  const int nchunks = static_cast<int>((len + Q - 1) / Q);

  if (tid < P) Dsm[tid] = p.D ? p.D[h * p.D_h + tid * p.D_p] : 0.f;
  if (tid == 0) {
    mbar_init(full0, 1);
    mbar_init(full0 + 8, 1);
    mbar_init(empty0, NT);
    mbar_init(empty0 + 8, NT);
    mbar_init(sready, NT / 2);
    mbar_init(sfree, NT / 2);
    mbar_init(mready, NT / 2);
    mbar_init(mfree, NT / 2);
    mbar_init_fence();
  }

  if (tid < NT / 2) {
    // ================= WG0: the mask and the state =================
    // sacc[np][4 j + e]: p row 16 wq + g + 8 (e >> 1), n column 64 np + 8 j + 2 t + (e & 1)
    float sacc[NP][32];
    bar_sync_n(1, NT / 2);  // the barrier inits, before this warpgroup's arrivals
    if (p.init) {  // staged through stage 0 as fp32 [p][n]
      wg::load_init_state<N, NT / 2>(sacc, p, row, h, reinterpret_cast<float*>(Xs(0)), tid, wq, g,
                                     t, [] { bar_sync_n(1, NT / 2); });
    } else {
      wg::zero_state(sacc);
    }
    // S (bf16) as the K-major operand of WG1's Y = C S^T
    const uint32_t st_base = wg::state_store_base(Ss, wq, lane);
    auto store_state = [&]() { wg::store_state(sacc, st_base); };
    // masked M as WG1's K-major A operand: the accumulator layout of one 64-column panel, as S
    const uint32_t m_base = wg::state_store_base(Ms, wq, lane);
    store_state();      // S_{-1}: sready's completion 0
    fence_async_smem();  // the state and the staging stores -> the async proxy (wgmma, TMA)
    mbar_arrive(sready);
    bar_sync_n(0, NT);  // stage 0 free for the TMA loads
    setmaxnreg_inc<kWsRegsState>();

#pragma unroll 1
    for (int c = 0; c < nchunks; ++c) {
      const ChunkVecs cv(vec0 + (c & 1) * kVecBytes);
      const unsigned char *X = Xs(c & 1), *B = Bs(c & 1), *C = Cs(c & 1);
      wait_phase(full0 + 8 * (c & 1), (c >> 1) & 1);
      __syncwarp();
      float macc[32];
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < N / 16; ++s) wgmma_m64n64_ss<0, 0>(macc, desc_k(C, s), desc_k(B, s), s > 0);
      wgmma_commit();  // group: M
      uint32_t xa[4][4];
      wg::scaled_xt(xa, X, cv, wq, lane);
      wg::state_update(sacc, xa, B, cv);
      wgmma_commit();  // group: S
      wgmma_wait<1>();
      uint32_t ma[4][4];
      wg::mask_m(ma, macc, cv, wq, g, t);
      hand_over_m(ma, m_base, mfree, mready, c);  // M_c to WG1
      wgmma_wait<0>();
      mbar_arrive(empty0 + 8 * (c & 1));  // done with X, B, C and the vectors of stage c & 1
      if (c + 1 == nchunks) break;         // nobody reads the last state from Sbuf
      wait_phase(sfree, c & 1);            // WG1 has read S_{c-1} (sfree completion c)
      __syncwarp();
      store_state();
      fence_async_smem();
      mbar_arrive(sready);  // completion c + 1: S_c
    }
    if (p.final_states) wg::store_final_state<N>(sacc, p, row, h, wq, g, t);
    return;
  }

  // ================= WG1: the output, and the loads =================
  bar_sync_n(0, NT);
  setmaxnreg_dec<kWsRegsOutput>();
  const bool leader = tid == NT / 2;
  const unsigned char* vsrc = p.vecs + wg::vec_index(p, span, h, 0) * kVecBytes;
  auto issue = [&](int c) {  // the leader: stage c & 1's tiles and vectors on its full barrier
    const uint32_t bar = full0 + 8 * (c & 1);
    const int tok = static_cast<int>(tstart + static_cast<int64_t>(c) * Q), hb = static_cast<int>(bidx);
    mbar_arrive_expect_tx(bar, Lt::X_B + 2 * Lt::BC_B + kVecBytes);
    bulk_load(smem_u32(vec0 + (c & 1) * kVecBytes), vsrc + static_cast<int64_t>(c) * kVecBytes,
              kVecBytes, bar);
    tma_load_4d(smem_u32(Xs(c & 1)), &p.tm_x, 0, tok, h, hb, bar);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      tma_load_4d(smem_u32(Bs(c & 1)) + np * Q * 128, &p.tm_B, 64 * np, tok, grp, hb, bar);
      tma_load_4d(smem_u32(Cs(c & 1)) + np * Q * 128, &p.tm_C, 64 * np, tok, grp, hb, bar);
    }
  };
  if (leader) {
    if (nchunks > 0) issue(0);
    if (nchunks > 1) issue(1);
  }
  __syncwarp();
  bf16* out_head = static_cast<bf16*>(p.out) + bidx * p.out_b + h * p.out_h;

#pragma unroll 1
  for (int c = 0; c < nchunks; ++c) {
    const int64_t c0 = static_cast<int64_t>(c) * Q;
    const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
    const ChunkVecs cv(vec0 + (c & 1) * kVecBytes);
    unsigned char *X = Xs(c & 1), *C = Cs(c & 1);
    wait_phase(full0 + 8 * (c & 1), (c >> 1) & 1);
    wait_phase(sready, c & 1);  // S_{c-1} in Sbuf (completion c)
    __syncwarp();

    // ---- batch 1: Y = C S_{c-1}^T ----
    float yacc[32];
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < N / 16; ++s) wgmma_m64n64_ss<0, 0>(yacc, desc_k(C, s), desc_k(Ss, s), s > 0);
    wgmma_commit();
    wgmma_wait<0>();     // Y = C S_{c-1}^T done: Sbuf is free for S_c
    mbar_arrive(sfree);  // completion c
    wg::scale_y(yacc, cv, wq, g);

    // ---- batch 2: Y += M X (M masked by WG0, in Mbuf) ----
    wait_phase(mready, c & 1);  // completion c
    __syncwarp();
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64n64_ss<0, 1>(yacc, desc_k(Ms, s), desc_mn(X, s), true);
    wgmma_commit();
    wgmma_wait<0>();
    mbar_arrive(mfree);  // completion c

    // ---- epilogue: + D x, * silu(z), store (as fwd_wgmma.cu) ----
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = 16 * wq + g + 8 * hf;
      if (i >= nvalid) continue;
      const int64_t tok = tstart + c0 + i;
      float* y = yacc + 2 * hf;
      wg::finish_row(y, X, Dsm, p, bidx, tok, h, i, g, t);
      wg::store_row(out_head + tok * p.out_l + 2 * t, y);
    }
    mbar_arrive(empty0 + 8 * (c & 1));  // done with C, X and the vectors of stage c & 1
    if (leader && c + 2 < nchunks) {     // chunk c + 2 into stage c & 1 once both are done
      wait_phase(empty0 + 8 * (c & 1), (c >> 1) & 1);
      issue(c + 2);
    }
    __syncwarp();
  }
}

template <int N>
const char* launch_ws(const FwdParams& p, cudaStream_t stream) {
  return launch_ws_grid<ssd_fwd_ws_kernel<N>>(
      p, WsLayout<N>::SMEM,
      "it needs the chunk-vector pre-pass (not with cu_seqlens or an empty sequence)", stream);
}

}  // namespace

const char* launch_ssd_fwd_ws(const FwdParams& p, int dstate, cudaStream_t stream) {
  if (p.headdim != P) return "headdim must be 64";
  if (!p.tma) return "it needs TMA tile loads (bf16 x, B, C whose tensor maps encode; no cu_seqlens)";
  if (!p.vec_buf)
    return "it needs the chunk-vector pre-pass (not with MLMAMBA_SSD_FWD_VEC=0, cu_seqlens or an "
           "empty sequence)";
  if (dstate == 64) return launch_ws<64>(p, stream);
  if (dstate == 128) return launch_ws<128>(p, stream);
  return "dstate must be 64 or 128";
}

}  // namespace ssd
}  // namespace mlmamba
