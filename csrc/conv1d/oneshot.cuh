// Helpers of the one-shot l-contiguous kernels (fwd_lcontig_oneshot.cu, bwd_lcontig_oneshot.cu):
// a warp per tile of one row, tiles numbered (batch, channel, segment), blocks in address order.
#pragma once
#include "conv1d/pipe.cuh"

namespace mlmamba {
namespace conv1d {

// Tile gt's batch, channel and segment (all < 2^32: the launchers check it).
struct OneTile {
  uint32_t b, c, seg;
};
__device__ __forceinline__ OneTile oneshot_tile(uint32_t gt, uint32_t nseg, uint32_t D) {
  const uint32_t row = gt / nseg, b = row / D;
  return {b, row - b * D, gt - row * nseg};
}

// Elements from q up to the next 16-byte boundary (0 on one): where a row's tiles start.
template <typename R>
__device__ __forceinline__ int to_boundary16(const R* q) {
  constexpr int E = 16 / static_cast<int>(sizeof(R)), S = static_cast<int>(sizeof(R));
  return (E - static_cast<int>(reinterpret_cast<uintptr_t>(q) % 16) / S) % E;
}

// Row (b, c)'s input at position q < 0: its initial state (zero without them, or below -H).
template <int H>
__device__ __forceinline__ float input_before(const ConvParams& p, uint32_t b, uint32_t c, int q) {
  return p.init != nullptr && q >= -H
             ? load_any(p.init, b * p.init_b + c * p.init_d + (H + q) * p.init_k, p.init_dtype)
             : 0.f;
}

// Row (b, c)'s reversed taps and bias, and the w-1 inputs before the tile at t_start: x (one
// 16-byte load of the 8 before it; t_start on a 16-byte boundary), for the row's first tile
// (seg 0) the initial states (zeros), the inputs before position 0.
template <int W, typename R>
__device__ __forceinline__ void row_side(const ConvParams& p, const R* xr, int t_start, uint32_t seg,
                                         uint32_t b, uint32_t c, float (&wr)[W], float& bias,
                                         float (&before)[W - 1]) {
  constexpr int H = W - 1;
  load_any_n<W>(p.weight, c * p.w_d + (W - 1) * p.w_k, -p.w_k, p.w_dtype, wr);
  bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;
  if (seg > 0) {
    float pv[8];
    load_vec<8>(xr + t_start - 8, pv);
    #pragma unroll
    for (int j = 0; j < H; ++j) before[j] = pv[8 - H + j];
  } else {
    #pragma unroll
    for (int j = 0; j < H; ++j) before[j] = input_before<H>(p, b, c, j - H);
  }
}

// The short-row kernels' (*_lcontig_rows.cu) step between staging and arithmetic: commits the
// lane's staging copies, loads the side values of rows r0 .. r0+nr-1 while they land (a warp's
// lanes together: side[k] = row r0+k's reversed taps, bias and initial states, 2W floats), then
// waits for the copies and meets the warp.
template <int W>
__device__ __forceinline__ void finish_rows_staging(const ConvParams& p, uint32_t r0, uint32_t nr, uint32_t D,
                                                    int lane, float (*side)[2 * W]) {
  constexpr int H = W - 1, S = 2 * W;
  cp_async_commit();
  for (uint32_t i = lane; i < nr * S; i += 32) {
    const uint32_t k = i / S, j = i - k * S, r = r0 + k, rb = r / D, rc = r - rb * D;
    float v;
    if (j < W) v = load_any(p.weight, rc * p.w_d + (W - 1 - j) * p.w_k, p.w_dtype);
    else if (j == W) v = p.bias != nullptr ? load_any(p.bias, rc * p.bias_s, p.bias_dtype) : 0.f;
    else v = input_before<H>(p, rb, rc, static_cast<int>(j) - W - 1 - H);
    side[k][j] = v;
  }
  cp_async_wait<0>();
  __syncwarp();
}

// One row's side values (finish_rows_staging) into registers.
template <int W>
__device__ __forceinline__ void read_row_side(const float (&side)[2 * W], float (&wr)[W], float& bias,
                                              float (&tail)[W - 1]) {
  #pragma unroll
  for (int j = 0; j < W; ++j) wr[j] = side[j];
  bias = side[W];
  #pragma unroll
  for (int j = 0; j < W - 1; ++j) tail[j] = side[W + 1 + j];
}

// Rows off 16-byte boundaries in the short-row kernels: a lane's inputs at row positions p0 ..
// p0+7 (xv) and the H before them (h), where some precede the row's start (they were staged
// from the neighbouring row): the row's initial states there (init: the H inputs before
// position 0), zeros before those.
template <int H>
__device__ __forceinline__ void inputs_before_row(const float* init, int p0, float (&xv)[8], float (&h)[H]) {
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    const int t = p0 - H + j;
    if (t < 0) h[j] = t >= -H ? init[H + t] : 0.f;
  }
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int t = p0 + i;
    if (t < 0) xv[i] = t >= -H ? init[H + t] : 0.f;
  }
}

