// SSD backward, step 1 on sm_90a tensor cores (the default there; the plan and the
// measurements: docs/perf-log.md "ssd_scan backward" v8). The same walks as
// bwd_states.cu, one warpgroup per (sequence, direction, head, 64 NP state columns) carrying
// the whole 64 x 64 NP tile in wgmma accumulators:
//   forward:  S <- cont * S + (dt sout o x)^T B      (S_prev stored before each update)
//   backward: G <- cont * G + (sin o dy)^T C          (G_next stored before; dy = dout silu(z))
// and dinitial_states = G at the end. The forward kernel's state update (fwd_wg_parts.cuh)
// with the backward's chunk scales (vectors_kernel): thread 0 streams each chunk's x / dy
// (and z), B / C tiles by TMA and its scales by a bulk copy, kStages - 1 chunks ahead
// (full[s]: bytes; empty[s]: the 128 threads' arrivals after their wgmma); each chunk's
// outgoing tile goes out through shared memory (two tiles, out_full / out_free) by thread
// 0's TMA store, issued while the wgmma runs. bf16, headdim 64,
// d_state 64 or 128, no cu_seqlens; elsewhere bwd_states.cu runs.
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

constexpr int kThr = 128;
constexpr int kTileB = kQ * 64 * 2;  // one 64 x 64 bf16 tile (128-byte swizzled panel)
constexpr int kVecB = kVecW * 4;     // a chunk's scales: dt sout (64), sin (64), cont, pad

// Shared memory: two outgoing state tiles (NP panels each, the TMA stores' sources), then
// kStages stages of input tiles (x or dout, z, NP panels of B or C), their scales and the
// barriers (full / empty per stage, out_full / out_free per outgoing tile).
// S stages and NO outgoing tiles sized for MB CTAs per SM.
template <int NP, bool Z, int S, int NO, int MB>
struct StLayout {
  static constexpr int kStages = S;
  static constexpr int OUT_OFF = 0, OUT_B = NP * kTileB, IN_OFF = NO * OUT_B;
  static constexpr int X_OFF = 0, Z_OFF = kTileB, Y_OFF = (Z ? 2 : 1) * kTileB;  // in a stage
  static constexpr int STAGE_B = Y_OFF + NP * kTileB;
  static constexpr int VEC_OFF = IN_OFF + kStages * STAGE_B;
  static constexpr int BAR_OFF = VEC_OFF + kStages * kVecB;
  static constexpr int SMEM = BAR_OFF + (2 * kStages + 2 * NO) * 8 + 1024;  // + alignment slack
  static_assert(kVecB % 16 == 0 && BAR_OFF % 8 == 0, "alignment");
  static_assert(MB * (SMEM + 1024) <= 228 * 1024, "MB CTAs per SM");
};

// The A operand (rows p, k = tokens 16 s ..) of the update: the input tile's transpose scaled
// per token by wv (and gated by silu(z) first where zt), each product rounded to bf16 once, as
// bwd_states.cu does: (dout silu(z)) * scale.
template <bool Z>
__device__ __forceinline__ void scaled_in_t(uint32_t (&xa)[4][4], const unsigned char* X,
                                            const unsigned char* Zt, const float* wv, int w,
                                            int lane) {
  const int t = lane & 3;
  const int off = ssd::sw128_offset<kQ>((lane & 7) + (lane >> 4) * 8, 16 * w + ((lane >> 3) & 1) * 8);
  const uint32_t xr = ssd::smem_u32(X) + off;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    ssd::ldsm_x4_t(xa[s], xr + s * 16 * 128);
    uint32_t za[4];
    if constexpr (Z) ssd::ldsm_x4_t(za, ssd::smem_u32(Zt) + off + s * 16 * 128);
    const float2 wa = *reinterpret_cast<const float2*>(wv + 16 * s + 2 * t);
    const float2 wb = *reinterpret_cast<const float2*>(wv + 16 * s + 8 + 2 * t);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float2 f = ssd::unpack_bf16(xa[s][q]);
      if constexpr (Z) {
        const float2 zf = ssd::unpack_bf16(za[q]);
        f.x *= silu_f(zf.x);
        f.y *= silu_f(zf.y);
      }
      const float2 sc = q < 2 ? wa : wb;
      xa[s][q] = ssd::pack_bf16(f.x * sc.x, f.y * sc.y);
    }
  }
}

// Tile element of accumulator index i (state accumulators of fwd_wg_parts.cuh): p row
// 16 w + g + 8 ((i & 3) >> 1), column 64 np + 8 (i >> 2) + 2 t + (i & 1).
__device__ __forceinline__ int acc_row(int w, int g, int i) { return 16 * w + g + 8 * ((i & 3) >> 1); }
__device__ __forceinline__ int acc_col(int np, int t, int i) { return 64 * np + 8 * (i >> 2) + 2 * t + (i & 1); }

