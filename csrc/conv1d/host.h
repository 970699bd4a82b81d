// Host helpers of the ops that launch conv1d kernels (conv1d/ops.cpp, msc/conv_ops.cpp): the
// dtype tag, the weight / bias fields of their params.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "conv1d/conv1d.h"

namespace mlmamba {
namespace conv1d {

// the kernels' dtype tag of a float32 / float16 / bfloat16 tensor (callers check the dtype)
inline int dtag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    default: return kBF16;
  }
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The weight/bias fields shared by the conv and the update params.
template <typename Params>
void set_weight_bias(Params& p, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  p.weight = weight.data_ptr();
  p.w_d = weight.stride(0);
  p.w_k = weight.stride(1);
  p.w_dtype = dtag(weight);
  p.bias_dtype = p.w_dtype;
  if (present(bias)) {
    p.bias = bias->data_ptr();
    p.bias_s = bias->stride(0);
    p.bias_dtype = dtag(*bias);
  }
}

}  // namespace conv1d
}  // namespace mlmamba
