// Causal depthwise conv1d: the parameter struct shared by the host glue and the kernels, and
// the small device helpers the kernels share.
//
//   out[b,c,t] = act(bias[c] + sum_{j<w} weight[c,j] * x[b,c,t-(w-1)+j])
//
// Kernels use the reversed taps wr[k] = weight[c, w-1-k], so out[t] = sum_k wr[k] * x[t-k].
// A tap x[t-k] counts only if seq_idx does not change between t-k and t; positions t-k < 0
// read initial_states and carry seq_idx[0] (initial states feed the first segment only).
// All strides are in elements and 64-bit.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <cuda_runtime_api.h>

namespace mlmamba {
namespace conv1d {

constexpr unsigned kFull = 0xffffffffu;  // all lanes of a warp

// Runtime dtype tag for the small side tensors (weight, bias, states): they may differ from x.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct ConvParams {
  int64_t batch, dim, seqlen;
  int width;
  bool silu;

  const void* x;  // x dtype (kernel template T)
  int64_t x_b, x_d, x_l;
  const void* weight;  // (d, w)
  int64_t w_d, w_k;
  int w_dtype;
  const void* bias;  // (d,) or null
  int64_t bias_s;
  int bias_dtype;
  const void* init;  // (b, d, w-1) or null
  int64_t init_b, init_d, init_k;
  int init_dtype;
  const int* seq;  // (b, l) int32 or null
  int64_t seq_b, seq_l;

  void* out;  // fwd: out; bwd: dx (x dtype)
  int64_t out_b, out_d, out_l;
  void* final_states;  // fwd: contiguous (b, d, w-1), x dtype, or null

  // backward only
  const void* dout;  // x dtype, same fast dim as x
  int64_t dout_b, dout_d, dout_l;
  const void* dfinal;  // (b, d, w-1) or null
  int64_t dfinal_b, dfinal_d, dfinal_k;
  int dfinal_dtype;
  void* dinit;  // contiguous (b, d, w-1), init dtype, or null
  float* partial;  // (slots, d, w+1) fp32: per-tile dweight (reversed taps) then dbias
  int64_t nslots_per_batch;  // l-contig: tiles per row; channel-last: slots per row (a chunk's
                             // or a block's, plan_bwd_chlast); channel-last pipe: blocks per
                             // channel group (slots in all)
  int64_t chunk_blocks;  // channel-last v2 backward: 0, one chunk a warp; else the blocks per
                         // batch row, 4 consecutive chunks a block (plan_bwd_chlast)

  int64_t chunk;  // channel-last: rows per warp

