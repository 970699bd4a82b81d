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
// Tiles: 128-byte-swizzled panels (wgmma.cuh); X, B, C land by TMA (or cp.async) one chunk
// ahead. Chunk vectors: from a pre-pass (fwd_vectors_kernel, msc_vectors_kernel below), loaded
// with the tiles; else (cu_seqlens, MLMAMBA_SSD_FWD_VEC=0) warp 0 computes the next chunk's
// during batch 1. In MSC mode warp 0 always fetches the next chunk's positions then.
// MSC mode (msc_scan, fwd_msc.cuh): k scans per CTA through their orders, x conv'd in the load.
#include <cuda_runtime.h>

#include "common/device_utils.cuh"
#include "common/launch.h"
#include "common/tma.cuh"
#include "ssd/fwd.h"
#include "ssd/fwd_msc.cuh"
#include "ssd/fwd_vectors.cuh"
#include "ssd/fwd_wg_parts.cuh"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {
namespace {

using bf16 = __nv_bfloat16;
constexpr int Q = kChunk, P = 64, NT = 128;
constexpr int kSoPerSm = kFwdStateOnlyPerSm;  // state-only CTAs per SM (fwd_split.cpp's waves)

// MSC adds the raw x rows (single: the conv reads them at the top of the chunk, the next
// chunk's land after it) and three buffers of positions. SO (state only) needs no C tile and
// no bf16 state: ~52 KB at N 128, 4 CTAs per SM (there Cs(1) and Ss point at the vectors:
// the SO path must not load C or store the state).
template <int N, bool MSC, bool SO = false>
struct WgLayout {
  static constexpr int NP = N / 64;             // panels of a 64 x N tile
  static constexpr int X_B = Q * P * 2;         // bytes of one X tile
  static constexpr int BC_B = Q * N * 2;        // of one B or C tile
  static constexpr int STAGE_B = X_B + (SO ? 1 : 2) * BC_B;
  static constexpr int S_B = SO ? 0 : P * N * 2;  // the state, bf16
  static constexpr int S_OFF = 2 * STAGE_B;
  static constexpr int VEC_OFF = S_OFF + S_B;
  static constexpr int D_OFF = VEC_OFF + 2 * kVecBytes;
  static constexpr int BAR_OFF = D_OFF + P * 4;  // two mbarriers (TMA stages)
  static constexpr int RAW_OFF = BAR_OFF + 16;
  static constexpr int ORD_OFF = RAW_OFF + (MSC ? MscRaw<P>::BYTES : 0);
  static constexpr int CW_OFF = ORD_OFF + (MSC ? 3 * kMscOrd * 4 : 0);  // conv weights, bias
  static constexpr int SMEM = CW_OFF + (MSC ? P * (kMscW + 1) * 4 : 0) + 1024;  // + alignment slack
  static_assert(CW_OFF % 16 == 0, "conv weights are read as float4");
};
// kSoPerSm state-only CTAs fit an SM's 228 KB (1 KB of it reserved per CTA)
static_assert(kSoPerSm * (WgLayout<128, false, true>::SMEM + 1024) <= 228 * 1024,
              "the state-only layout must fit kSoPerSm CTAs per SM");

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

// SO (state only): the segment end state alone (fwd_split.cpp, step 1): no C, no outputs;
// a load-latency-bound walk, so 4 CTAs per SM (registers <= 128, kSoPerSm).
// MSC: the k scans of msc_scan (fwd_msc.cuh) one after another, y merged in the epilogue.
template <int N, bool SO, bool MSC>
__global__ void __launch_bounds__(NT, SO ? kSoPerSm : 1) ssd_fwd_wgmma_kernel(const __grid_constant__ FwdParams p) {
  using Lt = WgLayout<N, MSC, SO>;
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
  const wg::RowSpan span = wg::row_span(p, row);
  const int64_t bidx = span.bidx, tstart = span.tstart, len = span.len;
  const bf16* xg = static_cast<const bf16*>(p.x) + bidx * p.x_b + h * p.x_h;
  const bf16* Bg = static_cast<const bf16*>(p.B) + bidx * p.B_b + grp * p.B_g;
  const bf16* Cg = static_cast<const bf16*>(p.C) + bidx * p.C_b + grp * p.C_g;
  bf16* out_head = static_cast<bf16*>(p.out) + bidx * p.out_b + h * p.out_h;
  // MSC: the raw x rows, the positions (buffer c % 3 for chunk c), this row of xBC
  unsigned char* rawsm = sm + Lt::RAW_OFF;
  int* ordsm = reinterpret_cast<int*>(sm + Lt::ORD_OFF);
  float* cwsm = reinterpret_cast<float*>(sm + Lt::CW_OFF);
  const bf16* rows = static_cast<const bf16*>(p.x) + bidx * p.x_b;
  // TMA: stage b's tiles complete mbarrier b (initialised before any load is issued)
  const bool tma = !MSC && p.tma;
  // chunk vectors from the pre-pass: this (row, head)'s run of chunks (MSC: of scan 0)
  const bool pre = p.vecs != nullptr;
  const unsigned char* vsrc0 = pre ? p.vecs + wg::vec_index(p, span, h, 0) * kVecBytes : nullptr;
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
  float decay_prod = 1.f;  // SO: the walk's chunk decays multiplied in order (thread 0)
  const int nscans = MSC ? p.msc.nscans : 1;
#pragma unroll 1
  for (int sc = 0; sc < nscans; ++sc) {
    if (MSC && sc > 0) __syncthreads();  // scan sc - 1 is done with the buffers and the sums
    const int hs = MSC ? sc * static_cast<int>(p.nheads) + h : h;  // A, D, dt_bias: (k, h) in MSC
    const int* order = MSC ? p.msc.orders + sc * p.seqlen : nullptr;
    const unsigned char* vsrc =  // MSC: the pre-pass's rows are (scan, row)
        pre && MSC ? vsrc0 + sc * p.nrows * p.nheads * p.vec_nch * kVecBytes : vsrc0;
    const float Ah = p.A[hs];
    const float dtb = p.dt_bias ? p.dt_bias[hs] : 0.f;
    if (tid < P) Dsm[tid] = p.D ? p.D[hs * p.D_h + tid * p.D_p] : 0.f;
    if constexpr (MSC) {  // read after the __syncthreads before the first chunk's conv
      const int64_t cd = p.msc.conv_dim;
      msc_stage_weights<P, NT>(cwsm, p.msc.conv_w + sc * cd * kMscW,
                               p.msc.conv_b ? p.msc.conv_b + sc * cd : nullptr, h * p.x_h, tid);
    }
    if (!MSC && p.init) {  // staged through stage 0 (SO: and 1) as fp32 [p][n]
      wg::load_init_state<N, NT>(sacc, p, row, h, reinterpret_cast<float*>(Xs(0)), tid, warp, g, t,
                                 [] { __syncthreads(); });
      fence_async_smem();  // the generic stores above, then stage 0's loads (maybe TMA: async proxy)
      __syncthreads();     // stage 0 is overwritten by the first chunk's loads
    } else {
      wg::zero_state(sacc);
    }
    const uint32_t st_base = wg::state_store_base(Ss, warp, lane);
    auto store_state = [&]() { wg::store_state(sacc, st_base); };
    if constexpr (!SO) store_state();

    const int nchunks = static_cast<int>((len + Q - 1) / Q);
    auto issue = [&](int c) {
      if constexpr (MSC) {  // raw x rows at the chunk's positions; B, C (conv'd per scan, in
                            // scan order) as plain tiles
        const int* ord = ordsm + (c % 3) * kMscOrd;
        const int64_t bc = sc * p.msc.bc_s, c0 = static_cast<int64_t>(c) * Q;
        const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
        msc_issue_raw<P, NT>(smem_u32(rawsm), ord, rows, p.x_l, h * p.x_h, tid);
        load_tile<N>(smem_u32(Bs(c & 1)), Bg + bc, p.B_l, c0, nv, tid);
        load_tile<N>(smem_u32(Cs(c & 1)), Cg + bc, p.C_l, c0, nv, tid);
        if (pre && tid < kVecBytes / 16)
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                           smem_u32(vec0 + (c & 1) * kVecBytes) + 16 * tid),
                       "l"(vsrc + static_cast<int64_t>(c) * kVecBytes + 16 * tid));
        cp_async_commit();
        return;
      }
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      if (tma) {  // one thread: the stage's boxes, counted in bytes on its mbarrier
        if (tid == 0) {
          const uint32_t bar = bar0 + 8 * (c & 1);
          const int tok = static_cast<int>(tstart + c0), hb = static_cast<int>(bidx);
          mbar_arrive_expect_tx(bar, Lt::X_B + (SO ? 1 : 2) * Lt::BC_B + (pre ? kVecBytes : 0));
          if (pre) bulk_load(smem_u32(vec0 + (c & 1) * kVecBytes), vsrc + static_cast<int64_t>(c) * kVecBytes, kVecBytes, bar);
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
      if (pre && tid < kVecBytes / 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                         smem_u32(vec0 + (c & 1) * kVecBytes) + 16 * tid),
                     "l"(vsrc + static_cast<int64_t>(c) * kVecBytes + 16 * tid));
      cp_async_commit();
    };
    RawDt raw;
    auto fetch = [&](int64_t c0) {  // warp 0: raw dt (MSC: and positions) of the chunk at c0
      if constexpr (MSC)
        msc_fetch(raw, ordsm + (c0 / Q % 3) * kMscOrd, p, order, bidx, len, h, c0, lane, !pre);
      else
        raw.fetch(p, bidx, tstart, len, h, c0, lane);
    };
    auto vectors = [&](int c) {  // warp 0: chunk c's vectors into buffer c & 1 (unless the
      // pre-pass made them), then fetch c + 1
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      if (!pre) chunk_vectors(ChunkVecs(vec0 + (c & 1) * kVecBytes), raw, p, Ah, dtb, c0, nv, lane);
      if (c + 1 < nchunks) fetch(c0 + Q);
    };
    if (nchunks > 0) {
      if (!MSC) issue(0);
      if (warp == 0 && (MSC || !pre)) {
        fetch(0);
        vectors(0);
      }
      if (MSC) {  // chunk 0's positions -> all threads
        __syncthreads();
        issue(0);
      }
    }

    for (int c = 0; c < nchunks; ++c) {
      const int64_t c0 = static_cast<int64_t>(c) * Q;
      const int nvalid = static_cast<int>(len - c0 < Q ? len - c0 : Q);
      const ChunkVecs cv(vec0 + (c & 1) * kVecBytes);
      unsigned char *X = Xs(c & 1), *B = Bs(c & 1), *C = Cs(c & 1);
      if (tma) mbar_wait(bar0 + 8 * (c & 1), (c >> 1) & 1);  // the (c / 2)-th fill of stage c & 1
      else cp_async_wait<0>();
      if constexpr (MSC) {  // raw x rows of chunk c -> conv + SiLU -> X
        __syncthreads();
        msc_conv_x<P, NT>(X, rawsm, cwsm, nvalid, tid);
      }
      fence_async_smem();  // this thread's cp.async and S stores -> the async proxy
      __syncthreads();     // tiles, vectors and S_prev of chunk c visible to all
      if (c + 1 < nchunks) issue(c + 1);
      if constexpr (MSC) {  // rows of the running sum to L2: this chunk's (or the next one's)
        const int ahead = p.msc.prefetch == 2 ? 1 : 0;
        const int64_t n0 = c0 + ahead * Q;
        if (p.msc.prefetch > 0 && n0 < len)
          msc_prefetch_acc(ordsm + ((c + ahead) % 3) * kMscOrd + kMscLB, sc, nscans,
                           static_cast<int>(len - n0 < Q ? len - n0 : Q), bidx, h, tid, p);
      }

      if constexpr (SO) {  // S = decay S + (w o X)^T B, nothing else
        if (tid == 0) decay_prod *= cv.decay()[0];
        if (warp == 0 && !pre && c + 1 < nchunks) vectors(c + 1);
        uint32_t xa[4][4];
        wg::scaled_xt(xa, X, cv, warp, lane);
        wg::state_update(sacc, xa, B, cv);
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
      if (warp == 0 && (MSC || !pre) && c + 1 < nchunks) vectors(c + 1);  // overlaps the tensor cores
      wgmma_wait<1>();

      uint32_t ma[4][4], xa[4][4];
      wg::mask_m(ma, macc, cv, warp, g, t);
      wg::scaled_xt(xa, X, cv, warp, lane);
      wgmma_wait<0>();  // Y = C S_prev^T done: scale row i by e_i
      wg::scale_y(yacc, cv, warp, g);

      // ---- batch 2: S = decay S + (w o X)^T B, Y += M X ----
      wg::state_update(sacc, xa, B, cv);
      wgmma_commit();  // group: S
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_m64n64_rs<1>(yacc, ma[s], desc_mn(X, s), true);
      wgmma_commit();  // group: Y
      wgmma_wait<1>();
      store_state();   // S for the next chunk (batch 1, its only reader, is done) while Y computes
      wgmma_wait<0>();

      // ---- epilogue: + D x, * silu(z), store (lane: rows 16 w + g (+8), columns 8 j8 + 2 t) ----
      int pos[2];  // MSC: the rows' raster positions (-1: not stored)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * warp + g + 8 * hf;
        pos[hf] = MSC && i < nvalid ? ordsm[(c % 3) * kMscOrd + kMscLB + i] : -1;
        if (i >= nvalid) continue;
        const int64_t tok = tstart + c0 + i;
        float* y = yacc + 2 * hf;  // y[4 j8], y[4 j8 + 1]
        wg::finish_row(y, X, Dsm, p, bidx, tok, h, i, g, t);
        if (!MSC) wg::store_row(out_head + tok * p.out_l + 2 * t, y);
      }
      if constexpr (MSC) msc_store(yacc, pos, sc, nscans, bidx, h, t, p);
    }
  }  // scans

