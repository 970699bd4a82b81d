// SSD decode step: s = exp(dt A) s + dt x B^T, y = s C + D x, y *= silu(z); state in place.
// Memory-bound on the state: each lane streams up to four 16-byte vectors of one state row (p),
// the lanes of a row reduce y with shuffles. The small inputs (x, dt, B, C, z) go through the cache.
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

constexpr int kThreads = 128;

template <typename T> __device__ __forceinline__ float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
template <> __device__ __forceinline__ float ld<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}

// Vectors per lane: 16 state elements (64 bytes fp32, 32 bytes bf16) in flight per thread.
template <typename ST, int N> struct Shape {
  static constexpr int VEC = Vec<ST>::n, NV = N / VEC, VMAX = 16 / VEC;  // 16 elements a lane
  static constexpr int VPL = NV >= VMAX ? VMAX : NV, LPR = NV / VPL;
  static constexpr int RPW = 32 / LPR, ROWS_PER_BLOCK = kThreads / LPR;
  static_assert(LPR >= 1 && LPR <= 32 && NV % VPL == 0, "unsupported d_state");
};

// BT: dtype of B and C (their loads are typed so they issue together, ahead of the math).
template <typename ST, int N, typename BT>
__device__ __forceinline__ void update_rows(const UpdateParams& p) {
  using S = Shape<ST, N>;
  constexpr int VEC = S::VEC, VPL = S::VPL, LPR = S::LPR, RPW = S::RPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % LPR;  // lane within its row
  const int64_t nrows = p.batch * p.nheads * p.headdim;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp) * RPW + lane / LPR;
  const bool ok = r < nrows;
  const int64_t rr = ok ? r : 0;
  const int64_t pp = rr % p.headdim, hh = (rr / p.headdim) % p.nheads;
  const int64_t bi = rr / (p.headdim * p.nheads);
  const int64_t g = hh / p.heads_per_group;

  ST* srow = static_cast<ST*>(p.state) + bi * p.s_b + hh * p.s_h + pp * p.s_p;
  uint4 raw[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v)
    raw[v] = ok ? reinterpret_cast<const uint4*>(srow)[sub * VPL + v] : make_uint4(0, 0, 0, 0);
  constexpr int E = VPL * VEC;  // state elements of this lane
  float Bv[E], Cv[E];
  const int64_t n0 = static_cast<int64_t>(sub) * E;
  if (p.bc_vec) {  // B, C contiguous in n and 16-byte aligned: E elements in 16-byte loads
    constexpr int NU = E * static_cast<int>(sizeof(BT)) / 16;
    uint4 ub[NU], uc[NU];
    const uint4* bp = reinterpret_cast<const uint4*>(static_cast<const BT*>(p.B) + bi * p.B_b + g * p.B_g + n0);
    const uint4* cp = reinterpret_cast<const uint4*>(static_cast<const BT*>(p.C) + bi * p.C_b + g * p.C_g + n0);
#pragma unroll
    for (int q = 0; q < NU; ++q) {
      ub[q] = __ldg(bp + q);
      uc[q] = __ldg(cp + q);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      Bv[e] = ld<BT>(ub, e);
      Cv[e] = ld<BT>(uc, e);
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      Bv[e] = ld<BT>(p.B, bi * p.B_b + g * p.B_g + (n0 + e) * p.B_n);
      Cv[e] = ld<BT>(p.C, bi * p.C_b + g * p.C_g + (n0 + e) * p.C_n);
    }
  }

  float dt = load_as_float(p.dt, bi * p.dt_b + hh * p.dt_h, static_cast<DType>(p.dt_dtype));
  if (p.dt_bias) dt += p.dt_bias[hh];
  if (p.dt_softplus) dt = dt <= 20.f ? log1pf(expf(dt)) : dt;
  const float dA = expf(dt * p.A[hh]);
  const DType xt = static_cast<DType>(p.x_dtype);
  const float x = load_as_float(p.x, bi * p.x_b + hh * p.x_h + pp * p.x_p, xt);
  const float dtx = dt * x;

  float y = 0.f;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    float s[VEC];
    Vec<ST>::to_float(raw[v], s);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      s[e] = dA * s[e] + dtx * Bv[v * VEC + e];
      y += s[e] * Cv[v * VEC + e];
    }
    if (ok) reinterpret_cast<uint4*>(srow)[sub * VPL + v] = Vec<ST>::from_float(s);
  }
#pragma unroll
  for (int off = LPR / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
  if (ok && sub == 0) {
    if (p.D) y += p.D[hh * p.D_h + pp * p.D_p] * x;
    if (p.z) y *= silu(load_as_float(p.z, bi * p.z_b + hh * p.z_h + pp * p.z_p,
                                     static_cast<DType>(p.z_dtype)));
    store_as(p.out, (bi * p.nheads + hh) * p.headdim + pp, y, xt);
  }
}

template <typename ST, int N>
__global__ void __launch_bounds__(kThreads) ssd_update_kernel(const UpdateParams p) {
  switch (static_cast<DType>(p.bc_dtype)) {
    case DType::bf16: update_rows<ST, N, __nv_bfloat16>(p); break;
    case DType::f16: update_rows<ST, N, __half>(p); break;
    default: update_rows<ST, N, float>(p);
  }
}

template <typename ST, int N>
void launch_typed(const UpdateParams& p, cudaStream_t stream) {
  constexpr int rows_per_block = Shape<ST, N>::ROWS_PER_BLOCK;
  const int64_t nrows = p.batch * p.nheads * p.headdim;
  const int64_t blocks = (nrows + rows_per_block - 1) / rows_per_block;
  ssd_update_kernel<ST, N><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
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
