// Causal conv1d backward, channel-last, one tile a block through TMA (sm_90; the math:
// bwd_lcontig.cuh). A block owns LT rows of one 128-byte group of channels: it loads x's rows
// t0 - (w-1) .. t0 + LT + w-2 and dout's t0 .. t0 + LT + w-2 as two boxes (zeros outside the
// tensor: g = 0 past l), each warp walks LT / 4 rows of it down its lanes' 4-byte columns,
// writes dx in place of dout and the block stores dx as one box. g's look-ahead (the w-1 rows
// after a warp's rows) is recomputed by the warp that needs it. dweight / dbias: the 4 warps'
// sums are added in a fixed order into one workspace slot per block. Where it applies:
// use_tma (ops.cpp); p.nslots_per_batch = bwd_chlast_tma_tiles(p) slots per batch row.
#include "common/tma.cuh"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"
#include "conv1d/tma_tile.cuh"

namespace mlmamba {
namespace conv1d {

namespace {

constexpr int kBwdThreads = 128;  // 4 warps; a lane owns a 4-byte column of the 128-byte rows
constexpr int kBwdRowBytes = 128;

template <int W, typename T, int LT, int MINB>
__global__ void __launch_bounds__(kBwdThreads, MINB)
    bwd_chlast_tma_kernel(const __grid_constant__ ConvParams p, const __grid_constant__ CUtensorMap xmap,
                          const __grid_constant__ CUtensorMap dmap, const __grid_constant__ CUtensorMap omap,
                          int ncg, int nlt) {
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, E = 4 / static_cast<int>(sizeof(R)), DC = 32 * E, RW = LT / 4;
  constexpr int kItems = E * (W + 1);  // a lane's dweight (reversed taps) and dbias
  __shared__ __align__(128) uint32_t xs[LT + 2 * H][32];  // time t at row t - t0 + H
  __shared__ __align__(128) uint32_t ds[LT + H][32];      // time t at row t - t0; then dx
  __shared__ __align__(8) uint64_t bar;
  static_assert(4 * kItems * 32 <= (LT + 2 * H) * 32, "the warps' sums reuse x's tile");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cg = static_cast<int>(blockIdx.x % ncg);
  const int rest = static_cast<int>(blockIdx.x / ncg);
  const int lt = rest % nlt, b = rest / nlt;
  const int t0 = lt * LT;
  const uint32_t bar_a = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  if (tid == 0) {
    mbar_init(bar_a, 1);
    mbar_init_fence();
    mbar_arrive_expect_tx(bar_a, (2 * LT + 3 * H) * kBwdRowBytes);
    tma_load_4d(static_cast<uint32_t>(__cvta_generic_to_shared(&xs[0][0])), &xmap, cg * DC, t0 - H, b, 0, bar_a);
    tma_load_4d(static_cast<uint32_t>(__cvta_generic_to_shared(&ds[0][0])), &dmap, cg * DC, t0, b, 0, bar_a);
  }
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t c0 = int64_t(cg) * DC + lane * E;
  const bool act = c0 < D;  // d % 8 == 0: a lane has both 16-bit channels or none
  float wr[W][E], bias[E], dw[W][E], db[E];
  #pragma unroll
  for (int i = 0; i < E; ++i) {
    #pragma unroll
    for (int k = 0; k < W; ++k) {
      wr[k][i] = act ? load_any(p.weight, (c0 + i) * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype) : 0.f;
      dw[k][i] = 0.f;
    }
    bias[i] = act && p.bias != nullptr ? load_any(p.bias, (c0 + i) * p.bias_s, p.bias_dtype) : 0.f;
    db[i] = 0.f;
  }
  const int T0 = t0 + warp * RW;  // the warp's first row
  // rows before t = 0 read the initial states; the first warp of a row's first tile also
  // writes dinit (dx of those rows)
  const bool from_init = p.init != nullptr && T0 == 0 && act;
  const bool with_dinit = p.dinit != nullptr && T0 == 0 && act;
  const bool with_dfinal = p.dfinal != nullptr && act && T0 + RW > L - H;
  __syncthreads();  // the barrier's init before anyone waits on it
  wait_phase(bar_a, 0);  // traps after ~17 s rather than hang

  float xw[W][E], gw[W][E], dla[H][E];  // x at t - H .. t, g at t - H .. t; dout look-ahead
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    word_to_float<R>(xs[warp * RW + j][lane], xw[j]);
    if (from_init) {
      #pragma unroll
      for (int i = 0; i < E; ++i)
        xw[j][i] = load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + j * p.init_k, p.init_dtype);
    }
    word_to_float<R>(ds[warp * RW + RW + j][lane], dla[j]);  // the next warp's rows: read first
    #pragma unroll
    for (int i = 0; i < E; ++i) gw[j][i] = 0.f;  // g before the warp's rows: not needed but by dinit
  }
  __syncthreads();  // every warp has its look-ahead before any writes dx over dout

