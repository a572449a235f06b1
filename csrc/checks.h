// Argument checks shared by the CPU and CUDA implementations of every handgrad op.
//
// They run first in each op, before any kernel, so that a caller of torch.ops.handgrad.*
// gets an error that names the argument and the problem instead of undefined behaviour.
// pyext/handgrad/_fake.py makes the same checks for fake tensors (torch.compile, export).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <ATen/core/DimVector.h>
#include <c10/util/accumulate.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <ostream>
#include <string>

#include "activation.h"

namespace handgrad {

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "sigmoid") return Activation::Sigmoid;
  TORCH_CHECK_VALUE(
      false, "handgrad: unknown activation '", name,
      "'; expected 'relu', 'leaky_relu' or 'sigmoid'");
}

// The inverse of parse_activation.
inline c10::string_view activation_name(Activation activation) {
  switch (activation) {
    case Activation::ReLU: return "relu";
    case Activation::LeakyReLU: return "leaky_relu";
    case Activation::Sigmoid: return "sigmoid";
  }
  return "";
}

// The name users know an op by, to start every message: the schema's name with
// "activation" replaced by the activation ("linear_relu", "sigmoid_backward", ...). It is
// written out only when a check fails, so checks cost nothing on the happy path.
struct OpName {
  const char* prefix;  // "linear_", "bias_" or ""
  c10::string_view activation;
  const char* suffix;  // "_backward", "_" or ""
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

inline void check_negative_slope(const OpName& op, double negative_slope) {
  TORCH_CHECK_VALUE(
      std::isfinite(negative_slope), op, ": negative_slope must be a finite number, got ",
      negative_slope);
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

inline void check_linear_arguments(
    const OpName& op, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double negative_slope) {
  check_negative_slope(op, negative_slope);
  check_floating_dtype(op, "input", input);
  check_same_dtype_and_device(op, "weight", weight, "input", input);
  if (bias.has_value()) check_same_dtype_and_device(op, "bias", *bias, "input", input);

  TORCH_CHECK(
      input.dim() >= 1, op,
      ": input must have shape (*, in_features) with at least 1 dimension, got a 0-D tensor");
  TORCH_CHECK(
      weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
      weight.sizes());
  TORCH_CHECK(
      weight.size(1) == input.size(-1), op, ": weight has ", weight.size(1),
      " columns but input has ", input.size(-1), " features (input shape ", input.sizes(),
      ", weight shape ", weight.sizes(), ")");
  if (bias.has_value()) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
        weight.size(0), "] (out_features), got shape ", bias->sizes());
  }
}

inline void check_activation_arguments(const OpName& op, const at::Tensor& input,
                                       double negative_slope) {
  check_negative_slope(op, negative_slope);
  check_floating_dtype(op, "input", input);
}

// For the backward ops: the incoming gradient and the saved tensor match element for element.
inline void check_backward_arguments(
    const OpName& op, const at::Tensor& grad_output, const at::Tensor& saved,
    double negative_slope) {
  check_negative_slope(op, negative_slope);
  check_floating_dtype(op, "grad_output", grad_output);
  check_same_dtype_and_device(op, "saved", saved, "grad_output", grad_output);
  TORCH_CHECK(
      grad_output.sizes() == saved.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
      " but saved has shape ", saved.sizes());
}

// The shape of a linear layer's output (or of its gradient): input's leading dimensions,
// then out_features.
inline at::DimVector linear_output_sizes(const at::Tensor& input, const at::Tensor& weight) {
  at::DimVector sizes(input.sizes());
  sizes.back() = weight.size(0);
  return sizes;
}

inline void check_bias_backward_arguments(
    const OpName& op, const at::Tensor& grad_output, const at::Tensor& saved,
    double negative_slope) {
  check_backward_arguments(op, grad_output, saved, negative_slope);
  TORCH_CHECK(saved.dim() >= 1, op, ": saved must have shape (*, out_features), got a 0-D tensor");
}

inline void check_linear_backward_arguments(
    const OpName& op, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& saved, double negative_slope) {
  check_backward_arguments(op, grad_output, saved, negative_slope);
  check_linear_arguments(op, input, weight, std::nullopt, negative_slope);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(linear_output_sizes(input, weight)), op,
              ": saved must have shape ", at::IntArrayRef(linear_output_sizes(input, weight)),
              " (input's leading dimensions, then out_features), got ", saved.sizes());
}

// Rows of a (*, features) tensor seen as a matrix; works for zero sizes too.
inline int64_t leading_rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// The arguments of the whole-network ops: each layer's weight takes the features of the one
// before; biases lists one per layer, or none for a network without biases.
inline void check_mlp_arguments(const at::Tensor& input, at::TensorList weights,
                                at::TensorList biases, c10::string_view activation,
                                double negative_slope, int64_t checkpoint_every,
                                std::optional<c10::string_view> output_activation) {
  const OpName op{"mlp", "", ""};
  parse_activation(activation);
  if (output_activation.has_value()) parse_activation(*output_activation);
  check_negative_slope(op, negative_slope);
  check_floating_dtype(op, "input", input);
  TORCH_CHECK_VALUE(checkpoint_every >= 0, "mlp: checkpoint_every must be 0 (none) or a positive ",
                    "number of layers, got ", checkpoint_every);
  TORCH_CHECK(!weights.empty(), "mlp: weights must list at least the output layer, got none");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "mlp: got ", weights.size(),
              " weights but ", biases.size(), " biases; give one bias per layer, or none");
  TORCH_CHECK(input.dim() >= 1,
              "mlp: input must have shape (*, in_features) with at least 1 dimension, got a 0-D tensor");
  int64_t features = input.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const ListItem weight{"weights", l}, bias{"biases", l};
    check_same_dtype_and_device(op, weight, weights[l], "input", input);
    TORCH_CHECK(weights[l].dim() == 2, "mlp: ", weight,
                " must be 2-D (out_features, in_features), got shape ", weights[l].sizes());
    TORCH_CHECK(weights[l].size(1) == features, "mlp: ", weight, " has ", weights[l].size(1),
                " columns but ", l == 0 ? "input has " : "the layer before has ", features,
                " features");
    if (!biases.empty()) {
      check_same_dtype_and_device(op, bias, biases[l], "input", input);
      TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == weights[l].size(0), "mlp: ", bias,
                  " must have shape [", weights[l].size(0), "] (out_features of ", weight,
                  "), got shape ", biases[l].sizes());
    }
    features = weights[l].size(0);
  }
}

// Whether the whole-network forward stores h_made, the output of hidden layer made - 1, for
// the backward: every one, or with checkpoint_every = k > 0 every k-th below the last.
inline bool is_stored_output(size_t made, size_t hidden, int64_t checkpoint_every) {
  return checkpoint_every == 0 ||
         (made % static_cast<size_t>(checkpoint_every) == 0 && made < hidden);
}

// Whether a' cannot be read off the output: leaky_relu with a negative slope gives
// out >= 0 on both sides of f = 0, so its backward needs f itself (csrc/activation.h).
inline bool output_hides_sign(Activation activation, double negative_slope) {
  return activation == Activation::LeakyReLU && negative_slope < 0;
}

}  // namespace handgrad
