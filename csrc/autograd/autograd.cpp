// The Autograd kernel of each op, in C++: a torch::autograd::Function (the pattern of
// torchvision's csrc/ops/autograd).
//
// A forward runs the op below autograd and saves what the chapter's backward needs: h, Omega
// and out for a fused layer, never f (except where out hides its sign). A backward calls the
// backward ops, which have Autograd kernels of their own here, so double backward works:
// a plain backward (grad mode off) runs the whole of it as one fused op; a recorded one
// (create_graph=True) is built from differentiable pieces.
//
// The C++ Function API has no forward-mode AD and no torch.func support: handgrad.functional
// sends those calls to the Python Functions of handgrad.autograd instead.
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/tanh.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "function.h"
#include "tensor_formulas.h"

namespace handgrad {

// csrc/activation.h's mask, for the formulas on tensors (tensor_formulas.h): a bool tensor,
// which a product promotes.
at::Tensor less_than(const at::Tensor& a, double b) { return a < b; }

namespace {

using namespace handgrad::autograd;

// --- The fused layer: out = a[beta + Omega h] ---

class LinearActivationFunction : public torch::autograd::Function<LinearActivationFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input, const Variable& weight,
                          const std::optional<Variable>& bias, c10::string_view activation,
                          const ActivationParameters& params) {
    const Activation act = parse_activation(activation);
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = ops::linear_activation(input, weight, bias, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, act, params);
    // Without a bias the Function has no input edge for it, so needs_input_grad(2) is not
    // to be asked.
    ctx->saved_data["has_bias"] = defined(bias);
    // a' is read off out, or off f recomputed from the input, weight and bias (which is kept
    // only then). out is kept only where it is read, so that an in-place edit of it is
    // refused exactly where eager's would be (eager's SiLU keeps its input, ReLU its output).
    // autograd.py's _setup_linear keeps the same.
    const bool reads_f = derivative_needs_preactivation(act, params);
    ctx->save_for_backward({input, weight, defined(bias) && reads_f ? *bias : Variable(), reads_f ? Variable() : out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return no_gradients(5);
    const auto saved_vars = ctx->get_saved_variables();
    const Variable &input = saved_vars[0], &weight = saved_vars[1], &bias = saved_vars[2],
                   &out = saved_vars[3];
    const auto [act, activation, params] = saved_activation(ctx);
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const Variable& grad_output = grad_outputs[0];

    // a' is read off out, or off f recomputed where it must be: with its history where a
    // recorded backward differentiates a' in turn (SiLU, GELU), else below autograd.
    Variable out_or_f = out;
    if (derivative_needs_preactivation(act, params)) {
      std::optional<c10::NoGradGuard> no_grad;
      if (!has_second_derivative(act)) no_grad.emplace();
      out_or_f = ops::preactivation(input, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
    }
    Variable grad_input, grad_weight, grad_bias;
    if (!c10::GradMode::is_enabled()) {
      // A plain backward: the whole of it in one fused op.
      std::tie(grad_input, grad_weight, grad_bias) = ops::linear_activation_backward(
          grad_output, input, weight, out_or_f, activation, params,
          {need_input, need_weight, need_bias});
    } else {
      // create_graph: differentiable pieces, each with its own autograd.
      Variable grad_pre;
      if (need_bias) {
        std::tie(grad_pre, grad_bias) =
            ops::bias_activation_backward(grad_output, out_or_f, activation, params);
      } else {
        grad_pre = ops::activation_backward(grad_output, out_or_f, activation, params);
      }
      if (need_input) grad_input = grad_pre.matmul(weight);  // dl/dh = Omega^T dl/df (7.6)
      if (need_weight) grad_weight = as_matrix(grad_pre).t().mm(as_matrix(input));  // (7.9)
    }
    return {grad_input, grad_weight, grad_bias, Variable(), Variable()};
  }
};

at::Tensor linear_activation_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const at::Tensor& bias_or_undefined = defined(bias) ? *bias : at::Tensor();
  if (!needs_function({&input, &weight, &bias_or_undefined})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::linear_activation(input, weight, bias, activation, params);
  }
  return LinearActivationFunction::apply(input, weight, bias, activation, params);
}

// --- The standalone activations: out = a[input], and in place ---

class ActivationFunction : public torch::autograd::Function<ActivationFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input,
                          c10::string_view activation, const ActivationParameters& params) {
    const Activation act = parse_activation(activation);
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = ops::activation(input, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, act, params);
    ctx->save_for_backward({derivative_needs_preactivation(act, params) ? input : out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return no_gradients(3);
    const SavedActivation a = saved_activation(ctx);
    const Variable grad_input = ops::activation_backward(
        grad_outputs[0], ctx->get_saved_variables()[0], a.name, a.params);
    return {grad_input, Variable(), Variable()};
  }
};

at::Tensor activation_autograd(const at::Tensor& input, c10::string_view activation,
                               double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::activation(input, activation, params);
  }
  return ActivationFunction::apply(input, activation, params);
}

class InplaceActivationFunction : public torch::autograd::Function<InplaceActivationFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input,
                          c10::string_view activation, const ActivationParameters& params) {
    const Activation act = parse_activation(activation);
    at::Tensor input_copy;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (derivative_needs_preactivation(act, params) && has_second_derivative(act)) {
        input_copy = input.clone();
      }
      ops::activation_(input, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, act, params);
    ctx->mark_dirty({input});  // apply() bumps its version and rebases its history
    // The output, which a' is read off; for SiLU and GELU, a copy of the input, as eager keeps.
    ctx->save_for_backward({input_copy.defined() ? input_copy : input});
    return input;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return no_gradients(3);
    const SavedActivation a = saved_activation(ctx);
    // As eager's leaky_relu_: the input is gone, and the output cannot tell the sign of f.
    TORCH_CHECK(
        !(a.activation == Activation::LeakyReLU && derivative_needs_preactivation(a.activation, a.params)),
        "leaky_relu_: the backward of the in-place leaky_relu with a negative slope (",
        a.params.negative_slope, ") is not supported, because the output no longer tells the sign "
        "of the input; use the out-of-place leaky_relu (inplace=False)");
    const Variable grad_input = ops::activation_backward(
        grad_outputs[0], ctx->get_saved_variables()[0], a.name, a.params);
    return {grad_input, Variable(), Variable()};
  }
};

