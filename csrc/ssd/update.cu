// SSD decode step: s = exp(dt A) s + dt x B^T, y = s C + D x, y *= silu(z); state in place.
// Memory-bound on the state. A row (b, h, p) of N elements is streamed by LPR lanes, 16 elements
// a lane in 16-byte vectors; vector v of lane `sub` is chunk v * LPR + sub of the row, so at
// every step the lanes of a row read (and write) whole 128-byte lines. Every load of a thread
// is issued before its first FMA: the state streams (evict-first), the small inputs (x, dt, B,
// C, D, z) come through the cache. The lanes of a row reduce y with shuffles.
#include "common/device_utils.cuh"
#include "ssd/common.cuh"
#include "ssd/fwd.h"

namespace mlmamba {
namespace ssd {

namespace {

__device__ __forceinline__ void store_as(void* p, int64_t i, float v, DType t) {
  switch (t) {
    case DType::f16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

template <typename ST> struct Vec;
template <> struct Vec<float> {
  static constexpr int n = 4;
  __device__ static void to_float(const uint4& u, float* f) {
    const float* s = reinterpret_cast<const float*>(&u);
    for (int i = 0; i < 4; ++i) f[i] = s[i];
  }
  __device__ static uint4 from_float(const float* f) {
    uint4 u;
    float* d = reinterpret_cast<float*>(&u);
    for (int i = 0; i < 4; ++i) d[i] = f[i];
    return u;
  }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ static void to_float(const uint4& u, float* f) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(&u);
    for (int i = 0; i < 4; ++i) {
      const float2 v = unpack_bf16(s[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
  __device__ static uint4 from_float(const float* f) {
    uint4 u;
    uint32_t* d = reinterpret_cast<uint32_t*>(&u);
    for (int i = 0; i < 4; ++i) d[i] = pack_bf16(f[2 * i], f[2 * i + 1]);
    return u;
  }
};

template <typename T> __device__ __forceinline__ float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
template <> __device__ __forceinline__ float ld<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}

// W 32-bit words through the read-only cache; ptr aligned to 16 bytes when W % 4 == 0, else 8.
template <int W> struct Words { uint32_t w[W]; };
template <int W> __device__ __forceinline__ Words<W> ldg_words(const void* ptr) {
  Words<W> r;
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int q = 0; q < W / 4; ++q)
      reinterpret_cast<uint4*>(r.w)[q] = __ldg(static_cast<const uint4*>(ptr) + q);
  } else {
#pragma unroll
    for (int q = 0; q < W / 2; ++q)
      reinterpret_cast<uint2*>(r.w)[q] = __ldg(static_cast<const uint2*>(ptr) + q);
  }
  return r;
}

constexpr int kThreads = 128;

// Lanes per row: 16 state elements a lane (64 bytes fp32, 32 bytes bf16).
template <typename ST, int N> struct Shape {
  static constexpr int VEC = Vec<ST>::n, NV = N / VEC, VMAX = 16 / VEC;
  static constexpr int VPL = NV >= VMAX ? VMAX : NV, LPR = NV / VPL;
  static constexpr int ROWS = kThreads / LPR;  // rows of a block
  static_assert(LPR >= 1 && LPR <= 32 && NV % VPL == 0, "unsupported d_state");
};

// One thread: VPL vectors of one row. BT: dtype of B and C.
template <typename ST, int N, typename BT>
__device__ __forceinline__ void update_row(const UpdateParams& p) {
  using S = Shape<ST, N>;
  constexpr int VEC = S::VEC, VPL = S::VPL, LPR = S::LPR;
  constexpr int WV = VEC * static_cast<int>(sizeof(BT)) / 4;  // 32-bit words of B per vector
  const int sub = threadIdx.x % LPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * S::ROWS + threadIdx.x / LPR;
  const bool ok = r < p.batch * p.nheads * p.headdim;
  const int64_t row = ok ? r : 0;
  const int64_t pp = row % p.headdim, hh = (row / p.headdim) % p.nheads;
  const int64_t bi = row / (p.headdim * p.nheads);
  uint4* srow = reinterpret_cast<uint4*>(static_cast<ST*>(p.state) + bi * p.s_b + hh * p.s_h +
                                         pp * p.s_p);
  const int64_t g = hh / p.heads_per_group;
  const BT* bp = static_cast<const BT*>(p.B) + bi * p.B_b + g * p.B_g;
  const BT* cp = static_cast<const BT*>(p.C) + bi * p.C_b + g * p.C_g;

  uint4 raw[VPL];
  Words<WV> wb[VPL], wc[VPL];  // B and C of each vector, 16-bit ones kept packed
#pragma unroll
  for (int v = 0; v < VPL; ++v)
    raw[v] = ok ? __ldcs(srow + v * LPR + sub) : make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int64_t n = static_cast<int64_t>(v * LPR + sub) * VEC;
    if (p.bc_vec) {  // contiguous rows, 16-byte aligned: n * sizeof(BT) is a multiple of 4 * WV
      wb[v] = ldg_words<WV>(bp + n);
      wc[v] = ldg_words<WV>(cp + n);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        reinterpret_cast<BT*>(wb[v].w)[e] = bp[(n + e) * p.B_n];
        reinterpret_cast<BT*>(wc[v].w)[e] = cp[(n + e) * p.C_n];
      }
    }
  }
  float dt = load_as_float(p.dt, bi * p.dt_b + hh * p.dt_h, static_cast<DType>(p.dt_dtype));
  if (p.dt_bias) dt += p.dt_bias[hh];
  const float a = p.A[hh];
  const float x = load_as_float(p.x, bi * p.x_b + hh * p.x_h + pp * p.x_p,
                                static_cast<DType>(p.x_dtype));
  const float d = p.D ? p.D[hh * p.D_h + pp * p.D_p] : 0.f;
  const float z = p.z ? load_as_float(p.z, bi * p.z_b + hh * p.z_h + pp * p.z_p,
                                      static_cast<DType>(p.z_dtype))
                      : 0.f;

  if (p.dt_softplus) dt = dt <= 20.f ? log1pf(expf(dt)) : dt;
  const float dA = expf(dt * a), dtx = dt * x, gate = p.z ? silu(z) : 1.f;
  float y = 0.f;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    float s[VEC];
    Vec<ST>::to_float(raw[v], s);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      s[e] = dA * s[e] + dtx * ld<BT>(wb[v].w, e);
      y += s[e] * ld<BT>(wc[v].w, e);
    }
    if (ok) __stcs(srow + v * LPR + sub, Vec<ST>::from_float(s));
  }
#pragma unroll
  for (int off = LPR / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
  // out is (b, h, p) contiguous
  if (ok && sub == 0) store_as(p.out, row, fmaf(d, x, y) * gate, static_cast<DType>(p.x_dtype));
}

// MINB blocks an SM cap the registers: 8 (64 registers) holds 16 state elements and 16-bit
// B, C; fp32 B, C take 6 (80 registers).
template <typename ST, int N, typename BT, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) ssd_update_kernel(const UpdateParams p) {
  update_row<ST, N, BT>(p);
}

template <typename ST, int N, typename BT>
void launch_bt(const UpdateParams& p, cudaStream_t stream) {
  const int64_t nrows = p.batch * p.nheads * p.headdim;
  const int64_t blocks = (nrows + Shape<ST, N>::ROWS - 1) / Shape<ST, N>::ROWS;
  ssd_update_kernel<ST, N, BT, sizeof(BT) == 4 ? 6 : 8>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
}

template <typename ST, int N>
void launch_typed(const UpdateParams& p, cudaStream_t stream) {
  switch (static_cast<DType>(p.bc_dtype)) {
    case DType::bf16: launch_bt<ST, N, __nv_bfloat16>(p, stream); break;
    case DType::f16: launch_bt<ST, N, __half>(p, stream); break;
    default: launch_bt<ST, N, float>(p, stream);
  }
}

template <typename ST>
bool launch_by_n(const UpdateParams& p, cudaStream_t stream) {
  switch (p.dstate) {
    case 16: launch_typed<ST, 16>(p, stream); return true;
    case 32: launch_typed<ST, 32>(p, stream); return true;
    case 64: launch_typed<ST, 64>(p, stream); return true;
    case 128: launch_typed<ST, 128>(p, stream); return true;
    case 256: launch_typed<ST, 256>(p, stream); return true;
    default: return false;
  }
}

}  // namespace

bool launch_ssd_update(const UpdateParams& p, bool bf16_state, cudaStream_t stream) {
  return bf16_state ? launch_by_n<__nv_bfloat16>(p, stream) : launch_by_n<float>(p, stream);
}

}  // namespace ssd
}  // namespace mlmamba