  if (!MSC && p.final_states) wg::store_final_state<N>(sacc, p, row, h, warp, g, t);
  if (SO && p.seg_decay && tid == 0) p.seg_decay[static_cast<int64_t>(row) * p.nheads + h] = decay_prod;
}

// The pre-pass: each chunk's vectors, one warp per (chunk, row, head), the walk's own code
// (RawDt::fetch, chunk_vectors) on the walk's rows and segments, so the same values.
__global__ void __launch_bounds__(128) fwd_vectors_kernel(const __grid_constant__ FwdParams p) {
  __shared__ __align__(16) unsigned char buf[4][kVecBytes];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.z * 4 + warp, row = blockIdx.y, c = blockIdx.x;
  if (h >= p.nheads) return;
  const wg::RowSpan span = wg::row_span(p, row);  // never cu_seqlens here
  const int64_t bidx = span.bidx, tstart = span.tstart, len = span.len;
  const int64_t c0 = static_cast<int64_t>(c) * Q;
  if (c0 >= len) return;  // the last segment can be shorter
  RawDt raw;
  raw.fetch(p, bidx, tstart, len, h, c0, lane);
  const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
  chunk_vectors(ChunkVecs(buf[warp]), raw, p, p.A[h], p.dt_bias ? p.dt_bias[h] : 0.f, c0, nv, lane);
  __syncwarp();
  const uint4* src = reinterpret_cast<const uint4*>(buf[warp]);
  uint4* dst = reinterpret_cast<uint4*>(p.vec_buf + wg::vec_index(p, span, h, c) * kVecBytes);
  for (int i = lane; i < kVecBytes / 16; i += 32) dst[i] = src[i];
}

