// Causal conv1d backward, l contiguous, one-shot (no seq_idx, 16-byte aligned rows; pipe_ok;
// the default at 16-bit widths <= 4 and where a row fits one tile: ops.cpp use_oneshot; the
// math: bwd_lcontig.cuh; the layout and why one-shot: fwd_lcontig_oneshot.cu). A warp per
// tile of K 8-element vectors per lane; x and dout go by cp.async into shared memory in G
// groups. Per vector (rolled, or by 2 in whole tiles): g = dout * act'(pre) one vector ahead
// (lane 31's dx needs the next vector's first g), then dx of the vector. Lane 0's look-back
// and every lane's look-ahead (the 8 inputs and douts after the tile, for lane 31 of the last
// vector) are 16-byte loads (L2 hits: the neighbouring warps read them too). dweight/dbias:
// the warp's sums go to its tile's slot, reduced in a fixed order (reduce.cu).
#include <type_traits>

#include "common/check.h"
#include "conv1d/oneshot.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// 8 elements of a row from position s (n valid, the rest zeros), aligned when whole
template <typename R>
__device__ __forceinline__ void load8_any(const R* p, int64_t s, int64_t n, float (&v)[8]) {
  if (n >= 8) load_vec<8>(p + s, v);
  else load_checked<8>(p + s, n, v);
}

// Lane 0 of a row's first tile where the tiles start at a0 > 0: positions 0 .. a0-1. g there
// and up to a0-1+H (those past a0 are recomputed here: dx of a0-1 needs them), their dweight /
// dbias shares, their dx (with dfinal), dinit; tail becomes the inputs before a0. Every load
// first, none depending on another (one latency, not one per position), then static indices.
template <int W, typename R>
__device__ __forceinline__ void head(const ConvParams& p, const R* xr, const R* dr, uint32_t b, uint32_t c,
                                  int a0, const float (&wr)[W], float bias, float (&tail)[W - 1],
                                  float (&dw)[W], float& db) {
  constexpr int H = W - 1, E = 16 / static_cast<int>(sizeof(R)), NU = E - 1 + H;
  const int L = static_cast<int>(p.seqlen), fin0 = L - H, lim = a0 + H < L ? a0 + H : L;
  float xs[H + NU], ds[NU];  // xs[i]: x at position i - H (the initial states before 0)
  #pragma unroll
  for (int j = 0; j < H; ++j) xs[j] = input_before<H>(p, b, c, j - H);
  #pragma unroll
  for (int u = 0; u < NU; ++u) {
    const bool in = u < lim;
    xs[H + u] = in ? Elem<R>::tof(xr[u]) : 0.f;
    ds[u] = in ? Elem<R>::tof(dr[u]) : 0.f;
  }
  float g[NU];  // g at positions 0 .. NU-1 (zero from lim on: dout is)
  #pragma unroll
  for (int u = 0; u < NU; ++u) {
    float acc = bias;
    #pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(wr[k], xs[H + u - k], acc);
    g[u] = u < lim ? act_bwd(ds[u], acc, p.silu) : 0.f;
    if (u < a0) {
      db += g[u];
      #pragma unroll
      for (int k = 0; k < W; ++k) dw[k] = fmaf(g[u], xs[H + u - k], dw[k]);
    }
  }
  R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
  #pragma unroll
  for (int t = 0; t < E - 1; ++t) {
    if (t < a0 && t < L) {
      float acc = 0.f;
      #pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(wr[k], g[t + k], acc);  // g is zero past the row
      if (p.dfinal != nullptr && t >= fin0)
        acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (t - fin0) * p.dfinal_k, p.dfinal_dtype);
      dxr[t] = Elem<R>::fromf(acc);
    }
  }
  if (p.dinit != nullptr) {  // positions j - H < 0
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      float acc = 0.f;
      #pragma unroll
      for (int k = 0; k < W; ++k)
        if (j - H + k >= 0) acc = fmaf(wr[k], g[j - H + k], acc);
      if (p.dfinal != nullptr && j - H >= fin0)
        acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (j - H - fin0) * p.dfinal_k, p.dfinal_dtype);
      store_any(p.dinit, (static_cast<int64_t>(b) * p.dim + c) * H + j, p.init_dtype, acc);
    }
  }
  #pragma unroll
  for (int a = 1; a < E; ++a) {  // tail: x at a0 - H .. a0 - 1 (zero past the row)
    if (a == a0) {
      #pragma unroll
      for (int j = 0; j < H; ++j) tail[j] = xs[a + j];
    }
  }
}

