// Causal conv1d backward, channel-last, one-shot (no seq_idx; pipe_ok; the math: bwd_lcontig.cuh,
// the row walk: bwd_chlast.cuh). A warp owns 128 channels (4 per lane) x R rows of one batch
// row: x rows [r0-H, r0+R+H) and dout rows [r0, r0+R+H) go by cp.async into the warp's shared
// memory in two groups, each lane copying only the words it reads back (so cp.async.wait_group
// is the only synchronisation of the walk). The warp recomputes g on the H rows after its own
// (the next warp's first), so warps share nothing but the block's dweight slot. Why: the v2
// kernel holds its loads in registers (165 of them, 12 warps / SM, ~2 KB in flight per warp);
// here ~19 KB per warp are in flight from the start. Rows mode (msc_scan: p.rows, dout in
// pieces) as in bwd_chlast.cuh.
#include <type_traits>

#include "common/check.h"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

template <int W, int R, int RW_>
struct ChlastOneshotShape {
  static constexpr int H = W - 1, RW = RW_;  // rows a step (windows of H + RW rows)
  static constexpr int kXRows = R + 2 * H, kDRows = R + H;  // staged rows of x and of dout
  static constexpr int kIters = (R + H + RW - 1) / RW;      // groups of RW rows walked
  static_assert(R % (2 * RW) == 0, "R: a multiple of 2 groups");
};

// One lane's run of 4 channels as one cp.async word (8 bytes for 16-bit types, 16 for fp32),
// zero-filled when !ok (src is then not read: any address).
template <typename Word>
__device__ __forceinline__ void cp_word(Word* dst, const void* src, bool ok) {
  if constexpr (sizeof(Word) == 16) cp_async16(dst, src, ok ? 16 : 0);
  else cp_async8(dst, src, ok ? 8 : 0);
}

// store_run's words as one predicated store (no branch: the caller's basic block stays whole)
__device__ __forceinline__ void st_words_if(uint2* p, uint2 v, bool ok) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q st.global.v2.b32 [%0], {%1, %2};\n}\n"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(static_cast<int>(ok)));
}
__device__ __forceinline__ void st_words_if(uint4* p, uint4 v, bool ok) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q st.global.v4.b32 [%0], {%1, %2, %3, %4};\n}\n"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(static_cast<int>(ok)));
}
template <int N, typename E>
__device__ __forceinline__ void store_run_if(E* p, const float (&v)[N], bool ok) {
  using Wd = Words<N, E>;
  static_assert(Wd::kCount == 1, "one word");
  typename Wd::W w[1];
  to_words<N, E>(v, w);
  st_words_if(reinterpret_cast<typename Wd::W*>(p), w[0], ok);
}

