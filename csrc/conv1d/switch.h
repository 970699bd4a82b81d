// Compile-time switches for the conv1d kernels: x dtype (by DType tag) and width 2..8.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "conv1d/conv1d.h"

#define CONV_X_SWITCH(DT, T, ...)                                              \
  [&] {                                                                        \
    if ((DT) == ::mlmamba::conv1d::kF32) { using T = float; return __VA_ARGS__(); } \
    if ((DT) == ::mlmamba::conv1d::kF16) { using T = at::Half; return __VA_ARGS__(); } \
    using T = at::BFloat16;                                                    \
    return __VA_ARGS__();                                                      \
  }()

#define CONV_WIDTH_CASE(N, W, ...) \
  case N: {                        \
    constexpr int W = N;           \
    return __VA_ARGS__();          \
  }

#define CONV_WIDTH_SWITCH(WIDTH, W, ...)                                          \
  [&] {                                                                           \
    switch (WIDTH) {                                                              \
      CONV_WIDTH_CASE(2, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(3, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(4, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(5, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(6, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(7, W, __VA_ARGS__)                                          \
      CONV_WIDTH_CASE(8, W, __VA_ARGS__)                                          \
      default: TORCH_CHECK(false, "causal_conv1d: width must be 2..8, got ", WIDTH); \
    }                                                                             \
  }()