  // Rows mode (channel-last: the v2 forward and backward, the streaming forward; no seq_idx,
  // initial or final states): token t reads x row rows[t] (int32, length seqlen; an entry
  // outside [0, seqlen) reads a zero row); out / dx / dout stay in token order. msc_scan's
  // conv along a scan order (csrc/msc/conv_ops.cpp).
  const int* rows;
  // Backward, channel-last v2: dout channels [dsplit[i], dsplit[i + 1]) (dsplit[2] = dim)
  // come from dpiece[i] (strides dpiece_b / dpiece_l, its channel 0 first) when dpiece[0]
  // is set; dout holds channels [0, dsplit[0]). Splits are multiples of 4 (one lane's run).
  const void* dpiece[2];
  int64_t dsplit[2], dpiece_b[2], dpiece_l[2];
  // Rows mode, backward: k scans in one launch where scan_rows > 0. Batch row b of the launch
  // is row b % scan_rows of scan z = b / scan_rows: x's row b % scan_rows, rows + z seqlen,
  // weight / bias + z w_s / bias_ss elements, dout / dpiece[i] + z dout_s / dpiece_s[i]
  // elements; out and the dweight slots in b's order (each scan's contiguous).
  int64_t scan_rows, w_s, bias_ss, dout_s, dpiece_s[2];
};

void fwd_lcontig(const ConvParams& p, int xdtype, cudaStream_t s);
void fwd_chlast(const ConvParams& p, int xdtype, cudaStream_t s);
void bwd_lcontig(const ConvParams& p, int xdtype, cudaStream_t s);
void bwd_chlast(const ConvParams& p, int xdtype, cudaStream_t s);
// The channel-last kernels in rows mode (p.rows set; v2: p.chunk from the pickers below)
void fwd_chlast_rows(const ConvParams& p, int xdtype, cudaStream_t s);
void fwd_chlast_pipe_rows(const ConvParams& p, int xdtype, cudaStream_t s);  // where pipe_ok
void bwd_chlast_rows(const ConvParams& p, int xdtype, cudaStream_t s);
// Whether op takes the streaming kernels for p (MLMAMBA_CONV1D_IMPL; ops.cpp)
bool use_pipe(const char* op, const ConvParams& p, int esize, bool chlast, bool bwd);
// Whether the l-contiguous forward / backward takes a one-shot kernel (MLMAMBA_CONV1D_IMPL;
// ops.cpp)
bool use_oneshot(const char* op, const ConvParams& p, int esize, bool chlast, bool bwd);
// Rows per warp of the channel-last v2 forward / backward (ops.cpp)
int64_t pick_chunk_fwd_chlast(int64_t b, int64_t d, int64_t l);
// The channel-last v2 backward's plan: sets p.chunk, p.chunk_blocks and p.nslots_per_batch;
// returns the dweight workspace slots.
int64_t plan_bwd_chlast(ConvParams& p, int esize);
// Developer A/B switch: MLMAMBA_CONV1D_TUNE=n launches variant n of a kernel where one exists
// (bf16, width 4; scripts/dev/conv1d_dev.py); 20 (any dtype and width): short l-contiguous rows
// one a warp, not several (fwd_lcontig_rows.cu); 46 / 47: the channel-last v2 backward
// one chunk a warp / four a block (plan_bwd_chlast); unset or 0: the default.
inline int tune_variant() {
  const char* e = std::getenv("MLMAMBA_CONV1D_TUNE");
  return e != nullptr ? std::atoi(e) : 0;
}

// Blocks per SM of bwd_chlast_kernel (its launch bounds), by conv width
constexpr int bwd_chlast_blocks_per_sm(int width) { return width <= 4 ? 3 : 2; }
// Streaming fast paths (pipe.cuh): no seq_idx and 16-byte aligned rows (pipe_ok).
void fwd_lcontig_pipe(const ConvParams& p, int xdtype, cudaStream_t s);
void fwd_chlast_pipe(const ConvParams& p, int xdtype, cudaStream_t s);
// The channel-last forward by TMA tiles (sm_90 only; where pipe_ok holds, no rows mode).
void fwd_chlast_tma(const ConvParams& p, int xdtype, cudaStream_t s);
// One-shot l-contiguous kernels (*_lcontig_oneshot*.cu), where oneshot_ok holds (the forward's
// _any: rows off 16-byte boundaries); the backward with
// p.nslots_per_batch = bwd_lcontig_oneshot_tiles(p) (tiles per row).
void fwd_lcontig_oneshot(const ConvParams& p, int xdtype, cudaStream_t s);
void fwd_lcontig_oneshot_any(const ConvParams& p, int xdtype, cudaStream_t s);
// Rows of at most 1024 elements, 512 at fp32 (any: with the elements back to the 16-byte
// boundary below their start), several a warp (fwd_lcontig_rows.cu); false where it does not
// apply (longer rows, MLMAMBA_CONV1D_TUNE=20).
bool fwd_lcontig_rows(const ConvParams& p, int xdtype, bool any, cudaStream_t s);
// The backward's (bwd_lcontig_rows.cu; p.nslots_per_batch 1: one slot a row).
bool bwd_lcontig_rows(const ConvParams& p, int xdtype, bool any, cudaStream_t s);
int64_t bwd_lcontig_oneshot_tiles(const ConvParams& p, int xdtype);
void bwd_lcontig_oneshot(const ConvParams& p, int xdtype, cudaStream_t s);
// l-contiguous backward: p.nslots_per_batch = bwd_lcontig_pipe_tiles(p) (tiles per row).
int64_t bwd_lcontig_pipe_tiles(const ConvParams& p, int xdtype);
void bwd_lcontig_pipe(const ConvParams& p, int xdtype, cudaStream_t s);
// Channel-last backward: p.nslots_per_batch = bwd_chlast_pipe_slots(p) workspace slots in all.
int64_t bwd_chlast_pipe_slots(const ConvParams& p, int xdtype);
void bwd_chlast_pipe(const ConvParams& p, int xdtype, cudaStream_t s);
// Sums the partial workspace in a fixed order into dweight (d, w) and dbias (d,).
// nslots per scan; scans > 1: a k-scan launch's (ConvParams::scan_rows), dweight (k, d, w)
void reduce_dweight(const ConvParams& p, int64_t nslots, void* dweight, void* dbias, cudaStream_t s,
                    int64_t scans = 1);

inline bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

// What every fast path needs: no seq_idx, batch, dim and seqlen < 2^30 (the kernels' 32-bit
// row/batch indices), x and out starting 16-byte aligned.
inline bool fast_path_base_ok(const ConvParams& p) {
  constexpr int64_t kMax = int64_t(1) << 30;
  return p.seq == nullptr && aligned16(p.x) && aligned16(p.out) && p.batch < kMax && p.dim < kMax &&
         p.seqlen < kMax;
}

// True when the streaming kernels apply: fast_path_base_ok, and x, out (and dout) with every
// stride but the unit one a multiple of 16 bytes (channel-last: d % 8 == 0; dout aligned too).
inline bool pipe_ok(const ConvParams& p, int esize, bool chlast, bool bwd) {
  auto st = [esize](int64_t s) { return (s * esize) % 16 == 0; };
  bool ok = fast_path_base_ok(p) && st(p.x_b) && st(p.out_b);
  ok = ok && (chlast ? p.dim % 8 == 0 && st(p.x_l) && st(p.out_l) : st(p.x_d) && st(p.out_d));
  if (bwd) ok = ok && aligned16(p.dout) && st(p.dout_b) && st(chlast ? p.dout_l : p.dout_d);
  return ok;
}

// The one-shot l-contiguous kernels': pipe_ok's, except that rows may start anywhere, as long
// as x's and out's (and the backward's dout's) rows start equally far past a 16-byte boundary.
inline bool oneshot_ok(const ConvParams& p, int esize, bool bwd) {
  const int64_t e = 16 / esize;  // elements per 16 bytes
  bool ok = fast_path_base_ok(p) && (p.x_b - p.out_b) % e == 0 && (p.x_d - p.out_d) % e == 0;
  if (bwd) ok = ok && aligned16(p.dout) && (p.x_b - p.dout_b) % e == 0 && (p.x_d - p.dout_d) % e == 0;
  return ok;
}

// Whether every x row starts on a 16-byte boundary (given that x does: fast_path_base_ok);
// where oneshot_ok holds, the out and dout rows then do too.
inline bool rows_aligned16(const ConvParams& p, int esize) {
  const int64_t e = 16 / esize;  // elements per 16 bytes
  return p.x_b % e == 0 && p.x_d % e == 0;
}

// Tile sizes the host needs to size the workspace.
constexpr int kFwdLVecs = 4;  // 8-element vectors per lane, l-contiguous forward
constexpr int kBwdLVecs = 2;  // same, backward
inline int64_t bwd_lcontig_tiles(int64_t seqlen) {
  const int64_t tile = 32 * 8 * kBwdLVecs;
  return (seqlen + tile - 1) / tile;
}

struct UpdateParams {
  int64_t batch, dim, seqlen;
  int width;
  bool silu;
  const void* x;
  int64_t x_b, x_d, x_l;
  void* state;  // (b, d, w-1), updated in place
  int64_t st_b, st_d, st_k;
  int st_dtype;
  const void* weight;
  int64_t w_d, w_k;
  int w_dtype;
  const void* bias;
  int64_t bias_s;
  int bias_dtype;
  void* out;  // x's shape, contiguous
  int64_t out_b, out_d, out_l;
};
void update(const UpdateParams& p, int xdtype, cudaStream_t s);

}  // namespace conv1d
}  // namespace mlmamba

