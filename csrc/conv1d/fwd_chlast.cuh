// Causal conv1d forward, channel-last x (d contiguous; l contiguous: fwd_lcontig.cuh).
// A lane owns 8 channels (one 16-byte load per row) and walks a chunk of rows, keeping the
// last w-1 rows in registers; only the chunk's first w-1 rows are read twice (hits in L2).
#pragma once
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "conv1d/conv1d.h"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// kRows: x rows through p.rows (conv1d.h), no seq_idx, initial or final states.
// Whole groups of RW rows come through a per-lane ring of S groups in shared memory (cp.async,
// as in bwd_chlast.cuh): S-1 groups in flight while a group computes, in no registers.
template <int W, typename T, bool kSeq, bool kRows, int S>
__global__ void __launch_bounds__(128, W <= 4 ? 3 : 2) fwd_chlast_kernel(const ConvParams p, int64_t cgroups) {
  using R = typename RawOf<T>::type;
  constexpr int C = 8, H = W - 1, RW = 4;  // channels per lane, rows per step
  constexpr int RB = C * static_cast<int>(sizeof(R));  // a lane's row: 16 or 32 bytes
  __shared__ __align__(16) unsigned char ring[S][RW][128][RB];  // [group][row][thread]
  static_assert(sizeof(ring) <= 48 * 1024, "static shared memory over sm_80's 48 KB");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  const int64_t b = blockIdx.x / cgroups;
  const int64_t t0 = ((blockIdx.x - b * cgroups) * 4 + warp) * p.chunk;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * C;
  if (t0 >= L || c0 >= D) return;
  const int64_t t1 = t0 + p.chunk < L ? t0 + p.chunk : L;
  const int64_t nc = D - c0;
  const R* xb = static_cast<const R*>(p.x) + b * p.x_b + c0;
  R* ob = static_cast<R*>(p.out) + b * p.out_b + c0;
  constexpr bool has_seq = kSeq;  // without seq_idx every mask folds away
  const int* sr = has_seq ? p.seq + b * p.seq_b : nullptr;
  const int seq0 = has_seq ? sr[0] : 0;

  float wr[W][C], bias[C];
  load_channel_weights<W, C>(p, c0, nc, wr, bias);
  // Window of rows t-H .. t+RW-1: the first H rows are the look-back.
  float xw[H + RW][C];
  int sw[H + RW];
  // Rows as whole 16-byte words when this lane's C channels exist and every row is aligned.
  const bool vec_in = nc >= C && vec_ok<C>(xb, p.x_l);
  const bool vec_out = nc >= C && vec_ok<C>(ob, p.out_l);
  bool zero;  // rows mode: the token's row entry is out of range
  if (t0 >= H && vec_in) {  // the common case: straight-line loads
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      load_vec<C>(x_row<kRows>(xb, p, t0 - H + j, zero), xw[j]);
      zero_if(zero, xw[j]);
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) sw[j] = has_seq ? sr[t0 - H + j] : 0;
  } else {  // first chunk (initial states), or rows that are not whole aligned words
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const int64_t q = t0 - H + j;
      if (q >= 0) {
        load_checked<C>(x_row<kRows>(xb, p, q, zero), nc, xw[j]);
        zero_if(zero, xw[j]);
        sw[j] = has_seq ? sr[q] : 0;
      } else {
        #pragma unroll
        for (int i = 0; i < C; ++i)
          xw[j][i] = !kRows && p.init != nullptr && i < nc
                         ? load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + (H + q) * p.init_k,
                                    p.init_dtype)
                         : 0.f;
        sw[j] = seq0;
      }
    }
  }
  // Group tq's rows into ring slot q, one commit group (empty past the whole groups); rows
  // mode zero-fills a row out of range.
  const int tid = threadIdx.x;
  auto issue = [&](int64_t tq, int q) {
    if (vec_in && tq + RW <= t1) {
      #pragma unroll
      for (int r = 0; r < RW; ++r) cp_async_x_row<kRows, C>(&ring[q][r][tid][0], xb, p, tq + r);
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int q = 0; q < S - 1; ++q) issue(t0 + q * RW, q);
  int q_now = 0;  // the ring slot of group tg
  for (int64_t tg = t0; tg < t1; tg += RW) {
    issue(tg + (S - 1) * RW, q_now == 0 ? S - 1 : q_now - 1);  // into the slot read last step
    if (vec_in && tg + RW <= t1) {
      cp_async_wait<S - 1>();
      #pragma unroll
      for (int r = 0; r < RW; ++r) smem_run_to_float<C, R>(&ring[q_now][r][tid][0], xw[H + r]);
    } else {
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        if (tg + r < t1) {
          load_checked<C>(x_row<kRows>(xb, p, tg + r, zero), nc, xw[H + r]);
          zero_if(zero, xw[H + r]);
        } else {
          #pragma unroll
          for (int i = 0; i < C; ++i) xw[H + r][i] = 0.f;
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < RW; ++r) sw[H + r] = has_seq && tg + r < t1 ? sr[tg + r] : 0;
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
      const int64_t t = tg + r;
      if (t >= t1) break;
      float o[C];
      #pragma unroll
      for (int i = 0; i < C; ++i) {
        float acc = bias[i];
        bool ok = true;
        #pragma unroll
        for (int k = 0; k < W; ++k) {
          ok = ok && sw[H + r - k] == sw[H + r];
          const float xval = ok ? xw[H + r - k][i] : 0.f;
          acc = fmaf(wr[k][i], xval, acc);
        }
        o[i] = act_fwd(acc, p.silu);
      }
      if (vec_out) store_vec<C>(ob + t * p.out_l, o);
      else store_checked<C>(ob + t * p.out_l, nc, o);
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < C; ++i) xw[j][i] = xw[RW + j][i];
      sw[j] = sw[RW + j];
    }
    q_now = q_now == S - 1 ? 0 : q_now + 1;
  }
  cp_async_wait<0>();  // empty groups only: none may be pending at exit
  if (!kRows && p.final_states != nullptr && t1 == L) {  // last w-1 inputs, initial states in front
    R* fr = static_cast<R*>(p.final_states) + (b * D + c0) * H;
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const int64_t q = L - H + j;
      float v[C];
      if (q >= 0) {
        load_checked<C>(xb + q * p.x_l, nc, v);
      } else {
        #pragma unroll
        for (int i = 0; i < C; ++i)
          v[i] = p.init != nullptr && i < nc
                     ? load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + (H + q) * p.init_k,
                                p.init_dtype)
                     : 0.f;
      }
      #pragma unroll
      for (int i = 0; i < C; ++i)
        if (i < nc) fr[i * H + j] = Elem<R>::fromf(v[i]);
    }
  }
}

template <bool kSeq, bool kRows = false>
void fwd_chlast_launch(const ConvParams& p, int xdtype, cudaStream_t s) {
  const int64_t nchunks = (p.seqlen + p.chunk - 1) / p.chunk;
  const int64_t cgroups = (nchunks + 3) / 4;
  const int64_t gx = p.batch * cgroups, gy = (p.dim + 255) / 256;
  MLM_CHECK(gx < (int64_t(1) << 31) && gy < 65536,
            kRows ? "msc_conv_fwd" : "causal_conv1d_fwd", ": input too large");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // ring depth 3 groups (24 KB a block at 16 bits), 2 at fp32 (32 KB)
      fwd_chlast_kernel<W, T, kSeq, kRows, sizeof(T) == 4 ? 2 : 3><<<grid, 128, 0, s>>>(p, cgroups);
      MLM_CHECK_LAUNCH();
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
