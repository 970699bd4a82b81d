// Causal conv1d forward, channel-last, streaming fast path (no seq_idx, d % 8 == 0, 16-byte
// aligned rows; the general path is fwd_chlast.cuh). A block owns one group of 32 C channels
// (a lane C of them, so the weights are loaded once); its warps split that group's rows,
// flattened over (batch, l), into equal ranges and walk them in stages of RW rows, each lane
// queueing its rows through cp.async S-1 stages ahead (pipe.cuh). The last w-1 rows stay in
// registers; a range re-reads w-1 rows only where it starts a batch row.
#include <algorithm>
#include <type_traits>

#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// C channels per lane (8: 16-byte words; 4 at 16-bit types: 8-byte words, fewer registers), S
// stages of RW = 4 rows, MINB blocks per SM the registers are budgeted for. kRows: x rows
// through p.rows (conv1d.h; no initial or final states), read by the producer S-1 stages ahead.
template <int W, typename T, int C, int S, int MINB, bool kRows = false>
__global__ void __launch_bounds__(128, MINB) fwd_chlast_pipe_kernel(const ConvParams p, int64_t ncg,
                                                                   int64_t rows_per_warp) {
  using R = typename RawOf<T>::type;
  constexpr int RW = 4, V = Words<C, R>::kCount;  // words per row of a lane
  constexpr int H = W - 1;
  __shared__ typename Words<C, R>::W q[S][RW][128][V];  // [stage][row][thread][word]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t cg = blockIdx.x % ncg, kb = blockIdx.x / ncg;
  const int64_t c0 = (cg * 32 + lane) * C;
  const bool act = c0 < D;  // d % 8 == 0: a lane has all C (4 or 8) channels or none
  const int64_t total = p.batch * L;
  const int64_t r0 = (kb * 4 + warp) * rows_per_warp;
  if (r0 >= total) return;  // whole warp
  const int64_t r1 = std::min(total, r0 + rows_per_warp);
  const R* xc = static_cast<const R*>(p.x) + (act ? c0 : 0);
  R* oc = static_cast<R*>(p.out) + c0;

  float wr[W][C], bias[C];
  load_channel_weights<W, C>(p, c0, act ? C : 0, wr, bias);

  SegIter<RW> pi, ci;  // producer, consumer
  pi.begin(r0, r1, L, H, 0);
  ci = pi;
  auto issue = [&](int s) {  // queue the producer's stage into s (an empty group past the end)
    if (!pi.done()) {
      const R* xb = xc + pi.b * p.x_b;
      if (kRows) {  // token t reads row rows[t]; out of range: zeros
        #pragma unroll
        for (int r = 0; r < RW; ++r) {
          const int64_t t = pi.ts + r;
          const int row = act && t >= 0 && t < pi.t1 ? __ldg(p.rows + t) : -1;
          const bool in = row >= 0 && row < L;
          cp_async_run<C, R>(&q[s][r][tid][0], in ? xb + row * p.x_l : xc, in ? C : 0);
        }
      } else if (act && pi.ts >= 0 && pi.ts + RW <= pi.t1) {  // every row in range
        #pragma unroll
        for (int r = 0; r < RW; ++r) cp_async_whole<C, R>(&q[s][r][tid][0], xb + (pi.ts + r) * p.x_l);
      } else {
        #pragma unroll
        for (int r = 0; r < RW; ++r) {
          const int64_t t = pi.ts + r;
          const bool in = act && t >= 0 && t < pi.t1;
          cp_async_run<C, R>(&q[s][r][tid][0], in ? xb + t * p.x_l : xc, in ? C : 0);
        }
      }
      pi.next();
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);

  float xw[H + RW][C];  // rows ts-H .. ts+RW-1 of the current stage
  for (int s = 0; !ci.done(); s = s + 1 == S ? 0 : s + 1) {
    issue(s == 0 ? S - 1 : s - 1);
    cp_async_wait<S - 1>();
    #pragma unroll
    for (int r = 0; r < RW; ++r) smem_run_to_float<C, R>(&q[s][r][tid][0], xw[H + r]);
    if (!kRows && ci.ts < 0 && p.init != nullptr && act) {  // rows before t = 0: the initial states
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        const int64_t t = ci.ts + r;
        if (t >= 0) continue;
        #pragma unroll
        for (int i = 0; i < C; ++i)
          xw[H + r][i] = load_any(p.init, ci.b * p.init_b + (c0 + i) * p.init_d + (H + t) * p.init_k,
                                  p.init_dtype);
      }
    }
    R* ob = oc + ci.b * p.out_b;
    #pragma unroll
    for (int r = 0; r < RW; ++r) {  // predicated stores: the RW rows are one basic block
      const int64_t t = ci.ts + r;
      float o[C];
      #pragma unroll
      for (int i = 0; i < C; ++i) {
        float acc = bias[i];
        #pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], xw[H + r - k][i], acc);
        o[i] = act_fwd(acc, p.silu);
      }
      store_run_if<C>(ob + t * p.out_l, o, t >= ci.t0 && t < ci.t1 && act);
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < C; ++i) xw[j][i] = xw[RW + j][i];
    }
    if (!kRows && p.final_states != nullptr && act && ci.t1 == L && ci.ts + RW >= L) {
      // the segment's last stage ends the batch row: last w-1 inputs, initial states in front
      R* fr = static_cast<R*>(p.final_states) + (ci.b * D + c0) * H;
      const R* xb = xc + ci.b * p.x_b;
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        const int64_t q_ = L - H + j;
        #pragma unroll
        for (int i = 0; i < C; ++i) {
          const float v = q_ >= 0 ? Elem<R>::tof(xb[q_ * p.x_l + i])
                          : p.init != nullptr
                              ? load_any(p.init, ci.b * p.init_b + (c0 + i) * p.init_d + (H + q_) * p.init_k,
                                         p.init_dtype)
                              : 0.f;
          fr[i * H + j] = Elem<R>::fromf(v);
        }
      }
    }
    ci.next();
  }
  cp_async_wait<0>();
}