#ifdef __CUDACC__
#include "common/device_utils.cuh"

namespace mlmamba {
namespace conv1d {

// Element i of a float32/float16/bfloat16 tensor as float. Written without branches around
// the load, so that a kernel's prologue issues all of these loads before waiting on any.
__device__ __forceinline__ float load_any(const void* p, int64_t i, int dt) {
  const uint32_t v = dt == kF32 ? __ldg(static_cast<const unsigned int*>(p) + i)
                                : static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(p) + i));
  if (dt == kF32) return __uint_as_float(v);
  if (dt == kF16) return __half2float(__ushort_as_half(static_cast<unsigned short>(v)));
  return __uint_as_float(v << 16);
}

// N loads p[i0 + n * step] of one dtype, the dtype resolved once (load_any per element
// leaves a branch around each load).
template <int N>
__device__ __forceinline__ void load_any_n(const void* p, int64_t i0, int64_t step, int dt, float (&v)[N]) {
  if (dt == kF32) {
    #pragma unroll
    for (int n = 0; n < N; ++n) v[n] = __ldg(static_cast<const float*>(p) + i0 + n * step);
  } else if (dt == kF16) {
    #pragma unroll
    for (int n = 0; n < N; ++n) v[n] = __half2float(__ldg(static_cast<const __half*>(p) + i0 + n * step));
  } else {
    #pragma unroll
    for (int n = 0; n < N; ++n)
      v[n] = __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(p) + i0 + n * step)) << 16);
  }
}

