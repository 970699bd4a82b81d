// msc_sum_rows: the msc_scan backward's sum of the per-scan gradients, each read through its
// scan's inverse order (msc.h). One thread per 16-byte piece of an output row: the k pieces
// are loaded first (k loads in flight), then added in scan order in fp32 and rounded once, so
// the result equals gathering each scan's rows back and summing them in that order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "msc/msc.h"

namespace mlmamba {
namespace msc {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements of T: 16 bytes (V = 16 / sizeof(T)) or one element (V = 1)
template <typename T, int V>
struct alignas(V * sizeof(T)) Piece {
  T v[V];
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(const SumRowsParams p) {
  using P = Piece<T, V>;
  const int64_t per_row = p.cols / V;
  const int64_t total = p.batch * p.seqlen * per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += step) {
    const int64_t col = (e % per_row) * V, row = e / per_row;
    const int64_t r = row % p.seqlen, bi = row / p.seqlen;
    P in[kMaxSumScans];
#pragma unroll
    for (int i = 0; i < kMaxSumScans; ++i) {
      if (i >= p.nscans) break;
      // positions outside range(L) (orders not checked under graph capture) add nothing
      const int src = p.inv[i * p.seqlen + r];
      if (src < 0 || src >= p.seqlen) {
#pragma unroll
        for (int j = 0; j < V; ++j) in[i].v[j] = from_f<T>(0.f);
        continue;
      }
      const T* base = static_cast<const T*>(p.src[i]) + bi * p.src_b[i] + src * p.src_l[i] + col;
      in[i] = *reinterpret_cast<const P*>(base);
    }
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxSumScans; ++i) {
      if (i >= p.nscans) break;
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += to_f(in[i].v[j]);
    }
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(acc[j]);
    *reinterpret_cast<P*>(static_cast<T*>(p.out) + bi * p.out_b + r * p.out_l + col) = o;
  }
}

template <typename T>
void launch_typed(const SumRowsParams& p, bool wide, int sms, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t total = p.batch * p.seqlen * (wide ? p.cols / V : p.cols);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 32LL * sms);
  if (blocks == 0) return;
  if (wide)
    sum_rows_kernel<T, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  else
    sum_rows_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
}

}  // namespace

void launch_sum_rows(const SumRowsParams& p, int dtype, bool wide, int sms, cudaStream_t stream) {
  if (dtype == 0) launch_typed<float>(p, wide, sms, stream);
  else if (dtype == 1) launch_typed<__half>(p, wide, sms, stream);
  else launch_typed<__nv_bfloat16>(p, wide, sms, stream);
}

}  // namespace msc
}  // namespace mlmamba
