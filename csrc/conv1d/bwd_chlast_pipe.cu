// Causal conv1d backward, channel-last, streaming fast path (no seq_idx, d % 8 == 0, 16-byte
// aligned rows; the math and the general path: bwd_lcontig.cuh, bwd_chlast.cuh). As in
// fwd_chlast_pipe.cu a block owns one channel group (128 channels, 4 per lane) and its warps
// split the group's rows, flattened over (batch, l), into equal ranges. A segment [t0, t1) of a
// range is walked from t0 - (w-1) (the x look-back) to t1 + w-1 (g's look-ahead): dx of row
// u = t - (w-1) is complete once g[t] is known. dweight/dbias: a lane sums over its whole
// range, the block's 4 warps are added in a fixed order, one workspace slot per block.
#include <algorithm>
#include <type_traits>

#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// C = 4 channels per lane (8-byte words at 16-bit types), S stages of RW rows, MINB blocks per
// SM the registers are budgeted for.
template <int W, typename T, int RW, int S, int MINB>
__global__ void __launch_bounds__(128, MINB) bwd_chlast_pipe_kernel(const ConvParams p, int64_t ncg,
                                                                   int64_t rows_per_warp) {
  using R = typename RawOf<T>::type;
  constexpr int C = 4, RB = C * sizeof(R), H = W - 1;  // RB: bytes of a lane's row
  constexpr int kQueue = S * 2 * RW * 128 * RB;
  constexpr int kItems = C * (W + 1);  // dweight (reversed taps) and dbias of a lane's channels
  static_assert(4 * kItems * 32 * 4 <= kQueue, "the reduction reuses the queue");
  __shared__ __align__(16) unsigned char smem[kQueue];
  auto qrow = [&](int s, int which, int r) {  // [stage][x, dout][row][thread][RB bytes]
    return smem + ((((s * 2 + which) * RW + r) * 128) + threadIdx.x) * RB;
  };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t cg = blockIdx.x % ncg, kb = blockIdx.x / ncg;
  const int64_t c0 = (cg * 32 + lane) * C;
  const bool act = c0 < D;  // d % 8 == 0: a lane has all C channels or none
  const int64_t total = p.batch * L;
  const int64_t r0 = std::min(total, (kb * 4 + warp) * rows_per_warp);
  const int64_t r1 = std::min(total, r0 + rows_per_warp);  // r0 == r1: an idle warp
  const R* xc = static_cast<const R*>(p.x) + (act ? c0 : 0);
  const R* dc = static_cast<const R*>(p.dout) + (act ? c0 : 0);
  R* dxc = static_cast<R*>(p.out) + c0;
  const int64_t fin0 = L - H;

  float wr[W][C], bias[C], dw[W][C] = {}, db[C] = {};
  load_channel_weights<W, C>(p, c0, act ? C : 0, wr, bias);

  SegIter<RW> pi, ci;  // producer, consumer
  pi.begin(r0, r1, L, H, H);
  ci = pi;
  auto issue = [&](int s) {  // queue the producer's stage into s (an empty group past the end)
    if (!pi.done()) {
      const R* xb = xc + pi.b * p.x_b;
      const R* db_ = dc + pi.b * p.dout_b;
      const int64_t t_end = std::min<int64_t>(L, pi.t1 + H);  // rows read: [t0 - H, t_end), dout from t0
      if (act && pi.ts >= pi.t0 && pi.ts + RW <= t_end) {  // every row in range
        #pragma unroll
        for (int r = 0; r < RW; ++r) {
          cp_async_whole<C, R>(qrow(s, 0, r), xb + (pi.ts + r) * p.x_l);
          cp_async_whole<C, R>(qrow(s, 1, r), db_ + (pi.ts + r) * p.dout_l);
        }
      } else {
        #pragma unroll
        for (int r = 0; r < RW; ++r) {
          const int64_t t = pi.ts + r;
          const bool in = act && t >= 0 && t < t_end;
          const bool din = in && t >= pi.t0;  // g = 0 before the segment: no dout needed there
          cp_async_run<C, R>(qrow(s, 0, r), in ? xb + t * p.x_l : xc, in ? C : 0);
          cp_async_run<C, R>(qrow(s, 1, r), din ? db_ + t * p.dout_l : dc, din ? C : 0);
        }
      }
      pi.next();
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);

  float xw[H + RW][C], gw[H + RW][C];  // rows ts-H .. ts+RW-1 of the current stage
  for (int s = 0; !ci.done(); s = s + 1 == S ? 0 : s + 1) {
    issue(s == 0 ? S - 1 : s - 1);
    const int64_t u_first = (ci.t0 == 0 && p.dinit != nullptr) ? -H : ci.t0;
    cp_async_wait<S - 1>();
    float dv[RW][C];
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
      smem_run_to_float<C, R>(qrow(s, 0, r), xw[H + r]);
      smem_run_to_float<C, R>(qrow(s, 1, r), dv[r]);
    }
    if (ci.ts < 0 && p.init != nullptr && act) {  // rows before t = 0: the initial states
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
    R* dxb = dxc + ci.b * p.out_b;
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
      const int64_t t = ci.ts + r;
      const bool own = t >= ci.t0 && t < ci.t1;
      #pragma unroll
      for (int i = 0; i < C; ++i) {
        float acc = bias[i];
        #pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], xw[H + r - k][i], acc);
        // g = 0 before the segment (where the window's look-back is not loaded) and past l
        const float gi = t < ci.t0 ? 0.f : act_bwd(dv[r][i], acc, p.silu);
        gw[H + r][i] = gi;
        if (own) {
          db[i] += gi;
          #pragma unroll
          for (int k = 0; k < W; ++k) dw[k][i] = fmaf(gi, xw[H + r - k][i], dw[k][i]);
        }
      }
      const int64_t u = t - H;  // window row r
      if (u >= u_first && u < ci.t1 && act) {
        float o[C];
        #pragma unroll
        for (int i = 0; i < C; ++i) {
          float acc = 0.f;
          #pragma unroll
          for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], gw[r + k][i], acc);
          o[i] = acc;
        }
        if (p.dfinal != nullptr && u >= fin0) {  // the last w-1 positions
          #pragma unroll
          for (int i = 0; i < C; ++i)
            o[i] += load_any(p.dfinal, ci.b * p.dfinal_b + (c0 + i) * p.dfinal_d + (u - fin0) * p.dfinal_k,
                             p.dfinal_dtype);
        }
        if (u >= 0) {
          store_run<C>(dxb + u * p.out_l, o);
        } else {
          #pragma unroll
          for (int i = 0; i < C; ++i) store_any(p.dinit, (ci.b * D + c0 + i) * H + (u + H), p.init_dtype, o[i]);
        }
      }
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < C; ++i) { xw[j][i] = xw[RW + j][i]; gw[j][i] = gw[RW + j][i]; }
    }
    ci.next();
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the queue: it becomes the reduction buffer
  float (*red)[kItems][32] = reinterpret_cast<float (*)[kItems][32]>(smem);
  #pragma unroll
  for (int i = 0; i < C; ++i) {
    #pragma unroll
    for (int k = 0; k < W; ++k) red[warp][i * (W + 1) + k][lane] = dw[k][i];
    red[warp][i * (W + 1) + W][lane] = db[i];
  }
  __syncthreads();
  if (!act) return;
  float* slot = p.partial + (kb * D + c0) * (W + 1);
  for (int it = warp; it < kItems; it += 4)
    slot[it] = ((red[0][it][lane] + red[1][it][lane]) + red[2][it][lane]) + red[3][it][lane];
}