// kAny: rows may start anywhere (x, dout and dx rows equally far off a 16-byte boundary); a
// row that starts a0 elements before one has its tiles start at position a0, and lane 0 of its
// first tile takes positions 0 .. a0-1 alone (head(): their g, dx, dweight / dbias shares and
// dinit), as the forward does (fwd_lcontig_oneshot.cuh).
template <int W, typename T, int K, int MINB, int G, int U, bool kAny>
__global__ void __launch_bounds__(128, MINB) bwd_lcontig_oneshot_kernel(const ConvParams p, uint32_t nseg,
                                                                        uint32_t ntiles, Stagger st) {
  stagger_start(st);
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, kTile = 256 * K, V = Words<8, R>::kCount, KG = K / G;
  static_assert(K % G == 0 && G <= 4, "groups");
  __shared__ uint4 q[K][2][128][V];  // [vector][x, dout][thread][word]
  const int tid = threadIdx.x, lane = tid & 31;
  const uint32_t gt = blockIdx.x * 4u + (tid >> 5);
  if (gt >= ntiles) return;  // whole warp
  const uint32_t D = static_cast<uint32_t>(p.dim);
  const auto [b, c, seg] = oneshot_tile(gt, nseg, D);
  const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
  const R* dr = static_cast<const R*>(p.dout) + b * p.dout_b + c * p.dout_d;
  const int a0 = kAny ? to_boundary16(xr) : 0;
  const int L = static_cast<int>(p.seqlen), t_start = a0 + static_cast<int>(seg) * kTile, t_end = t_start + kTile;
  if (kAny && seg > 0 && t_start >= L) {  // a row's spare last tile: its dweight slot is zeros
    if (lane == 0) {
      float* slot = p.partial + ((static_cast<int64_t>(b) * nseg + seg) * D + c) * (W + 1);
      #pragma unroll
      for (int kk = 0; kk <= W; ++kk) slot[kk] = 0.f;
    }
    return;
  }

  const bool whole = t_end <= L;
  // vectors wholly in the row (kw), holding any of it (kv); both K in a whole tile
  const int kw = whole ? K : (L - t_start) / 256, kv = whole ? K : (L - t_start + 255) / 256;
  if (whole) {  // one branch around the staging, not one per vector (fwd_lcontig_oneshot.cu)
    const int s0 = t_start + lane * 8;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      cp_async_whole<8, R>(&q[k][0][tid][0], xr + s0 + k * 256);
      cp_async_whole<8, R>(&q[k][1][tid][0], dr + s0 + k * 256);
      if ((k + 1) % KG == 0) cp_async_commit();
    }
  } else {  // vectors wholly in the row stage whole; those wholly past its end not at all
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s0 = t_start + (k * 32 + lane) * 8;
      if (k < kw) {
        cp_async_whole<8, R>(&q[k][0][tid][0], xr + s0);
        cp_async_whole<8, R>(&q[k][1][tid][0], dr + s0);
      } else if (k < kv) {
        cp_async_run<8, R>(&q[k][0][tid][0], s0 < L ? xr + s0 : xr, L - s0);
        cp_async_run<8, R>(&q[k][1][tid][0], s0 < L ? dr + s0 : dr, L - s0);
      }
      if ((k + 1) % KG == 0) cp_async_commit();
    }
  }
  float wr[W], bias, tail[H];  // tail: the w-1 inputs before the current vector
  row_side<W>(p, xr, t_start, seg, b, c, wr, bias, tail);
  float xa[8], da[8];  // after the tile (zeros past the end)
  load8_any(xr, t_end < L ? t_end : 0, t_end < L ? L - t_end : 0, xa);
  load8_any(dr, t_end < L ? t_end : 0, t_end < L ? L - t_end : 0, da);

  float dw[W], db = 0.f;
  #pragma unroll
  for (int k = 0; k < W; ++k) dw[k] = 0.f;
  if (kAny && seg == 0 && lane == 0 && a0 > 0) head<W>(p, xr, dr, b, c, a0, wr, bias, tail, dw, db);
  // g on vector k's positions (dout is zero past the end, so g is too), and the sums
  auto gvec = [&](int k, float (&g)[8]) {
    float xv[8];
    smem_run_to_float<8, R>(&q[k][0][tid][0], xv);
    smem_run_to_float<8, R>(&q[k][1][tid][0], g);
    float h[H];
    lookback<H>(xv, k, lane, tail, h);
    grad8<W>(wr, bias, xv, h, p.silu, g, dw, db);
  };

  R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
  const int fin0 = L - H;  // first position that final_states covers
  // Vector k's dx; gc: g on its positions, then on the next vector's. kFast: vector k wholly in
  // the row, the next one holding some of it (or k the tile's last), none of k's positions
  // dinit's or final_states' (no edge checks).
  auto step = [&]<bool kFast>(int k, float (&gc)[8]) {
    float gn[8];  // g of the next vector; after the last one, of the w-1 positions after the tile
    if (!kFast && k + 1 >= kv && k + 1 < K) {  // the next vector is past the row's end
      #pragma unroll
      for (int j = 0; j < 8; ++j) gn[j] = 0.f;
    } else if (k + 1 < K) {
      if ((k + 1) % KG == 0) cp_async_wait_upto(G - 1 - (k + 1) / KG);
      gvec(k + 1, gn);
    } else {  // only lane 31 uses these; its tail is the tile's last w-1 inputs
      #pragma unroll
      for (int j = 0; j < 8; ++j) {
        float acc = bias;
        if (j < H) {
          #pragma unroll
          for (int kk = 0; kk < W; ++kk) acc = fmaf(wr[kk], j - kk >= 0 ? xa[j - kk >= 0 ? j - kk : 0] : tail[(H + j - kk) % H], acc);
        }
        gn[j] = j < H ? act_bwd(da[j], acc, p.silu) : 0.f;
      }
    }
    const int s0 = t_start + (k * 32 + lane) * 8;
    float ah[H];
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const float dn = __shfl_down_sync(kFull, gc[j], 1);
      const float wrap = __shfl_sync(kFull, gn[j], 0);  // the next vector's lane 0
      ah[j] = lane == 31 ? (k + 1 < K ? wrap : gn[j]) : dn;
    }
    if (!kFast && p.dinit != nullptr && k == 0 && t_start == 0 && lane == 0) {  // positions j - H < 0
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        float acc = 0.f;
        #pragma unroll
        for (int kk = 0; kk < W; ++kk) {
          const int t = j - H + kk;  // < w-1 <= 7: inside lane 0's first vector
          if (t >= 0 && t < L) acc = fmaf(wr[kk], gc[t >= 0 && t < 8 ? t : 0], acc);
        }
        if (p.dfinal != nullptr && j - H >= fin0)
          acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (j - H - fin0) * p.dfinal_k, p.dfinal_dtype);
        store_any(p.dinit, (static_cast<int64_t>(b) * D + c) * H + j, p.init_dtype, acc);
      }
    }
    if (kFast) {
      float o[8];
      conv8_bwd<W>(wr, gc, ah, o);
      store_run<8>(dxr + s0, o);
    } else if (s0 < L) {
      float o[8];
      conv8_bwd<W>(wr, gc, ah, o);
      add_dfinal<H>(p, b, c, s0, L, o);
      if (s0 + 8 <= L) store_run<8>(dxr + s0, o);
      else store_checked<8>(dxr + s0, L - s0, o);
    }
    #pragma unroll
    for (int i = 0; i < 8; ++i) gc[i] = gn[i];
  };
  // Where U > 1, a whole tile with no dinit or final-state positions runs every vector fast,
  // unrolled by U (fewer basic blocks); a partial tile the vectors before its edges (kf) fast,
  // rolled, and the rest with the edge checks.
  int kf = 0;
  if constexpr (U > 1) {
    if (p.dinit == nullptr || t_start > 0) {
      kf = whole ? K : kw < kv ? kw : kw - 1;  // a partial tile: vector k + 1 holds some of the row
      if (p.dfinal != nullptr) kf = min(kf, fin0 >= t_start ? (fin0 - t_start) / 256 : 0);
      kf = max(kf, 0);
    }
  }
  if (kv > 0) {  // else a row shorter than a0: head() took it all
    float gc[8];
    cp_async_wait_upto(G - 1);
    gvec(0, gc);
    if (kf == K) {
      #pragma unroll U
      for (int k = 0; k < K; ++k) step.template operator()<true>(k, gc);
    } else {
      #pragma unroll 1
      for (int k = 0; k < kf; ++k) step.template operator()<true>(k, gc);
      #pragma unroll 1
      for (int k = kf; k < kv; ++k) step.template operator()<false>(k, gc);
    }
  }
  cp_async_wait<0>();

  lane_sums<32>(dw, db);  // warp sums, then the tile's slot
  if (lane == 0) {
    float* slot = p.partial + ((static_cast<int64_t>(b) * nseg + seg) * D + c) * (W + 1);
    #pragma unroll
    for (int kk = 0; kk < W; ++kk) slot[kk] = dw[kk];
    slot[W] = db;
  }
}

