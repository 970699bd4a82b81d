// Causal conv1d forward, x with l contiguous (channel-last: fwd_chlast.cuh).
// A warp owns a run of one channel row; each lane holds kFwdLVecs 8-element vectors
// (16-byte loads, warp-interleaved so every load instruction is coalesced); the w-1 look-back
// comes from the neighbouring lane by shuffle, so x is read exactly once.
#pragma once
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "conv1d/conv1d.h"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

template <int W, typename T, bool kSeq>
__global__ void __launch_bounds__(128) fwd_lcontig_kernel(const ConvParams p) {
  using R = typename RawOf<T>::type;
  constexpr int K = kFwdLVecs, H = W - 1;
  const int lane = threadIdx.x & 31;
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t tile = 256 * K;
  const int64_t nseg = (L + tile - 1) / tile;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (gw >= p.batch * D * nseg) return;  // whole warp
  const int64_t row = gw / nseg, seg = gw - row * nseg;
  const int64_t b = row / D, c = row - b * D;
  const int64_t t_start = seg * tile;
  const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
  constexpr bool has_seq = kSeq;  // without seq_idx every mask folds away
  const int* sr = has_seq ? p.seq + b * p.seq_b : nullptr;

  float xv[K][8];
  int sv[K][8];
  // Whole tile in range and 16-byte aligned: K straight-line vector loads, all in flight at
  // once. Otherwise (the row's tail, or a sliced x) element loads with bounds checks.
  const bool full = t_start + tile <= L;
  if (full && vec_ok<8>(xr + t_start)) {
    #pragma unroll
    for (int k = 0; k < K; ++k) load_vec<8>(xr + t_start + (k * 32 + lane) * 8, xv[k]);
  } else {
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s0 = t_start + (k * 32 + lane) * 8;
      load_checked<8>(xr + s0, L - s0, xv[k]);
    }
  }
  const int seq0 = has_seq ? sr[0] : 0;
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t s0 = t_start + (k * 32 + lane) * 8;
    if (has_seq) load_seq8(sr + s0, L - s0, seq0, sv[k]);
    else {
      #pragma unroll
      for (int i = 0; i < 8; ++i) sv[k][i] = 0;
    }
  }
  // Look-back of the warp's first element (used by lane 0; every lane loads the same
  // addresses, one broadcast transaction): x, or initial states (zeros) before t = 0.
  float h0[H];
  int hs0[H];
  if (t_start > 0) {
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      h0[j] = Elem<R>::tof(xr[t_start - H + j]);
      hs0[j] = has_seq ? sr[t_start - H + j] : 0;
    }
  } else {
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      h0[j] = p.init != nullptr ? load_any(p.init, b * p.init_b + c * p.init_d + j * p.init_k,
                                           p.init_dtype)
                                : 0.f;
      hs0[j] = seq0;
    }
  }
  float wr[W];
  #pragma unroll
  for (int k = 0; k < W; ++k) wr[k] = load_any(p.weight, c * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
  const float bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;

  R* outr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t s0 = t_start + (k * 32 + lane) * 8;
    float h[H];
    int hs[H];
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const float up = __shfl_up_sync(kFull, xv[k][8 - H + j], 1);
      const float wrap = k > 0 ? __shfl_sync(kFull, xv[k > 0 ? k - 1 : 0][8 - H + j], 31) : h0[j];
      h[j] = lane == 0 ? wrap : up;
      if (has_seq) {
        const int sup = __shfl_up_sync(kFull, sv[k][8 - H + j], 1);
        const int swrap = k > 0 ? __shfl_sync(kFull, sv[k > 0 ? k - 1 : 0][8 - H + j], 31) : hs0[j];
        hs[j] = lane == 0 ? swrap : sup;
      } else {
        hs[j] = 0;
      }
    }
    if (s0 >= L) continue;  // after the shuffles: every lane takes part in them
    float o[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      float acc = bias;
      bool ok = true;  // no seq_idx change between t-kk and t
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) {
        const int src = i - kk;
        float xval = src >= 0 ? xv[k][src] : h[H + src];
        const int sq = src >= 0 ? sv[k][src] : hs[H + src];
        ok = ok && sq == sv[k][i];
        if (!ok) xval = 0.f;
        acc = fmaf(wr[kk], xval, acc);
      }
      o[i] = act_fwd(acc, p.silu);
    }
    if (full && vec_ok<8>(outr + t_start)) store_vec<8>(outr + s0, o);
    else store_checked<8>(outr + s0, L - s0, o);
  }

  if (p.final_states != nullptr) {
    R* fr = static_cast<R*>(p.final_states) + (b * D + c) * H;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s0 = t_start + (k * 32 + lane) * 8;
      if (s0 + 8 <= L - H || s0 >= L) continue;
      #pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t j = s0 + i - (L - H);
        if (j >= 0 && s0 + i < L) fr[j] = Elem<R>::fromf(xv[k][i]);
      }
    }
    if (seg == 0 && lane == 0 && L < H) {  // initial states (or zeros) in front
      #pragma unroll
      for (int j = 0; j < H; ++j)
        if (j >= L) fr[j - L] = Elem<R>::fromf(h0[j]);
    }
  }
}

template <bool kSeq>
void fwd_lcontig_launch(const ConvParams& p, int xdtype, cudaStream_t s) {
  const int64_t tile = 256 * kFwdLVecs;
  const int64_t warps = p.batch * p.dim * ((p.seqlen + tile - 1) / tile);
  const int64_t blocks = (warps + 3) / 4;
  MLM_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d_fwd: input too large (", blocks, " blocks)");
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      fwd_lcontig_kernel<W, T, kSeq><<<static_cast<unsigned>(blocks), 128, 0, s>>>(p);
      MLM_CHECK_LAUNCH();
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
