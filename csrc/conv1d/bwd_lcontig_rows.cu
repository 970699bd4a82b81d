// Causal conv1d backward, l contiguous, for short rows (at most 1024 elements, 512 at fp32) that
// start on 16-byte boundaries: NR = 8 / KV consecutive rows a warp (4 / KV at fp32; flat index b *
// d + c), KV vectors a lane per row, every row's x and dout staged by cp.async before any is
// computed (the forward's scheme, fwd_lcontig_rows.cu; the math and the sums' order as
// bwd_lcontig_oneshot.cu, so the results are bitwise the one-row-a-warp kernel's). One dweight /
// dbias slot per row.
#include "common/check.h"
#include "conv1d/oneshot.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// Rows a warp: 8 vectors a lane of x and of dout in shared memory (32 KB a block at 16 bits);
// half as many at fp32.
template <typename T>
constexpr int rows_a_warp(int kv) { return (sizeof(T) == 4 ? 4 : 8) / kv; }

// Several rows a vector (bwd_lcontig_rows_kernel's S > 1; fwd_rows_shared in
// fwd_lcontig_rows.cu): vector k of lane l holds row k * S + l / G of the warp's, positions
// (l % G) * 8 .. +7 (G = 32 / S lanes a row); a row's first lane takes its initial states as the
// look-back, its last no g after it; dweight / dbias summed over the row's G lanes.
template <int W, typename R, int NR, int S, typename Q>
__device__ __forceinline__ void bwd_rows_shared(const ConvParams& p, Q& q, float (*side)[2 * W], uint32_t r0,
                                                uint32_t nr, uint32_t D, int L, int tid) {
  constexpr int H = W - 1, G = 32 / S;
  const int lane = tid & 31, s0 = lane % G * 8, fin0 = L - H;
  #pragma unroll
  for (int k = 0; k < NR; ++k) {  // the rows' vectors, all in flight (zeros past the end)
    const uint32_t j = k * S + lane / G, r = r0 + j, b = r / D, c = r - b * D;
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    const R* dr = static_cast<const R*>(p.dout) + b * p.dout_b + c * p.dout_d;
    const int n = j < nr ? L - s0 : 0;
    cp_async_run<8, R>(&q[k][0][tid][0], n > 0 ? xr + s0 : xr, n);
    cp_async_run<8, R>(&q[k][1][tid][0], n > 0 ? dr + s0 : dr, n);
  }
  finish_rows_staging<W>(p, r0, nr, D, lane, side);
  #pragma unroll 1
  for (int k = 0; k < NR && k * S < static_cast<int>(nr); ++k) {
    const uint32_t j = k * S + lane / G, jj = j < nr ? j : nr - 1, r = r0 + jj, b = r / D, c = r - b * D;
    float wr[W], bias, tail[H], xv[8], g[8], h[H], dw[W], db = 0.f;
    read_row_side<W>(side[jj], wr, bias, tail);
    smem_run_to_float<8, R>(&q[k][0][tid][0], xv);
    smem_run_to_float<8, R>(&q[k][1][tid][0], g);
    row_lookback<H>(xv, s0 == 0, tail, h);
    #pragma unroll
    for (int kk = 0; kk < W; ++kk) dw[kk] = 0.f;
    grad8<W>(wr, bias, xv, h, p.silu, g, dw, db);  // g = dout * act'(pre), and the sums
    float ah[H];  // g of the w-1 positions after the lane's: the next lane's (none past the row)
    #pragma unroll
    for (int i = 0; i < H; ++i) {
      const float dn = __shfl_down_sync(kFull, g[i], 1);
      ah[i] = lane % G == G - 1 ? 0.f : dn;
    }
    lane_sums<G>(dw, db);  // over the row's lanes
    if (j >= nr) continue;
    R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    if (p.dinit != nullptr && s0 == 0) {  // positions i - H < 0
      #pragma unroll
      for (int i = 0; i < H; ++i) {
        float acc = 0.f;
        #pragma unroll
        for (int kk = 0; kk < W; ++kk) {
          const int t = i - H + kk;  // < w-1 <= 7: inside the lane's vector
          if (t >= 0 && t < L) acc = fmaf(wr[kk], g[t >= 0 ? t : 0], acc);
        }
        if (p.dfinal != nullptr && i - H >= fin0)
          acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (i - H - fin0) * p.dfinal_k, p.dfinal_dtype);
        store_any(p.dinit, (static_cast<int64_t>(b) * D + c) * H + i, p.init_dtype, acc);
      }
    }
    if (s0 < L) {
      float o[8];
      conv8_bwd<W>(wr, g, ah, o);
      add_dfinal<H>(p, b, c, s0, L, o);
      if (s0 + 8 <= L) store_run<8>(dxr + s0, o);
      else store_checked<8>(dxr + s0, L - s0, o);
    }
    if (s0 == 0) {
      float* slot = p.partial + (static_cast<int64_t>(b) * D + c) * (W + 1);  // one slot a row
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) slot[kk] = dw[kk];
      slot[W] = db;
    }
  }
}

