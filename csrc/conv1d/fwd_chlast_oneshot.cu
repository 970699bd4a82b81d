// Causal conv1d forward, channel-last, one-shot (no seq_idx, d % 8 == 0, 16-byte aligned rows;
// pipe_ok; opt-in: MLMAMBA_CONV1D_IMPL=oneshot). A warp owns 32*C channels of TR consecutive
// rows of one batch row; warps are numbered channel groups fastest (the warps reading one band
// of rows run together), blocks in address order. Each lane queues its w-1 look-back rows and
// its TR rows by cp.async into shared memory in G groups, computes each group as it lands
// (a sliding window of w-1 rows in registers), stores and exits. The look-back rows are L2
// hits: the warp of the previous row chunk reads them too.
#include <type_traits>

#include "common/check.h"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// C channels per lane (one 16- or 8-byte word per row at 16-bit types), TR rows per warp in G
// groups of cp.async, MINB blocks per SM the registers are budgeted for.
template <int W, typename T, int C, int TR, int G, int MINB>
__global__ void __launch_bounds__(128, MINB) fwd_chlast_oneshot_kernel(const ConvParams p, uint32_t ncg,
                                                                       uint32_t nchunk, uint32_t nwarps) {
  using R = typename RawOf<T>::type;
  using Wd = Words<C, R>;
  constexpr int H = W - 1, NR = H + TR, RG = TR / G;
  static_assert(TR % G == 0 && G <= 4, "groups");
  __shared__ typename Wd::W q[NR][128][Wd::kCount];  // [row][thread][word]
  const int tid = threadIdx.x, lane = tid & 31;
  const uint32_t gw = blockIdx.x * 4u + (tid >> 5);
  if (gw >= nwarps) return;  // whole warp
  const uint32_t rest = gw / ncg, cg = gw - rest * ncg, b = rest / nchunk, tc = rest - b * nchunk;
  const int L = static_cast<int>(p.seqlen), t0 = static_cast<int>(tc) * TR;
  const int64_t c0 = (static_cast<int64_t>(cg) * 32 + lane) * C;
  const bool act = c0 < p.dim;  // d % 8 == 0: a lane has all C channels or none
  const R* xb = static_cast<const R*>(p.x) + b * p.x_b + (act ? c0 : 0);

  // row q is token t0 - H + q: the look-back rows and the first group, then one group each
  #pragma unroll
  for (int q0 = 0; q0 < NR; ++q0) {
    const int t = t0 - H + q0;
    const bool in = act && t >= 0 && t < L;
    cp_async_run<C, R>(&q[q0][tid][0], in ? xb + static_cast<int64_t>(t) * p.x_l : xb, in ? C : 0);
    if (q0 >= H && (q0 - H + 1) % RG == 0) cp_async_commit();
  }
  float wr[W][C], bias[C];
  #pragma unroll
  for (int e = 0; e < C; ++e) {
    #pragma unroll
    for (int k = 0; k < W; ++k)
      wr[k][e] = act ? load_any(p.weight, (c0 + e) * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype) : 0.f;
    bias[e] = act && p.bias != nullptr ? load_any(p.bias, (c0 + e) * p.bias_s, p.bias_dtype) : 0.f;
  }
  R* fr = p.final_states != nullptr && act && t0 + TR > L - H
              ? static_cast<R*>(p.final_states) + (static_cast<int64_t>(b) * p.dim + c0) * H
              : nullptr;  // this chunk holds some of the row's last w-1 inputs

  float xw[H][C];  // the w-1 rows before the current one
  if (G > 1) cp_async_wait<G - 1>();
  else cp_async_wait<0>();
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    smem_run_to_float<C, R>(&q[j][tid][0], xw[j]);
    const int t = t0 - H + j;
    if (t < 0 && p.init != nullptr && act) {  // before t = 0: initial states
      #pragma unroll
      for (int e = 0; e < C; ++e)
        xw[j][e] = load_any(p.init, b * p.init_b + (c0 + e) * p.init_d + (H + t) * p.init_k, p.init_dtype);
    }
    if (fr != nullptr && t0 == 0 && t < 0 && t >= L - H) {  // L < w-1: initial states in front
      #pragma unroll
      for (int e = 0; e < C; ++e) fr[e * H + t - (L - H)] = Elem<R>::fromf(xw[j][e]);
    }
  }
  R* ob = static_cast<R*>(p.out) + b * p.out_b + c0;
  #pragma unroll 1
  for (int r = 0; r < TR; ++r) {
    const int t = t0 + r;
    if (t >= L) break;
    if (G > 1 && r > 0 && r % RG == 0) cp_async_wait_upto(G - 1 - r / RG);
    float cur[C];
    smem_run_to_float<C, R>(&q[H + r][tid][0], cur);
    if (act) {
      float o[C];
      #pragma unroll
      for (int e = 0; e < C; ++e) {
        float acc = fmaf(wr[0][e], cur[e], bias[e]);
        #pragma unroll
        for (int k = 1; k < W; ++k) acc = fmaf(wr[k][e], xw[H - k][e], acc);
        o[e] = act_fwd(acc, p.silu);
      }
      store_run<C>(ob + static_cast<int64_t>(t) * p.out_l, o);
      if (fr != nullptr && t >= L - H) {
        #pragma unroll
        for (int e = 0; e < C; ++e) fr[e * H + t - (L - H)] = Elem<R>::fromf(cur[e]);
      }
    }
    #pragma unroll
    for (int j = 0; j + 1 < H; ++j) {
      #pragma unroll
      for (int e = 0; e < C; ++e) xw[j][e] = xw[j + 1][e];
    }
    if constexpr (H > 0) {
      #pragma unroll
      for (int e = 0; e < C; ++e) xw[H - 1][e] = cur[e];
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block's shared memory
}

template <int W, typename T, int C, int TR, int G, int MINB>
void launch_fwd_chlast_oneshot(const ConvParams& p, cudaStream_t s) {
  const int64_t ncg = (p.dim + 32 * C - 1) / (32 * C), nchunk = (p.seqlen + TR - 1) / TR;
  const int64_t nwarps = ncg * nchunk * p.batch;
  MLM_CHECK(nwarps < (int64_t(1) << 32) - 4, "causal_conv1d_fwd: input too large for the one-shot kernel");
  fwd_chlast_oneshot_kernel<W, T, C, TR, G, MINB><<<static_cast<unsigned>((nwarps + 3) / 4), 128, 0, s>>>(
      p, static_cast<uint32_t>(ncg), static_cast<uint32_t>(nchunk), static_cast<uint32_t>(nwarps));
  MLM_CHECK_LAUNCH();
}

void fwd_chlast_oneshot(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_fwd: input too large");
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // MLMAMBA_CONV1D_TUNE (bf16, width 4): rows per warp, groups, channels per lane
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        switch (tune_variant()) {
          case 21: return launch_fwd_chlast_oneshot<W, T, 4, 32, 4, 4>(p, s);
          case 22: return launch_fwd_chlast_oneshot<W, T, 4, 16, 2, 6>(p, s);
          case 23: return launch_fwd_chlast_oneshot<W, T, 8, 16, 4, 4>(p, s);
          default: break;
        }
      }
      constexpr int C = sizeof(T) == 4 ? 4 : 8;  // one 16-byte word per row and lane
      launch_fwd_chlast_oneshot<W, T, C, 16, 2, W <= 4 ? 4 : 3>(p, s);
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
