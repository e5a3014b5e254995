// The device-independent halves of the operators (ops.cpp): argument checks, layouts and
// allocation, then the kernel. The sharded operators (sharded_ops.cpp) call the same halves
// with a shard's map, so a shard's call differs from the unsharded one only in the mask index
// its kernel gives each element.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "fastdropout.h"

namespace fastdropout {

void check_p(double p);
void check_floating(const at::Tensor& t, const char* name);
void check_channel_numel(int64_t channel_numel);
void check_rng_state(const at::Tensor& rng_state, const at::Tensor& like);

// `shard`: the map of a DTensor shard (run_map.h), or null for an ordinary tensor. Each returns
// what the operator of the same name returns.
std::tuple<at::Tensor, at::Tensor> dropout_forward(const at::Tensor& x, double p,
                                                   const RngRequest& request,
                                                   int64_t channel_numel, const RunMap* shard);
at::Tensor dropout_forward_inplace(at::Tensor& x, double p, const RngRequest& request,
                                   int64_t channel_numel, const RunMap* shard);
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& rng_state, double p,
                            int64_t channel_numel, const RunMap* shard);
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    double p, const RngRequest& request, const RunMap* shard);
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad,
                                                             const at::Tensor& rng_state,
                                                             double p, const RunMap* shard);

}  // namespace fastdropout