// kAny: rows may start anywhere (x, dout and dx rows equally far off a boundary): a row staged
// from the 16-byte boundary at or below its start, a elements earlier, as the forward's
// (fwd_lcontig_rows.cu); g is zero before the row's start, and the stores skip what is not the
// row's. S > 1 (KV 1, aligned rows of at most 256 / S elements): S rows a vector
// (bwd_rows_shared above).
template <int W, typename T, int KV, int MINB, bool kAny, int S = 1>
__global__ void __launch_bounds__(128, MINB) bwd_lcontig_rows_kernel(const ConvParams p, uint32_t nrows) {
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, NR = rows_a_warp<T>(KV), V = Words<8, R>::kCount;
  static_assert(S == 1 || (KV == 1 && !kAny), "several rows a vector: one vector a row, aligned rows");
  __shared__ uint4 q[NR * KV][2][128][V];    // [row * KV + vector][x, dout][thread][word]
  __shared__ float side[4][NR * S][2 * W];  // [warp][row]: reversed taps, bias, initial states
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t r0 = (blockIdx.x * 4u + warp) * (NR * S);
  if (r0 >= nrows) return;  // whole warp
  const uint32_t D = static_cast<uint32_t>(p.dim), nr = nrows - r0 < NR * S ? nrows - r0 : NR * S;
  const int L = static_cast<int>(p.seqlen), fin0 = L - H;
  if constexpr (S > 1) {
    bwd_rows_shared<W, R, NR, S>(p, q, side[warp], r0, nr, D, L, tid);
    return;
  }
  const uint32_t b0 = r0 / D, c0 = r0 - b0 * D;

  uint32_t b = b0, c = c0;
  for (uint32_t k = 0; k < nr; ++k) {  // the rows' vectors, all in flight (zeros past the end)
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    const R* dr = static_cast<const R*>(p.dout) + b * p.dout_b + c * p.dout_d;
    const int a = kAny ? static_cast<int>(reinterpret_cast<uintptr_t>(xr) % 16 / sizeof(R)) : 0;
    #pragma unroll
    for (int v = 0; v < KV; ++v) {
      const int s0 = v * 256 + lane * 8, n = L + a - s0;
      cp_async_run<8, R>(&q[k * KV + v][0][tid][0], n > 0 ? xr - a + s0 : xr, n);
      cp_async_run<8, R>(&q[k * KV + v][1][tid][0], n > 0 ? dr - a + s0 : dr, n);
    }
    if (++c == D) c = 0, ++b;
  }
  finish_rows_staging<W>(p, r0, nr, D, lane, side[warp]);

  b = b0, c = c0;
  #pragma unroll 1
  for (uint32_t k = 0; k < nr; ++k) {
    float wr[W], bias, tail[H];
    read_row_side<W>(side[warp][k], wr, bias, tail);
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    const int a = kAny ? static_cast<int>(reinterpret_cast<uintptr_t>(xr) % 16 / sizeof(R)) : 0;
    float g[KV][8], dw[W], db = 0.f;
    #pragma unroll
    for (int j = 0; j < W; ++j) dw[j] = 0.f;
    #pragma unroll
    for (int v = 0; v < KV; ++v) {  // g = dout * act'(pre), and the dweight / dbias sums
      float xv[8], h[H];
      smem_run_to_float<8, R>(&q[k * KV + v][0][tid][0], xv);
      smem_run_to_float<8, R>(&q[k * KV + v][1][tid][0], g[v]);
      lookback<H>(xv, v, lane, tail, h);
      const int p0 = v * 256 + lane * 8 - a;  // the row position of xv[0]
      if (kAny && v == 0 && p0 < H) {  // the neighbouring row's positions: no gradient flows
        inputs_before_row<H>(&side[warp][k][W + 1], p0, xv, h);
        #pragma unroll
        for (int i = 0; i < 8; ++i)
          if (p0 + i < 0) g[v][i] = 0.f;
      }
      grad8<W>(wr, bias, xv, h, p.silu, g[v], dw, db);
    }
    R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    #pragma unroll
    for (int v = 0; v < KV; ++v) {  // dx: g of the w-1 positions after each; zero past the row
      const int s0 = v * 256 + lane * 8;
      float ah[H];
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        const float dn = __shfl_down_sync(kFull, g[v][j], 1);
        const float wrap = v + 1 < KV ? __shfl_sync(kFull, g[v + 1 < KV ? v + 1 : v][j], 0) : 0.f;
        ah[j] = lane == 31 ? wrap : dn;
      }
      if (v == 0 && p.dinit != nullptr) {  // positions j - H < 0
        float g0[H];  // g at positions 0 .. H-1: lane 0's first ones (kAny: staged index t + a)
        #pragma unroll
        for (int t = 0; t < H; ++t) {
          if constexpr (kAny) {
            const int e = (t + a) & 7;
            float u = g[0][0];
            #pragma unroll
            for (int i = 1; i < 8; ++i) u = e == i ? g[0][i] : u;
            g0[t] = __shfl_sync(kFull, u, (t + a) >> 3);
          } else {
            g0[t] = g[0][t];
          }
        }
        if (lane == 0) {
          #pragma unroll
          for (int j = 0; j < H; ++j) {
            float acc = 0.f;
            #pragma unroll
            for (int kk = 0; kk < W; ++kk) {
              const int t = j - H + kk;  // < w-1 <= 7
              if (t >= 0 && t < L) acc = fmaf(wr[kk], g0[t >= 0 ? t : 0], acc);
            }
            if (p.dfinal != nullptr && j - H >= fin0)
              acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (j - H - fin0) * p.dfinal_k, p.dfinal_dtype);
            store_any(p.dinit, (static_cast<int64_t>(b) * D + c) * H + j, p.init_dtype, acc);
          }
        }
      }
      const int p0 = s0 - a;  // the row position of o[0]
      if (p0 + 8 > 0 && p0 < L) {
        float o[8];
        conv8_bwd<W>(wr, g[v], ah, o);
        add_dfinal<H>(p, b, c, p0, L, o);
        if (p0 >= 0 && p0 + 8 <= L) {
          store_run<8>(dxr - a + s0, o);
        } else {
          #pragma unroll
          for (int i = 0; i < 8; ++i)
            if (p0 + i >= 0 && p0 + i < L) dxr[p0 + i] = Elem<R>::fromf(o[i]);
        }
      }
    }
    lane_sums<32>(dw, db);  // warp sums, then the row's slot
    if (lane == 0) {
      float* slot = p.partial + (static_cast<int64_t>(b) * D + c) * (W + 1);  // one slot a row
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) slot[kk] = dw[kk];
      slot[W] = db;
    }
    if (++c == D) c = 0, ++b;
  }
}