// The weights of channels c0 .. c0 + C - 1, taps reversed (wr[k][i] multiplies x[t - k]), and
// their bias; zeros for channels i >= n (past d: n = d - c0, or 0 for an idle lane). One branch
// on the weights' dtype around all their loads, then the conversions: with load_any per weight
// the compiler put a branch around each load and its conversion, so the loads waited one after
// another (ncu of the TMA forward, docs/perf-log.md, causal_conv1d v14). woff / boff: element
// offsets of the weight and bias (scan z of a k-scan launch: z w_s, z bias_ss).
template <int W, int C, typename Params>
__device__ __forceinline__ void load_channel_weights(const Params& p, int64_t c0, int64_t n, float (&wr)[W][C],
                                                     float (&bias)[C], int64_t woff = 0, int64_t boff = 0) {
  auto all = [&](auto zero, auto to_float) {
    using V = decltype(zero);
    const V* w = static_cast<const V*>(p.weight) + woff;
    V raw[W][C];
    #pragma unroll
    for (int i = 0; i < C; ++i) {
      #pragma unroll
      for (int k = 0; k < W; ++k) raw[k][i] = i < n ? __ldg(w + (c0 + i) * p.w_d + (W - 1 - k) * p.w_k) : zero;
    }
    #pragma unroll
    for (int i = 0; i < C; ++i) {
      #pragma unroll
      for (int k = 0; k < W; ++k) wr[k][i] = to_float(raw[k][i]);
    }
  };
  if (p.w_dtype == kF32) all(0.f, [](float v) { return v; });
  else if (p.w_dtype == kF16) all(__ushort_as_half(0), [](__half v) { return __half2float(v); });
  else all(static_cast<unsigned short>(0), [](unsigned short v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); });
  #pragma unroll
  for (int i = 0; i < C; ++i)
    bias[i] = i < n && p.bias != nullptr ? load_any(p.bias, boff + (c0 + i) * p.bias_s, p.bias_dtype) : 0.f;
}