template <int NP, bool Z, int S, int NO, int MB>
__global__ void __launch_bounds__(kThr, MB) states_wg_kernel(const __grid_constant__ Params P,
                                                             const __grid_constant__ StatesMaps M) {
  using Lt = StLayout<NP, Z, S, NO, MB>;
  constexpr int kStages = Lt::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024u - (ssd::smem_u32(smem_raw) & 1023u)) & 1023u);
  // blockIdx.x: (sequence, direction), or the sequence alone where S_prev is given (g_only)
  const int dir = P.g_only ? 1 : blockIdx.x & 1, s = P.g_only ? blockIdx.x : blockIdx.x >> 1;
  const int hh = blockIdx.y;
  const int n0 = blockIdx.z * 64 * NP;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int gg = hh / P.hpg, nk = P.nch, slot0 = s * P.nch;
  const bool gate = Z && dir == 1;  // dy = dout silu(z)
  const uint32_t full0 = ssd::smem_u32(sm + Lt::BAR_OFF), empty0 = full0 + 8 * kStages;
  const uint32_t ofull0 = empty0 + 8 * kStages, ofree0 = ofull0 + 8 * NO;
  if (tid == 0) {
    for (int k = 0; k < kStages; ++k) {
      mlmamba::mbar_init(full0 + 8 * k, 1);
      mlmamba::mbar_init(empty0 + 8 * k, kThr);
    }
    for (int k = 0; k < NO; ++k) {
      mlmamba::mbar_init(ofull0 + 8 * k, kThr);  // the threads' writes of outgoing tile k
      mlmamba::mbar_init(ofree0 + 8 * k, 1);     // its TMA store has read it
    }
    mlmamba::mbar_init_fence();
  }
  __syncthreads();

  auto issue = [&](int it) {  // thread 0: walk step it's tiles and scales into stage it % S
    const int k = dir == 0 ? it : nk - 1 - it, st = it % kStages;
    unsigned char* base = sm + Lt::IN_OFF + st * Lt::STAGE_B;
    const uint32_t bar = full0 + 8 * st;
    mlmamba::mbar_arrive_expect_tx(bar, (gate ? 2 : 1) * kTileB + NP * kTileB + kVecB);
    mlmamba::bulk_load(ssd::smem_u32(sm + Lt::VEC_OFF + st * kVecB),
                   P.vec + (int64_t(slot0 + k) * P.h + hh) * kVecW, kVecB, bar);
    const int tok = k * kQ;
    mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::X_OFF), dir == 0 ? &M.x : &M.o, 0, tok, hh, s, bar);
    if (gate) mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::Z_OFF), &M.z, 0, tok, hh, s, bar);
#pragma unroll
    for (int np = 0; np < NP; ++np)
      mlmamba::tma_load_4d(ssd::smem_u32(base + Lt::Y_OFF + np * kTileB), dir == 0 ? &M.B : &M.C,
                       n0 + 64 * np, tok, gg, s, bar);
  };
  if (tid == 0)  // the first loads fly while the carried tile is read below
    for (int it = 0; it < kStages - 1 && it < nk; ++it) issue(it);

  // the carried tile from initial_states (forward) or dfinal_states (backward), else zero
  float acc[NP][32];
  {
    const CarriedSrc c0 = carried_src(P, dir);
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int nn = n0 + acc_col(np, t, i);
        acc[np][i] = c0.has && nn < P.n ? c0.at(s, hh, acc_row(w, g, i), nn) : 0.f;
      }
  }

  const CUtensorMap* ws = dir == 0 ? &M.wsS : &M.wsG;
