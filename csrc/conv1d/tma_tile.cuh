// Helpers of the channel-last TMA kernel (fwd_chlast_tma.cu; a backward on this pattern is on
// branch next/conv-bwd-chlast-tma): the tensor map of a channel-last tensor, and a thread's
// 4-byte column word <-> floats.
#pragma once
#include <cuda.h>

#include <type_traits>

#include "common/check.h"
#include "common/tensor_map.h"
#include "conv1d/conv1d.h"

namespace mlmamba {
namespace conv1d {

// A 4-D map of a channel-last (b, d, l) tensor (strides s_b, s_l in elements, channels unit
// stride) as (d, l, b, 1), with boxes of row_bytes of channels x rows. Reads outside the tensor
// fill zeros, stores there are dropped. The caller checked the alignment (pipe_ok).
inline void encode_chlast_map(CUtensorMap* map, const void* ptr, const ConvParams& p, int64_t s_b,
                              int64_t s_l, int xdtype, int row_bytes, int rows, const char* op) {
  const auto enc = tensor_map_encoder();
  MLM_CHECK(enc != nullptr, op, ": the driver has no cuTensorMapEncodeTiled");
  const int64_t es = xdtype == kF32 ? 4 : 2;
  const CUtensorMapDataType dt = xdtype == kF32   ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                 : xdtype == kF16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                  : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.dim), static_cast<cuuint64_t>(p.seqlen),
                        static_cast<cuuint64_t>(p.batch), 1};
  // strides of size-1 dims are free in torch: any multiple of 16 bytes does
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(p.seqlen == 1 ? 16 : s_l * es),
                           static_cast<cuuint64_t>(p.batch == 1 ? 16 : s_b * es), 16};
  cuuint32_t box[4] = {static_cast<cuuint32_t>(row_bytes / es), static_cast<cuuint32_t>(rows), 1, 1};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUresult r = enc(map, dt, 4, const_cast<void*>(ptr), dims, strides, box, estr,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MLM_CHECK(r == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
}

#ifdef __CUDACC__
// a 4-byte word of R elements <-> floats
template <typename R>
__device__ __forceinline__ void word_to_float(uint32_t u, float (&v)[4 / sizeof(R)]) {
  if constexpr (std::is_same_v<R, float>) {
    v[0] = __uint_as_float(u);
  } else {
    packed_to_float<2, R>(&u, v);
  }
}
template <typename R>
__device__ __forceinline__ uint32_t float_to_word(const float (&v)[4 / sizeof(R)]) {
  if constexpr (std::is_same_v<R, float>) {
    return __float_as_uint(v[0]);
  } else if constexpr (std::is_same_v<R, __half>) {
    const __half2 h = __floats2half2_rn(v[0], v[1]);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[0], v[1]);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}
#endif

}  // namespace conv1d
}  // namespace mlmamba
