// Argument checks shared by every op's host glue. Messages name the op and the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MLM_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

#define MLM_CHECK_CUDA(op, t) \
  MLM_CHECK((t).is_cuda(), op ": " #t " must be a CUDA tensor, got ", (t).device())

#define MLM_CHECK_SHAPE(op, t, ...)                                                      \
  MLM_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), op ": " #t " must have shape ", \
            at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

#define MLM_CHECK_SAME_DEVICE(op, a, b)                                                   \
  MLM_CHECK((a).device() == (b).device(), op ": " #b " is on ", (b).device(), " but " #a \
            " is on ", (a).device())

#define MLM_CHECK_FLOAT(op, t)                                                          \
  MLM_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||         \
                (t).scalar_type() == at::kBFloat16,                                    \
            op ": " #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

// Launch check: call right after every <<<>>> launch.
#define MLM_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
