// Host helpers of the ops that launch SSD kernels (fwd_ops.cpp, bwd_ops.cpp, msc/ops.cpp):
// float dtypes, the kernels' DType codes (common.cuh), argument checks, the forward's shape.
#pragma once
#include <ATen/ATen.h>

#include "common/check.h"
#include "ssd/fwd.h"

namespace mlmamba {
namespace ssd {

inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline int dtype_code(at::ScalarType t) {
  return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : 0;
}

// t on the CUDA device of ref (named ref_name in the message), of this shape, and (floating)
// float32, float16 or bfloat16.
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref, const char* ref_name, at::IntArrayRef shape,
                       bool floating = true) {
  MLM_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " must be on ",
            ref.device(), " like ", ref_name, ", got ", t.device());
  MLM_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  if (floating)
    MLM_CHECK(is_float(t), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// A forward launch's sizes; the rest of the parameters zero.
inline FwdParams fwd_params(int64_t seqlen, int64_t nheads, int64_t headdim, int64_t ngroups,
                            int64_t nrows) {
  FwdParams p{};
  p.seqlen = seqlen;
  p.nheads = nheads;
  p.headdim = headdim;
  p.ngroups = ngroups;
  p.nrows = nrows;
  p.heads_per_group = static_cast<int>(nheads / ngroups);
  return p;
}

// A 4-D bf16 map of t (b, l, j, cols) as (cols, l, j, b) with 64 x box_rows boxes and the
// 128-byte swizzle of the wgmma tiles, zeros past the ends (fwd_ops.cpp); false where it
// cannot encode.
bool encode_tile_map(CUtensorMap* map, const at::Tensor& t, int box_rows = 64);

// The buffer of the wgmma forward's chunk-vector pre-pass for rows x heads x chunks, on
// opts' device; sets p.vec_buf / p.vec_cap (the tensor keeps it alive until the launches are
// queued).
inline at::Tensor attach_vec_buf(FwdParams& p, int64_t rows, int64_t chunks,
                                 const at::TensorOptions& opts) {
  p.vec_cap = rows * p.nheads * chunks * kFwdVecBytes;
  at::Tensor buf = at::empty({p.vec_cap}, opts.dtype(at::kByte));
  p.vec_buf = buf.data_ptr<uint8_t>();
  return buf;
}

}  // namespace ssd
}  // namespace mlmamba
