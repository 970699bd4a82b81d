// Compile-time switches: turn a runtime value into a constexpr for a templated lambda.
// Keep instantiations to what is used: every switch multiplies the build time.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/core/ScalarType.h>

#define MLM_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                  \
    if (COND) {                          \
      constexpr bool NAME = true;        \
      return __VA_ARGS__();              \
    } else {                             \
      constexpr bool NAME = false;       \
      return __VA_ARGS__();              \
    }                                    \
  }()

// float / half / bfloat16 -> c10 type named T_NAME
#define MLM_FLOAT_SWITCH(STYPE, T_NAME, OP, ARG, ...)                                   \
  [&] {                                                                                 \
    switch (STYPE) {                                                                    \
      case at::kFloat: { using T_NAME = float; return __VA_ARGS__(); }                  \
      case at::kHalf: { using T_NAME = at::Half; return __VA_ARGS__(); }                \
      case at::kBFloat16: { using T_NAME = at::BFloat16; return __VA_ARGS__(); }        \
      default:                                                                          \
        TORCH_CHECK(false, OP ": " ARG " must be float32, float16 or bfloat16, got ",    \
                    STYPE);                                                             \
    }                                                                                   \
  }()
