// The one-shot l-contiguous forward: kernel and launch (fwd_lcontig_oneshot.cu runs rows that
// start on 16-byte boundaries, fwd_lcontig_oneshot_any.cu the others: two objects, built in
// parallel).
#pragma once
#include <type_traits>

#include "common/check.h"
#include "conv1d/oneshot.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// K 8-element vectors per lane; kAsync: they go through shared memory by cp.async (the bytes
// in flight cost no registers) in G groups, each computed as soon as it lands (the later
// groups stay in flight meanwhile), else straight into registers (G = 1).
// kAny: rows may start anywhere (else every row starts on a 16-byte boundary: a0 = 0).
template <int W, typename T, int K, int MINB, bool kAsync, int G, bool kAny>
__global__ void __launch_bounds__(128, MINB) fwd_lcontig_oneshot_kernel(const ConvParams p, uint32_t nseg,
                                                                        uint32_t ntiles, Stagger st) {
  stagger_start(st);
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, kTile = 256 * K, V = Words<8, R>::kCount, KG = K / G;
  static_assert(K % G == 0 && G <= 4 && (kAsync || G == 1), "groups");
  __shared__ uint4 q[kAsync ? K : 1][128][V];  // [vector][thread][word]
  const int tid = threadIdx.x, lane = tid & 31;
  const uint32_t gt = blockIdx.x * 4u + (tid >> 5);
  if (gt >= ntiles) return;  // whole warp
  const uint32_t D = static_cast<uint32_t>(p.dim);
  const auto [b, c, seg] = oneshot_tile(gt, nseg, D);
  const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
  constexpr int E = 16 / static_cast<int>(sizeof(R));  // elements per 16 bytes
  const int a0 = kAny ? to_boundary16(xr) : 0;
  const int L = static_cast<int>(p.seqlen), t_start = a0 + static_cast<int>(seg) * kTile;
  if (kAny && seg > 0 && t_start >= L) return;  // whole warp: a spare last tile of a row

  // x first (all K vectors in flight), then the side loads, then wait. A whole tile (every
  // tile but a row's last, as a rule) stages without the zero-fill arithmetic: one branch
  // around the loop, not one per vector.
  RawRun<8, R> raw[kAsync ? 1 : K];
  const bool whole = t_start + kTile <= L;
  const R* xl = xr + t_start + lane * 8;  // this lane's vector 0
  // vectors wholly in the row (kw), holding any of it (kv); both K in a whole tile
  const int kw = whole ? K : (L - t_start) / 256, kv = whole ? K : (L - t_start + 255) / 256;
  if (whole) {
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      if constexpr (kAsync) {
        cp_async_whole<8, R>(&q[k][tid][0], xl + k * 256);
        if ((k + 1) % KG == 0) cp_async_commit();
      } else {
        raw[k].load(xl + k * 256);
      }
    }
  } else {  // vectors wholly in the row stage whole; those wholly past its end not at all
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s0 = t_start + (k * 32 + lane) * 8;
      if constexpr (kAsync) {
        if (k < kw) cp_async_whole<8, R>(&q[k][tid][0], xr + s0);
        else if (k < kv) cp_async_run<8, R>(&q[k][tid][0], s0 < L ? xr + s0 : xr, L - s0);
        if ((k + 1) % KG == 0) cp_async_commit();
      } else if (s0 + 8 <= L) {
        raw[k].load(xr + s0);
      } else {
        R* e = reinterpret_cast<R*>(raw[k].w);
        #pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = s0 + i < L ? xr[s0 + i] : Elem<R>::fromf(0.f);
      }
    }
  }
  float wr[W], bias, h0[H];  // h0: the inputs before the tile
  row_side<W>(p, xr, t_start, seg, b, c, wr, bias, h0);
  R* outr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
  R* fr = p.final_states != nullptr && t_start + kTile > L - H
              ? static_cast<R*>(p.final_states) + (static_cast<int64_t>(b) * D + c) * H
              : nullptr;  // this tile holds some of the row's last w-1 inputs
  float tail[H];  // the previous vector's last w-1 inputs (h0 before vector 0)
  #pragma unroll
  for (int j = 0; j < H; ++j) tail[j] = h0[j];
  if (kAny && seg == 0 && lane == 0 && a0 > 0) {  // positions 0 .. a0-1, tail moved to before a0
    // every load first, none depending on another; then static indices
    constexpr int NU = E - 1;
    float xs[H + NU];  // xs[i]: x at position i - H (the initial states before 0)
    #pragma unroll
    for (int j = 0; j < H; ++j) xs[j] = tail[j];
    #pragma unroll
    for (int u = 0; u < NU; ++u) xs[H + u] = u < a0 && u < L ? Elem<R>::tof(xr[u]) : 0.f;
    #pragma unroll
    for (int u = 0; u < NU; ++u) {
      if (u < a0 && u < L) {
        float acc = bias;
        #pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(wr[k], xs[H + u - k], acc);
        outr[u] = Elem<R>::fromf(act_fwd(acc, p.silu));
        if (fr != nullptr && u >= L - H) fr[u - (L - H)] = Elem<R>::fromf(xs[H + u]);
      }
    }
    #pragma unroll
    for (int a = 1; a < E; ++a) {
      if (a == a0) {
        #pragma unroll
        for (int j = 0; j < H; ++j) tail[j] = xs[a + j];
      }
    }
  }

  // one vector; kWhole: every position of the tile in range (no bounds checks). Vector k is
  // converted where it is used (raw words stay packed: fewer live registers, so more bytes in
  // flight per SM); the wrap of vector k-1 into k comes from lane 31.
  auto vec = [&](auto whole_tag, int k) {
    constexpr bool kWhole = decltype(whole_tag)::value;
    const int s0 = t_start + (k * 32 + lane) * 8;
    float xv[8];
    if (kAsync && k % KG == 0) cp_async_wait_upto(G - 1 - k / KG);
    if constexpr (kAsync) smem_run_to_float<8, R>(&q[k][tid][0], xv);
    else raw[k].to_float(xv);
    float h[H];
    lookback<H>(xv, k, lane, tail, h);
    if (!kWhole && s0 >= L) return;  // after the shuffles: every lane takes part in them
    emit8_fwd<W, kWhole>(wr, bias, xv, h, p.silu, outr, fr, s0, L);
  };
  if (whole) {
    #pragma unroll (kAsync ? 1 : K)  // from shared memory: one vector's registers at a time
    for (int k = 0; k < K; ++k) vec(std::true_type{}, k);
  } else {  // the vectors wholly in the row without bounds checks, then the rest
    #pragma unroll (kAsync ? 1 : K)
    for (int k = 0; k < kw; ++k) vec(std::true_type{}, k);
    #pragma unroll (kAsync ? 1 : K)
    for (int k = kw; k < kv; ++k) vec(std::false_type{}, k);
  }
  if (fr != nullptr && seg == 0 && lane == 0 && L < H) {  // initial states in front
    #pragma unroll
    for (int j = 0; j < H; ++j)
      if (j >= L) fr[j - L] = Elem<R>::fromf(h0[j]);
  }
}