void activation_inplace_autograd(const at::Tensor& input, c10::string_view activation,
                                 double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&input})) {
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      ops::activation_(input, activation, params);
    }
    input.unsafeGetTensorImpl()->bump_version();  // what ADInplaceOrView would have done
    return;
  }
  InplaceActivationFunction::apply(input, activation, params);
}

// --- The backward pieces, differentiable for double backward ---

// Gradients of grad_pre = grad_output * a'(out_or_f) with respect to grad_output and out_or_f.
variable_list grads_of_activation_backward(AutogradContext* ctx, const Variable& grad_grad_pre) {
  if (!grad_grad_pre.defined()) return no_gradients(4);
  const auto saved_vars = ctx->get_saved_variables();
  const Variable &grad_output = saved_vars[0], &out_or_f = saved_vars[1];
  const SavedActivation a = saved_activation(ctx);
  Variable grad_grad_output, grad_out_or_f;
  if (ctx->needs_input_grad(0)) {
    grad_grad_output = ops::activation_backward(grad_grad_pre, out_or_f, a.name, a.params);
  }
  if (ctx->needs_input_grad(1) && has_second_derivative(a.activation)) {
    // ReLU and LeakyReLU have a'' = 0 almost everywhere: nothing flows back through out_or_f.
    grad_out_or_f = grad_grad_pre.mul(grad_output).mul(derivative_of_derivative(a.activation, out_or_f, a.params));
  }
  return {grad_grad_output, grad_out_or_f, Variable(), Variable()};
}

class ActivationBackwardFunction : public torch::autograd::Function<ActivationBackwardFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& grad_output, const Variable& out_or_f,
                          c10::string_view activation, const ActivationParameters& params) {
    at::Tensor grad_pre;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grad_pre = ops::activation_backward(grad_output, out_or_f, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, parse_activation(activation), params);
    ctx->save_for_backward({grad_output, out_or_f});
    return grad_pre;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return grads_of_activation_backward(ctx, grad_outputs[0]);
  }
};

at::Tensor activation_backward_autograd(const at::Tensor& grad_output, const at::Tensor& out_or_f,
                                        c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&grad_output, &out_or_f})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::activation_backward(grad_output, out_or_f, activation, params);
  }
  return ActivationBackwardFunction::apply(grad_output, out_or_f, activation, params);
}

class BiasActivationBackwardFunction
    : public torch::autograd::Function<BiasActivationBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad_output,
                               const Variable& out_or_f, c10::string_view activation,
                               const ActivationParameters& params) {
    at::Tensor grad_pre, grad_bias;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_pre, grad_bias) =
          ops::bias_activation_backward(grad_output, out_or_f, activation, params);
    }
    ctx->set_materialize_grads(false);
    save_activation(ctx, parse_activation(activation), params);
    ctx->save_for_backward({grad_output, out_or_f});
    return {grad_pre, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // grad_bias sums grad_pre over the rows, so its gradient reaches every row.
    const Variable &grad_grad_pre = grad_outputs[0], &grad_grad_bias = grad_outputs[1];
    if (!grad_grad_bias.defined()) return grads_of_activation_backward(ctx, grad_grad_pre);
    const Variable out_or_f = ctx->get_saved_variables()[1];  // a copy: the list is a temporary
    return grads_of_activation_backward(
        ctx, grad_grad_pre.defined() ? grad_grad_pre.add(grad_grad_bias)
                                     : grad_grad_bias.expand(out_or_f.sizes()));
  }
};

std::tuple<at::Tensor, at::Tensor> bias_activation_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& out_or_f, c10::string_view activation,
    double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  if (!needs_function({&grad_output, &out_or_f})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::bias_activation_backward(grad_output, out_or_f, activation, params);
  }
  const variable_list grads =
      BiasActivationBackwardFunction::apply(grad_output, out_or_f, activation, params);
  return {grads[0], grads[1]};
}