// One variant: K vectors per lane in G groups, MINB blocks per SM; U > 1: whole tiles unrolled.
template <int W, typename T, int K, int MINB, int G, int U = 1>
struct BwdLOneshot {
  static constexpr int kVecs = K;
  template <bool kAny>
  static void run(const ConvParams& p, cudaStream_t s, int64_t nseg, int64_t ntiles) {
    auto kernel = bwd_lcontig_oneshot_kernel<W, T, K, MINB, G, U, kAny>;
    const int knob = blocks_knob(), pad = occupancy_pad(kernel, knob);
    static int resident[64] = {};
    const int per_sm = knob >= 0 ? occupancy(kernel, 128, pad)
                                 : once_per_device(resident, [&] { return occupancy(kernel, 128, 0); });
    const int64_t blocks = (ntiles + 3) / 4;
    kernel<<<static_cast<unsigned>(blocks), 128, pad, s>>>(p, static_cast<uint32_t>(nseg),
                                                           static_cast<uint32_t>(ntiles),
                                                           stagger_plan(per_sm, blocks));
    MLM_CHECK_LAUNCH();
  }
  static void launch(const ConvParams& p, cudaStream_t s) {
    const int64_t nseg = lcontig_segments(p, K), ntiles = p.batch * p.dim * nseg;
    MLM_CHECK(p.nslots_per_batch == nseg, "causal_conv1d_bwd: workspace sized for another tile");
    MLM_CHECK(ntiles < (int64_t(1) << 32) - 4, "causal_conv1d_bwd: input too large for the one-shot kernel");
    if (rows_aligned16(p, sizeof(T))) run<false>(p, s, nseg, ntiles);
    else run<true>(p, s, nseg, ntiles);
  }
};