__device__ __forceinline__ void store_any(void* p, int64_t i, int dt, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

// Native element <-> float, keyed on the raw CUDA type; RawOf maps the c10 type to it.
template <typename T> struct RawOf { using type = T; };
template <> struct RawOf<at::Half> { using type = __half; };
template <> struct RawOf<at::BFloat16> { using type = __nv_bfloat16; };

template <typename R> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float tof(float v) { return v; }
  static __device__ __forceinline__ float fromf(float v) { return v; }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float tof(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half fromf(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 fromf(float v) { return __float2bfloat16_rn(v); }
};

// N consecutive elements (unit stride) as whole 16-byte (or 8-byte) words.
template <int N, typename R>
struct Words {
  static constexpr int kBytes = N * static_cast<int>(sizeof(R));
  static_assert(kBytes % 8 == 0, "a run must fill whole 8-byte words");
  using W = typename std::conditional<kBytes % 16 == 0, uint4, uint2>::type;
  static constexpr int kCount = kBytes / static_cast<int>(sizeof(W));
};

// True when p may be read as Words<N, R> (every run at p + k * step too, step in elements).
template <int N, typename R>
__device__ __forceinline__ bool vec_ok(const R* p, int64_t step = 0) {
  using W = typename Words<N, R>::W;
  return (reinterpret_cast<uintptr_t>(p) % sizeof(W)) == 0 &&
         (step * static_cast<int64_t>(sizeof(R))) % static_cast<int64_t>(sizeof(W)) == 0;
}

// N packed elements -> floats. bf16 by integer ops on 32-bit pairs: the high element is the
// word masked (one LOP3, where the generic path spends a PRMT and a shift); exact either way.
// Used where the words come from shared memory (smem_run_to_float); RawRun / load_vec keep the
// per-element conversion: with this one the v2 channel-last backward (bwd_chlast.cuh) ran 20%
// slower on an H200 for no difference visible in its SASS (docs/perf-log.md, session 17).
template <int N, typename R>
__device__ __forceinline__ void packed_to_float(const void* w, float (&v)[N]) {
  if constexpr (std::is_same_v<R, __nv_bfloat16>) {
    static_assert(N % 2 == 0, "bf16 pairs");
    const uint32_t* u = static_cast<const uint32_t*>(w);
    #pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      v[2 * i] = __uint_as_float(u[i] << 16);
      v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  } else {
    const R* e = static_cast<const R*>(w);
    #pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Elem<R>::tof(e[i]);
  }
}

// N elements held as raw words: load now, convert later (a prefetch that costs N*size bytes of
// registers, not N floats).
template <int N, typename R>
struct RawRun {
  typename Words<N, R>::W w[Words<N, R>::kCount];
  __device__ __forceinline__ void load(const R* p) {
    #pragma unroll
    for (int i = 0; i < Words<N, R>::kCount; ++i)
      w[i] = reinterpret_cast<const typename Words<N, R>::W*>(p)[i];
  }
  __device__ __forceinline__ void to_float(float (&v)[N]) const {
    const R* e = reinterpret_cast<const R*>(w);
    #pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Elem<R>::tof(e[i]);
  }
};

// Fast path: N elements with whole-word loads; the caller checked vec_ok and the range. Call it
// for all runs of a step before using any value, so the loads are all in flight together.
template <int N, typename R>
__device__ __forceinline__ void load_vec(const R* p, float (&v)[N]) {
  using Wd = Words<N, R>;
  typename Wd::W w[Wd::kCount];
  #pragma unroll
  for (int i = 0; i < Wd::kCount; ++i) w[i] = reinterpret_cast<const typename Wd::W*>(p)[i];
  const R* e = reinterpret_cast<const R*>(w);
  #pragma unroll
  for (int i = 0; i < N; ++i) v[i] = Elem<R>::tof(e[i]);
}

// Slow path: element loads, n of them valid (the rest read as 0).
template <int N, typename R>
__device__ __forceinline__ void load_checked(const R* p, int64_t n, float (&v)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) v[i] = i < n ? Elem<R>::tof(p[i]) : 0.f;
}

// N floats converted to R and packed into whole words (store_vec; pipe.cuh's store_run)
template <int N, typename R>
__device__ __forceinline__ void to_words(const float (&v)[N],
                                         typename Words<N, R>::W (&w)[Words<N, R>::kCount]) {
  R* e = reinterpret_cast<R*>(w);
  #pragma unroll
  for (int i = 0; i < N; ++i) e[i] = Elem<R>::fromf(v[i]);
}

template <int N, typename R>
__device__ __forceinline__ void store_vec(R* p, const float (&v)[N]) {
  using Wd = Words<N, R>;
  typename Wd::W w[Wd::kCount];
  to_words<N, R>(v, w);
  #pragma unroll
  for (int i = 0; i < Wd::kCount; ++i) reinterpret_cast<typename Wd::W*>(p)[i] = w[i];
}

template <int N, typename R>
__device__ __forceinline__ void store_checked(R* p, int64_t n, const float (&v)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) p[i] = Elem<R>::fromf(v[i]);
}

// 8 consecutive int32 seq_idx values, n valid (the rest repeat `fill`).
__device__ __forceinline__ void load_seq8(const int* p, int64_t n, int fill, int (&v)[8]) {
  if (n >= 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
    const int4 a = reinterpret_cast<const int4*>(p)[0];
    const int4 b = reinterpret_cast<const int4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    #pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < n ? p[i] : fill;
  }
}

// x row of token q (rows mode: rows[q], an entry outside [0, seqlen) gives row 0 and *zero)
template <bool kRows, typename R>
__device__ __forceinline__ const R* x_row(const R* xb, const ConvParams& p, int64_t q,
                                          bool& zero, int64_t roff = 0) {
  if constexpr (!kRows) {
    zero = false;
    return xb + q * p.x_l;
  } else {
    const int r = __ldg(p.rows + roff + q);
    zero = r < 0 || r >= p.seqlen;
    return xb + (zero ? 0 : static_cast<int64_t>(r)) * p.x_l;
  }
}

template <int N>
__device__ __forceinline__ void zero_if(bool zero, float (&v)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) v[i] = zero ? 0.f : v[i];
}

