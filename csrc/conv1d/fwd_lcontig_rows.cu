// Causal conv1d forward, l contiguous, for short rows (at most 1024 elements, 512 at fp32). The
// one-shot kernel gives each row its own warp, so a 200-element row keeps a warp's 32 lanes for 400
// bytes: too few bytes in flight per SM (b64 L200 ran at 45% of a same-size copy). Here a warp
// takes NR consecutive rows (flat index b * d + c), KV 8-element vectors a lane per row, and stages
// all of them by cp.async before computing any: 8 vectors a lane, as the long-row kernel keeps.
// Each row's taps, bias and initial states go through shared memory, loaded by the warp's lanes
// together.
#include "common/check.h"
#include "conv1d/oneshot.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// kAny's 8 outputs of a lane: xv's positions p0 .. p0+7 of the row (some may be another
// row's), its word at outa + s0 (outa: the 16-byte boundary at or below the row's start).
template <int W, typename R>
__device__ __forceinline__ void store8_rows(const float (&wr)[W], float bias, const float (&xv)[8],
                                            const float (&h)[W - 1], bool silu, R* outa, R* fr, int s0,
                                            int p0, int L) {
  constexpr int H = W - 1;
  float o[8];
  conv8_fwd<W>(wr, bias, xv, h, silu, o);
  if (p0 >= 0 && p0 + 8 <= L) {
    store_run<8>(outa + s0, o);
  } else {
    #pragma unroll
    for (int i = 0; i < 8; ++i)
      if (p0 + i >= 0 && p0 + i < L) outa[s0 + i] = Elem<R>::fromf(o[i]);
  }
  if (fr != nullptr && p0 + 8 > L - H) {  // final states
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int j = p0 + i - (L - H);
      if (j >= 0 && p0 + i >= 0 && p0 + i < L) fr[j] = Elem<R>::fromf(xv[i]);
    }
  }
}

// Several rows a vector (fwd_lcontig_rows_kernel's S > 1): vector k of lane l holds row k * S +
// l / G of the warp's, positions (l % G) * 8 .. +7 (G = 32 / S lanes a row); a row's first lane
// takes the row's initial states as its look-back.
template <int W, typename R, int NR, int S, typename Q>
__device__ __forceinline__ void fwd_rows_shared(const ConvParams& p, Q& q, float (*side)[2 * W], uint32_t r0,
                                                uint32_t nr, uint32_t D, int L, int tid) {
  constexpr int H = W - 1, G = 32 / S;
  const int lane = tid & 31, s0 = lane % G * 8;
  #pragma unroll
  for (int k = 0; k < NR; ++k) {  // the rows' vectors, all in flight
    const uint32_t j = k * S + lane / G, r = r0 + j, b = r / D, c = r - b * D;
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    if (j < nr && s0 < L) cp_async_run<8, R>(&q[k][tid][0], xr + s0, L - s0);
  }
  finish_rows_staging<W>(p, r0, nr, D, lane, side);
  #pragma unroll 1
  for (int k = 0; k < NR && k * S < static_cast<int>(nr); ++k) {
    const uint32_t j = k * S + lane / G, jj = j < nr ? j : nr - 1, r = r0 + jj, b = r / D, c = r - b * D;
    float wr[W], bias, tail[H], xv[8], h[H];
    read_row_side<W>(side[jj], wr, bias, tail);
    smem_run_to_float<8, R>(&q[k][tid][0], xv);  // past the row: never stored
    row_lookback<H>(xv, s0 == 0, tail, h);
    if (j >= nr) continue;
    R* outr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    R* fr = p.final_states != nullptr ? static_cast<R*>(p.final_states) + (static_cast<int64_t>(b) * D + c) * H
                                      : nullptr;
    if (s0 < L) emit8_fwd<W, false>(wr, bias, xv, h, p.silu, outr, fr, s0, L);
    if (fr != nullptr && s0 == 0 && L < H) {  // initial states in front
      #pragma unroll
      for (int i = 0; i < H; ++i)
        if (i >= L) fr[i - L] = Elem<R>::fromf(tail[i]);
    }
  }
}

