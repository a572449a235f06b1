// Argument checks of every handgrad op, and their messages, written once.
//
// Each op has one check, named after it and taking its arguments (check_linear_activation,
// ...). The CPU and CUDA kernels call it before any kernel runs; the fake kernels
// (pyext/handgrad/_fake.py) call the same function through handgrad._C. So an eager call,
// a call on meta tensors and a torch.compile'd or exported program fail with one message,
// which names the op, the argument and the problem.
//
// Shapes are read as SymInts (sym_size), which the fake tensors of dynamic-shape tracing
// have; on real tensors they are plain integers.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/DimVector.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <ostream>
#include <string>

#include "activation.h"
#include "checkpoint.h"
#include "shapes.h"

namespace handgrad {

// The name users know an op by, to start every message: the schema's name with
// "activation" replaced by the activation ("linear_relu", "sigmoid_backward", ...). It is
// written out only when a check fails, so checks cost nothing on the happy path.
struct OpName {
  c10::string_view prefix;  // "linear_", "bias_", "mlp" or ""
  c10::string_view activation;
  c10::string_view suffix;  // "_backward", "_" or ""

  // The OpName of the op with schema name `schema` ("linear_activation_backward"), called
  // with `activation`.
  static OpName of(c10::string_view schema, c10::string_view activation) {
    const size_t at = schema.find("activation");
    if (at == c10::string_view::npos) return {schema, "", ""};
    return {schema.substr(0, at), activation, schema.substr(at + 10)};
  }
};

inline std::ostream& operator<<(std::ostream& out, const OpName& name) {
  return out << name.prefix << name.activation << name.suffix;
}

// An argument that is an element of a list argument, for messages: "weights[2]". Like
// OpName, written out only when a check fails.
struct ListItem {
  const char* list;
  size_t index;
};

inline std::ostream& operator<<(std::ostream& out, const ListItem& item) {
  return out << item.list << "[" << item.index << "]";
}

inline std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

namespace detail {

// Every activation's parameters, whichever activation runs: their defaults pass.
inline void check_parameters(const OpName& op, const ActivationParameters& params) {
  TORCH_CHECK_VALUE(std::isfinite(params.negative_slope), op,
                    ": negative_slope must be a finite number, got ", params.negative_slope);
  TORCH_CHECK_VALUE(std::isfinite(params.beta) && params.beta > 0, op,
                    ": beta must be a positive finite number, got ", params.beta);
  TORCH_CHECK_VALUE(!std::isnan(params.threshold), op, ": threshold must be a number, got nan");
}

inline void check_floating_dtype(const OpName& op, const char* arg, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": ", arg, " has dtype ", dtype_name(t),
      "; expected torch.float32, torch.float64, torch.float16 or torch.bfloat16");
}

// `other` must share dtype and device with `reference`. Arg is a name: a const char* or a
// ListItem.
template <typename Arg>
void check_same_dtype_and_device(
    const OpName& op, const Arg& arg, const at::Tensor& other, const char* reference_arg,
    const at::Tensor& reference) {
  TORCH_CHECK(
      other.device() == reference.device(), op, ": ", arg, " is on ", other.device(), " but ",
      reference_arg, " is on ", reference.device(), "; all tensors must be on one device");
  TORCH_CHECK(
      other.scalar_type() == reference.scalar_type(), op, ": ", arg, " has dtype ",
      dtype_name(other), " but ", reference_arg, " has dtype ", dtype_name(reference));
}

inline void check_has_features(const OpName& op, const char* arg, const at::Tensor& t,
                               const char* features) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", arg, " must have shape (*, ", features,
              ") with at least 1 dimension, got a 0-D tensor");
}

// A layer's weight (out_features, in_features) takes `features` from what comes before.
template <typename Arg>
void check_weight(const OpName& op, const Arg& arg, const at::Tensor& weight,
                  const c10::SymInt& features, const char* before) {
  TORCH_CHECK(weight.dim() == 2, op, ": ", arg,
              " must be 2-D (out_features, in_features), got shape ", weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(1) == features, op, ": ", arg, " has ", weight.sym_size(1),
              " columns but ", before, " has ", features, " features");
}

template <typename Arg, typename WeightArg>
void check_bias(const OpName& op, const Arg& arg, const at::Tensor& bias,
                const WeightArg& weight_arg, const at::Tensor& weight) {
  TORCH_CHECK(bias.dim() == 1 && bias.sym_size(0) == weight.sym_size(0), op, ": ", arg,
              " must have shape [", weight.sym_size(0), "] (out_features of ", weight_arg,
              "), got shape ", bias.sym_sizes());
}

