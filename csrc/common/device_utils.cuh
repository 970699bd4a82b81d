// Small device helpers shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mlmamba {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }

// 2^x on the special-function unit (flushes results below 2^-126 to zero).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }
// silu with the approximate division (MUFU reciprocal): the fused msc conv's activation. The
// exp is __expf's (ex2.approx of -x log2 e) with subnormal results flushed: 1 + e rounds to 1
// there either way, so the value is __fdividef(x, 1 + __expf(-x))'s, bit for bit, without the
// three instructions of __expf's subnormal path.
__device__ __forceinline__ float silu_fast(float x) {
  return __fdividef(x, 1.f + exp2_approx(x * -kLog2e));
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float softplusf(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }

}  // namespace mlmamba