// kAny: rows may start anywhere (x and out rows equally far off a boundary): a row staged from
// the 16-byte boundary at or below its start, a elements earlier; positions before the row's
// start read its initial states, and the stores skip what is not the row's.
// S > 1 (KV 1, aligned rows of at most 256 / S elements): a vector holds S rows, 32 / S lanes
// each, so a warp takes 8 * S rows (fwd_rows_shared above).
template <int W, typename T, int KV, int MINB, bool kAny, int S = 1>
__global__ void __launch_bounds__(128, MINB) fwd_lcontig_rows_kernel(const ConvParams p, uint32_t nrows) {
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, NR = 8 / KV, V = Words<8, R>::kCount;
  static_assert(S == 1 || (KV == 1 && !kAny), "several rows a vector: one vector a row, aligned rows");
  __shared__ uint4 q[NR * KV][128][V];    // [row * KV + vector][thread][word]
  __shared__ float side[4][NR * S][2 * W];  // [warp][row]: reversed taps, bias, initial states
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t r0 = (blockIdx.x * 4u + warp) * (NR * S);
  if (r0 >= nrows) return;  // whole warp
  const uint32_t D = static_cast<uint32_t>(p.dim), nr = nrows - r0 < NR * S ? nrows - r0 : NR * S;
  const int L = static_cast<int>(p.seqlen);
  if constexpr (S > 1) {
    fwd_rows_shared<W, R, NR, S>(p, q, side[warp], r0, nr, D, L, tid);
    return;
  }
  const uint32_t b0 = r0 / D, c0 = r0 - b0 * D;

  uint32_t b = b0, c = c0;
  for (uint32_t k = 0; k < nr; ++k) {  // the rows' vectors, all in flight
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    const int a = kAny ? static_cast<int>(reinterpret_cast<uintptr_t>(xr) % 16 / sizeof(R)) : 0;
    #pragma unroll
    for (int v = 0; v < KV; ++v) {
      const int s0 = v * 256 + lane * 8;
      if (s0 < L + a) cp_async_run<8, R>(&q[k * KV + v][tid][0], xr - a + s0, L + a - s0);
    }
    if (++c == D) c = 0, ++b;
  }
  finish_rows_staging<W>(p, r0, nr, D, lane, side[warp]);

  b = b0, c = c0;
  #pragma unroll 1
  for (uint32_t k = 0; k < nr; ++k) {
    float wr[W], bias, tail[H];
    read_row_side<W>(side[warp][k], wr, bias, tail);
    R* outr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
    const int a = kAny ? static_cast<int>(reinterpret_cast<uintptr_t>(xr) % 16 / sizeof(R)) : 0;
    R* fr = p.final_states != nullptr ? static_cast<R*>(p.final_states) + (static_cast<int64_t>(b) * D + c) * H
                                      : nullptr;
    #pragma unroll
    for (int v = 0; v < KV; ++v) {
      const int s0 = v * 256 + lane * 8;
      float xv[8], h[H];
      smem_run_to_float<8, R>(&q[k * KV + v][tid][0], xv);  // past the row: never stored
      lookback<H>(xv, v, lane, tail, h);
      if constexpr (kAny) {
        const int p0 = s0 - a;  // the row position of xv[0]
        if (v == 0 && p0 < H) inputs_before_row<H>(&side[warp][k][W + 1], p0, xv, h);
        if (p0 + 8 > 0 && p0 < L) store8_rows(wr, bias, xv, h, p.silu, outr - a, fr, s0, p0, L);
      } else if (s0 < L) {
        emit8_fwd<W, false>(wr, bias, xv, h, p.silu, outr, fr, s0, L);
      }
    }
    if (fr != nullptr && lane == 0 && L < H) {  // initial states in front
      #pragma unroll
      for (int j = 0; j < H; ++j)
        if (j >= L) fr[j - L] = Elem<R>::fromf(side[warp][k][W + 1 + j]);
    }
    if (++c == D) c = 0, ++b;
  }
}

template <int W, typename T, int KV, bool kAny, int S = 1>
void launch_fwd_lcontig_rows(const ConvParams& p, cudaStream_t s) {
  constexpr int NR = 8 / KV * S, MINB = sizeof(T) == 4 ? 6 : 8;  // NR: rows a warp
  const int64_t nrows = p.batch * p.dim;
  MLM_CHECK(nrows < (int64_t(1) << 32) - 4 * NR, "causal_conv1d_fwd: input too large for the short-row kernel");
  const int64_t blocks = (nrows + 4 * NR - 1) / (4 * NR);
  fwd_lcontig_rows_kernel<W, T, KV, MINB, kAny, S><<<static_cast<unsigned>(blocks), 128, 0, s>>>(
      p, static_cast<uint32_t>(nrows));
  MLM_CHECK_LAUNCH();
}

bool fwd_lcontig_rows(const ConvParams& p, int xdtype, bool any, cudaStream_t s) {
  const int64_t span = rows_span(p, xdtype, any);
  if (span == 0) return false;
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      with_rows_variant<T>(span, any, [&]<int KV, bool kAny, int S>() {
        launch_fwd_lcontig_rows<W, T, KV, kAny, S>(p, s);
      });
    });
  });
  return true;
}

}  // namespace conv1d
}  // namespace mlmamba