template <int W, typename T, int KV, bool kAny, int S = 1>
void launch_bwd_lcontig_rows(const ConvParams& p, cudaStream_t s) {
  constexpr int NR = rows_a_warp<T>(KV) * S, MINB = sizeof(T) == 4 ? 4 : 6;  // NR: rows a warp
  const int64_t nrows = p.batch * p.dim;
  MLM_CHECK(nrows < (int64_t(1) << 32) - 4 * NR, "causal_conv1d_bwd: input too large for the short-row kernel");
  const int64_t blocks = (nrows + 4 * NR - 1) / (4 * NR);
  bwd_lcontig_rows_kernel<W, T, KV, MINB, kAny, S><<<static_cast<unsigned>(blocks), 128, 0, s>>>(
      p, static_cast<uint32_t>(nrows));
  MLM_CHECK_LAUNCH();
}

bool bwd_lcontig_rows(const ConvParams& p, int xdtype, bool any, cudaStream_t s) {
  const int64_t span = rows_span(p, xdtype, any);
  if (span == 0 || p.nslots_per_batch != 1) return false;
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      with_rows_variant<T>(span, any, [&]<int KV, bool kAny, int S>() {
        launch_bwd_lcontig_rows<W, T, KV, kAny, S>(p, s);
      });
    });
  });
  return true;
}

}  // namespace conv1d
}  // namespace mlmamba