// The H inputs before a lane's 8 of vector k (xv): the previous lane's last H, for lane 0 the
// previous vector's lane 31 (tail: every lane's last H of the previous vector; before vector
// 0, the inputs before the tile). tail becomes this vector's. Every lane must take part.
template <int H>
__device__ __forceinline__ void lookback(const float (&xv)[8], int k, int lane, float (&tail)[H],
                                         float (&h)[H]) {
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    const float up = __shfl_up_sync(kFull, xv[8 - H + j], 1);
    const float wrap = __shfl_sync(kFull, tail[j], 31);
    h[j] = lane == 0 ? (k > 0 ? wrap : tail[j]) : up;
    tail[j] = xv[8 - H + j];
  }
}

// Several rows a vector: a lane's look-back, the previous lane's last w-1 inputs, or the row's
// own (tail: its initial states) where the lane starts the row (first).
template <int H>
__device__ __forceinline__ void row_lookback(const float (&xv)[8], bool first, const float (&tail)[H],
                                             float (&h)[H]) {
  #pragma unroll
  for (int i = 0; i < H; ++i) {
    const float up = __shfl_up_sync(kFull, xv[8 - H + i], 1);
    h[i] = first ? tail[i] : up;
  }
}

// The short-row kernels' (*_lcontig_rows.cu) elements a row stages (the row, and where rows
// start off 16-byte boundaries those back to the boundary below), 0 where they do not apply:
// rows of up to 1024 elements at 16 bits, 512 at fp32; MLMAMBA_CONV1D_TUNE=20 turns them off.
inline int64_t rows_span(const ConvParams& p, int xdtype, bool any) {
  const int64_t span = p.seqlen + (any ? (xdtype == kF32 ? 3 : 7) : 0);
  return span > (xdtype == kF32 ? 512 : 1024) || tune_variant() == 20 ? 0 : span;
}

// f.template operator()<KV, kAny, S>() for the short-row variant of rows that stage `span`
// elements: KV vectors a lane per row (two rows a warp at KV 4), or S rows a vector (aligned
// rows of at most 128 / 64 / 32 elements; MLMAMBA_CONV1D_TUNE=21: one row a vector).
template <typename T, typename F>
void with_rows_variant(int64_t span, bool any, F&& f) {
  auto go = [&]<bool kAny>() {
    const bool several = !kAny && tune_variant() != 21;
    if (several && span <= 32) f.template operator()<1, false, 8>();
    else if (several && span <= 64) f.template operator()<1, false, 4>();
    else if (several && span <= 128) f.template operator()<1, false, 2>();
    else if (span <= 256) f.template operator()<1, kAny, 1>();
    else if (span <= 512) f.template operator()<2, kAny, 1>();
    else if constexpr (sizeof(T) == 2) f.template operator()<4, kAny, 1>();
  };
  if (any) go.template operator()<true>();
  else go.template operator()<false>();
}

// A lane's 8 outputs at positions s0 .. s0+7 of a row of L (s0 < L): the conv of xv with the
// look-back h, stored (kWhole: all 8 in the row, no checks), and any of the row's final states.
template <int W, bool kWhole, typename R>
__device__ __forceinline__ void emit8_fwd(const float (&wr)[W], float bias, const float (&xv)[8],
                                          const float (&h)[W - 1], bool silu, R* outr, R* fr, int s0,
                                          int L) {
  constexpr int H = W - 1;
  float o[8];
  conv8_fwd<W>(wr, bias, xv, h, silu, o);
  if (kWhole || s0 + 8 <= L) store_run<8>(outr + s0, o);
  else store_checked<8>(outr + s0, L - s0, o);
  if (fr != nullptr && s0 + 8 > L - H) {  // final states
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int j = s0 + i - (L - H);
      if (j >= 0 && s0 + i < L) fr[j] = Elem<R>::fromf(xv[i]);
    }
  }
}

// Waits until at most n (< 4) of this thread's cp.async groups are pending (n known at run
// time: the kernels' groups).
__device__ __forceinline__ void cp_async_wait_upto(int n) {
  if (n <= 0) cp_async_wait<0>();
  else if (n == 1) cp_async_wait<1>();
  else if (n == 2) cp_async_wait<2>();
  else cp_async_wait<3>();
}

}  // namespace conv1d
}  // namespace mlmamba