// A layer's input, weight and bias, where input has been checked to be floating point.
inline void check_layer(const OpName& op, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  check_same_dtype_and_device(op, "weight", weight, "input", input);
  if (bias.has_value()) check_same_dtype_and_device(op, "bias", *bias, "input", input);
  check_has_features(op, "input", input, "in_features");
  check_weight(op, "weight", weight, input.sym_size(-1), "input");
  if (bias.has_value()) check_bias(op, "bias", *bias, "weight", weight);
}

// The backward ops: grad_output and out_or_f match element for element.
inline void check_gradient_and_out_or_f(const OpName& op, const at::Tensor& grad_output,
                                     const at::Tensor& out_or_f) {
  check_floating_dtype(op, "grad_output", grad_output);
  check_same_dtype_and_device(op, "out_or_f", out_or_f, "grad_output", grad_output);
  TORCH_CHECK(grad_output.sym_sizes() == out_or_f.sym_sizes(), op, ": grad_output has shape ",
              grad_output.sym_sizes(), " but out_or_f has shape ", out_or_f.sym_sizes());
}

}  // namespace detail

// --- One check per op; each returns the parsed activation ---

inline Activation check_linear_activation(const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          c10::string_view activation, const ActivationParameters& params) {
  const Activation act = parse_activation(activation);
  const OpName op{"linear_", activation, ""};
  detail::check_parameters(op, params);
  detail::check_floating_dtype(op, "input", input);
  detail::check_layer(op, input, weight, bias);
  return act;
}

// activation and activation_ (in place, `inplace`).
inline Activation check_activation(const at::Tensor& input, c10::string_view activation,
                                   const ActivationParameters& params, bool inplace = false) {
  const Activation act = parse_activation(activation);
  const OpName op{"", activation, inplace ? "_" : ""};
  detail::check_parameters(op, params);
  detail::check_floating_dtype(op, "input", input);
  return act;
}

inline Activation check_activation_backward(const at::Tensor& grad_output,
                                            const at::Tensor& out_or_f, c10::string_view activation,
                                            const ActivationParameters& params) {
  const Activation act = parse_activation(activation);
  const OpName op{"", activation, "_backward"};
  detail::check_parameters(op, params);
  detail::check_gradient_and_out_or_f(op, grad_output, out_or_f);
  return act;
}

inline Activation check_bias_activation_backward(const at::Tensor& grad_output,
                                                 const at::Tensor& out_or_f,
                                                 c10::string_view activation,
                                                 const ActivationParameters& params) {
  const Activation act = parse_activation(activation);
  const OpName op{"bias_", activation, "_backward"};
  detail::check_parameters(op, params);
  detail::check_gradient_and_out_or_f(op, grad_output, out_or_f);
  detail::check_has_features(op, "out_or_f", out_or_f, "out_features");
  return act;
}

inline Activation check_linear_activation_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, const ActivationParameters& params) {
  const Activation act = parse_activation(activation);
  const OpName op{"linear_", activation, "_backward"};
  detail::check_parameters(op, params);
  detail::check_gradient_and_out_or_f(op, grad_output, out_or_f);
  detail::check_same_dtype_and_device(op, "input", input, "grad_output", grad_output);
  detail::check_layer(op, input, weight, std::nullopt);
  const auto expected = linear_output_sizes(input.sym_sizes(), weight.sym_size(0));
  TORCH_CHECK(out_or_f.sym_sizes() == c10::SymIntArrayRef(expected), op, ": out_or_f must have shape ",
              c10::SymIntArrayRef(expected),
              " (input's leading dimensions, then out_features), got ", out_or_f.sym_sizes());
  return act;
}