template <int W, typename T, int C, int S, int MINB, bool kRows = false>
void launch_fwd_chlast_pipe(const ConvParams& p, cudaStream_t s) {
  const int64_t ncg = (p.dim + 32 * C - 1) / (32 * C), rows = p.batch * p.seqlen;
  auto kernel = fwd_chlast_pipe_kernel<W, T, C, S, MINB, kRows>;
  static const int occ = occupancy(kernel, 128);
  const int64_t bpc = chlast_pipe_bpc(occ, rows, ncg, 2.0);
  const int64_t rows_per_warp = (rows + 4 * bpc - 1) / (4 * bpc);
  MLM_CHECK(ncg * bpc < (int64_t(1) << 31) && p.batch < (int64_t(1) << 30) &&
                p.seqlen < (int64_t(1) << 30),
            kRows ? "msc_conv_fwd" : "causal_conv1d_fwd", ": input too large");
  kernel<<<static_cast<unsigned>(ncg * bpc), 128, 0, s>>>(p, ncg, rows_per_warp);
  MLM_CHECK_LAUNCH();
}

void fwd_chlast_pipe(const ConvParams& p, int xdtype, cudaStream_t s) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // bf16, width 4: 4 channels per lane (8-byte words, 96 registers, 5 blocks per SM), 8
      // stages: on an H200 3% faster than 8 channels at 3 blocks / SM once a step's rows were
      // one basic block (graph timings, docs/perf-log.md, causal_conv1d v7; before that, not
      // reliably: v4). MLMAMBA_CONV1D_TUNE: 1 = 6 stages, 2 = the 8-channel configuration.
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 1) return launch_fwd_chlast_pipe<W, T, 4, 6, 5>(p, s);
        if (tune_variant() == 2) return launch_fwd_chlast_pipe<W, T, 8, 4, 3>(p, s);
        return launch_fwd_chlast_pipe<W, T, 4, 8, 5>(p, s);
      }
      launch_fwd_chlast_pipe<W, T, 8, sizeof(T) == 4 ? 2 : 4, W <= 4 ? 3 : 2>(p, s);
    });
  });
}

// rows mode (msc_conv_fwd): the default configuration only
void fwd_chlast_pipe_rows(const ConvParams& p, int xdtype, cudaStream_t s) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      launch_fwd_chlast_pipe<W, T, 8, sizeof(T) == 4 ? 2 : 4, W <= 4 ? 3 : 2, true>(p, s);
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