#pragma unroll 1
  for (int it = 0; it < nk; ++it) {
    const int k = dir == 0 ? it : nk - 1 - it, st = it % kStages;
    if (tid == 0 && it + kStages - 1 < nk) {
      // stage (it - 1) % S: every thread's wgmma of step it - 1 is done with it
      if (it >= 1) mlmamba::mbar_wait(empty0 + 8 * ((it - 1) % kStages), ((it - 1) / kStages) & 1);
      issue(it + kStages - 1);
    }
    // the tile entering chunk k (forward) / arriving at its end (backward), bf16, into
    // outgoing tile ob once step it - NO's store has read it; thread 0 stores it by TMA while
    // the wgmma runs (per-thread 4-byte global stores held the registers: ncu)
    const int ob = it % NO;
    unsigned char* out = sm + Lt::OUT_OFF + ob * Lt::OUT_B;
    if (it >= NO) mlmamba::mbar_wait(ofree0 + 8 * ob, (it / NO - 1) & 1);
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int i = 0; i < 32; i += 2)
        *reinterpret_cast<__nv_bfloat162*>(out + ssd::sw128_offset<kQ>(acc_row(w, g, i), acc_col(np, t, i))) =
            __floats2bfloat162_rn(acc[np][i], acc[np][i + 1]);
    mlmamba::fence_async_smem();
    mlmamba::mbar_arrive(ofull0 + 8 * ob);

    mlmamba::mbar_wait(full0 + 8 * st, (it / kStages) & 1);
    const unsigned char* base = sm + Lt::IN_OFF + st * Lt::STAGE_B;
    const float* vec = reinterpret_cast<const float*>(sm + Lt::VEC_OFF + st * kVecB);
    uint32_t xa[4][4];
    if (gate) scaled_in_t<true>(xa, base + Lt::X_OFF, base + Lt::Z_OFF, vec + kQ, w, lane);
    else scaled_in_t<false>(xa, base + Lt::X_OFF, nullptr, vec + dir * kQ, w, lane);
    const float cont = vec[2 * kQ];
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[np][i] *= cont;
    ssd::wgmma_fence();
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4)
        ssd::wgmma_m64n64_rs<1>(acc[np], xa[s4], ssd::desc_mn(base + Lt::Y_OFF + np * kTileB, s4), true);
    ssd::wgmma_commit();
    if (tid == 0) {
      mlmamba::mbar_wait(ofull0 + 8 * ob, (it / NO) & 1);
#pragma unroll
      for (int np = 0; np < NP; ++np)
        mlmamba::tma_store_4d(ws, ssd::smem_u32(out + np * kTileB), n0 + 64 * np, 0, 0,
                          (slot0 + k) * P.h + hh);
      mlmamba::bulk_commit();
      if (it >= NO - 1) {  // step it - NO + 1's store has read its tile: free it
        mlmamba::bulk_wait_read<NO - 1>();
        mlmamba::mbar_arrive(ofree0 + 8 * ((it - NO + 1) % NO));
      }
    }
    ssd::wgmma_wait<0>();
    mlmamba::mbar_arrive(empty0 + 8 * st);
  }

  if (tid == 0) mlmamba::bulk_wait_all();  // the outgoing tiles stay valid until the stores are done
  if (dir == 1 && P.has_init) {
#pragma unroll
    for (int np = 0; np < NP; ++np)
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int pp = acc_row(w, g, i), nn = n0 + acc_col(np, t, i);
        if (nn < P.n) st_code(P.dinit, P.init_code, ((int64_t(s) * P.h + hh) * P.p + pp) * P.n + nn, acc[np][i]);
      }
  }
}

template <int NP, bool Z, int S, int NO, int MB>
bool launch_np(const Params& P, const StatesMaps& M, cudaStream_t st) {
  auto kern = states_wg_kernel<NP, Z, S, NO, MB>;
  constexpr int smem = StLayout<NP, Z, S, NO, MB>::SMEM;
  if (ensure_max_dynamic_smem(reinterpret_cast<const void*>(kern), smem) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const dim3 grid(P.nseq * (P.g_only ? 1 : 2), P.h, P.npad / (64 * NP));
  kern<<<grid, kThr, smem, st>>>(P, M);
  return true;
}

}  // namespace

bool states_wg_ok(const Params& P, int tcode) {
  return wg_shape_ok(P, tcode) && P.vec != nullptr;
}

bool launch_states_wg(const Params& P, const StatesMaps& M, int num_sms, void* stream) {
  static const bool image =
      !sm90_image_missing(reinterpret_cast<const void*>(states_wg_kernel<1, false, 3, 2, 2>));
  if (!image) return false;
  auto st = static_cast<cudaStream_t>(stream);
  // 128 state columns in one tile where that still gives two CTAs per SM, else 64 per CTA
  const bool np2 = P.npad == 128 && int64_t(P.nseq) * (P.g_only ? 1 : 2) * P.h >= 2LL * num_sms;
  // 3 stages and 2 outgoing tiles at 2 CTAs per SM (2 stages with z and 128 columns). Measured
  // against (H200, session 9): 2 stages, 1 tile, 3 CTAs/SM (-1..+2%) and 64 columns at 3
  // CTAs/SM (-0..+4%): docs/perf-log.md
  if (P.has_z) return np2 ? launch_np<2, true, 2, 2, 2>(P, M, st) : launch_np<1, true, 3, 2, 2>(P, M, st);
  return np2 ? launch_np<2, false, 3, 2, 2>(P, M, st) : launch_np<1, false, 3, 2, 2>(P, M, st);
}

}  // namespace ssd_bwd
}  // namespace mlmamba
