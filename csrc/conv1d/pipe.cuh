// Helpers of the streaming ("pipe") conv1d kernels: a per-lane queue of cp.async copies into
// shared memory. A lane copies the words it will itself consume, S-1 stages ahead, so the bytes
// in flight are bounded by shared memory, not by registers (Little's law at ~3 TB/s wants
// ~25 KB in flight per SM). Each lane reads back only its own words: cp.async.wait_group is
// the only synchronisation the queue needs.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "common/check.h"
#include "common/cp_async.cuh"
#include "conv1d/conv1d.h"

namespace mlmamba {
namespace conv1d {

// Copies n (<= N) valid elements of a run of N at src into dst as N*sizeof(R)/16 16-byte words
// (or one 8-byte word when N*sizeof(R) == 8); the rest is zero-filled. src (when n > 0) and dst
// must be aligned to the word size; with n <= 0 src is not read (it only has to be a pointer).
template <int N, typename R>
__device__ __forceinline__ void cp_async_run(void* dst, const R* src, int64_t n) {
  constexpr int kBytes = N * static_cast<int>(sizeof(R));
  constexpr int kWord = kBytes >= 16 ? 16 : 8;
  constexpr int E = kWord / static_cast<int>(sizeof(R));  // elements per word
  #pragma unroll
  for (int i = 0; i < kBytes / kWord; ++i) {
    const int64_t m = n - i * E;
    const int bytes = m >= E ? kWord : (m > 0 ? static_cast<int>(m) * static_cast<int>(sizeof(R)) : 0);
    const R* s = bytes > 0 ? src + i * E : src;
    char* d = static_cast<char*>(dst) + i * kWord;
    if (kWord == 16) cp_async16(d, s, bytes);
    else cp_async8(d, s, bytes);
  }
}

// The same for a run known to be whole and in range (no zero-fill arithmetic).
template <int N, typename R>
__device__ __forceinline__ void cp_async_whole(void* dst, const R* src) {
  constexpr int kBytes = N * static_cast<int>(sizeof(R));
  constexpr int kWord = kBytes >= 16 ? 16 : 8;
  constexpr int E = kWord / static_cast<int>(sizeof(R));
  #pragma unroll
  for (int i = 0; i < kBytes / kWord; ++i) {
    char* d = static_cast<char*>(dst) + i * kWord;
    if (kWord == 16) cp_async16(d, src + i * E, 16);
    else cp_async8(d, src + i * E, 8);
  }
}

// x's row q (C elements of this lane's channels from xb) into dst by cp.async; in rows mode
// through p.rows (x_row), a row out of range zero-filled.
template <bool kRows, int C, typename R>
__device__ __forceinline__ void cp_async_x_row(void* dst, const R* xb, const ConvParams& p, int64_t q,
                                               int64_t roff = 0) {
  bool zero;
  const R* src = x_row<kRows>(xb, p, q, zero, roff);
  if (kRows) cp_async_run<C, R>(dst, src, zero ? 0 : C);
  else cp_async_whole<C, R>(dst, src);
}

// N elements from shared memory (written by cp_async_run) as floats.
template <int N, typename R>
__device__ __forceinline__ void smem_run_to_float(const void* src, float (&v)[N]) {
  typename Words<N, R>::W w[Words<N, R>::kCount];
  #pragma unroll
  for (int i = 0; i < Words<N, R>::kCount; ++i) w[i] = static_cast<const typename Words<N, R>::W*>(src)[i];
  packed_to_float<N, R>(w, v);
}

// N floats -> global memory as whole words (N*sizeof(R) a multiple of 8 bytes; p aligned to
// 16, or 8 for an 8-byte run). Vector stores written out: with plain word stores the compiler
// split them into 4-byte stores here.
__device__ __forceinline__ void st_words(uint4* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void st_words(uint2* p, uint2 v) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(p), "r"(v.x), "r"(v.y));
}
template <int N, typename R>
__device__ __forceinline__ void store_run(R* p, const float (&v)[N]) {
  using Wd = Words<N, R>;
  typename Wd::W w[Wd::kCount];
  to_words<N, R>(v, w);
  #pragma unroll
  for (int i = 0; i < Wd::kCount; ++i) st_words(reinterpret_cast<typename Wd::W*>(p) + i, w[i]);
}

// store_run as predicated stores (no branch around them: the caller's basic block stays whole,
// so the compiler can interleave the rows of a step)
__device__ __forceinline__ void st_words_if(uint4* p, uint4 v, bool ok) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q st.global.v4.b32 [%0], {%1, %2, %3, %4};\n}\n"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(static_cast<int>(ok)));
}
__device__ __forceinline__ void st_words_if(uint2* p, uint2 v, bool ok) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q st.global.v2.b32 [%0], {%1, %2};\n}\n"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(static_cast<int>(ok)));
}
template <int N, typename R>
__device__ __forceinline__ void store_run_if(R* p, const float (&v)[N], bool ok) {
  using Wd = Words<N, R>;
  typename Wd::W w[Wd::kCount];
  to_words<N, R>(v, w);
  #pragma unroll
  for (int i = 0; i < Wd::kCount; ++i) st_words_if(reinterpret_cast<typename Wd::W*>(p) + i, w[i], ok);
}

