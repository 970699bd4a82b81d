// sm_90a warpgroup MMA (wgmma) building blocks of the SSD forward (fwd_wgmma.cu).
// scripts/dev/wgmma_check.py checks every layout and wrapper here against torch on a GPU.
//
// Shared-memory tiles use the 128-byte swizzle (PTX ISA "Shared Memory Matrix Layout"): a tile
// of ROWS x COLS bf16 is stored as COLS / 64 panels of ROWS rows x 64 columns; a row of a panel
// is 128 bytes whose eight 16-byte chunks are XOR-permuted by (row % 8). Panels and tiles must
// start 1024-byte aligned.
//   K-major operand (rows = M or N, columns = K): SBO = 1024 (next 8 rows), LBO unused; the
//     k-step s of 16 columns starts at panel s / 4, byte (s % 4) * 32.
//   MN-major operand (rows = K, columns = M or N): LBO = panel bytes (next 64 M/N columns),
//     SBO = 1024 (next 8 K rows); the k-step s starts at row 16 s.
// A from registers: warp w of the warpgroup holds rows 16 w.. in the mma.sync m16n8k16 A layout.
// Accumulators: warp w, rows 16 w + g (+ 8), d[4 j + e] at columns 8 j + 2 t (+1) (the mma.sync
// C layout per n8 block j).
#pragma once
#include <cstdint>

#include "common/tma.cuh"
#include "ssd/common.cuh"

namespace mlmamba {
namespace ssd {

// byte offset of element (r, c) in a 128-byte-swizzled panel tile with ROWS rows
template <int ROWS>
__device__ __forceinline__ int sw128_offset(int r, int c) {
  return (c >> 6) * (ROWS * 128) + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2;
}

// matrix descriptor: start address, leading / stride byte offsets, 128-byte swizzle
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint64_t a = smem_u32(smem);
  return ((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// Descriptors of a 64-row tile of panels: K-major, k-step s of 16 columns; MN-major, rows
// 16 s of panel 0 (LBO: the next panel, 64 rows x 128 bytes further)
__device__ __forceinline__ uint64_t desc_k(const unsigned char* t, int s) {
  return wgmma_desc(t + (s >> 2) * (64 * 128) + (s & 3) * 32, 16, 1024);
}
__device__ __forceinline__ uint64_t desc_mn(const unsigned char* t, int s) {
  return wgmma_desc(t + s * 16 * 128, 64 * 128, 1024);
}

// (compiled for a target without wgmma, the default build's sm_80 code, these trap: the
// kernels that use them only run from an sm_90a image, which their launchers check)
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// this warpgroup's registers per thread: raised to / lowered to N (warp-specialized kernels)
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#else
  __trap();
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#else
  __trap();
#endif
}

// store four 8 x 8 bf16 matrices (the mma fragment layout: lane holds row lane / 4, columns
// 2 (lane % 4) +0/1 of each); lanes 8 q .. 8 q + 7 give the row addresses of matrix q
__device__ __forceinline__ void stsm_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                        uint32_t r3) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#else
  __trap();
#endif
}

#define MLM_WG_D32                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MLM_WG_D32_OUT(d)                                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),         \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),           \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),           \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// D (64 x 64) (+)= A (64 x 16) B (16 x 64), both from shared memory. TA / TB: A M-major / B
// N-major (1) or K-major (0). accumulate = false overwrites D.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n64_ss(float (&d)[32], uint64_t da, uint64_t db,
                                                bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MLM_WG_D32
      ", %32, %33, p, 1, 1, %35, %36;\n}\n"
      : MLM_WG_D32_OUT(d)
      : "l"(da), "l"(db), "r"(static_cast<int>(accumulate)), "n"(TA), "n"(TB));
#else
  __trap();
#endif
}

// D (64 x 64) (+)= A (64 x 16, registers) B (16 x 64, shared memory; TB as above)
template <int TB>
__device__ __forceinline__ void wgmma_m64n64_rs(float (&d)[32], const uint32_t (&a)[4],
                                                uint64_t db, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MLM_WG_D32
      ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
      : MLM_WG_D32_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(accumulate)),
        "n"(TB));
#else
  __trap();
#endif
}

}  // namespace ssd
}  // namespace mlmamba
