// Causal conv1d backward: recompute pre = conv(x) + bias, g = dout * act'(pre), then
//   dx[s]      = sum_k wr[k] g[s+k]          (+ dfinal for the last w-1 positions)
//   dwr[k]     = sum_t g[t] x[t-k],  dbias = sum_t g[t]
//   dinit[q<0] = sum_k wr[k] g[q+k]          (+ dfinal when l < w-1)
// dweight/dbias: each warp (l-contig) or block (channel-last) writes its partial sums to its own
// workspace slot; reduce_dweight (reduce.cu) adds the slots in a fixed order, so the result is
// bitwise reproducible (no atomics). This file: x with l contiguous (channel-last:
// bwd_chlast.cuh). A warp owns a run of one channel row as in the forward; g's look-ahead of
// w-1 positions comes from the next lane by shuffle.
#pragma once
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "conv1d/conv1d.h"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

template <int W, typename T, bool kSeq>
__global__ void __launch_bounds__(128) bwd_lcontig_kernel(const ConvParams p) {
  using R = typename RawOf<T>::type;
  constexpr int K = kBwdLVecs, H = W - 1;
  const int lane = threadIdx.x & 31;
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t tile = 256 * K;
  const int64_t nseg = (L + tile - 1) / tile;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (gw >= p.batch * D * nseg) return;  // whole warp
  const int64_t row = gw / nseg, seg = gw - row * nseg;
  const int64_t b = row / D, c = row - b * D;
  const int64_t t_start = seg * tile, t_end = t_start + tile;
  const R* xr = static_cast<const R*>(p.x) + b * p.x_b + c * p.x_d;
  const R* dr = static_cast<const R*>(p.dout) + b * p.dout_b + c * p.dout_d;
  constexpr bool has_seq = kSeq;  // without seq_idx every mask folds away
  const int* sr = has_seq ? p.seq + b * p.seq_b : nullptr;
  const int seq0 = has_seq ? sr[0] : 0;

  float xv[K][8], g[K][8];
  int sv[K][8];
  // g holds dout until it is multiplied by act'. Fast path as in the forward.
  const bool full = t_end <= L;
  if (full && vec_ok<8>(xr + t_start) && vec_ok<8>(dr + t_start)) {
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      load_vec<8>(xr + t_start + (k * 32 + lane) * 8, xv[k]);
      load_vec<8>(dr + t_start + (k * 32 + lane) * 8, g[k]);
    }
  } else {
    #pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s0 = t_start + (k * 32 + lane) * 8;
      load_checked<8>(xr + s0, L - s0, xv[k]);
      load_checked<8>(dr + s0, L - s0, g[k]);
    }
  }
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t s0 = t_start + (k * 32 + lane) * 8;
    if (has_seq) load_seq8(sr + s0, L - s0, seq0, sv[k]);
    else {
      #pragma unroll
      for (int i = 0; i < 8; ++i) sv[k][i] = 0;
    }
  }
  // Lane 0: the w-1 inputs before the warp's run. Lane 31: the w-1 positions after it
  // (x, dout, seq), to recompute g there.
  // (Every lane loads the same addresses: one broadcast transaction, no divergence.)
  float h0[H], xa[H], da[H];
  int hs0[H], sa[H];
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
  if (t_end + H <= L) {
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      xa[j] = Elem<R>::tof(xr[t_end + j]);
      da[j] = Elem<R>::tof(dr[t_end + j]);
      sa[j] = has_seq ? sr[t_end + j] : 0;
    }
  } else {
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const bool in = t_end + j < L;
      xa[j] = in ? Elem<R>::tof(xr[t_end + j]) : 0.f;
      da[j] = in ? Elem<R>::tof(dr[t_end + j]) : 0.f;
      sa[j] = has_seq && in ? sr[t_end + j] : seq0;
    }
  }
  float wr[W];
  #pragma unroll
  for (int k = 0; k < W; ++k) wr[k] = load_any(p.weight, c * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
  const float bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;

  // g on the lane's own positions, and the dweight/dbias partial sums.
  float dw[W], db = 0.f;
  #pragma unroll
  for (int k = 0; k < W; ++k) dw[k] = 0.f;
  #pragma unroll
  for (int k = 0; k < K; ++k) {
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
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      float xm[W];
      float acc = bias;
      bool ok = true;  // no seq_idx change between t-kk and t
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) {
        const int src = i - kk;
        const float xval = src >= 0 ? xv[k][src] : h[H + src];
        const int sq = src >= 0 ? sv[k][src] : hs[H + src];
        ok = ok && sq == sv[k][i];
        xm[kk] = ok ? xval : 0.f;
        acc = fmaf(wr[kk], xm[kk], acc);
      }
      const float gi = act_bwd(g[k][i], acc, p.silu);  // dout is 0 past the end
      g[k][i] = gi;
      db += gi;
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) dw[kk] = fmaf(gi, xm[kk], dw[kk]);
    }
  }
  // g on the w-1 positions after the run (lane 31 only uses it).
  float ga[H];
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    float acc = bias;
    bool ok = true;
    #pragma unroll
    for (int kk = 0; kk < W; ++kk) {
      const int src = j - kk;  // >= 0: xa, else the run's own last elements
      const float xval = src >= 0 ? xa[src] : xv[K - 1][8 + src];
      const int sq = src >= 0 ? sa[src] : sv[K - 1][8 + src];
      ok = ok && sq == sa[j];
      acc = fmaf(wr[kk], ok ? xval : 0.f, acc);
    }
    ga[j] = act_bwd(da[j], acc, p.silu);
  }

  R* dxr = static_cast<R*>(p.out) + b * p.out_b + c * p.out_d;
  const int64_t fin0 = L - H;  // first position that final_states covers
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t s0 = t_start + (k * 32 + lane) * 8;
    float ah[H];
    int as[H];
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const float dn = __shfl_down_sync(kFull, g[k][j], 1);
      const float wrap = k < K - 1 ? __shfl_sync(kFull, g[k < K - 1 ? k + 1 : 0][j], 0) : ga[j];
      ah[j] = lane == 31 ? wrap : dn;
      if (has_seq) {
        const int sdn = __shfl_down_sync(kFull, sv[k][j], 1);
        const int swrap = k < K - 1 ? __shfl_sync(kFull, sv[k < K - 1 ? k + 1 : 0][j], 0) : sa[j];
        as[j] = lane == 31 ? swrap : sdn;
      } else {
        as[j] = 0;
      }
    }
    if (s0 >= L) continue;
    float o[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      float acc = 0.f;
      bool ok = true;  // no seq_idx change between s and s+kk
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) {
        const int src = i + kk;
        const float gval = src < 8 ? g[k][src] : ah[src - 8];
        const int sq = src < 8 ? sv[k][src] : as[src - 8];
        ok = ok && sq == sv[k][i];
        if (ok) acc = fmaf(wr[kk], gval, acc);
      }
      o[i] = acc;
    }
    add_dfinal<H>(p, b, c, s0, L, o);
    if (full && vec_ok<8>(dxr + t_start)) store_vec<8>(dxr + s0, o);
    else store_checked<8>(dxr + s0, L - s0, o);
  }

  if (p.dinit != nullptr && seg == 0 && lane == 0) {  // positions q = j - H < 0
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      float acc = 0.f;
      bool ok = true;  // positions 0..t all in the first segment
      #pragma unroll
      for (int kk = 0; kk < W; ++kk) {
        const int t = j - H + kk;  // t < 7: inside lane 0's first vector
        if (t < 0) continue;
        ok = ok && sv[0][t] == seq0;
        if (ok && t < L) acc = fmaf(wr[kk], g[0][t], acc);
      }
      if (p.dfinal != nullptr && j - H >= fin0)
        acc += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (j - H - fin0) * p.dfinal_k,
                        p.dfinal_dtype);
      store_any(p.dinit, (b * D + c) * H + j, p.init_dtype, acc);
    }
  }

  lane_sums<32>(dw, db);  // warp sums, then one slot per warp
  if (lane == 0) {
    float* slot = p.partial + ((b * nseg + seg) * D + c) * (W + 1);
    #pragma unroll
    for (int kk = 0; kk < W; ++kk) slot[kk] = dw[kk];
    slot[W] = db;
  }
}

template <bool kSeq>
void bwd_lcontig_launch(const ConvParams& p, int xdtype, cudaStream_t s) {
  const int64_t warps = p.batch * p.dim * bwd_lcontig_tiles(p.seqlen);
  const int64_t blocks = (warps + 3) / 4;
  MLM_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d_bwd: input too large (", blocks, " blocks)");
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      bwd_lcontig_kernel<W, T, kSeq><<<static_cast<unsigned>(blocks), 128, 0, s>>>(p);
      MLM_CHECK_LAUNCH();
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
