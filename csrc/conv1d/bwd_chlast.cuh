// Causal conv1d backward, channel-last layout (the math and the determinism: bwd_lcontig.cuh).
#pragma once
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "common/check.h"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

// Channel-last: a lane owns C channels and walks rows t = t0 .. t1+H-1 upward, keeping the
// last H+1 rows of x and g; dx for row u = t - H is complete once g[t] is known. A warp takes
// a chunk (p.chunk rows of one batch row) of the block's 128 channels. p.chunk_blocks 0
// ("flat"): warp w of block x the (row, chunk) item 4x + w, its own dweight / dbias slot, no
// barrier; else block x takes 4 consecutive chunks of one row (idle warps past its end), its
// warps' sums added on chip into one slot (plan_bwd_chlast, ops.cpp).
// kRows: x rows through p.rows (conv1d.h), no seq_idx, initial or final states.
// Whole groups of RW rows come through a per-lane ring of S groups in shared memory (cp.async,
// S-1 groups in flight while a group computes; pipe.cuh): the bytes in flight cost no
// registers. Held in registers one group ahead, they had ~2 KB in flight per warp at 168
// registers, 12 warps per SM.
template <int W, typename T, bool kSeq, bool kRows, int S>
__global__ void __launch_bounds__(128, bwd_chlast_blocks_per_sm(W)) bwd_chlast_kernel(const ConvParams p) {
  using R = typename RawOf<T>::type;
  constexpr int C = 4, H = W - 1, RW = 4, RB = C * static_cast<int>(sizeof(R));  // RB: a lane's row
  __shared__ __align__(16) unsigned char ring[S][2][RW][128][RB];  // [group][x, dout][row][thread]
  static_assert(sizeof(ring) <= 48 * 1024, "static shared memory over sm_80's 48 KB");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t L = p.seqlen, D = p.dim;
  const bool flat = p.chunk_blocks == 0;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * 4 + warp;  // flat: (row, chunk)
  const int64_t b = flat ? item / p.nslots_per_batch : blockIdx.x / p.chunk_blocks;
  const int64_t t0 = (flat ? item - b * p.nslots_per_batch
                           : (blockIdx.x - b * p.chunk_blocks) * 4 + warp) * p.chunk;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * C;
  // Blocked: no early return, the block meets at a barrier for the dweight sums; idle lanes
  // add zeros.
  const bool active = b < p.batch && t0 < L && c0 < D;
  if (flat && !active) return;
  const int64_t t1 = !active ? t0 : (t0 + p.chunk < L ? t0 + p.chunk : L);
  const int64_t nc = D - c0;
  // k scans in one launch (rows mode, p.scan_rows): scan z, its batch row bx (conv1d.h)
  int64_t z = 0, bx = b;
  if constexpr (kRows) {
    if (p.scan_rows > 0) {
      z = b / p.scan_rows;
      bx = b - z * p.scan_rows;
    }
  }
  const int64_t roff = z * L;  // this scan's rows
  const R* xb = static_cast<const R*>(p.x) + bx * p.x_b + c0;
  const R* dob = static_cast<const R*>(p.dout) + bx * p.dout_b + z * p.dout_s + c0;
  int64_t dl = p.dout_l;  // dout's row stride for this lane's channels
  if (p.dpiece[0] != nullptr && c0 >= p.dsplit[0]) {  // dout in pieces (conv1d.h)
    const int i = c0 >= p.dsplit[1] ? 1 : 0;
    dob = static_cast<const R*>(p.dpiece[i]) + bx * p.dpiece_b[i] + z * p.dpiece_s[i] +
          (c0 - p.dsplit[i]);
    dl = p.dpiece_l[i];
  }
  R* dxb = static_cast<R*>(p.out) + b * p.out_b + c0;
  constexpr bool has_seq = kSeq;  // without seq_idx every mask folds away
  const int* sr = has_seq ? p.seq + b * p.seq_b : nullptr;
  const int seq0 = has_seq ? sr[0] : 0;
  const int64_t fin0 = L - H;
  const int64_t u_first = (t0 == 0 && p.dinit != nullptr) ? -H : t0;

  float wr[W][C], bias[C], dw[W][C] = {}, db[C] = {};
  load_channel_weights<W, C>(p, c0, nc, wr, bias, z * p.w_s, z * p.bias_ss);
  float xw[H + RW][C], gw[H + RW][C];
  int sw[H + RW];
  const bool vec_in = nc >= C && vec_ok<C>(xb, p.x_l) && vec_ok<C>(dob, dl);
  const bool vec_out = nc >= C && vec_ok<C>(dxb, p.out_l);
  #pragma unroll
  for (int j = 0; j < H; ++j) {
    #pragma unroll
    for (int i = 0; i < C; ++i) gw[j][i] = 0.f;  // never read for a row < t0 that is emitted
  }
  bool zero;  // rows mode: the token's row entry is out of range
  if (active && t0 >= H && vec_in) {  // the common case: straight-line loads
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      load_vec<C>(x_row<kRows>(xb, p, t0 - H + j, zero, roff), xw[j]);
      zero_if(zero, xw[j]);
    }
    #pragma unroll
    for (int j = 0; j < H; ++j) sw[j] = has_seq ? sr[t0 - H + j] : 0;
  } else {  // first chunk (initial states), idle warps, or rows not whole aligned words
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      const int64_t q = t0 - H + j;
      if (q >= 0 && q < L) {  // q >= L only for an idle warp
        load_checked<C>(x_row<kRows>(xb, p, q, zero, roff), nc, xw[j]);
        zero_if(zero, xw[j]);
        sw[j] = has_seq ? sr[q] : 0;
      } else {
        #pragma unroll
        for (int i = 0; i < C; ++i)
          xw[j][i] = !kRows && q < 0 && p.init != nullptr && i < nc
                         ? load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + (H + q) * p.init_k,
                                    p.init_dtype)
                         : 0.f;
        sw[j] = seq0;
      }
    }
  }
  const int64_t t_last = active ? t1 + H : t0;  // exclusive; rows >= t1 are look-ahead
  const int64_t t_stop = t_last < L ? t_last : L;  // rows to read in this chunk
  // Group tq's rows into ring slot q, one commit group (empty past the whole groups), so that
  // wait<S-1> after each issue leaves group g landed. Rows mode: a row out of range is
  // zero-filled (cp_async_run with n 0).
  const int tid = threadIdx.x;
  auto issue = [&](int64_t tq, int q) {
    if (vec_in && tq + RW <= t_stop) {
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        cp_async_x_row<kRows, C>(&ring[q][0][r][tid][0], xb, p, tq + r, roff);
        cp_async_whole<C, R>(&ring[q][1][r][tid][0], dob + (tq + r) * dl);
      }
    }
    cp_async_commit();
  };
  #pragma unroll
  for (int q = 0; q < S - 1; ++q) issue(t0 + q * RW, q);
  int q_now = 0;  // the ring slot of group tg
  for (int64_t tg = t0; tg < t_last; tg += RW) {
    float dv[RW][C];
    issue(tg + (S - 1) * RW, q_now == 0 ? S - 1 : q_now - 1);  // into the slot read last step
    if (vec_in && tg + RW <= t_stop) {
      cp_async_wait<S - 1>();
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        smem_run_to_float<C, R>(&ring[q_now][0][r][tid][0], xw[H + r]);
        smem_run_to_float<C, R>(&ring[q_now][1][r][tid][0], dv[r]);
      }
    } else {
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        if (tg + r < t_stop) {
          load_checked<C>(x_row<kRows>(xb, p, tg + r, zero, roff), nc, xw[H + r]);
          zero_if(zero, xw[H + r]);
          load_checked<C>(dob + (tg + r) * dl, nc, dv[r]);
        } else {
          #pragma unroll
          for (int i = 0; i < C; ++i) { xw[H + r][i] = 0.f; dv[r][i] = 0.f; }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < RW; ++r) sw[H + r] = !has_seq ? 0 : (tg + r < t_stop ? sr[tg + r] : -1);
    // The group's rows; kFast: every row own and its dx a whole-word store with no edge (no
    // seq_idx, dinit or final states): no branch, so the rows' latency chains interleave.
    auto group = [&]<bool kFast>() {
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        const int64_t t = tg + r;
        const bool own = kFast || t < t1;
        #pragma unroll
        for (int i = 0; i < C; ++i) {
          float xm[W];
          float acc = bias[i];
          bool ok = true;
          #pragma unroll
          for (int k = 0; k < W; ++k) {
            ok = ok && sw[H + r - k] == sw[H + r];
            xm[k] = ok ? xw[H + r - k][i] : 0.f;
            acc = fmaf(wr[k][i], xm[k], acc);
          }
          const float gi = act_bwd(dv[r][i], acc, p.silu);
          gw[H + r][i] = gi;
          if (own) {
            db[i] += gi;
            #pragma unroll
            for (int k = 0; k < W; ++k) dw[k][i] = fmaf(gi, xm[k], dw[k][i]);
          }
        }
        const int64_t u = t - H;  // window row r
        if (kFast || (u >= u_first && u < t1)) {
          float o[C];
          #pragma unroll
          for (int i = 0; i < C; ++i) {
            float acc = 0.f;
            bool ok = true;
            #pragma unroll
            for (int k = 0; k < W; ++k) {
              ok = ok && sw[r + k] == sw[r];
              if (ok) acc = fmaf(wr[k][i], gw[r + k][i], acc);
            }
            o[i] = acc;
          }
          if constexpr (kFast) {
            store_run<C>(dxb + u * p.out_l, o);
          } else {
            if (!kRows && p.dfinal != nullptr && u >= fin0) {  // the last w-1 positions
              #pragma unroll
              for (int i = 0; i < C; ++i)
                if (i < nc)
                  o[i] += load_any(p.dfinal, b * p.dfinal_b + (c0 + i) * p.dfinal_d +
                                                 (u - fin0) * p.dfinal_k, p.dfinal_dtype);
            }
            if (u >= 0) {
              if (vec_out) store_vec<C>(dxb + u * p.out_l, o);
              else store_checked<C>(dxb + u * p.out_l, nc, o);
            } else {
              #pragma unroll
              for (int i = 0; i < C; ++i)
                if (i < nc) store_any(p.dinit, (b * D + c0 + i) * H + (u + H), p.init_dtype, o[i]);
            }
          }
        }
      }
    };
    const bool fast = !has_seq && vec_out && tg + RW <= t1 && tg - H >= t0 &&
                      (kRows || p.dfinal == nullptr || tg + RW - 1 - H < fin0);
    if (fast) group.template operator()<true>();
    else group.template operator()<false>();
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      #pragma unroll
      for (int i = 0; i < C; ++i) { xw[j][i] = xw[RW + j][i]; gw[j][i] = gw[RW + j][i]; }
      sw[j] = sw[RW + j];
    }
    q_now = q_now == S - 1 ? 0 : q_now + 1;
  }
  cp_async_wait<0>();  // only empty groups remain; none may be pending at exit or below
  if (flat) {
    float* slot = p.partial + (item * D + c0) * (W + 1);
    #pragma unroll
    for (int i = 0; i < C; ++i) {
      if (i < nc) {
        #pragma unroll
        for (int k = 0; k < W; ++k) slot[i * (W + 1) + k] = dw[k][i];
        slot[i * (W + 1) + W] = db[i];
      }
    }
    return;
  }
  // Blocked: the 4 warps' sums in a fixed order, through the ring's memory (a buffer of their
  // own put fp32 w 8 over sm_80's 48 KB of static shared memory) once every warp is past its
  // walk (its copies waited for above).
  constexpr int kItems = C * (W + 1);
  static_assert(sizeof(ring) >= sizeof(float) * 4 * kItems * 32, "the reduction reuses the ring");
  float (*red)[kItems][32] = reinterpret_cast<float (*)[kItems][32]>(&ring[0][0][0][0][0]);
  __syncthreads();
  #pragma unroll
  for (int i = 0; i < C; ++i) {
    #pragma unroll
    for (int k = 0; k < W; ++k) red[warp][i * (W + 1) + k][lane] = dw[k][i];
    red[warp][i * (W + 1) + W][lane] = db[i];
  }
  __syncthreads();
  if (c0 >= D) return;
  float* slot = p.partial + (static_cast<int64_t>(blockIdx.x) * D + c0) * (W + 1);
  for (int it = warp; it < kItems; it += 4) {
    if (it / (W + 1) >= nc) break;
    slot[it] = ((red[0][it][lane] + red[1][it][lane]) + red[2][it][lane]) + red[3][it][lane];
  }
}