  // step s: time t = T0 + s. g[t] from x[t - H .. t] and dout[t] (dv); the warp's own rows add
  // to dweight / dbias; then dx of time t - H, which needs g[t - H .. t].
  auto step = [&](int s, const float (&dv)[E]) {
    const int t = T0 + s;
    word_to_float<R>(xs[warp * RW + s + H][lane], xw[H]);
    #pragma unroll
    for (int i = 0; i < E; ++i) {
      float acc = bias[i];
      #pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], xw[H - k][i], acc);
      const float gi = dv[i] * act_grad(acc, p.silu);
      gw[H][i] = gi;
      if (s < RW) {
        db[i] += gi;
        #pragma unroll
        for (int k = 0; k < W; ++k) dw[k][i] = fmaf(gi, xw[H - k][i], dw[k][i]);
      }
    }
    const int u = t - H;
    if (s >= H || with_dinit) {
      float o[E];
      #pragma unroll
      for (int i = 0; i < E; ++i) {
        float acc = 0.f;
        #pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], gw[k][i], acc);
        o[i] = acc;
      }
      if (with_dfinal && u >= L - H && u < L) {  // the last w-1 positions
        #pragma unroll
        for (int i = 0; i < E; ++i)
          o[i] += load_any(p.dfinal, b * p.dfinal_b + (c0 + i) * p.dfinal_d + (u - (L - H)) * p.dfinal_k,
                           p.dfinal_dtype);
      }
      if (s >= H) {
        ds[warp * RW + s - H][lane] = float_to_word<R>(o);
      } else {
        #pragma unroll
        for (int i = 0; i < E; ++i) store_any(p.dinit, (b * D + c0 + i) * H + (u + H), p.init_dtype, o[i]);
      }
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < E; ++i) { xw[j][i] = xw[j + 1][i]; gw[j][i] = gw[j + 1][i]; }
    }
  };
  #pragma unroll 4
  for (int s = 0; s < RW; ++s) {
    float dv[E];
    word_to_float<R>(ds[warp * RW + s][lane], dv);
    step(s, dv);
  }
  #pragma unroll
  for (int j = 0; j < H; ++j) step(RW + j, dla[j]);

  __syncthreads();  // every warp is done with x's tile: it becomes the reduction buffer
  float (*red)[kItems][32] = reinterpret_cast<float (*)[kItems][32]>(&xs[0][0]);
  #pragma unroll
  for (int i = 0; i < E; ++i) {
    #pragma unroll
    for (int k = 0; k < W; ++k) red[warp][i * (W + 1) + k][lane] = dw[k][i];
    red[warp][i * (W + 1) + W][lane] = db[i];
  }
  fence_async_smem();  // dx in ds -> the TMA store
  __syncthreads();
  if (tid == 0) {
    tma_store_4d(&omap, static_cast<uint32_t>(__cvta_generic_to_shared(&ds[0][0])), cg * DC, t0, b, 0);
    bulk_commit();
  }
  // the group's items in address order, spread over all threads (not a thread's own lane's)
  float* slot = p.partial + ((int64_t(b) * nlt + lt) * D + int64_t(cg) * DC) * (W + 1);
  for (int it = tid; it < 32 * kItems; it += kBwdThreads) {
    const int ln = it / kItems, k = it - ln * kItems;
    if (int64_t(cg) * DC + ln * E < D)
      slot[it] = ((red[0][k][ln] + red[1][k][ln]) + red[2][k][ln]) + red[3][k][ln];
  }
  if (tid == 0) bulk_wait_read<0>();  // the box is read out before the block's shared memory goes
}

template <int W, typename T, int LT, int MINB>
void launch_bwd_chlast_tma(const ConvParams& p, int xdtype, cudaStream_t s) {
  const char* op = "causal_conv1d_bwd";
  CUtensorMap xmap, dmap, omap;
  encode_chlast_map(&xmap, p.x, p, p.x_b, p.x_l, xdtype, kBwdRowBytes, LT + 2 * (W - 1), op);
  encode_chlast_map(&dmap, p.dout, p, p.dout_b, p.dout_l, xdtype, kBwdRowBytes, LT + W - 1, op);
  encode_chlast_map(&omap, p.out, p, p.out_b, p.out_l, xdtype, kBwdRowBytes, LT, op);
  const int64_t DC = kBwdRowBytes / static_cast<int64_t>(sizeof(T));
  const int64_t ncg = (p.dim + DC - 1) / DC, nlt = p.nslots_per_batch;
  const int64_t blocks = ncg * nlt * p.batch;
  MLM_CHECK(blocks < (int64_t(1) << 31), op, ": input too large");
  bwd_chlast_tma_kernel<W, T, LT, MINB><<<static_cast<unsigned>(blocks), kBwdThreads, 0, s>>>(
      p, xmap, dmap, omap, static_cast<int>(ncg), static_cast<int>(nlt));
  MLM_CHECK_LAUNCH();
}

// rows a tile: 128 (34 KB of shared memory at w 4); MLMAMBA_CONV1D_TUNE=31: 64
int bwd_rows() { return tune_variant() == 31 ? 64 : 128; }

}  // namespace

int64_t bwd_chlast_tma_tiles(const ConvParams& p) {
  const int lt = bwd_rows();
  return (p.seqlen + lt - 1) / lt;
}

void bwd_chlast_tma(const ConvParams& p, int xdtype, cudaStream_t s) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // registers: 80 at widths <= 4 (6 blocks per SM), 128 above (4); 64-row tiles 64 / 104
      if (bwd_rows() == 64) return launch_bwd_chlast_tma<W, T, 64, W <= 4 ? 8 : 5>(p, xdtype, s);
      return launch_bwd_chlast_tma<W, T, 128, W <= 4 ? 6 : 4>(p, xdtype, s);
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
