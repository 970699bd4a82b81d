// Causal conv1d decode update: one thread per (batch, channel) runs the l new tokens through
// the window [conv_state | x] and leaves the last w-1 inputs in conv_state. No allocation, no
// host sync: safe to capture in a CUDA graph. Dtypes are runtime switches (the data is tiny),
// width is a template parameter so the window stays in registers.
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "conv1d/conv1d.h"
#include "conv1d/switch.h"

namespace mlmamba {
namespace conv1d {

template <int W>
__global__ void __launch_bounds__(128) update_kernel(const UpdateParams p, int xdtype) {
  constexpr int H = W - 1;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int64_t b = idx / p.dim, c = idx - b * p.dim;
  float win[H], wr[W];
  const int64_t st = b * p.st_b + c * p.st_d;
  #pragma unroll
  for (int j = 0; j < H; ++j) win[j] = load_any(p.state, st + j * p.st_k, p.st_dtype);
  #pragma unroll
  for (int k = 0; k < W; ++k) wr[k] = load_any(p.weight, c * p.w_d + (W - 1 - k) * p.w_k, p.w_dtype);
  const float bias = p.bias != nullptr ? load_any(p.bias, c * p.bias_s, p.bias_dtype) : 0.f;
  const int64_t xo = b * p.x_b + c * p.x_d, oo = b * p.out_b + c * p.out_d;
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const float xt = load_any(p.x, xo + t * p.x_l, xdtype);
    float acc = fmaf(wr[0], xt, bias);
    #pragma unroll
    for (int k = 1; k < W; ++k) acc = fmaf(wr[k], win[H - k], acc);
    store_any(p.out, oo + t * p.out_l, xdtype, act_fwd(acc, p.silu));
    #pragma unroll
    for (int j = 0; j + 1 < H; ++j) win[j] = win[j + 1];
    win[H - 1] = xt;
  }
  #pragma unroll
  for (int j = 0; j < H; ++j) store_any(p.state, st + j * p.st_k, p.st_dtype, win[j]);
}

void update(const UpdateParams& p, int xdtype, cudaStream_t s) {
  const int threads = 128;
  const int64_t blocks = (p.batch * p.dim + threads - 1) / threads;
  MLM_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d_update: input too large");
  CONV_WIDTH_SWITCH(p.width, W, [&] {
    update_kernel<W><<<static_cast<unsigned>(blocks), threads, 0, s>>>(p, xdtype);
    MLM_CHECK_LAUNCH();
  });
}

}  // namespace conv1d
}  // namespace mlmamba