template <int W, typename T, bool kRows, int NW, int R, int RW_, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB)
    bwd_chlast_oneshot_kernel(const ConvParams p, uint32_t nstrips, uint32_t ntl) {
  using E = typename RawOf<T>::type;
  using Word = typename Words<4, E>::W;  // one lane's 4 channels of a row
  using S = ChlastOneshotShape<W, R, RW_>;
  constexpr int C = 4, H = W - 1, RW = S::RW, NX = S::kXRows, ND = S::kDRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Word* xs = reinterpret_cast<Word*>(smem_raw) + warp * (NX + ND) * 32;  // [row][lane]
  Word* ds = xs + NX * 32;
  const uint32_t strip = blockIdx.x % nstrips, rest = blockIdx.x / nstrips;
  const uint32_t tl = rest % ntl, b = rest / ntl;
  const int L = static_cast<int>(p.seqlen), D = static_cast<int>(p.dim);
  const int r0 = static_cast<int>((tl * NW + warp) * R);
  const int c0 = static_cast<int>(strip) * 128 + lane * C;
  const bool active = r0 < L;  // warps past the end still meet the block's barrier
  const int nc = c0 < D ? C : 0;  // D % 8 == 0: a lane's run is whole or empty

  const E* xb = static_cast<const E*>(p.x) + b * p.x_b + c0;
  const E* dob = static_cast<const E*>(p.dout) + b * p.dout_b + c0;
  int64_t dl = p.dout_l;
  if (p.dpiece[0] != nullptr && c0 >= p.dsplit[0]) {  // dout in pieces (conv1d.h)
    const int i = c0 >= p.dsplit[1] ? 1 : 0;
    dob = static_cast<const E*>(p.dpiece[i]) + b * p.dpiece_b[i] + (c0 - p.dsplit[i]);
    dl = p.dpiece_l[i];
  }
  // Staging: x rows [r0-H, r0+R+H) and dout rows [r0, r0+R+H) (local rows from 0) in two
  // commit groups; rows outside [0, L) (in rows mode, entries outside it), idle warps and lanes
  // zero-filled. Pointers advance by a stride a row; rows mode takes the row indices from the
  // lanes that loaded them.
  static_assert(NX <= 64, "rows mode: two index loads per lane");
  int ridx[2] = {0, 0};
  if constexpr (kRows) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = r0 - H + h * 32 + lane;
      ridx[h] = active && q >= 0 && q < L ? __ldg(p.rows + q) : -1;
    }
  }
  const bool lane_ok = active && nc > 0;
  const E* xp = xb + static_cast<int64_t>(r0 - H) * p.x_l;
  const E* dp = dob + static_cast<int64_t>(r0) * dl;
  auto stage_x = [&](int j) {  // j: compile-time after unrolling
    const int q = r0 - H + j;
    bool ok = lane_ok && static_cast<unsigned>(q) < static_cast<unsigned>(L);
    const E* src = xp;
    if constexpr (kRows) {
      const int r = __shfl_sync(kFull, ridx[j / 32], j % 32);
      ok = ok && static_cast<unsigned>(r) < static_cast<unsigned>(L);
      src = xb + static_cast<int64_t>(ok ? r : 0) * p.x_l;
    }
    cp_word(xs + j * 32 + lane, src, ok);
    xp += p.x_l;
  };
  auto stage_d = [&](int j) {
    const bool ok = lane_ok && r0 + j < L;
    cp_word(ds + j * 32 + lane, dp, ok);
    dp += dl;
  };
  #pragma unroll
  for (int j = 0; j < H + R / 2; ++j) stage_x(j);
  #pragma unroll
  for (int j = 0; j < R / 2; ++j) stage_d(j);
  cp_async_commit();
  #pragma unroll
  for (int j = H + R / 2; j < NX; ++j) stage_x(j);
  #pragma unroll
  for (int j = R / 2; j < ND; ++j) stage_d(j);
  cp_async_commit();

  float wr[W][C], bias[C], dw[W][C], db[C];
  #pragma unroll
  for (int i = 0; i < C; ++i) {
    const bool ok = i < nc;
    #pragma unroll
    for (int k = 0; k < W; ++k) {
      wr[k][i] = ok ? load_any(p.weight, (c0 + i) * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype) : 0.f;
      dw[k][i] = 0.f;
    }
    bias[i] = ok && p.bias != nullptr ? load_any(p.bias, (c0 + i) * p.bias_s, p.bias_dtype) : 0.f;
    db[i] = 0.f;
  }

  if (active) {
    const int r1 = r0 + R < L ? r0 + R : L;  // own rows [r0, r1)
    const bool first_dinit = r0 == 0 && p.dinit != nullptr;  // dx of positions -H..-1 too
    const bool has_dfinal = !kRows && p.dfinal != nullptr;
    E* dxb = static_cast<E*>(p.out) + b * p.out_b + c0;
    float xw[H + RW][C], gw[H + RW][C];
    cp_async_wait<1>();
    #pragma unroll
    for (int j = 0; j < H; ++j) {
      smem_run_to_float<C, E>(xs + j * 32 + lane, xw[j]);  // zeros before row 0
      if (!kRows && r0 == 0 && p.init != nullptr) {
        #pragma unroll
        for (int i = 0; i < C; ++i)
          xw[j][i] = i < nc ? load_any(p.init, b * p.init_b + (c0 + i) * p.init_d + j * p.init_k, p.init_dtype) : 0.f;
      }
      #pragma unroll
      for (int i = 0; i < C; ++i) gw[j][i] = 0.f;  // g before row 0 (dinit's sums)
    }
    // RW rows from local row lt: g of each, the dweight sums of own rows, dx of the rows H
    // back. kEdge: the group holds dinit's positions or final-state positions (branches);
    // otherwise one basic block, the rows' latency chains interleaved.
    auto group = [&]<bool kEdge>(int lt) {
      float dv[RW][C];
      #pragma unroll
      for (int r = 0; r < RW; ++r) {  // the walk's last group may pass the staged rows: it
        const int lx = H + lt + r < NX ? H + lt + r : NX - 1;  // reads the last (unused)
        const int ld = lt + r < ND ? lt + r : ND - 1;
        smem_run_to_float<C, E>(xs + lx * 32 + lane, xw[H + r]);
        smem_run_to_float<C, E>(ds + ld * 32 + lane, dv[r]);
      }
      #pragma unroll
      for (int r = 0; r < RW; ++r) {
        const bool own = lt + r < R;
        #pragma unroll
        for (int i = 0; i < C; ++i) {
          float xm[W];
          float acc = bias[i];
          #pragma unroll
          for (int k = 0; k < W; ++k) {
            xm[k] = xw[H + r - k][i];
            acc = fmaf(wr[k][i], xm[k], acc);
          }
          const float gi = dv[r][i] * act_grad(acc, p.silu);  // 0 past the end: dout is
          gw[H + r][i] = gi;
          const float go = own ? gi : 0.f;
          db[i] += go;
          #pragma unroll
          for (int k = 0; k < W; ++k) dw[k][i] = fmaf(go, xm[k], dw[k][i]);
        }
        const int u = r0 + lt + r - H;  // dx of window row r
        float o[C];
        #pragma unroll
        for (int i = 0; i < C; ++i) {
          float acc = 0.f;
          #pragma unroll
          for (int k = 0; k < W; ++k) acc = fmaf(wr[k][i], gw[r + k][i], acc);
          o[i] = acc;
        }
        if constexpr (kEdge) {
          if (u >= (first_dinit ? -H : r0) && u < r1) {
            if (has_dfinal && u >= L - H) {  // the last w-1 positions
              #pragma unroll
              for (int i = 0; i < C; ++i)
                if (i < nc)
                  o[i] += load_any(p.dfinal, b * p.dfinal_b + (c0 + i) * p.dfinal_d + (u - (L - H)) * p.dfinal_k,
                                   p.dfinal_dtype);
            }
            if (u >= 0) {
              if (nc) store_run<C>(dxb + u * p.out_l, o);
            } else {
              #pragma unroll
              for (int i = 0; i < C; ++i)
                if (i < nc) store_any(p.dinit, (b * p.dim + c0 + i) * H + (u + H), p.init_dtype, o[i]);
            }
          }
        } else {
          store_run_if<C>(dxb + u * p.out_l, o, nc > 0 && u >= r0 && u < r1);
        }
      }
      #pragma unroll
      for (int j = 0; j < H; ++j) {
        #pragma unroll
        for (int i = 0; i < C; ++i) { xw[j][i] = xw[RW + j][i]; gw[j][i] = gw[RW + j][i]; }
      }
    };
    #pragma unroll 1
    for (int it = 0; it < S::kIters; ++it) {
      if (it == R / (2 * RW)) cp_async_wait<0>();
      const int lt = it * RW;
      const bool edge = (it == 0 && first_dinit) || (has_dfinal && r0 + lt + RW - 1 - H >= L - H);
      if (edge) group.template operator()<true>(lt);
      else group.template operator()<false>(lt);
    }
  }
  cp_async_wait<0>();
  // The warps' partials summed in a fixed order into the block's slot, through each warp's own
  // staging memory (read by its lanes only up to here).
  constexpr int kItems = C * (W + 1);
  static_assert(kItems * 32 * 4 <= NX * 32 * static_cast<int>(sizeof(Word)), "slot staging");
  __syncwarp();
  float* red = reinterpret_cast<float*>(xs);
  #pragma unroll
  for (int i = 0; i < C; ++i) {
    #pragma unroll
    for (int k = 0; k < W; ++k) red[(i * (W + 1) + k) * 32 + lane] = dw[k][i];
    red[(i * (W + 1) + W) * 32 + lane] = db[i];
  }
  __syncthreads();
  if (nc == 0) return;
  float* slot = p.partial + ((static_cast<int64_t>(b) * ntl + tl) * D + c0) * (W + 1);
  constexpr int kStride = (NX + ND) * 32 * static_cast<int>(sizeof(Word)) / 4;  // floats per warp
  const float* red0 = reinterpret_cast<const float*>(smem_raw);
  for (int it = warp; it < kItems; it += NW) {
    float s = red0[it * 32 + lane];
    #pragma unroll
    for (int w = 1; w < NW; ++w) s += red0[w * kStride + it * 32 + lane];
    slot[it] = s;
  }
}

