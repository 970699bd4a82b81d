// Causal conv1d forward, channel-last, one tile a block through TMA (sm_90). A block loads LT
// rows of 512 bytes of channels with the w-1 rows before them as one box (rows before t = 0 and
// channels past d read zeros), convolves them in place in shared memory, each thread down its
// own 4-byte column, and stores the LT rows as one box (rows past l and channels past d are not
// written). No loop over tiles and no bytes in flight in registers: many small blocks per SM
// keep the loads in flight, as in the one-shot l-contiguous kernels (docs/perf-log.md,
// causal_conv1d v6). Where it applies: use_tma (ops.cpp).
#include "common/tma.cuh"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"
#include "conv1d/tma_tile.cuh"

namespace mlmamba {
namespace conv1d {

namespace {

constexpr int kTmaThreads = 128;  // one 4-byte column each: a row of 512 bytes
constexpr int kTmaRowBytes = 4 * kTmaThreads;

// blocks = batch x ceil(l / LT) x channel groups, the channel group fastest (address order)
template <int W, typename T, int LT, int MINB>
__global__ void __launch_bounds__(kTmaThreads, MINB)
    fwd_chlast_tma_kernel(const __grid_constant__ ConvParams p, const __grid_constant__ CUtensorMap xmap,
                          const __grid_constant__ CUtensorMap omap, int ncg, int nlt, Stagger st) {
  stagger_start(st);
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, E = 4 / static_cast<int>(sizeof(R)), DC = kTmaThreads * E;
  __shared__ __align__(128) uint32_t tile[LT + H][kTmaThreads];
  __shared__ __align__(8) uint64_t bar;
  const int tid = threadIdx.x;
  const int cg = static_cast<int>(blockIdx.x % ncg);
  const int rest = static_cast<int>(blockIdx.x / ncg);
  const int lt = rest % nlt, b = rest / nlt;
  const int t0 = lt * LT;
  const uint32_t bar_a = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  const uint32_t tile_a = static_cast<uint32_t>(__cvta_generic_to_shared(&tile[0][0]));
  if (tid == 0) {
    mbar_init(bar_a, 1);
    mbar_init_fence();
    mbar_arrive_expect_tx(bar_a, (LT + H) * kTmaRowBytes);
    tma_load_4d(tile_a, &xmap, cg * DC, t0 - H, b, 0, bar_a);
  }
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t c0 = int64_t(cg) * DC + tid * E;
  const bool act = c0 < D;  // d % 8 == 0: a thread has both 16-bit channels or none
  float wr[W][E], bias[E];
  load_channel_weights<W, E>(p, c0, act ? E : 0, wr, bias);
  // input j of the initial states (time j - H) of channel c0 + i
  auto init_at = [&](int j, int i) {
    return load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + j * p.init_k, p.init_dtype);
  };
  const bool from_init = p.init != nullptr && t0 == 0 && act;
  __syncthreads();  // the barrier's init before anyone waits on it
  wait_phase(bar_a, 0);  // traps after ~17 s rather than hang

  // A thread reads and writes its own column only: no barrier until the store.
  if (p.final_states != nullptr && act && t0 + LT >= L) {  // the tile holds row L - 1
    R* fr = static_cast<R*>(p.final_states) + (b * D + c0) * H;
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const int64_t q = L - H + j;  // >= t0 - H: in the tile
      float v[E];
      word_to_float<R>(tile[q - t0 + H][tid], v);
      #pragma unroll
      for (int i = 0; i < E; ++i)
        fr[i * H + j] = Elem<R>::fromf(q >= 0 ? v[i] : p.init != nullptr ? init_at(H + q, i) : 0.f);
    }
  }
  float xw[W][E];  // times t - H .. t
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    word_to_float<R>(tile[j][tid], xw[j]);
    if (from_init) {
      #pragma unroll
      for (int i = 0; i < E; ++i) xw[j][i] = init_at(j, i);
    }
  }
  #pragma unroll 8  // fully unrolled, the loads all hoisted: spills at 40 registers
  for (int r = 0; r < LT; ++r) {
    word_to_float<R>(tile[r + H][tid], xw[H]);
    float o[E];
    #pragma unroll
    for (int i = 0; i < E; ++i) {
      float acc = bias[i];
      #pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], xw[H - k][i], acc);
      o[i] = act_fwd(acc, p.silu);
    }
    tile[r + H][tid] = float_to_word<R>(o);
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < E; ++i) xw[j][i] = xw[j + 1][i];
    }
  }
  fence_async_smem();
  __syncthreads();
  if (tid == 0) {
    tma_store_4d(&omap, tile_a + H * kTmaRowBytes, cg * DC, t0, b, 0);
    bulk_commit();
    bulk_wait_read<0>();  // the box is read out before the block's shared memory goes
  }
}

template <int W, typename T, int LT, int MINB>
void launch_fwd_chlast_tma(const ConvParams& p, int xdtype, cudaStream_t s) {
  constexpr int DC = kTmaRowBytes / static_cast<int>(sizeof(T));
  const char* op = "causal_conv1d_fwd";
  CUtensorMap xmap, omap;
  encode_chlast_map(&xmap, p.x, p, p.x_b, p.x_l, xdtype, kTmaRowBytes, LT + W - 1, op);
  encode_chlast_map(&omap, p.out, p, p.out_b, p.out_l, xdtype, kTmaRowBytes, LT, op);
  const int64_t ncg = (p.dim + DC - 1) / DC, nlt = (p.seqlen + LT - 1) / LT;
  const int64_t blocks = ncg * nlt * p.batch;
  MLM_CHECK(blocks < (int64_t(1) << 31), op, ": input too large");
  auto kernel = fwd_chlast_tma_kernel<W, T, LT, MINB>;
  static int resident[64] = {};
  const int per_sm = once_per_device(resident, [&] { return occupancy(kernel, kTmaThreads); });
  kernel<<<static_cast<unsigned>(blocks), kTmaThreads, 0, s>>>(
      p, xmap, omap, static_cast<int>(ncg), static_cast<int>(nlt), stagger_plan(per_sm, blocks));
  MLM_CHECK_LAUNCH();
}

}  // namespace

void fwd_chlast_tma(const ConvParams& p, int xdtype, cudaStream_t s) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // 48-row tiles (26 KB at w 4, 8 blocks per SM): on an H200 1-2% faster than 64 rows (6
      // blocks per SM) and than 32 rows (docs/perf-log.md, causal_conv1d v15).
      // MLMAMBA_CONV1D_TUNE: 31 = 32 rows (12 blocks per SM), 32 = 64 rows, 33 = 80 rows (5
      // blocks per SM; static shared memory caps a tile at 89 rows).
      switch (tune_variant()) {
        case 31: return launch_fwd_chlast_tma<W, T, 32, W <= 7 ? 12 : 10>(p, xdtype, s);
        case 32: return launch_fwd_chlast_tma<W, T, 64, 6>(p, xdtype, s);
        case 33: return launch_fwd_chlast_tma<W, T, 80, 5>(p, xdtype, s);
        default: return launch_fwd_chlast_tma<W, T, 48, 8>(p, xdtype, s);
      }
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
