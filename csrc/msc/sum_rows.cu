// msc_sum_rows: the msc_scan backward's sum of the per-scan gradients, each read through its
// scan's inverse order (msc.h). A thread's 16-byte piece of an output row: the k pieces are
// loaded first (k loads in flight), then added in scan order in fp32 and rounded once, so the
// result equals gathering each scan's rows back and summing them in that order, times scale
// (fp32, before the rounding). With one scan and scale 1 it is an exact row gather (msc.py
// uses it so for the scans' inputs, and with scale 1 / k for merge mean's dout).
// msc_gather_rows is the same kernel with one scan per blockIdx.y: scan s reads its own index
// row and source (src_s apart) and writes its own column block (out_s apart). A source shared
// by the scans with rows of 1 KB or more goes by source row instead (scatter_rows_kernel): read
// once, written k times (the k reads of each row cost ~40% of the gather, call 4 of session 28).
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
// K: the scans held in registers, nscans <= K; U: pieces a thread loads at once
template <typename T, int V, int K, int U>
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
    // U pieces a thread a round: their U K loads in flight together
    for (int64_t c0 = sub; c0 < per_row; c0 += int64_t{tpr} * U) {
      P in[U][K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + int64_t{u} * tpr;
#pragma unroll
        for (int i = 0; i < K; ++i)
          if (src[i] && c < per_row) in[u][i] = reinterpret_cast<const P*>(src[i])[c];
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + int64_t{u} * tpr;
        if (c >= per_row) break;
        float acc[V];  // -0 is the identity of fp32 addition (+0 would turn a -0 sum into +0)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = -0.f;
#pragma unroll
        for (int i = 0; i < K; ++i)
          if (src[i]) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] += to_float(in[u][i].v[j]);
          }
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(acc[j] * p.scale);
        reinterpret_cast<P*>(out)[c] = o;
      }
    }
  }
}

// inv[s, r] = the largest t with rows[s, t] == r (inv set to -1 before; duplicates only in
// orders not checked under graph capture)
__global__ void invert_kernel(const int* rows, int* inv, int64_t seqlen, int64_t n) {
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < n;
       q += int64_t{gridDim.x} * blockDim.x) {
    const int64_t s = q / seqlen;
    const int r = rows[q];
    if (r >= 0 && r < seqlen) atomicMax(inv + s * seqlen + r, static_cast<int>(q - s * seqlen));
  }
}

// msc_gather_rows with src shared by the scans, by source row: each source row is read once and
// written to its position in every scan (inv); a row t the inverse misses (a position outside
// range(L), or a duplicate) is written from rows[s, t] by the second loop. U pieces a thread a
// round, as sum_rows_kernel.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kThreads) scatter_rows_kernel(const SumRowsParams p, int tpr) {
  using P = Piece<T, V>;
  const int64_t per_row = p.cols / V, rows = p.batch * p.seqlen, L = p.seqlen;
  const int per_block = kThreads / tpr, sub = threadIdx.x % tpr;
  const T* src0 = static_cast<const T*>(p.src[0]);
  auto put = [&](T* out, const P& in, int64_t c) {
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(to_float(in.v[j]) * p.scale);
    reinterpret_cast<P*>(out)[c] = o;
  };
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr;
       row < rows; row += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t r = row % L, bi = row / L;
    const T* src = src0 + bi * p.src_b[0] + r * p.src_l[0];
    T* out = static_cast<T*>(p.out) + bi * p.out_b;
    for (int64_t c0 = sub; c0 < per_row; c0 += int64_t{tpr} * U) {
      P in[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c0 + u * tpr < per_row) in[u] = reinterpret_cast<const P*>(src)[c0 + u * tpr];
      for (int s = 0; s < p.ngather; ++s) {
        const int t = p.inv[s * L + r];
        if (t < 0) continue;
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c0 + u * tpr < per_row) put(out + s * p.out_s + t * p.out_l, in[u], c0 + u * tpr);
      }
    }
  }
  // rows the inverse missed: none for k permutations
  for (int64_t q = blockIdx.x * int64_t{kThreads} + threadIdx.x; q < p.ngather * L;
       q += int64_t{gridDim.x} * kThreads) {
    const int64_t s = q / L, t = q - s * L;
    const int r = p.rows[q];
    const bool ok = r >= 0 && r < L;
    if (ok && p.inv[s * L + r] == t) continue;
    for (int64_t bi = 0; bi < p.batch; ++bi) {
      T* out = static_cast<T*>(p.out) + bi * p.out_b + s * p.out_s + t * p.out_l;
      const T* src = src0 + bi * p.src_b[0] + (ok ? r : 0) * p.src_l[0];
      for (int64_t c = 0; c < per_row; ++c) {
        P in;
        if (ok) in = reinterpret_cast<const P*>(src)[c];
        else
#pragma unroll
          for (int j = 0; j < V; ++j) in.v[j] = from_float<T>(-0.f);
        put(out, in, c);
      }
    }
  }
}

template <typename T, int V>
void launch_k(const SumRowsParams& p, int tpr, int64_t blocks, cudaStream_t stream) {
  const dim3 g(static_cast<unsigned>(blocks), static_cast<unsigned>(p.ngather));
  if (p.nscans == 1) sum_rows_kernel<T, V, 1, 4><<<g, kThreads, 0, stream>>>(p, tpr);
  else if (p.nscans <= 2) sum_rows_kernel<T, V, 2, 1><<<g, kThreads, 0, stream>>>(p, tpr);
  else if (p.nscans <= 4) sum_rows_kernel<T, V, 4, 1><<<g, kThreads, 0, stream>>>(p, tpr);
  else sum_rows_kernel<T, V, kMaxSumScans, 1><<<g, kThreads, 0, stream>>>(p, tpr);
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
  if (p.inv_ws != nullptr) {  // the gather by source row
    const int64_t n = p.ngather * p.seqlen;
    invert_kernel<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4LL * sms)), 256, 0,
                    stream>>>(p.inv, p.inv_ws, p.seqlen, n);
    SumRowsParams q = p;
    q.rows = p.inv;
    q.inv = p.inv_ws;
    const int64_t sblocks = std::min<int64_t>((rows + per_block - 1) / per_block, 32LL * sms);
    if (wide) scatter_rows_kernel<T, V, 4><<<static_cast<unsigned>(sblocks), kThreads, 0, stream>>>(q, tpr);
    else scatter_rows_kernel<T, 1, 4><<<static_cast<unsigned>(sblocks), kThreads, 0, stream>>>(q, tpr);
    return;
  }
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
