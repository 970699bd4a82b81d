// Host helpers of the ops that launch conv1d kernels (conv1d/ops.cpp, msc/conv_ops.cpp).
#pragma once
#include <ATen/ATen.h>

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

}  // namespace conv1d
}  // namespace mlmamba