template <bool kSeq, bool kRows = false>
void bwd_chlast_launch(const ConvParams& p, int xdtype, cudaStream_t s) {
  const int64_t gx = p.chunk_blocks == 0 ? (p.batch * p.nslots_per_batch + 3) / 4
                                          : p.batch * p.chunk_blocks;
  const int64_t gy = (p.dim + 127) / 128;
  MLM_CHECK(gx < (int64_t(1) << 31) && gy < 65536,
            kRows ? "msc_conv_bwd" : "causal_conv1d_bwd", ": input too large");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // ring depth: 3 groups (24 KB a block at 16 bits, 3 blocks per SM), 2 at fp32 (32 KB).
      // MLMAMBA_CONV1D_TUNE (bf16, width 4, no seq_idx): 41 = 2 groups, 42 = 4.
      auto launch = [&](auto kernel) {
        kernel<<<grid, 128, 0, s>>>(p);
        MLM_CHECK_LAUNCH();
      };
      if constexpr (!kSeq && std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 41) return launch(bwd_chlast_kernel<W, T, kSeq, kRows, 2>);
        if (tune_variant() == 42) return launch(bwd_chlast_kernel<W, T, kSeq, kRows, 4>);
      }
      launch(bwd_chlast_kernel<W, T, kSeq, kRows, sizeof(T) == 4 ? 2 : 3>);
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
