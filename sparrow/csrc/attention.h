// The multi-token decode attention (multi_token_attention.cpp), callable from the other C++ ops.
#pragma once

#include <ATen/ATen.h>

namespace sparrow_cpu {

// q [Hq, T, D]; k/v_cache [Hkv, >= past + T, D] (last dim contiguous); tail_mask [T, T] bool -> [Hq, T, D].
at::Tensor multi_token_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 int64_t past, const at::Tensor& tail_mask, double scale);

}  // namespace sparrow_cpu