// One variant: NW warps per block of R rows each, RW rows a step, MINB blocks per SM.
template <int W, typename T, int NW, int R, int RW, int MINB>
struct BwdCOneshot {
  static constexpr int kRowsPerSlot = NW * R;
  static constexpr size_t smem() {
    using S = ChlastOneshotShape<W, R, RW>;
    return static_cast<size_t>(NW) * (S::kXRows + S::kDRows) * 32 *
           sizeof(typename Words<4, typename RawOf<T>::type>::W);
  }
  template <bool kRows>
  static void launch(const ConvParams& p, cudaStream_t s) {
    const int64_t nstrips = (p.dim + 127) / 128, ntl = (p.seqlen + kRowsPerSlot - 1) / kRowsPerSlot;
    const int64_t blocks = p.batch * ntl * nstrips;
    MLM_CHECK(p.nslots_per_batch == ntl, "causal_conv1d_bwd: workspace sized for another tile");
    MLM_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d_bwd: input too large for the one-shot kernel");
    auto kernel = bwd_chlast_oneshot_kernel<W, T, kRows, NW, R, RW, MINB>;
    static const bool attr = [&] {  // once per instantiation
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem())));
      return true;
    }();
    (void)attr;
    kernel<<<static_cast<unsigned>(blocks), NW * 32, smem(), s>>>(p, static_cast<uint32_t>(nstrips),
                                                                  static_cast<uint32_t>(ntl));
    MLM_CHECK_LAUNCH();
  }
};