// The same for MSC mode: one warp per (chunk, scan, row, head), dt through the scan's order
// (msc_fetch) and the scan's A, dt_bias, as the walk would; rows of the buffer are (scan, row).
__global__ void __launch_bounds__(128) msc_vectors_kernel(const __grid_constant__ FwdParams p) {
  __shared__ __align__(16) unsigned char buf[4][kVecBytes];
  __shared__ int ord[4][kMscOrd];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hgroups = static_cast<int>((p.nheads + 3) / 4);
  const int sc = blockIdx.z / hgroups, h = (blockIdx.z % hgroups) * 4 + warp;
  const int row = blockIdx.y, c = blockIdx.x;
  if (h >= p.nheads) return;
  const int64_t len = p.seqlen, c0 = static_cast<int64_t>(c) * Q;
  const int hs = sc * static_cast<int>(p.nheads) + h;
  RawDt raw;
  msc_fetch(raw, ord[warp], p, p.msc.orders + sc * p.seqlen, row, len, h, c0, lane);
  const int nv = static_cast<int>(len - c0 < Q ? len - c0 : Q);
  chunk_vectors(ChunkVecs(buf[warp]), raw, p, p.A[hs], p.dt_bias ? p.dt_bias[hs] : 0.f, c0, nv, lane);
  __syncwarp();
  const uint4* src = reinterpret_cast<const uint4*>(buf[warp]);
  uint4* dst = reinterpret_cast<uint4*>(
      p.vec_buf +
      (((static_cast<int64_t>(sc) * p.nrows + row) * p.nheads + h) * p.vec_nch + c) * kVecBytes);
  for (int i = lane; i < kVecBytes / 16; i += 32) dst[i] = src[i];
}

