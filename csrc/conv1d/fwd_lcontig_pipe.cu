// Causal conv1d forward, l contiguous, streaming fast path (no seq_idx, 16-byte aligned rows;
// the general path is fwd_lcontig.cuh). A tile is a warp's 256*K elements of one row; the
// tiles, flattened over (batch, channel, l), are split into equal contiguous ranges, one per
// warp of a persistent grid. Each lane queues its tile words through cp.async S-1 tiles ahead
// (pipe.cuh), so loads stay in flight while the warp computes and stores. The w-1 look-back
// comes from the previous lane by shuffle, and for lane 0 from the previous tile of the row
// (kept in registers); weights are loaded once per row the range touches.
#include <algorithm>
#include <type_traits>

#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// K 8-element vectors per lane and tile, S stages, MINB blocks per SM the registers are
// budgeted for.
template <int W, typename T, int K, int S, int MINB>
__global__ void __launch_bounds__(128, MINB) fwd_lcontig_pipe_kernel(const ConvParams p, int64_t ntiles) {
  using R = typename RawOf<T>::type;
  constexpr int V = Words<8, R>::kCount, H = W - 1;  // 16-byte words per 8-element vector
  __shared__ uint4 q[S][K][128][V];  // [stage][vector][thread][word]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  constexpr int64_t tile = 256 * K;
  const int64_t nseg = (L + tile - 1) / tile;
  const int nseg32 = static_cast<int>(nseg), D32 = static_cast<int>(D);
  const R* x = static_cast<const R*>(p.x);
  int64_t g0, g1;
  warp_range(ntiles, static_cast<int64_t>(gridDim.x) * 4, static_cast<int64_t>(blockIdx.x) * 4 + warp, g0, g1);

  TileIter pi, ci;  // producer, consumer
  pi.begin(g0, nseg, D);
  ci = pi;
  auto issue = [&](int s) {  // queue the producer's tile into stage s (an empty group past the end)
    if (pi.gt < g1) {
      const int64_t t_start = pi.seg * tile;
      const R* xr = x + pi.b * p.x_b + pi.c * p.x_d;
      if (t_start + tile <= L) {
        #pragma unroll
        for (int k = 0; k < K; ++k) cp_async_whole<8, R>(&q[s][k][tid][0], xr + t_start + (k * 32 + lane) * 8);
      } else {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t s0 = t_start + (k * 32 + lane) * 8;
          cp_async_run<8, R>(&q[s][k][tid][0], s0 < L ? xr + s0 : xr, L - s0);
        }
      }
      pi.next(nseg32, D32);
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);

  float wr[W], bias = 0.f, hprev[H];  // the row's weights; the previous tile's last inputs
  for (int s = 0; ci.gt < g1; ci.next(nseg32, D32), s = s + 1 == S ? 0 : s + 1) {
    issue(s == 0 ? S - 1 : s - 1);
    const int64_t t_start = ci.seg * tile, b = ci.b, c = ci.c;
    const R* xr = x + b * p.x_b + c * p.x_d;
    const bool first = t_start == 0;
    float h0[H];  // the inputs before the tile: initial states (or zeros) at t = 0
    if (first || ci.gt == g0) {  // a new row: weights, and the look-back (L1/L2 hits)
      #pragma unroll
      for (int k = 0; k < W; ++k) wr[k] = load_any(p.weight, c * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
      bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;
      #pragma unroll
      for (int j = 0; j < H; ++j)
        h0[j] = !first ? Elem<R>::tof(xr[t_start - H + j])
                : p.init != nullptr ? load_any(p.init, b * p.init_b + c * p.init_d + j * p.init_k, p.init_dtype)
                                    : 0.f;
    } else {
      #pragma unroll
      for (int j = 0; j < H; ++j) h0[j] = hprev[j];
    }
    cp_async_wait<S - 1>();
    float xv[K][8];
    #pragma unroll
    for (int k = 0; k < K; ++k) smem_run_to_float<8, R>(&q[s][k][tid][0], xv[k]);

    R* outr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s0 = t_start + (k * 32 + lane) * 8;
      float h[H];
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        const float up = __shfl_up_sync(kFull, xv[k][8 - H + j], 1);
        const float wrap = k > 0 ? __shfl_sync(kFull, xv[k > 0 ? k - 1 : 0][8 - H + j], 31) : h0[j];
        h[j] = lane == 0 ? wrap : up;
      }
      if (s0 >= L) continue;  // after the shuffles: every lane takes part in them
      float o[8];
      conv8_fwd<W>(wr, bias, xv[k], h, p.silu, o);
      if (s0 + 8 <= L) store_run<8>(outr + s0, o);
      else store_checked<8>(outr + s0, L - s0, o);
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) hprev[j] = __shfl_sync(kFull, xv[K - 1][8 - H + j], 31);

    if (p.final_states != nullptr && t_start + tile > L - H) {  // the row's last w-1 inputs (maybe two tiles)
      R* fr = static_cast<R*>(p.final_states) + (b * D + c) * H;
      #pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t s0 = t_start + (k * 32 + lane) * 8;
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t j = s0 + i - (L - H);
          if (j >= 0 && s0 + i < L) fr[j] = Elem<R>::fromf(xv[k][i]);
        }
      }
      if (first && lane == 0 && L < H) {  // initial states (or zeros) in front
        #pragma unroll
        for (int j = 0; j < H; ++j)
          if (j >= L) fr[j - L] = Elem<R>::fromf(h0[j]);
      }
    }
  }
  cp_async_wait<0>();
}

template <int W, typename T, int K, int S, int MINB>
void launch_fwd_lcontig_pipe(const ConvParams& p, cudaStream_t s) {
  auto kernel = fwd_lcontig_pipe_kernel<W, T, K, S, MINB>;
  static const int occ = occupancy(kernel, 128);
  launch_lcontig_tiles(kernel, occ, p, p.batch * p.dim * lcontig_segments(p, K), s);
}

void fwd_lcontig_pipe(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_fwd: input too large");
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // MLMAMBA_CONV1D_TUNE (bf16, width 4): 1 = 1 KB tiles at 6 blocks per SM, 2 = 4 stages;
      // on an H200 both within -1..+3% of the default (docs/perf-log.md).
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 1) return launch_fwd_lcontig_pipe<W, T, 2, 4, 6>(p, s);
        if (tune_variant() == 2) return launch_fwd_lcontig_pipe<W, T, 4, 4, 5>(p, s);
      }
      launch_fwd_lcontig_pipe<W, T, kFwdLVecs, sizeof(T) == 4 ? 2 : 3, 5>(p, s);
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