// l-contiguous streaming: a warp walks a contiguous range of tiles gt = (b * D + c) * nseg + seg
// (warp_range), kept as (seg, c, b) so that a step needs no division.
struct TileIter {
  int64_t gt;
  int seg, c, b;  // each < 2^30 (the launch checks it)
  __device__ __forceinline__ void begin(int64_t g, int64_t nseg, int64_t D) {
    gt = g;
    const int64_t row = g / nseg;
    seg = static_cast<int>(g - row * nseg);
    b = static_cast<int>(row / D);
    c = static_cast<int>(row - b * D);
  }
  __device__ __forceinline__ void next(int nseg, int D) {
    ++gt;
    if (++seg == nseg) {
      seg = 0;
      if (++c == D) { c = 0; ++b; }
    }
  }
};

// Warp w's share [g0, g1) of n items split evenly over nw warps.
__device__ __forceinline__ void warp_range(int64_t n, int64_t nw, int64_t w, int64_t& g0, int64_t& g1) {
  const int64_t per = n / nw, extra = n % nw;
  g0 = w * per + (w < extra ? w : extra);
  g1 = g0 + per + (w < extra ? 1 : 0);
}

// Channel-last streaming: the rows of one channel group, flattened over (batch, l), split into
// equal ranges, one per warp; a range is walked as segments (one per batch row it touches),
// each in stages of RW rows from t0 - lead to t1 + tail. Producer and consumer each step their
// own copy of this iterator through the same sequence.
template <int RW>
struct SegIter {
  int64_t r, r1, L;  // flattened row of the current segment's start, range end, seqlen
  int b, t0, t1, ts; // segment: batch, [t0, t1), first row of the current stage (the launchers
                     // check batch and seqlen < 2^31 - 64)
  int lead, tail;
  __device__ __forceinline__ void begin(int64_t r0, int64_t r_end, int64_t seqlen, int lead_, int tail_) {
    r = r0; r1 = r_end; L = seqlen; lead = lead_; tail = tail_;
    set_segment();
  }
  __device__ __forceinline__ void set_segment() {
    const int64_t bb = r / L;
    b = static_cast<int>(bb);
    t0 = static_cast<int>(r - bb * L);
    t1 = static_cast<int>(t0 + (r1 - r) < L ? t0 + (r1 - r) : L);
    ts = t0 - lead;
  }
  __device__ __forceinline__ bool done() const { return r >= r1; }
  __device__ __forceinline__ void next() {
    ts += RW;
    if (ts >= t1 + tail) {
      r += t1 - t0;
      if (r < r1) set_segment();
    }
  }
};

// Blocks per SM of a kernel (call once per instantiation: keep it in a static).
template <typename K>
int occupancy(K kernel, int threads, int smem = 0) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n > 0 ? n : 1;
}

// f() for the current device, computed once per device and kept in the caller's static cache
// (one per kernel instantiation; devices past 63 compute it each time).
template <typename F>
int once_per_device(int (&cache)[64], F f) {
  const int dev = c10::cuda::current_device();
  if (dev >= 64) return f();
  if (cache[dev] == 0) cache[dev] = f() + 1;  // 0: not yet
  return cache[dev] - 1;
}

// A staggered start for one-shot grids of several waves. The first wave's blocks all issue
// their loads at t = 0, then all compute and store, and the grid keeps that lockstep (a burst
// of loads, then one of compute and stores) for waves after. Blocks of the first wave that
// start up to (classes - 1) x ns late, a class per block by a hash of its index, break it;
// the blocks already running keep the DRAM busy meanwhile. On an H200 (bf16 w 4, d 5376) the
// forward's cost per launch beyond its streaming rate went from ~6 to ~5 µs: b4 L2048 48.0 ->
// 47.1 µs (docs/perf-log.md, causal_conv1d v17).
struct Stagger {
  uint32_t first = 0;    // blocks below this index may wait (0: none)
  uint32_t classes = 1;  // block x waits class(x) * ns, class(x) in [0, classes)
  uint32_t ns = 0;
};