// The fused backward op is used only where the backward is not itself recorded, so it has
// no derivative: a call that autograd would record is refused at once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_activation_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& out_or_f, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  TORCH_CHECK(
      !needs_function({&grad_output, &input, &weight, &out_or_f}),
      "linear_", activation, "_backward: this fused backward is not differentiable and not for "
      "forward-mode AD; call it under torch.no_grad(), or differentiate linear_activation's "
      "backward with create_graph=True, which uses the differentiable backward ops");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return ops::linear_activation_backward(grad_output, input, weight, out_or_f, activation,
                                         params, output_mask);
}

// --- The whole network (csrc/mlp.cpp) ---

class MLPFunction : public torch::autograd::Function<MLPFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& input, at::TensorList weights,
                          at::TensorList biases, c10::string_view activation,
                          const ActivationParameters& params, int64_t checkpoint_every,
                          std::optional<c10::string_view> output_activation) {
    at::Tensor out;
    std::vector<at::Tensor> hidden_outputs;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, hidden_outputs) = ops::mlp_forward(input, weights, biases, activation, params,
                                              checkpoint_every, output_activation);
    }
    ctx->set_materialize_grads(false);
    const std::optional<Activation> output = output_activation.has_value()
        ? std::optional<Activation>(parse_activation(*output_activation)) : std::nullopt;
    save_network(ctx, {parse_activation(activation), output, params, checkpoint_every},
                 weights.size(), !biases.empty());
    // h, the parameters (a recomputation needs them) and the stored hidden outputs.
    variable_list to_save{input};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), biases.begin(), biases.end());
    to_save.insert(to_save.end(), hidden_outputs.begin(), hidden_outputs.end());
    ctx->save_for_backward(std::move(to_save));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto layers = static_cast<size_t>(ctx->saved_data["layers"].toInt());
    const size_t bias_count = ctx->saved_data["has_bias"].toBool() ? layers : 0;
    const size_t argument_count = 1 + layers + bias_count + 4;  // the lists flattened
    if (!grad_outputs[0].defined()) return no_gradients(argument_count);
    const Network network = saved_network(ctx);
    const variable_list saved_vars = ctx->get_saved_variables();
    const Variable& input = saved_vars[0];
    const at::TensorList weights(saved_vars.data() + 1, layers);
    const at::TensorList biases(saved_vars.data() + 1 + layers, bias_count);
    const size_t first_hidden = 1 + layers + bias_count;
    const at::TensorList hidden(saved_vars.data() + first_hidden, saved_vars.size() - first_hidden);
    const bool need_input = ctx->needs_input_grad(0);
    bool need_parameters = false;  // a gradient penalty's autograd.grad(out, input) asks for none
    for (size_t i = 1; i < 1 + layers + bias_count; ++i) {
      need_parameters = need_parameters || ctx->needs_input_grad(i);
    }

    variable_list grads;  // one per forward argument, the lists flattened
    if (!c10::GradMode::is_enabled()) {
      // Below autograd: mlp_backward has no autograd kernel, and its boxed fallback would
      // box every list argument for nothing (a tiny network's step measurably).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_input, grad_weights, grad_biases] = ops::mlp_backward(
          grad_outputs[0], input, weights, biases, hidden, activation_name(network.hidden),
          network.params, network.checkpoint_every, need_input, network.output_name(),
          need_parameters);
      grads.push_back(grad_input);
      grads.insert(grads.end(), grad_weights.begin(), grad_weights.end());  // none if not needed
      grads.insert(grads.end(), grad_biases.begin(), grad_biases.end());
    } else {
      // create_graph: the same fused backward, recorded as a Function whose own backward
      // is the network's double backward (csrc/autograd/mlp_second_order.cpp).
      grads = mlp_backward_recorded(grad_outputs[0], input, weights, biases, hidden, network,
                                    need_input, need_parameters);
    }
    grads.resize(argument_count);  // undefined for activation, ..., output_activation
    return grads;
  }
};

at::Tensor mlp_autograd(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        c10::string_view activation, double negative_slope,
                        int64_t checkpoint_every, std::optional<c10::string_view> output_activation, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  bool record = needs_function({&input});
  for (const auto& t : weights) record = record || needs_function({&t});
  for (const auto& t : biases) record = record || needs_function({&t});
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::mlp(input, weights, biases, activation, params, checkpoint_every,
                    output_activation);
  }
  return MLPFunction::apply(input, weights, biases, activation, params, checkpoint_every,
                            output_activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("linear_activation", &linear_activation_autograd);
  m.impl("activation", &activation_autograd);
  m.impl("activation_", &activation_inplace_autograd);
  m.impl("activation_backward", &activation_backward_autograd);
  m.impl("bias_activation_backward", &bias_activation_backward_autograd);
  m.impl("linear_activation_backward", &linear_activation_backward_autograd);
  m.impl("mlp", &mlp_autograd);
}

}  // namespace handgrad