// sigmoid through the hardware exp2 and reciprocal (a few ulp; no IEEE-division slow path):
// these kernels are memory-bound only while the arithmetic per element stays this short.
__device__ __forceinline__ float fast_sigmoid(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + exp2_approx(x * -kLog2e)));
  return r;
}
__device__ __forceinline__ float act_fwd(float pre, bool silu) {
  return silu ? pre * fast_sigmoid(pre) : pre;
}
// dv * d act / d pre: with s = sigmoid(pre), dv s (1 + pre (1 - s)) = a + a t, a = dv s,
// t = pre - s pre (3 instructions after s; d act / d pre first, then dv times it, took 4). The
// sigmoid is computed on both paths and the result selected (volatile asm cannot be moved under
// a branch): left to itself the compiler put each element's forward recompute and its two MUFU
// ops behind a branch on `silu` in the backward kernels (SASS), one basic block per element, so
// the elements' latency chains ran one after another.
__device__ __forceinline__ float act_bwd(float dv, float pre, bool silu) {
  float e, s;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(pre * -1.4426950408889634f));
  asm volatile("rcp.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(1.f + e));
  const float a = dv * s;
  return silu ? fmaf(a, fmaf(-s, pre, pre), a) : dv;
}

// A lane's 8 outputs of the l-contiguous kernels, reversed taps wr (out[t] = sum_k wr[k] x[t-k]):
// forward, act(bias + sum_k wr[k] x[i-k]) from its 8 inputs x and the w-1 before them h;
template <int W>
__device__ __forceinline__ void conv8_fwd(const float (&wr)[W], float bias, const float (&x)[8],
                                          const float (&h)[W - 1], bool silu, float (&o)[8]) {
  constexpr int H = W - 1;
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    float acc = bias;
    #pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(wr[k], i - k >= 0 ? x[i - k] : h[H + i - k], acc);
    o[i] = act_fwd(acc, silu);
  }
}
// backward, dx[i] = sum_k wr[k] g[i+k] from its 8 g and the w-1 after them ah.
template <int W>
__device__ __forceinline__ void conv8_bwd(const float (&wr)[W], const float (&g)[8],
                                          const float (&ah)[W - 1], float (&o)[8]) {
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    float acc = 0.f;
    #pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(wr[k], i + k < 8 ? g[i + k] : ah[i + k - 8], acc);
    o[i] = acc;
  }
}
// backward, g = dout * act'(pre) on a lane's 8 positions (g holds dout on entry; x their
// inputs, h the w-1 before them), and their dweight / dbias shares added in position order.
template <int W>
__device__ __forceinline__ void grad8(const float (&wr)[W], float bias, const float (&x)[8],
                                      const float (&h)[W - 1], bool silu, float (&g)[8], float (&dw)[W],
                                      float& db) {
  constexpr int H = W - 1;
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    float xm[W];
    float acc = bias;
    #pragma unroll
    for (int k = 0; k < W; ++k) {
      xm[k] = i - k >= 0 ? x[i - k] : h[H + i - k];
      acc = fmaf(wr[k], xm[k], acc);
    }
    const float gi = act_bwd(g[i], acc, silu);
    g[i] = gi;
    db += gi;
    #pragma unroll
    for (int k = 0; k < W; ++k) dw[k] = fmaf(gi, xm[k], dw[k]);
  }
}
// Sums dw / db over groups of N lanes (xor offsets N/2 .. 1: a fixed order, deterministic);
// every lane of a group ends with its group's sums. Every lane must take part.
template <int N, int W>
__device__ __forceinline__ void lane_sums(float (&dw)[W], float& db) {
  #pragma unroll
  for (int off = N / 2; off > 0; off >>= 1) {
    #pragma unroll
    for (int k = 0; k < W; ++k) dw[k] += __shfl_xor_sync(kFull, dw[k], off);
    db += __shfl_xor_sync(kFull, db, off);
  }
}
// Adds dfinal_states to a lane's 8 dx at positions s0.. of row (b, c) that are among the row's
// last w-1 (L: seqlen; index types as the caller's).
template <int H, typename B, typename I>
__device__ __forceinline__ void add_dfinal(const ConvParams& p, B b, B c, I s0, I L, float (&o)[8]) {
  const I fin0 = L - H;  // first position that final_states covers
  if (p.dfinal == nullptr || s0 + 8 <= fin0) return;
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    const I t = s0 + i;
    if (t >= fin0 && t < L)
      o[i] += load_any(p.dfinal, b * p.dfinal_b + c * p.dfinal_d + (t - fin0) * p.dfinal_k, p.dfinal_dtype);
  }
}

}  // namespace conv1d
}  // namespace mlmamba
#endif