// f(BwdLOneshot<...>{}) for the variant to run: 16-bit types 8 vectors per lane in two groups
// (32 KB of shared memory per block), fp32 4. MLMAMBA_CONV1D_TUNE (bf16, width 4): 11 = 4
// vectors, one group; 13 = 8 vectors, four groups; 14 = whole tiles rolled (the default
// unrolls them by 2 at 16-bit w <= 4; by 8 measured the same: perf-log v7).
template <typename F>
void with_bwd_lcontig_oneshot(int xdtype, int width, F&& f) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(width, W, [&] {
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 11) return f(BwdLOneshot<W, T, 4, 6, 1>{});
        if (tune_variant() == 13) return f(BwdLOneshot<W, T, 8, 6, 4>{});
        if (tune_variant() == 14) return f(BwdLOneshot<W, T, 8, 6, 2, 1>{});
      }
      // whole tiles unrolled by 2 where the registers allow it (9% at bf16 w 4 on an H200:
      // perf-log v7; wider rows and fp32 spill with it)
      if constexpr (sizeof(T) == 4) f(BwdLOneshot<W, T, 4, 6, 2>{});
      else f(BwdLOneshot<W, T, 8, W <= 5 ? 6 : 5, 2, W <= 4 ? 2 : 1>{});
    });
  });
}

int64_t bwd_lcontig_oneshot_tiles(const ConvParams& p, int xdtype) {
  int64_t nseg = 0;
  with_bwd_lcontig_oneshot(xdtype, p.width, [&](auto k) {
    nseg = lcontig_segments(p, decltype(k)::kVecs);
  });
  return nseg;
}

void bwd_lcontig_oneshot(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_bwd: input too large");
  if (bwd_lcontig_rows(p, xdtype, !rows_aligned16(p, xdtype == kF32 ? 4 : 2), s)) return;
  with_bwd_lcontig_oneshot(xdtype, p.width, [&](auto k) { decltype(k)::launch(p, s); });
}

}  // namespace conv1d
}  // namespace mlmamba
