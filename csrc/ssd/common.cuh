// Device helpers for the SSD kernels: bf16 tensor-core mma (m16n8k16, fp32 accumulate),
// ldmatrix fragment loads from swizzled shared-memory tiles, hi/lo bf16 splits; cp.async from
// common/cp_async.cuh.
// Portable: sm_80 and newer.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major)  a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)  a[3]: (g+8, 2t+8..)
//   B (16x8, k by n)      b[0]: (k 2t..2t+1, n g)                  b[1]: (k 2t+8.., n g)
//   C (16x8)              c[0..1]: (g, 2t..2t+1)                   c[2..3]: (g+8, 2t..)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "common/arch.h"
#include "common/cp_async.cuh"
#include "common/device_utils.cuh"

namespace mlmamba {
namespace ssd {

// ---- shared-memory tiles of bf16, 16-byte chunks XOR-swizzled by row --------------------
// A tile has COLS bf16 per row (COLS % 8 == 0, COLS >= 16). Eight consecutive rows at the same
// logical 16-byte chunk land in eight different bank groups, so ldmatrix and the 4-byte
// accumulator stores are conflict-free without padding.
template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int CPR = COLS / 8;                    // chunks per row
  constexpr int RPL = CPR >= 8 ? 1 : 8 / CPR;      // rows per 128-byte line
  constexpr int MASK = CPR >= 8 ? 7 : CPR - 1;
  return row * COLS + ((((col >> 3) ^ ((row / RPL) & MASK))) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- ldmatrix ---------------------------------------------------------------------------
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// A fragment (16x16 at m0,k0) of a tile stored [m][k] (row-major A).
template <int COLS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* tile, int m0, int k0,
                                       int lane) {
  int r = m0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  int c = k0 + (lane >> 4) * 8;
  ldsm_x4(a, smem_u32(tile + swz<COLS>(r, c)));
}
// A fragment (16x16 at m0,k0) of a tile stored [k][m] (A transposed in memory).
template <int COLS>
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const __nv_bfloat16* tile, int m0,
                                         int k0, int lane) {
  int r = k0 + (lane & 7) + (lane >> 4) * 8;
  int c = m0 + ((lane >> 3) & 1) * 8;
  ldsm_x4_t(a, smem_u32(tile + swz<COLS>(r, c)));
}
// B fragments of two n8 tiles (n0, n0+8) over k0..k0+15, tile stored [n][k].
// b[0..1] -> n-tile n0, b[2..3] -> n-tile n0+8.
template <int COLS>
__device__ __forceinline__ void load_b2(uint32_t (&b)[4], const __nv_bfloat16* tile, int n0, int k0,
                                        int lane) {
  int r = n0 + (lane & 7) + (lane >> 4) * 8;
  int c = k0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(b, smem_u32(tile + swz<COLS>(r, c)));
}
// Same, tile stored [k][n].
template <int COLS>
__device__ __forceinline__ void load_b2_t(uint32_t (&b)[4], const __nv_bfloat16* tile, int n0,
                                          int k0, int lane) {
  int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  int c = n0 + (lane >> 4) * 8;
  ldsm_x4_t(b, smem_u32(tile + swz<COLS>(r, c)));
}
// One n8 tile, stored [n][k] / [k][n] (lanes 16..31 repeat valid addresses).
template <int COLS>
__device__ __forceinline__ void load_b1(uint32_t (&b)[2], const __nv_bfloat16* tile, int n0, int k0,
                                        int lane) {
  int r = n0 + (lane & 7);
  int c = k0 + ((lane >> 3) & 1) * 8;
  ldsm_x2(b, smem_u32(tile + swz<COLS>(r, c)));
}
template <int COLS>
__device__ __forceinline__ void load_b1_t(uint32_t (&b)[2], const __nv_bfloat16* tile, int n0,
                                          int k0, int lane) {
  int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  int c = n0;
  ldsm_x2_t(b, smem_u32(tile + swz<COLS>(r, c)));
}

// ---- mma --------------------------------------------------------------------------------
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Operands held as hi + lo bf16 pairs (SPLIT) give ~16 mantissa bits: hi*hi + hi*lo + lo*hi.
template <bool SPLIT>
__device__ __forceinline__ void mma_split(float (&c)[4], const uint32_t (&ah)[4],
                                          const uint32_t (&al)[4], uint32_t bh0, uint32_t bh1,
                                          uint32_t bl0, uint32_t bl1) {
  mma_bf16(c, ah, bh0, bh1);
  if constexpr (SPLIT) {
    mma_bf16(c, ah, bl0, bl1);
    mma_bf16(c, al, bh0, bh1);
  }
}

// ---- conversions ------------------------------------------------------------------------
__device__ __forceinline__ uint32_t pack_bf16(float lo_elem, float hi_elem) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo_elem, hi_elem);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
// v = hi + lo with hi = bf16(v), lo = bf16(v - hi); two elements per call.
__device__ __forceinline__ void split_bf16(float v0, float v1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16(v0, v1);
  float2 h = unpack_bf16(hi);
  lo = pack_bf16(v0 - h.x, v1 - h.y);
}

// exp2_approx, kLog2e: common/device_utils.cuh


// ---- runtime-typed scalar loads for small side inputs (dt, z, states) -------------------
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace ssd
}  // namespace mlmamba