// cap: at most this many blocks per SM (0: as the registers allow); MLMAMBA_CONV1D_BLOCKS
// overrides it (tuning).
template <bool kAny, int W, typename T, int K, int MINB, bool kAsync = true, int G = 1>
void launch_fwd_lcontig_oneshot(const ConvParams& p, cudaStream_t s, int cap = 0) {
  const int64_t nseg = lcontig_segments(p, K), ntiles = p.batch * p.dim * nseg;
  MLM_CHECK(ntiles < (int64_t(1) << 32) - 4, "causal_conv1d_fwd: input too large for the one-shot kernel");
  auto kernel = fwd_lcontig_oneshot_kernel<W, T, K, MINB, kAsync, G, kAny>;
  const int knob = blocks_knob();
  int pad = 0, per_sm = 0;
  if (knob >= 0) {
    pad = occupancy_pad(kernel, knob);
    per_sm = occupancy(kernel, 128, pad);
  } else {  // looked up once per device (with and without the cap)
    static int pads[64] = {}, resident[2][64] = {};
    if (cap > 0) pad = once_per_device(pads, [&] { return occupancy_pad(kernel, cap); });
    per_sm = once_per_device(resident[cap > 0], [&] { return occupancy(kernel, 128, pad); });
  }
  const int64_t blocks = (ntiles + 3) / 4;
  kernel<<<static_cast<unsigned>(blocks), 128, pad, s>>>(p, static_cast<uint32_t>(nseg),
                                                         static_cast<uint32_t>(ntiles),
                                                         stagger_plan(per_sm, blocks));
  MLM_CHECK_LAUNCH();
}

// The forward on rows that all start on 16-byte boundaries (kAny false) or anywhere.
template <bool kAny>
void fwd_lcontig_oneshot_rows(const ConvParams& p, int xdtype, cudaStream_t s) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // MLMAMBA_CONV1D_TUNE (bf16, width 4): 11 = x in registers (4 vectors per lane, 64
      // registers), 13 = 4 cp.async groups. On an H200 both within 1% of the default at b1
      // L16384 / b4 L2048 (docs/perf-log.md, causal_conv1d v6). Whole tiles unrolled by 2 / 8
      // measured +0 / 1% (v7) and were removed.
      if constexpr (!kAny && std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 11) return launch_fwd_lcontig_oneshot<kAny, W, T, 4, 8, false>(p, s);
        if (tune_variant() == 13) return launch_fwd_lcontig_oneshot<kAny, W, T, 8, 10, true, 4>(p, s);
      }
      // blocks per SM as the registers allow; the tile the shortest of 512, 1024 and 2048
      // elements that holds the row (a longer one leaves lanes idle: at bf16 w 4 on an H200,
      // b32 L512 53.7% of a same-size copy with 2048, 84.5% with 512; b16 L1024 83.3% / 93.8%
      // with 1024). Where one 2048 tile holds a row of 16-bit elements, at most 8 blocks per
      // SM (128 KB of tiles in flight): b4 L2048 88.2 -> 89.7%, b8 93.1 -> 93.8%; no gain at
      // longer rows (perf-log, causal_conv1d / session 19). The tuning variants: aligned rows.
      constexpr int MINB = sizeof(T) == 4 ? 6 : W <= 4 ? 10 : 8;  // 12 at w <= 3 spilled
      const int64_t L = p.seqlen;
      if (L <= 512) return launch_fwd_lcontig_oneshot<kAny, W, T, 2, MINB, true, 1>(p, s);
      if (L <= 1024) return launch_fwd_lcontig_oneshot<kAny, W, T, 4, MINB, true, 1>(p, s);
      const int cap = sizeof(T) == 2 && L <= 2048 ? 8 : 0;
      launch_fwd_lcontig_oneshot<kAny, W, T, 8, MINB, true, 2>(p, s, cap);
  });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
