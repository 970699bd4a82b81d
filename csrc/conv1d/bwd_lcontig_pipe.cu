// Causal conv1d backward, l contiguous, streaming fast path (no seq_idx, 16-byte aligned rows;
// the math and the general path: bwd_lcontig.cuh). Tiles, ranges and the queue as in
// fwd_lcontig_pipe.cu; a lane queues its x and dout words S-1 tiles ahead, lane 0 also the 8
// inputs and douts after the tile (the look-ahead of lane 31). dweight/dbias: a warp sums over
// its piece of a row (the tiles of one row in its range) and writes the sum to the slot of the
// piece's first tile, zeros to the others: one slot per tile, as in v2, reduced in a fixed order.
#include <algorithm>
#include <type_traits>

#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// K 8-element vectors per lane and tile, S stages, MINB blocks per SM the registers are
// budgeted for.
template <int W, typename T, int K, int S, int MINB>
__global__ void __launch_bounds__(128, MINB) bwd_lcontig_pipe_kernel(const ConvParams p, int64_t ntiles) {
  using R = typename RawOf<T>::type;
  constexpr int V = Words<8, R>::kCount, H = W - 1;
  __shared__ uint4 q[S][2][K][128][V];  // [stage][x, dout][vector][thread][word]
  __shared__ uint4 qe[S][4][2][V];      // [stage][warp][x, dout] after the tile
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  constexpr int64_t tile = 256 * K;
  const int64_t nseg = (L + tile - 1) / tile;
  const int nseg32 = static_cast<int>(nseg), D32 = static_cast<int>(D);
  const R* x = static_cast<const R*>(p.x);
  const R* dout = static_cast<const R*>(p.dout);
  int64_t g0, g1;
  warp_range(ntiles, static_cast<int64_t>(gridDim.x) * 4, static_cast<int64_t>(blockIdx.x) * 4 + warp, g0, g1);

  TileIter pi, ci;  // producer, consumer
  pi.begin(g0, nseg, D);
  ci = pi;
  auto issue = [&](int s) {  // queue the producer's tile into stage s (an empty group past the end)
    if (pi.gt < g1) {
      const int64_t t_start = pi.seg * tile, t_end = t_start + tile;
      const R* xr = x + pi.b * p.x_b + pi.c * p.x_d;
      const R* dr = dout + pi.b * p.dout_b + pi.c * p.dout_d;
      if (t_end <= L) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t s0 = t_start + (k * 32 + lane) * 8;
          cp_async_whole<8, R>(&q[s][0][k][tid][0], xr + s0);
          cp_async_whole<8, R>(&q[s][1][k][tid][0], dr + s0);
        }
      } else {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t s0 = t_start + (k * 32 + lane) * 8;
          cp_async_run<8, R>(&q[s][0][k][tid][0], s0 < L ? xr + s0 : xr, L - s0);
          cp_async_run<8, R>(&q[s][1][k][tid][0], s0 < L ? dr + s0 : dr, L - s0);
        }
      }
      if (lane == 0) {
        const bool more = t_end < L;
        cp_async_run<8, R>(&qe[s][warp][0][0], more ? xr + t_end : xr, more ? L - t_end : 0);
        cp_async_run<8, R>(&qe[s][warp][1][0], more ? dr + t_end : dr, more ? L - t_end : 0);
      }
      pi.next(nseg32, D32);
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);

  // Per row piece: the weights, the dweight/dbias sums, the piece's first tile; per tile: the
  // previous tile's last inputs.
  float wr[W], bias = 0.f, hprev[H], dw[W], db = 0.f;
  int seg_first = 0;
  for (int s = 0; ci.gt < g1; ci.next(nseg32, D32), s = s + 1 == S ? 0 : s + 1) {
    __syncwarp();  // the warp is done with the stage refilled next (lane 0's look-ahead is shared)
    issue(s == 0 ? S - 1 : s - 1);
    const int seg = ci.seg;
    const int64_t t_start = seg * tile, b = ci.b, c = ci.c;
    const R* xr = x + b * p.x_b + c * p.x_d;
    const bool first = t_start == 0;
    const bool piece_end = seg == nseg32 - 1 || ci.gt + 1 == g1;
    float h0[H];  // the inputs before the tile: initial states (or zeros) at t = 0
    if (first || ci.gt == g0) {  // a new piece (L1/L2 hits)
      #pragma unroll
      for (int k = 0; k < W; ++k) {
        wr[k] = load_any(p.weight, c * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
        dw[k] = 0.f;
      }
      bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;
      db = 0.f;
      seg_first = seg;
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
    __syncwarp();  // lane 0's look-ahead copies are visible to the warp
    float xa[8], da[8];  // after the tile (zeros past the end)
    smem_run_to_float<8, R>(&qe[s][warp][0][0], xa);
    smem_run_to_float<8, R>(&qe[s][warp][1][0], da);
    float xv[K][8], g[K][8];  // g holds dout until it is multiplied by act'
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      smem_run_to_float<8, R>(&q[s][0][k][tid][0], xv[k]);
      smem_run_to_float<8, R>(&q[s][1][k][tid][0], g[k]);
    }

    // g on the lane's own positions, and the dweight/dbias sums
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      float h[H];
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        const float up = __shfl_up_sync(kFull, xv[k][8 - H + j], 1);
        const float wrap = k > 0 ? __shfl_sync(kFull, xv[k > 0 ? k - 1 : 0][8 - H + j], 31) : h0[j];
        h[j] = lane == 0 ? wrap : up;
      }
      grad8<W>(wr, bias, xv[k], h, p.silu, g[k], dw, db);  // dout is 0 past the end
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) hprev[j] = __shfl_sync(kFull, xv[K - 1][8 - H + j], 31);
    // g on the w-1 positions after the tile (lane 31 uses it)
    float ga[H];
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      float acc = bias;
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) acc = fmaf(wr[kk], j - kk >= 0 ? xa[j - kk] : xv[K - 1][8 + j - kk], acc);
      ga[j] = act_bwd(da[j], acc, p.silu);
    }

    R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
    const int64_t fin0 = L - H;  // first position that final_states covers
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s0 = t_start + (k * 32 + lane) * 8;
      float ah[H];
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        const float dn = __shfl_down_sync(kFull, g[k][j], 1);
        const float wrap = k < K - 1 ? __shfl_sync(kFull, g[k < K - 1 ? k + 1 : 0][j], 0) : ga[j];
        ah[j] = lane == 31 ? wrap : dn;
      }
      if (s0 >= L) continue;
      float o[8];
      conv8_bwd<W>(wr, g[k], ah, o);
      add_dfinal<H>(p, b, c, s0, L, o);
      if (s0 + 8 <= L) store_run<8>(dxr + s0, o);
      else store_checked<8>(dxr + s0, L - s0, o);
    }

    if (p.dinit != nullptr && first && lane == 0) {  // positions q = j - H < 0
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        float acc = 0.f;
        #pragma unroll
        for (int kk = 0; kk < W; ++kk) {
          const int t = j - H + kk;  // t < 7: inside lane 0's first vector
          if (t >= 0 && t < L) acc = fmaf(wr[kk], g[0][t], acc);
        }
        if (p.dfinal != nullptr && j - H >= fin0)
          acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (j - H - fin0) * p.dfinal_k,
                          p.dfinal_dtype);
        store_any(p.dinit, (b * D + c) * H + j, p.init_dtype, acc);
      }
    }

    float* slots = p.partial + (b * nseg * D + c) * (W + 1);  // + seg * D * (W + 1)
    if (lane == 0 && seg != seg_first) {  // the piece's sum goes to its first tile's slot
      #pragma unroll
      for (int kk = 0; kk <= W; ++kk) slots[seg * D * (W + 1) + kk] = 0.f;
    }
    if (piece_end) {  // warp sums, then the piece's slot
      lane_sums<32>(dw, db);
      if (lane == 0) {
        float* slot = slots + seg_first * D * (W + 1);
        #pragma unroll
        for (int kk = 0; kk < W; ++kk) slot[kk] = dw[kk];
        slot[W] = db;
      }
    }
  }
  cp_async_wait<0>();
}

