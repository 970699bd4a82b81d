// Causal conv1d forward, channel-last, one-shot fast path (no seq_idx, d % 8 == 0, 16-byte
// aligned rows; pipe_ok). Shaped like torch's elementwise kernels: a thread owns C channels of
// TR consecutive rows, threads numbered channels fastest (then row chunks, then batch), blocks
// in address order; each thread loads its w-1 look-back rows and its TR rows at once (the
// look-back rows are L2 hits: the thread of the previous chunk reads them too), computes,
// stores and exits (why one-shot: fwd_lcontig_oneshot.cu).
#include <type_traits>

#include "common/check.h"
#include "conv1d/pipe.cuh"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

template <int W, typename T, int C, int TR, int MINB>
__global__ void __launch_bounds__(128, MINB) fwd_chlast_oneshot_kernel(const ConvParams p, uint32_t ncv,
                                                                       uint32_t nchunk, uint32_t nthreads) {
  using R = typename RawOf<T>::type;
  constexpr int H = W - 1, NR = H + TR;  // rows a thread reads: look-back, then its own
  const uint32_t i = blockIdx.x * 128u + threadIdx.x;
  if (i >= nthreads) return;
  const uint32_t rest = i / ncv, cv = i - rest * ncv, b = rest / nchunk, tc = rest - b * nchunk;
  const int L = static_cast<int>(p.seqlen), t0 = static_cast<int>(tc) * TR;
  const int64_t c0 = static_cast<int64_t>(cv) * C;
  const R* xb = static_cast<const R*>(p.x) + b * p.x_b + c0;

  RawRun<C, R> raw[NR];  // row q is token t0 - H + q; rows outside [0, L) read as zeros
  #pragma unroll
  for (int q = 0; q < NR; ++q) {
    const int t = t0 - H + q;
    if (t >= 0 && t < L) raw[q].load(xb + t * p.x_l);
    else {
      #pragma unroll
      for (int w = 0; w < Words<C, R>::kCount; ++w) raw[q].w[w] = {};
    }
  }
  float wr[W][C], bias[C];
  #pragma unroll
  for (int e = 0; e < C; ++e) {
    #pragma unroll
    for (int k = 0; k < W; ++k) wr[k][e] = load_any(p.weight, (c0 + e) * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
    bias[e] = p.bias != nullptr ? load_any(p.bias, (c0 + e) * p.bias_s, p.bias_dtype) : 0.f;
  }
  float lb[H][C];  // the look-back rows as floats: x, or initial states (zeros) before t = 0
  #pragma unroll
  for (int q = 0; q < H; ++q) {
    raw[q].to_float(lb[q]);
    const int t = t0 - H + q;
    if (t < 0 && p.init != nullptr) {
      #pragma unroll
      for (int e = 0; e < C; ++e)
        lb[q][e] = load_any(p.init, b * p.init_b + (c0 + e) * p.init_d + (H + t) * p.init_k, p.init_dtype);
    }
  }
  // row q's values: the own rows are converted where they are used (fewer live registers)
  auto xval = [&](int q, int e) {
    return q < H ? lb[q < H ? q : 0][e] : Elem<R>::tof(reinterpret_cast<const R*>(raw[q].w)[e]);
  };

  // final states: the row's last w-1 inputs (they may span two chunks), written by the chunk
  // that owns each row; the first chunk also writes the initial states in front when L < w-1
  R* fr = p.final_states != nullptr
              ? static_cast<R*>(p.final_states) + (static_cast<int64_t>(b) * p.dim + c0) * H
              : nullptr;
  if (fr != nullptr && t0 == 0 && L < H) {
    #pragma unroll
    for (int q = 0; q < H; ++q) {
      if (q >= L) {
        #pragma unroll
        for (int e = 0; e < C; ++e) fr[e * H + q - L] = Elem<R>::fromf(lb[q][e]);
      }
    }
  }
  R* ob = static_cast<R*>(p.out) + b * p.out_b + c0;
  #pragma unroll
  for (int r = 0; r < TR; ++r) {
    const int t = t0 + r;
    if (t >= L) break;
    float o[C];
    #pragma unroll
    for (int e = 0; e < C; ++e) {
      float acc = bias[e];
      #pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(wr[k][e], xval(H + r - k, e), acc);
      o[e] = act_fwd(acc, p.silu);
    }
    store_run<C>(ob + t * p.out_l, o);
    if (fr != nullptr && t >= L - H) {
      #pragma unroll
      for (int e = 0; e < C; ++e) fr[e * H + t - (L - H)] = Elem<R>::fromf(xval(H + r, e));
    }
  }
}

template <int W, typename T, int C, int TR, int MINB>
void launch_fwd_chlast_oneshot(const ConvParams& p, cudaStream_t s) {
  const int64_t ncv = p.dim / C, nchunk = (p.seqlen + TR - 1) / TR, n = ncv * nchunk * p.batch;
  MLM_CHECK(p.dim % C == 0 && n < (int64_t(1) << 32) - 128, "causal_conv1d_fwd: input too large for the one-shot kernel");
  fwd_chlast_oneshot_kernel<W, T, C, TR, MINB><<<static_cast<unsigned>((n + 127) / 128), 128, 0, s>>>(
      p, static_cast<uint32_t>(ncv), static_cast<uint32_t>(nchunk), static_cast<uint32_t>(n));
  MLM_CHECK_LAUNCH();
}

void fwd_chlast_oneshot(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_fwd: input too large");
  CONV_X_SWITCH(xdtype, T, [&] {
    CONV_WIDTH_SWITCH(p.width, W, [&] {
      // MLMAMBA_CONV1D_TUNE (bf16, width 4): channels, rows and registers (A/B, docs/perf-log.md)
      if constexpr (std::is_same_v<T, at::BFloat16> && W == 4) {
        switch (tune_variant()) {
          case 21: return launch_fwd_chlast_oneshot<W, T, 8, 4, 4>(p, s);
          case 22: return launch_fwd_chlast_oneshot<W, T, 4, 16, 6>(p, s);
          case 23: return launch_fwd_chlast_oneshot<W, T, 4, 8, 8>(p, s);
          default: break;
        }
      }
      launch_fwd_chlast_oneshot<W, T, 4, 8, W <= 4 ? 6 : 4>(p, s);  // 8-byte words at 16-bit types
    });
  });
}

}  // namespace conv1d
}  // namespace mlmamba
