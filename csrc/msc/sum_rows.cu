// msc_sum_rows: the msc_scan backward's sum of the per-scan gradients, each read through its
// scan's inverse order (msc.h). A thread's 16-byte piece of an output row: the k pieces are
// loaded first (k loads in flight), then added in scan order in fp32 and rounded once, so the
// result equals gathering each scan's rows back and summing them in that order, times scale
// (fp32, before the rounding). With one scan and scale 1 it is an exact row gather (msc.py
// uses it so for the scans' inputs, and with scale 1 / k for merge mean's dout).
// msc_gather_rows is the same kernel with one scan per blockIdx.y: scan s reads its own index
// row and source (src_s apart) and writes its own column block (out_s apart).
#include <algorithm>

#include "common/device_utils.cuh"
#include "msc/msc.h"

namespace mlmamba {
namespace msc {
namespace {

constexpr int kThreads = 256;

// V elements of T: 16 bytes (V = 16 / sizeof(T)) or one element (V = 1)
template <typename T, int V>
struct alignas(V * sizeof(T)) Piece {
  T v[V];
};

// tpr threads (a power of two up to 32) per output row, rows over the grid; the row's scan
// positions are read once, then each thread walks the row's pieces tpr apart
// K: the scans held in registers, nscans <= K
template <typename T, int V, int K>
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(const SumRowsParams p, int tpr) {
  using P = Piece<T, V>;
  const int64_t per_row = p.cols / V, rows = p.batch * p.seqlen;
  const int per_block = kThreads / tpr, sub = threadIdx.x % tpr;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr;
       row < rows; row += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t r = row % p.seqlen, bi = row / p.seqlen, s = blockIdx.y;
    const int* inv = p.inv + s * p.seqlen;
    // nullptr adds nothing: past nscans, or a position outside range(L) (orders not checked
    // under graph capture may hold one)
    const T* src[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int pos = i < p.nscans ? inv[i * p.seqlen + r] : -1;
      src[i] = pos < 0 || pos >= p.seqlen ? nullptr
               : static_cast<const T*>(p.src[i]) + s * p.src_s + bi * p.src_b[i] + pos * p.src_l[i];
    }
    T* out = static_cast<T*>(p.out) + s * p.out_s + bi * p.out_b + r * p.out_l;
    for (int64_t c = sub; c < per_row; c += tpr) {
      P in[K];
#pragma unroll
      for (int i = 0; i < K; ++i)
        if (src[i]) in[i] = reinterpret_cast<const P*>(src[i])[c];
      float acc[V];  // -0 is the identity of fp32 addition (+0 would turn a -0 sum into +0)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = -0.f;
#pragma unroll
      for (int i = 0; i < K; ++i)
        if (src[i]) {
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += to_float(in[i].v[j]);
        }
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(acc[j] * p.scale);
      reinterpret_cast<P*>(out)[c] = o;
    }
  }
}

template <typename T, int V>
void launch_k(const SumRowsParams& p, int tpr, int64_t blocks, cudaStream_t stream) {
  const dim3 g(static_cast<unsigned>(blocks), static_cast<unsigned>(p.ngather));
  if (p.nscans <= 2) sum_rows_kernel<T, V, 2><<<g, kThreads, 0, stream>>>(p, tpr);
  else if (p.nscans <= 4) sum_rows_kernel<T, V, 4><<<g, kThreads, 0, stream>>>(p, tpr);
  else sum_rows_kernel<T, V, kMaxSumScans><<<g, kThreads, 0, stream>>>(p, tpr);
}

template <typename T>
void launch_typed(const SumRowsParams& p, bool wide, int sms, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t per_row = wide ? p.cols / V : p.cols;
  int tpr = 1;
  while (tpr < 32 && tpr < per_row) tpr *= 2;
  const int64_t rows = p.batch * p.seqlen, per_block = kThreads / tpr;
  const int64_t blocks = std::min<int64_t>((rows + per_block - 1) / per_block,
                                          std::max<int64_t>(32LL * sms / p.ngather, 1));
  if (blocks == 0) return;
  if (wide) launch_k<T, V>(p, tpr, blocks, stream);
  else launch_k<T, 1>(p, tpr, blocks, stream);
}

}  // namespace

void launch_sum_rows(const SumRowsParams& p, int dtype, bool wide, int sms, cudaStream_t stream) {
  if (dtype == 0) launch_typed<float>(p, wide, sms, stream);
  else if (dtype == 1) launch_typed<__half>(p, wide, sms, stream);
  else launch_typed<__nv_bfloat16>(p, wide, sms, stream);
}

}  // namespace msc
}  // namespace mlmamba