// One variant of the kernel: K vectors per lane (tile 256 K), S stages, MINB blocks per SM.
template <int W, typename T, int K, int S, int MINB>
struct BwdLPipe {
  static constexpr int kVecs = K;
  static void launch(const ConvParams& p, cudaStream_t s) {
    const int64_t nseg = lcontig_segments(p, K);
    MLM_CHECK(p.nslots_per_batch == nseg, "causal_conv1d_bwd: workspace sized for another tile");
    auto kernel = bwd_lcontig_pipe_kernel<W, T, K, S, MINB>;
    static const int occ = occupancy(kernel, 128);
    launch_lcontig_tiles(kernel, occ, p, p.batch * p.dim * nseg, s);
  }
};

// f(BwdLPipe<...>{}) for the variant to run. 16-bit types: 2 KB tiles per warp (K 4: half the
// per-tile work per element; on an H200 ncu kernel time 103.4 us against 108.4 for K 2 at b4
// L2048, host-side timings 5-8% faster in two runs; docs/perf-log.md); fp32: K 2 (the queue's
// shared memory).
// MLMAMBA_CONV1D_TUNE=1 (bf16, width 4): the earlier K 2, 3 stages, 5 blocks per SM.
template <typename F>
void with_bwd_lcontig_pipe(int xdtype, int width, F&& f) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(width, W, [&] {
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 1) return f(BwdLPipe<W, T, 2, 3, 5>{});
      }
      if constexpr (sizeof(T) == 4) f(BwdLPipe<W, T, kBwdLVecs, 2, 5>{});
      else f(BwdLPipe<W, T, 4, 2, W <= 5 ? 4 : 3>{});
    });
  });
}

int64_t bwd_lcontig_pipe_tiles(const ConvParams& p, int xdtype) {
  int64_t nseg = 0;
  with_bwd_lcontig_pipe(xdtype, p.width,
                        [&](auto k) { nseg = lcontig_segments(p, decltype(k)::kVecs); });
  return nseg;
}

void bwd_lcontig_pipe(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_bwd: input too large");
  with_bwd_lcontig_pipe(xdtype, p.width, [&](auto k) { decltype(k)::launch(p, s); });
}

}  // namespace conv1d
}  // namespace mlmamba
