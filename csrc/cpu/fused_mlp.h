// The fused CPU engine: a whole network (section 7.4), or one layer, in blocks of rows that
// stay in cache through every layer. csrc/cpu/fused_mlp.cpp has the algorithm.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../activation.h"

namespace handgrad::cpu {

// The activations of a network: `hidden` after every hidden layer, `output` (if any) after
// the output layer; negative_slope for leaky_relu.
struct NetworkActivations {
  Activation hidden;
  std::optional<Activation> output;
  double negative_slope;
};

// out = the network applied to input (*, d_0). biases is empty, or one per layer. With
// `hidden_outputs` non-null, the hidden outputs the backward needs are stored there as (rows, d)
// matrices: every one, or with checkpoint_every = k > 0 every k-th below the last.
at::Tensor fused_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                         const NetworkActivations& activations, int64_t checkpoint_every,
                         std::vector<at::Tensor>* hidden_outputs);

// The gradients of the network's parameters and input, given dl/d(out). `hidden_outputs` is what
// fused_forward stored. output_source, if defined, gives the output layer's a' (the
// activation's output, or f where it hides the sign, as activation_backward takes it);
// otherwise f of the output layer is recomputed in cache. needs: input, weights, biases.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, const at::Tensor& output_source,
    const NetworkActivations& activations, int64_t checkpoint_every, std::array<bool, 3> needs);

}  // namespace handgrad::cpu