__device__ __forceinline__ void stagger_start(const Stagger& st) {
  if (blockIdx.x < st.first) {
    const uint32_t c = ((blockIdx.x * 2654435761u) >> 16) % st.classes;
    if (c != 0) __nanosleep(c * st.ns);
  }
}

// The stagger of a grid of `blocks` blocks, per_sm resident per SM: 16 classes 250 ns apart
// (the best of 2-16 classes over 0.6-3.75 µs in v17's sweep) where the grid holds at least two
// waves, else none. MLMAMBA_CONV1D_STAGGER="classes,ns" overrides them (tuning; "1,0": off).
inline Stagger stagger_plan(int per_sm, int64_t blocks) {
  Stagger st;
  st.classes = 16;
  st.ns = 250;
  if (const char* e = std::getenv("MLMAMBA_CONV1D_STAGGER"); e != nullptr && *e != 0) {
    unsigned c = 1, ns = 0;
    MLM_CHECK(std::sscanf(e, "%u,%u", &c, &ns) == 2 && c >= 1 && c <= 64 && ns <= 100000,
              "environment variable MLMAMBA_CONV1D_STAGGER must be \"classes,ns\" (1-64, 0-100000), got '", e, "'");
    st.classes = c;
    st.ns = ns;
  }
  const int64_t wave = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (st.classes > 1 && st.ns > 0 && blocks >= 2 * wave) st.first = static_cast<uint32_t>(wave);
  return st;
}

// The dynamic shared memory (unused) that leaves a kernel at most n blocks per SM (0: none).
// The kernel's limit on dynamic shared memory only ever grows: a pad looked up before (a
// cached default) must stay launchable after a smaller one (MLMAMBA_CONV1D_BLOCKS).
template <typename K>
int occupancy_pad(K kernel, int n) {
  if (n <= 0) return 0;
  cudaFuncAttributes a;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int per = static_cast<int>(prop->sharedMemPerMultiprocessor / n) / 256 * 256;
  const int pad = std::max(0, per - static_cast<int>(a.sharedSizeBytes) - static_cast<int>(prop->reservedSharedMemPerBlock));
  if (pad > a.maxDynamicSharedSizeBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, pad));
  return pad;
}

// Developer switch (tuning): MLMAMBA_CONV1D_BLOCKS=n caps a one-shot kernel at n blocks per SM
// (occupancy_pad); unset: -1, the kernel's own choice.
inline int blocks_knob() {
  const char* e = std::getenv("MLMAMBA_CONV1D_BLOCKS");
  return e != nullptr && *e != 0 ? std::atoi(e) : -1;
}

// The grid of a persistent launch: `waves` times every SM full once (the forward kernels and
// the l-contiguous backward measured fastest at 2 on an H200: docs/perf-log.md, causal_conv1d).
// MLMAMBA_CONV1D_WAVES overrides it (tuning).
inline int64_t persistent_grid(int per_sm, double waves) {
  const char* e = std::getenv("MLMAMBA_CONV1D_WAVES");
  if (e != nullptr && std::atof(e) > 0) waves = std::atof(e);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t g = static_cast<int64_t>(waves * per_sm * sms);
  return g > 0 ? g : 1;
}

// The l-contiguous pipe kernels' tiles: (batch, channel, segment of 256 K tokens).
inline int64_t lcontig_segments(const ConvParams& p, int K) {
  return (p.seqlen + 256 * K - 1) / (256 * K);
}

// Their launch: 128 threads, at most 4 tiles per block, a persistent grid of 2 waves.
// occ: the kernel's blocks per SM (occupancy(), kept in a static by the caller).
template <typename Kern>
void launch_lcontig_tiles(Kern kernel, int occ, const ConvParams& p, int64_t ntiles,
                          cudaStream_t s) {
  const int64_t grid = std::min((ntiles + 3) / 4, persistent_grid(occ, 2.0));
  kernel<<<static_cast<unsigned>(grid), 128, 0, s>>>(p, ntiles);
  MLM_CHECK_LAUNCH();
}

// Channel-last: blocks per channel group (ncg groups of rows rows each). Fills the GPU `waves`
// times, but gives each warp >= 16 rows.
inline int64_t chlast_pipe_bpc(int occ, int64_t rows, int64_t ncg, double waves) {
  return std::max<int64_t>(1, std::min(persistent_grid(occ, waves) / ncg, (rows + 63) / 64));
}

}  // namespace conv1d
}  // namespace mlmamba