// f(BwdCOneshot<...>{}) for the variant to run: 16-bit types 3 warps of 32 rows (56 KB of shared
// memory per block at w 4: 4 blocks / SM, 141 registers), fp32 2 warps of 16 rows; 2 rows a
// step from w 6 (registers). MLMAMBA_CONV1D_TUNE (bf16, width 4): 21 = 4 warps of 16 rows, 2 a
// step, 4 blocks / SM; 22 = 4 warps of 32 rows, 3 blocks / SM; 23 = 2 warps of 32 rows, 6
// blocks / SM.
template <typename F>
void with_bwd_chlast_oneshot(int xdtype, int width, F&& f) {
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(width, W, [&] {
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        if (tune_variant() == 21) return f(BwdCOneshot<W, T, 4, 16, 2, 4>{});
        if (tune_variant() == 22) return f(BwdCOneshot<W, T, 4, 32, 4, 3>{});
        if (tune_variant() == 23) return f(BwdCOneshot<W, T, 2, 32, 4, 6>{});
      }
      constexpr int RW = W <= 5 ? 4 : 2;
      if constexpr (sizeof(T) == 4) f(BwdCOneshot<W, T, 2, 16, RW, W <= 4 ? 5 : 4>{});
      else f(BwdCOneshot<W, T, 3, 32, RW, W <= 4 ? 4 : (W <= 6 ? 3 : 2)>{});
    });
  });
}

int64_t bwd_chlast_oneshot_slots(const ConvParams& p, int xdtype) {
  int64_t ntl = 0;
  with_bwd_chlast_oneshot(xdtype, p.width, [&](auto k) {
    constexpr int64_t rows = decltype(k)::kRowsPerSlot;
    ntl = (p.seqlen + rows - 1) / rows;
  });
  return ntl;
}

void bwd_chlast_oneshot(const ConvParams& p, int xdtype, cudaStream_t s) {
  with_bwd_chlast_oneshot(xdtype, p.width, [&](auto k) {
    if (p.rows != nullptr) decltype(k)::template launch<true>(p, s);
    else decltype(k)::template launch<false>(p, s);
  });
}

}  // namespace conv1d
}  // namespace mlmamba