// One variant of the kernel: its occupancy (once) and its launch.
template <int W, typename T, int RW, int S, int MINB>
struct BwdChlPipe {
  static int occ() {
    static const int n = occupancy(bwd_chlast_pipe_kernel<W, T, RW, S, MINB>, 128);
    return n;
  }
  static void launch(unsigned grid, cudaStream_t s, const ConvParams& p, int64_t ncg, int64_t rpw) {
    bwd_chlast_pipe_kernel<W, T, RW, S, MINB><<<grid, 128, 0, s>>>(p, ncg, rpw);
  }
};

// f(BwdChlPipe<...>{}) for the variant to run. (Measured on an H200 and dropped: 2 rows per
// stage x 8 stages at 4 blocks per SM (48 B of spills) 16-21% slower; 4 x 4 at 4 blocks per SM
// (spills) 5-11% slower.)
template <typename F>
void with_bwd_chlast_pipe(int xdtype, int width, F&& f) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(width, W, [&] {
      f(BwdChlPipe<W, T, 4, sizeof(T) == 4 ? 2 : 4, W <= 4 ? 3 : 2>{});
    });
  });
}

int64_t bwd_chlast_pipe_slots(const ConvParams& p, int xdtype) {
  int64_t bpc = 1;
  with_bwd_chlast_pipe(xdtype, p.width, [&](auto k) {
    bpc = chlast_pipe_bpc(decltype(k)::occ(), p.batch * p.seqlen, (p.dim + 127) / 128, 1.0);
  });
  return bpc;
}

// p.nslots_per_batch: the blocks per channel group from bwd_chlast_pipe_slots.
void bwd_chlast_pipe(const ConvParams& p, int xdtype, cudaStream_t s) {
  const int64_t ncg = (p.dim + 127) / 128, bpc = p.nslots_per_batch;
  const int64_t rows_per_warp = (p.batch * p.seqlen + 4 * bpc - 1) / (4 * bpc);
  MLM_CHECK(ncg * bpc < (int64_t(1) << 31) && p.batch < (int64_t(1) << 30) &&
                p.seqlen < (int64_t(1) << 30), "causal_conv1d_bwd: input too large");
  with_bwd_chlast_pipe(xdtype, p.width, [&](auto k) {
    decltype(k)::launch(static_cast<unsigned>(ncg * bpc), s, p, ncg, rows_per_warp);
    MLM_CHECK_LAUNCH();
  });
}

}  // namespace conv1d
}  // namespace mlmamba
