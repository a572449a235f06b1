// The dtypes of every handgrad kernel, CPU and CUDA: float and double, and bfloat16 and
// float16 computed in float.
#pragma once

#include <ATen/Dispatch.h>

#define HANDGRAD_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
