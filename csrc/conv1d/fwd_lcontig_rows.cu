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

// kAny: rows may start anywhere (x and out rows equally far off a boundary): a row staged from
// the 16-byte boundary at or below its start, a elements earlier; positions before the row's
// start read its initial states, and the stores skip what is not the row's.
template <int W, typename T, int KV, int MINB, bool kAny>
__global__ void __launch_bounds__(128, MINB) fwd_lcontig_rows_kernel(const ConvParams p, uint32_t nrows) {
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, NR = 8 / KV, V = Words<8, R>::kCount;
  __shared__ uint4 q[NR * KV][128][V];  // [row * KV + vector][thread][word]
  __shared__ float side[4][NR][2 * W];    // [warp][row]: reversed taps, bias, initial states
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t r0 = (blockIdx.x * 4u + warp) * NR;
  if (r0 >= nrows) return;  // whole warp
  const uint32_t D = static_cast<uint32_t>(p.dim), nr = nrows - r0 < NR ? nrows - r0 : NR;
  const int L = static_cast<int>(p.seqlen);
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
  cp_async_commit();
  load_rows_side<W>(p, r0, nr, D, lane, side[warp]);
  cp_async_wait<0>();
  __syncwarp();

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

template <int W, typename T, int KV, bool kAny>
void launch_fwd_lcontig_rows(const ConvParams& p, cudaStream_t s) {
  constexpr int NR = 8 / KV, MINB = sizeof(T) == 4 ? 6 : 8;
  const int64_t nrows = p.batch * p.dim;
  MLM_CHECK(nrows < (int64_t(1) << 32) - 4 * NR, "causal_conv1d_fwd: input too large for the short-row kernel");
  const int64_t blocks = (nrows + 4 * NR - 1) / (4 * NR);
  fwd_lcontig_rows_kernel<W, T, KV, MINB, kAny><<<static_cast<unsigned>(blocks), 128, 0, s>>>(
      p, static_cast<uint32_t>(nrows));
  MLM_CHECK_LAUNCH();
}

bool fwd_lcontig_rows(const ConvParams& p, int xdtype, bool any, cudaStream_t s) {
  // a row and the elements before it back to a 16-byte boundary (at most 7 at 16 bits); rows
  // of up to 1024 elements at 16 bits (two a warp), 512 at fp32
  const int64_t span = p.seqlen + (any ? (xdtype == kF32 ? 3 : 7) : 0);
  if (span > (xdtype == kF32 ? 512 : 1024) || tune_variant() == 20) return false;
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      auto go = [&]<bool kAny>() {
        if (span <= 256) launch_fwd_lcontig_rows<W, T, 1, kAny>(p, s);
        else if (span <= 512) launch_fwd_lcontig_rows<W, T, 2, kAny>(p, s);
        else if constexpr (sizeof(T) == 2) launch_fwd_lcontig_rows<W, T, 4, kAny>(p, s);
      };
      if (any) go.template operator()<true>();
      else go.template operator()<false>();
    });
  });
  return true;
}

}  // namespace conv1d
}  // namespace mlmamba