// The whole-network ops: each layer's weight takes the features of the one before; biases
// lists one per layer, or none for a network without biases.
inline Activation check_mlp(const at::Tensor& input, at::TensorList weights,
                            at::TensorList biases, c10::string_view activation,
                            const ActivationParameters& params, int64_t checkpoint_every,
                            std::optional<c10::string_view> output_activation) {
  const OpName op{"mlp", "", ""};
  const Activation act = parse_activation(activation);
  if (output_activation.has_value()) parse_activation(*output_activation);
  detail::check_parameters(op, params);
  detail::check_floating_dtype(op, "input", input);
  TORCH_CHECK_VALUE(checkpoint_every >= 0, op, ": checkpoint_every must be 0 (none) or a ",
                    "positive number of layers, got ", checkpoint_every);
  TORCH_CHECK(!weights.empty(), op, ": weights must list at least the output layer, got none");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op, ": got ", weights.size(),
              " weights but ", biases.size(), " biases; give one bias per layer, or none");
  detail::check_has_features(op, "input", input, "in_features");
  c10::SymInt features = input.sym_size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const ListItem weight{"weights", l}, bias{"biases", l};
    detail::check_same_dtype_and_device(op, weight, weights[l], "input", input);
    detail::check_weight(op, weight, weights[l], features,
                         l == 0 ? "input" : "the layer before");
    if (!biases.empty()) {
      detail::check_same_dtype_and_device(op, bias, biases[l], "input", input);
      detail::check_bias(op, bias, biases[l], weight, weights[l]);
    }
    features = weights[l].sym_size(0);
  }
  return act;
}

// mlp_backward: also what mlp_forward stored.
inline Activation check_mlp_backward(const at::Tensor& input, at::TensorList weights,
                                     at::TensorList biases, at::TensorList hidden_outputs,
                                     c10::string_view activation, const ActivationParameters& params,
                                     int64_t checkpoint_every,
                                     std::optional<c10::string_view> output_activation) {
  const Activation act = check_mlp(input, weights, biases, activation, params,
                                   checkpoint_every, output_activation);
  const size_t hidden = weights.size() - 1;
  TORCH_CHECK(hidden_outputs.size() == stored_output_count(hidden, checkpoint_every),
              "mlp_backward: hidden_outputs has ", hidden_outputs.size(),
              " tensors, which is not what mlp_forward stores for ", hidden,
              " hidden layers with checkpoint_every=", checkpoint_every);
  return act;
}

// mlp_double_backward: every hidden output (none checkpointed), and the cotangents shaped as
// the results of mlp_backward they belong to.
inline Activation check_mlp_double_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs,
    const std::optional<at::Tensor>& grad_grad_input,
    const c10::List<std::optional<at::Tensor>>& grad_grad_weights,
    const c10::List<std::optional<at::Tensor>>& grad_grad_biases, c10::string_view activation,
    const ActivationParameters& params, std::optional<c10::string_view> output_activation) {
  const Activation act = check_mlp_backward(input, weights, biases, hidden_outputs, activation,
                                            params, 0, output_activation);
  const OpName op{"mlp_double_backward", "", ""};
  detail::check_same_dtype_and_device(op, "grad_output", grad_output, "input", input);
  const auto expected = linear_output_sizes(input.sym_sizes(), weights.back().sym_size(0));
  TORCH_CHECK(grad_output.sym_sizes() == c10::SymIntArrayRef(expected), op,
              ": grad_output must have shape ", c10::SymIntArrayRef(expected),
              " (the network's output), got ", grad_output.sym_sizes());
  const auto check_like = [&](const auto& arg, const std::optional<at::Tensor>& t,
                              const auto& reference_arg, const at::Tensor& reference) {
    if (!t.has_value()) return;
    detail::check_same_dtype_and_device(op, arg, *t, "input", input);
    TORCH_CHECK(t->sym_sizes() == reference.sym_sizes(), op, ": ", arg, " has shape ",
                t->sym_sizes(), " but ", reference_arg, " has shape ", reference.sym_sizes());
  };
  check_like("grad_grad_input", grad_grad_input, "input", input);
  TORCH_CHECK(grad_grad_weights.empty() || grad_grad_weights.size() == weights.size(), op,
              ": grad_grad_weights has ", grad_grad_weights.size(), " entries for ",
              weights.size(), " weights; give one per weight (None where there is none), or none");
  TORCH_CHECK(grad_grad_biases.empty() || grad_grad_biases.size() == biases.size(), op,
              ": grad_grad_biases has ", grad_grad_biases.size(), " entries for ", biases.size(),
              " biases; give one per bias (None where there is none), or none");
  for (size_t l = 0; l < grad_grad_weights.size(); ++l) {
    check_like(ListItem{"grad_grad_weights", l}, grad_grad_weights.get(l), ListItem{"weights", l}, weights[l]);
  }
  for (size_t l = 0; l < grad_grad_biases.size(); ++l) {
    check_like(ListItem{"grad_grad_biases", l}, grad_grad_biases.get(l), ListItem{"biases", l}, biases[l]);
  }
  return act;
}

}  // namespace handgrad