// Whether ssd_fwd_vectors fills p.vec_buf for p's rows (buffer set and large enough, ...).
bool ssd_fwd_vectors_apply(const FwdParams& p) {
  if (!p.vec_buf || p.cu_seqlens || p.nrows <= 0 || p.nheads <= 0) return false;
  const int64_t scans = p.msc.nscans > 0 ? p.msc.nscans : 1;
  const int64_t nch = ((p.seg_len ? p.seg_len : p.seqlen) + Q - 1) / Q;  // per launch row
  const int64_t batch_rows = p.seg_len ? (p.nrows + p.seg_rows - 1) / p.seg_rows : p.nrows;
  return nch > 0 && nch < (int64_t(1) << 31) && p.nrows <= 65535 &&
         (p.nheads + 3) / 4 * scans <= 65535 &&
         scans * batch_rows * p.nheads * ((p.seqlen + Q - 1) / Q) * kVecBytes <= p.vec_cap;
}

}  // namespace

FwdParams ssd_fwd_vectors(const FwdParams& p, cudaStream_t stream) {
  FwdParams q = p;
  q.vecs = nullptr;
  if (!ssd_fwd_vectors_apply(p)) return q;
  const int64_t scans = p.msc.nscans > 0 ? p.msc.nscans : 1;
  q.vec_nch = (p.seqlen + Q - 1) / Q;  // the buffer's runs: whole sequences (wg::vec_index)
  const int64_t nch = ((p.seg_len ? p.seg_len : p.seqlen) + Q - 1) / Q;
  const dim3 grid(static_cast<unsigned>(nch), static_cast<unsigned>(p.nrows),
                  static_cast<unsigned>((p.nheads + 3) / 4 * scans));
  if (p.msc.nscans > 0) msc_vectors_kernel<<<grid, 128, 0, stream>>>(q);
  else fwd_vectors_kernel<<<grid, 128, 0, stream>>>(q);
  q.vecs = q.vec_buf;
  return q;
}

namespace {

template <int N, bool SO, bool MSC = false>
const char* launch_n(const FwdParams& p, cudaStream_t stream) {
  auto kern = ssd_fwd_wgmma_kernel<N, SO, MSC>;
  // the image check once per process; the shared-memory limit once per device (launch.h)
  static const char* const image = sm90_image_missing(reinterpret_cast<const void*>(kern));
  if (image) return image;
  constexpr int smem = WgLayout<N, MSC, SO>::SMEM;
  if (ensure_max_dynamic_smem(reinterpret_cast<const void*>(kern), smem) != cudaSuccess) {
    cudaGetLastError();
    return "cannot reserve its shared memory";
  }
  // the pre-pass (if asked and not made by the caller), before this launch
  const FwdParams q = p.vecs ? p : ssd_fwd_vectors(p, stream);
  dim3 grid(static_cast<unsigned>(p.nheads), static_cast<unsigned>(p.nrows));
  kern<<<grid, NT, smem, stream>>>(q);
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
