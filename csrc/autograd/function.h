// What the Autograd kernels (csrc/autograd/*.cpp) share: the activation kept in a
// Function's context, and when a call must go through its Function at all.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <optional>

#include "../checks.h"

namespace handgrad::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// The activation in the context, and only the parameters it takes (leaky_relu's slope,
// softplus's beta and threshold): each entry costs a tiny layer measurable time. Keys of at
// most 15 characters are stored without an allocation.
inline void save_parameters(AutogradContext* ctx, Activation activation, const ActivationParameters& params) {
  if (activation == Activation::LeakyReLU) ctx->saved_data["negative_slope"] = params.negative_slope;
  if (activation == Activation::Softplus) {
    ctx->saved_data["beta"] = params.beta;
    ctx->saved_data["threshold"] = params.threshold;
  }
}

// The parameters saved, the defaults for those that were not.
inline ActivationParameters saved_parameters(AutogradContext* ctx) {
  ActivationParameters params;
  const auto read = [&](const char* key, double& value) {
    const auto it = ctx->saved_data.find(key);
    if (it != ctx->saved_data.end()) value = it->second.toDouble();
  };
  read("negative_slope", params.negative_slope);
  read("beta", params.beta);
  read("threshold", params.threshold);
  return params;
}

inline void save_activation(AutogradContext* ctx, Activation activation, const ActivationParameters& params) {
  ctx->saved_data["activation"] = static_cast<int64_t>(activation);
  save_parameters(ctx, activation, params);
}

struct SavedActivation {
  Activation activation;
  c10::string_view name;
  ActivationParameters params;
};

inline SavedActivation saved_activation(AutogradContext* ctx) {
  const auto activation = static_cast<Activation>(ctx->saved_data["activation"].toInt());
  return {activation, activation_name(activation), saved_parameters(ctx)};
}

inline bool defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// Whether a call must go through its Function: autograd will record it, or an input carries
// a forward-mode tangent (which the Function then refuses with PyTorch's own message rather
// than dropping it). Any other call runs the op below autograd directly, which is cheaper.
inline bool needs_function(std::initializer_list<const at::Tensor*> tensors) {
  const bool grad_mode = c10::GradMode::is_enabled();
  for (const at::Tensor* t : tensors) {
    if (t->defined() && ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined())) {
      return true;
    }
  }
  return false;
}

// Every Function here turns off the materialization of undefined output gradients: autograd
// would fill them with plain zeros, which a tensor subclass (DTensor) cannot be mixed
// with under create_graph. An undefined gradient in gives undefined gradients out.
inline variable_list no_gradients(size_t count) {
  return variable_list(count);
}

// The whole network's configuration, as the mlp ops take it.
struct Network {
  Activation hidden;
  std::optional<Activation> output;  // none: a linear output layer
  ActivationParameters params;
  int64_t checkpoint_every;

  std::optional<c10::string_view> output_name() const {
    return output.has_value() ? std::optional<c10::string_view>(activation_name(*output)) : std::nullopt;
  }
};

// A network's configuration and its count of layers in a Function's context (MLPFunction's
// and MLPBackwardFunction's), and read back.
inline void save_network(AutogradContext* ctx, const Network& network, size_t layers, bool has_bias) {
  save_activation(ctx, network.hidden, network.params);
  if (network.output.has_value()) save_parameters(ctx, *network.output, network.params);
  ctx->saved_data["checkpoint"] = network.checkpoint_every;
  ctx->saved_data["layers"] = static_cast<int64_t>(layers);
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["out_activation"] =
      network.output.has_value() ? static_cast<int64_t>(*network.output) : int64_t{-1};
}

inline Network saved_network(AutogradContext* ctx) {
  const int64_t output = ctx->saved_data["out_activation"].toInt();
  return {static_cast<Activation>(ctx->saved_data["activation"].toInt()),
          output < 0 ? std::nullopt : std::optional<Activation>(static_cast<Activation>(output)),
          saved_parameters(ctx), ctx->saved_data["checkpoint"].toInt()};
}

}  // namespace handgrad::autograd
