// The Autograd kernel of the whole network (mlp), and its backward as a Function of its own
// for create_graph=True: gradient penalties (WGAN-GP), eikonal losses (neural SDFs) and
// PINNs differentiate the gradient. What every Autograd kernel shares is in function.h.
//
// The network's node (MLPBackward0) keeps the input, the parameters and the stored hidden
// outputs of the op run below autograd; its plain backward is the fused backward op
// (mlp_backward).
// Under create_graph that same op is recorded as MLPBackwardFunction, whose backward,
// the double backward, is the derivative of the chapter's backward pass (section 7.4) with
// respect to everything that pass reads, written out (docs/second_order.md): an upward pass
// for the cotangents of the backward's own values, then an ordinary backward of what they
// leave on f and h through the forward network. No layer is recomputed through the per-layer
// ops and no autograd call is made; ReLU's and LeakyReLU's a'' = 0 makes the second pass
// vanish for a cotangent on the input gradient alone (the gradient penalty).
//
// The double backward is the op mlp_double_backward: on the CPU the fused engine's kernel,
// a pass over blocks of rows in cache (csrc/cpu/kernels/fused_second_order.cpp); elsewhere,
// and on the CPU where the network's products are BLAS's, the formula below as tensor ops.
// A third order (a PINN's u_xx, then its loss's backward) differentiates the formula itself,
// each piece a differentiable op: the hidden outputs are then recomputed with their
// history, since the stored ones have none. Once a network has been differentiated so, its
// later forwards whose input needs a gradient record a chain of layers instead, whose graph
// the third order reuses (ThirdOrderNetworks).
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "../cpu/kernels.h"
#include "../ops.h"
#include "../shapes.h"
#include "function.h"
#include "mlp.h"
#include "tensor_formulas.h"

namespace handgrad::autograd {
namespace {

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

// A network's configuration and its count of layers in MLPBackwardFunction's context, and
// read back.
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

// a + b, where either may be undefined (a zero that was never made).
at::Tensor sum_of_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// The network's layers as the double backward reads them. Layer l (0-based) computes
// f_l = h_l Omega_l^T + beta_l from its input h_l and gives h_{l+1} = a_l[f_l]; the output
// layer's a_l is the output activation, or none. All tensors are (rows, features) matrices.
struct Layers {
  at::TensorList weights, biases;
  const Network& network;
  std::vector<at::Tensor> inputs;   // h_0 (the network's input) ... h_{L-1}
  std::vector<at::Tensor> out_or_f;  // what a_l' is read off: h_{l+1}, or f_l where it hides the sign

  size_t count() const { return weights.size(); }
  std::optional<Activation> activation(size_t l) const {
    return l + 1 < count() ? std::optional<Activation>(network.hidden) : network.output;
  }
  // grad * a_l'[f_l] (7.7, 7.10): dl/df_l from dl/dh_{l+1}.
  at::Tensor times_derivative(const at::Tensor& grad, size_t l) const {
    const auto a = activation(l);
    if (!a.has_value()) return grad;
    return ops::activation_backward(grad, out_or_f[l], activation_name(*a), network.params);
  }
};

// Every layer's input and out_or_f. The stored hidden outputs serve where they are all
// stored and have no history to keep; otherwise (checkpointing, or a third order under
// grad mode, where they must carry their dependence on the input and the parameters) the
// hidden layers are run again through the per-layer op.
Layers layers_of(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                 at::TensorList hidden_outputs, const Network& network) {
  Layers layers{weights, biases, network, {as_matrix(input)}, {}};
  const size_t count = weights.size();
  if (network.checkpoint_every == 0 && !c10::GradMode::is_enabled()) {
    layers.inputs.insert(layers.inputs.end(), hidden_outputs.begin(), hidden_outputs.end());
  } else {
    ops::run_hidden(layers.inputs[0], weights, biases, 0, count - 1, activation_name(network.hidden),
                    network.params, [](size_t) { return true; }, layers.inputs);
  }
  layers.out_or_f.resize(count);
  for (size_t l = 0; l < count; ++l) {
    const auto a = layers.activation(l);
    if (!a.has_value()) continue;
    const bool stored_output = l + 1 < count && !derivative_needs_preactivation(*a, network.params);
    layers.out_or_f[l] = stored_output
        ? layers.inputs[l + 1]
        : ops::recompute_out_or_f(layers.inputs[l], weights[l], ops::bias_of(biases, l), *a,
                                 network.params);
  }
  return layers;
}

using cpu::SecondOrderGradients;

// The derivative of the backward pass (grad_input, grad_weights, grad_biases) =
// B(grad_output, input, weights, biases), given the cotangents of its results: v of
// grad_input, V_l of grad_weights[l], u_l of grad_biases[l] (each undefined where none).
// Notation: e_l = dl/df_l, g_l = dl/dh_l of the first backward; a bar is a cotangent.
SecondOrderGradients double_backward(const at::Tensor& grad_output, const Layers& layers,
                                     const at::Tensor& v, at::TensorList V, at::TensorList u,
                                     bool need_input, bool need_parameters) {
  const size_t count = layers.count();
  const at::TensorList weights = layers.weights;
  const int64_t rows = layers.inputs[0].size(0);

  // The first backward again, for its e_l: g_L = grad_output, e_l = g_{l+1} * a_l',
  // g_l = e_l Omega_l (7.6).
  std::vector<at::Tensor> e(count), g(count);  // g[l]: dl/dh_{l+1}, layer l's output's
  g[count - 1] = grad_output.reshape({rows, weights[count - 1].size(0)});
  for (size_t l = count; l-- > 0;) {
    e[l] = layers.times_derivative(g[l], l);
    if (l > 0) g[l - 1] = e[l].mm(weights[l]);
  }

  // Upward, the reverse of the backward: g_bar is the cotangent of g_l (v for g_0).
  SecondOrderGradients out;
  out.weights.resize(count);
  out.biases.resize(layers.biases.empty() ? 0 : count);
  std::vector<at::Tensor> f_bar(count), h_bar(count);  // what is left on f_l and on h_l
  at::Tensor g_bar = v.defined() ? v.reshape({rows, weights[0].size(1)}) : at::Tensor();
  for (size_t l = 0; l < count; ++l) {
    at::Tensor e_bar;
    if (g_bar.defined()) {  // g_l = e_l Omega_l
      e_bar = g_bar.mm(weights[l].t());
      if (need_parameters) out.weights[l] = e[l].t().mm(g_bar);
    }
    if (V.size() > l && V[l].defined()) {  // grad_weights[l] = e_l^T h_l (7.9)
      e_bar = sum_of_defined(e_bar, layers.inputs[l].mm(V[l].t()));
      h_bar[l] = e[l].mm(V[l]);
    }
    if (u.size() > l && u[l].defined()) {  // grad_biases[l] = the sum of e_l over the rows
      e_bar = e_bar.defined() ? e_bar + u[l] : u[l].expand({rows, u[l].size(0)});
    }
    if (!e_bar.defined()) {
      g_bar = at::Tensor();
      continue;
    }
    // e_l = g_{l+1} * a_l'[f_l]: g_{l+1}'s cotangent, and f_l's where a_l' varies, g * a''[f]:
    // read off f (SiLU, GELU), or for sigmoid and tanh through a'' = d(a')/d(out) * a', so
    // that g * a'' = e * d(a')/d(out) (csrc/activation.h).
    const auto a = layers.activation(l);
    if (a.has_value() && has_second_derivative(*a)) {
      const bool off_f = derivative_needs_preactivation(*a, layers.network.params);
      f_bar[l] = e_bar.mul(off_f ? g[l] : e[l]).mul(derivative_of_derivative(*a, layers.out_or_f[l], layers.network.params));
    }
    g_bar = layers.times_derivative(e_bar, l);
  }
  if (g_bar.defined()) out.grad_output = g_bar.reshape(grad_output.sizes());

  // Downward: an ordinary backward of f_bar and h_bar through the forward network. h_cot
  // is the cotangent of the current layer's output, from the layers above.
  if (!need_input && !need_parameters) return out;
  at::Tensor h_cot;
  for (size_t l = count; l-- > 0;) {
    at::Tensor f_cot = f_bar[l];
    if (h_cot.defined()) f_cot = sum_of_defined(f_cot, layers.times_derivative(h_cot, l));
    if (!f_cot.defined()) {
      h_cot = h_bar[l];
      continue;
    }
    if (need_parameters) {
      out.weights[l] = sum_of_defined(out.weights[l], f_cot.t().mm(layers.inputs[l]));  // (7.9)
      if (!out.biases.empty()) out.biases[l] = f_cot.sum(0);
    }
    h_cot = (l > 0 || need_input) ? sum_of_defined(f_cot.mm(weights[l]), h_bar[l]) : at::Tensor();  // (7.6)
  }
  if (need_input && h_cot.defined()) out.input = h_cot;
  return out;
}

// The op's arguments as the formula reads them, and back.
std::vector<at::Tensor> defined_or_empty(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < list.size(); ++i) out.push_back(list.get(i).value_or(at::Tensor()));
  return out;
}

c10::List<std::optional<at::Tensor>> optional_list(at::TensorList tensors) {
  c10::List<std::optional<at::Tensor>> out;
  for (const auto& t : tensors) out.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
  return out;
}

// mlp_double_backward's results: each asked for, zero where nothing reached it.
ops::SecondOrderResults results_of(SecondOrderGradients found, const at::Tensor& grad_output,
                                   const at::Tensor& input, at::TensorList weights,
                                   at::TensorList biases, std::array<bool, 4> output_mask) {
  const auto asked = [](bool ask, at::Tensor t, const at::Tensor& like) {
    if (!ask) return at::Tensor();
    return t.defined() ? t : at::zeros_like(like);
  };
  ops::SecondOrderResults out;
  std::get<0>(out) = asked(output_mask[0], found.grad_output, grad_output);
  std::get<1>(out) = asked(output_mask[1], found.input.defined() ? found.input.reshape(input.sizes()) : at::Tensor(), input);
  for (size_t l = 0; l < weights.size() && output_mask[2]; ++l) {
    std::get<2>(out).push_back(asked(true, l < found.weights.size() ? found.weights[l] : at::Tensor(), weights[l]));
  }
  for (size_t l = 0; l < biases.size() && output_mask[3]; ++l) {
    std::get<3>(out).push_back(asked(true, l < found.biases.size() ? found.biases[l] : at::Tensor(), biases[l]));
  }
  return out;
}

// The formula as tensor ops, for checked arguments.
ops::SecondOrderResults formula(const at::Tensor& grad_output, const at::Tensor& input,
                                at::TensorList weights, at::TensorList biases,
                                at::TensorList hidden_outputs, const std::optional<at::Tensor>& v,
                                const c10::List<std::optional<at::Tensor>>& V,
                                const c10::List<std::optional<at::Tensor>>& u,
                                const cpu::NetworkActivations& acts, std::array<bool, 4> output_mask) {
  const Network network{acts.hidden, acts.output, acts.params, 0};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Layers layers = layers_of(input, weights, biases, hidden_outputs, network);
  SecondOrderGradients found =
      double_backward(grad_output, layers, v.value_or(at::Tensor()), defined_or_empty(V),
                      defined_or_empty(u), output_mask[1], output_mask[2] || output_mask[3]);
  return results_of(std::move(found), grad_output, input, weights, biases, output_mask);
}

// mlp_double_backward: the formula as tensor ops on any device (CompositeExplicitAutograd);
// on the CPU (kEngine) the fused engine's kernel, unless the formula on BLAS's products
// measured faster for this shape (second_order_blas_pays).
template <bool kEngine>
ops::SecondOrderResults mlp_double_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList hidden_outputs, const std::optional<at::Tensor>& grad_grad_input,
    const c10::List<std::optional<at::Tensor>>& grad_grad_weights,
    const c10::List<std::optional<at::Tensor>>& grad_grad_biases, c10::string_view activation,
    double negative_slope, std::optional<c10::string_view> output_activation,
    std::array<bool, 4> output_mask, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  check_mlp_double_backward(grad_output, input, weights, biases, hidden_outputs, grad_grad_input,
                            grad_grad_weights, grad_grad_biases, activation, params, output_activation);
  const auto acts = cpu::network_activations(activation, params, output_activation);
  if (!kEngine || cpu::kernels().second_order_blas_pays(leading_rows(input.sizes()), weights)) {
    return formula(grad_output, input, weights, biases, hidden_outputs, grad_grad_input, grad_grad_weights,
                   grad_grad_biases, acts, output_mask);
  }
  const std::vector<std::optional<at::Tensor>> V(grad_grad_weights.begin(), grad_grad_weights.end()),
      u(grad_grad_biases.begin(), grad_grad_biases.end());
  SecondOrderGradients found = cpu::kernels().fused_double_backward(
      grad_output, input, weights, biases, hidden_outputs, grad_grad_input, V, u, acts, output_mask);
  return results_of(std::move(found), grad_output, input, weights, biases, output_mask);
}

// The double backward through the op, below autograd; with checkpointing the hidden
// outputs it did not store are recomputed first.
SecondOrderGradients double_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                        at::TensorList weights, at::TensorList biases,
                                        at::TensorList hidden, const Network& network,
                                        const at::Tensor& v, at::TensorList V, at::TensorList u,
                                        std::array<bool, 4> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::vector<at::Tensor> every_hidden(hidden.begin(), hidden.end());
  if (network.checkpoint_every > 0) {
    every_hidden.clear();
    ops::run_hidden(as_matrix(input), weights, biases, 0, weights.size() - 1,
                    activation_name(network.hidden), network.params, [](size_t) { return true; },
                    every_hidden);
  }
  auto [grad_grad_output, grad_input, grad_weights, grad_biases] = ops::mlp_double_backward(
      grad_output, input, weights, biases, every_hidden,
      v.defined() ? std::optional<at::Tensor>(v) : std::nullopt, optional_list(V), optional_list(u),
      activation_name(network.hidden), network.params, network.output_name(), output_mask);
  return {grad_grad_output, grad_input, grad_weights, grad_biases};
}

// --- Networks differentiated to a third order ---
//
// A third order (a PINN's u_xx, then its loss's backward) differentiates the double
// backward's formula, which recomputes the forward and the first backward with their history:
// the network's own forward and first backward, fused, are then work done twice, and the
// whole step measured 1.2-1.6x torch.nn's (bench_second_order.py, DeepXDE and Burgers). A
// chain of layers (each its own node) keeps every piece's history instead, as torch.nn's
// graph does, and the third order reuses it. Which kind of step follows is unknown at the
// forward, so the first third order of a network is remembered by its shape (its widths,
// dtype, activations and biases) and later forwards of that network whose input needs a
// gradient, the PINN's collocation points, record the chain; a gradient penalty, which never
// differentiates the double backward, keeps the fused double backward.
struct NetworkShape {
  c10::ScalarType dtype;
  Activation hidden;
  int output;  // the output activation, or -1
  ActivationParameters params;
  bool has_bias;
  c10::SmallVector<int64_t, 8> widths;

  bool operator==(const NetworkShape& other) const {
    return dtype == other.dtype && hidden == other.hidden && output == other.output &&
           params.negative_slope == other.params.negative_slope && params.beta == other.params.beta &&
           params.threshold == other.params.threshold && has_bias == other.has_bias && widths == other.widths;
  }
};

NetworkShape shape_of(const at::Tensor& input, at::TensorList weights, bool has_bias, const Network& network) {
  NetworkShape shape{input.scalar_type(), network.hidden,
                     network.output.has_value() ? static_cast<int>(*network.output) : -1,
                     network.params, has_bias, {weights[0].size(1)}};
  for (const auto& w : weights) shape.widths.push_back(w.size(0));
  return shape;
}

// The shapes of the last kKept networks seen in a third order.
class ThirdOrderNetworks {
 public:
  // Whether the network is among them. The common case, none seen, takes no lock and builds
  // no shape: every recorded forward whose input needs a gradient asks.
  bool contains(const at::Tensor& input, at::TensorList weights, bool has_bias, const Network& network) {
    if (!any_.load(std::memory_order_relaxed)) return false;
    const NetworkShape shape = shape_of(input, weights, has_bias, network);
    std::lock_guard<std::mutex> lock(mutex_);
    return std::find(shapes_.begin(), shapes_.end(), shape) != shapes_.end();
  }
  void add(const at::Tensor& input, at::TensorList weights, bool has_bias, const Network& network) {
    NetworkShape shape = shape_of(input, weights, has_bias, network);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_ || std::find(shapes_.begin(), shapes_.end(), shape) != shapes_.end()) return;
    if (shapes_.size() == kKept) shapes_.erase(shapes_.begin());  // the oldest
    shapes_.push_back(std::move(shape));
    any_.store(true, std::memory_order_relaxed);
  }
  bool set_enabled(bool enabled) {
    std::lock_guard<std::mutex> lock(mutex_);
    shapes_.clear();
    any_.store(false, std::memory_order_relaxed);
    return std::exchange(enabled_, enabled);
  }

 private:
  static constexpr size_t kKept = 32;
  std::mutex mutex_;
  std::vector<NetworkShape> shapes_;
  std::atomic<bool> any_{false};
  bool enabled_ = true;
};

ThirdOrderNetworks& third_order_networks() {
  static ThirdOrderNetworks networks;
  return networks;
}

class MLPBackwardFunction : public torch::autograd::Function<MLPBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad_output,
                               const Variable& input, at::TensorList weights,
                               at::TensorList biases, at::TensorList hidden_outputs,
                               const Network& network, bool input_requires_grad,
                               bool parameters_require_grad) {
    at::Tensor grad_input;
    std::vector<at::Tensor> grad_weights, grad_biases;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_input, grad_weights, grad_biases) = ops::mlp_backward(
          grad_output, input, weights, biases, hidden_outputs, activation_name(network.hidden),
          network.params, network.checkpoint_every, input_requires_grad,
          network.output_name(), parameters_require_grad);
    }
    ctx->set_materialize_grads(false);
    save_network(ctx, network, weights.size(), !biases.empty());
    variable_list to_save{grad_output, input};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), biases.begin(), biases.end());
    to_save.insert(to_save.end(), hidden_outputs.begin(), hidden_outputs.end());
    ctx->save_for_backward(std::move(to_save));

    // The gradients made, in order (a Function's outputs must be defined): grad_input if
    // asked, then the parameters' if asked.
    ctx->saved_data["input_grad"] = input_requires_grad;
    ctx->saved_data["parameter_grads"] = parameters_require_grad;
    variable_list grads;
    if (input_requires_grad) grads.push_back(grad_input);
    grads.insert(grads.end(), grad_weights.begin(), grad_weights.end());
    grads.insert(grads.end(), grad_biases.begin(), grad_biases.end());
    return grads;
  }

  static variable_list backward(AutogradContext* ctx, variable_list cotangents) {
    const auto count = static_cast<size_t>(ctx->saved_data["layers"].toInt());
    const size_t bias_count = ctx->saved_data["has_bias"].toBool() ? count : 0;
    const variable_list saved = ctx->get_saved_variables();
    const size_t hidden_count = saved.size() - 2 - count - bias_count;
    const size_t argument_count = 2 + count + bias_count + hidden_count + 3;
    bool any = false;
    for (const auto& c : cotangents) any = any || c.defined();
    if (!any) return no_gradients(argument_count);

    const Network network = saved_network(ctx);
    const Variable &grad_output = saved[0], &input = saved[1];
    const at::TensorList weights(saved.data() + 2, count);
    const at::TensorList biases(saved.data() + 2 + count, bias_count);
    const at::TensorList hidden(saved.data() + 2 + count + bias_count, hidden_count);
    // The cotangents of grad_input, grad_weights and grad_biases, where they were made.
    const bool made_input = ctx->saved_data["input_grad"].toBool();
    const bool made_parameters = ctx->saved_data["parameter_grads"].toBool();
    const at::Tensor v = made_input ? cotangents[0] : at::Tensor();
    const Variable* parameter_cotangents = cotangents.data() + (made_input ? 1 : 0);
    const at::TensorList V(parameter_cotangents, made_parameters ? count : 0);
    const at::TensorList u(parameter_cotangents + count, made_parameters ? bias_count : 0);

    bool need_parameters = false;
    for (size_t i = 2; i < 2 + count + bias_count; ++i) {
      need_parameters = need_parameters || ctx->needs_input_grad(i);
    }
    SecondOrderGradients found;
    if (c10::GradMode::is_enabled()) {  // a third order: the formula, differentiable
      if (input.device().is_cpu()) {  // where a chain of layers is recorded
        third_order_networks().add(input, weights, bias_count > 0, network);
      }
      const Layers layers = layers_of(input, weights, biases, hidden, network);
      found = double_backward(grad_output, layers, v, V, u, ctx->needs_input_grad(1), need_parameters);
    } else {
      found = double_backward_op(grad_output, input, weights, biases, hidden, network, v, V, u,
                                 {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                  need_parameters, need_parameters});
    }

    // One gradient per argument. Where one is asked for and nothing reached it, a zero
    // tensor, as eager's double backward gives (ReLU's biases under a gradient penalty: the
    // backward reads a'[f], whose derivative is zero); but none for the bias of a linear
    // output layer, which the backward never reads, as in eager.
    variable_list grads(argument_count);
    const auto give = [&](size_t i, at::Tensor grad, const at::Tensor& like) {
      if (!ctx->needs_input_grad(i)) return;
      grads[i] = grad.defined() ? std::move(grad) : at::zeros_like(like);
    };
    give(0, found.grad_output, grad_output);
    give(1, found.input.defined() ? found.input.reshape(input.sizes()) : at::Tensor(), input);
    for (size_t l = 0; l < found.weights.size(); ++l) give(2 + l, found.weights[l], weights[l]);
    for (size_t l = 0; l < found.biases.size() && l < bias_count; ++l) {
      if (l + 1 < count || network.output.has_value()) {  // the formula never reaches the other
        give(2 + count + l, found.biases[l], biases[l]);
      }
    }
    return grads;
  }
};

// The MLP's backward under create_graph=True: the fused backward, recorded as one Function
// whose own backward is the network's double backward. Returns one gradient per MLP
// argument, the lists flattened: input, weights, biases; undefined where not required.
variable_list mlp_backward_recorded(const Variable& grad_output, const Variable& input,
                                    at::TensorList weights, at::TensorList biases,
                                    at::TensorList hidden_outputs, const Network& network,
                                    bool input_requires_grad, bool parameters_require_grad) {
  variable_list grads =
      MLPBackwardFunction::apply(grad_output, input, weights, biases, hidden_outputs, network,
                                 input_requires_grad, parameters_require_grad);
  variable_list all(1 + weights.size() + biases.size());  // one per MLP argument
  size_t next = 0;
  if (input_requires_grad) all[0] = grads[next++];
  if (parameters_require_grad) std::copy(grads.begin() + next, grads.end(), all.begin() + 1);
  return all;
}


// --- The network's own node: forward and first backward ---

// The network's node in the graph, written out as PyTorch's generated nodes are (as
// linear_activation.cpp's layer node): without a Function's context, its string-keyed map
// and its generic wrapping, the engine's work around a small network shrinks (RESULTS.md).
// It keeps h, the parameters (a recomputation needs them) and the stored hidden outputs.
struct MLPBackward0 : public torch::autograd::Node {
  torch::autograd::SavedVariable input_;
  std::vector<torch::autograd::SavedVariable> weights_, biases_, hidden_;
  Network network_{};

  std::string name() const override { return "MLPBackward0"; }

  // Locked as PyTorch's generated nodes lock theirs: a retained graph's backward may run on
  // several threads at once, and release_variables beside it.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    for (auto* list : {&weights_, &biases_, &hidden_}) {
      for (auto& saved : *list) saved.reset_data();
    }
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t outputs = num_outputs();  // input, weights, biases
    if (!grad_outputs[0].defined()) return no_gradients(outputs);
    const Variable input = input_.unpack();
    const auto unpack = [](const std::vector<torch::autograd::SavedVariable>& list) {
      std::vector<at::Tensor> tensors;
      tensors.reserve(list.size());
      for (const auto& saved : list) tensors.push_back(saved.unpack());
      return tensors;
    };
    const std::vector<at::Tensor> weights = unpack(weights_), biases = unpack(biases_), hidden = unpack(hidden_);
    const bool need_input = task_should_compute_output(0);
    bool need_parameters = false;  // a gradient penalty's autograd.grad(out, input) asks for none
    for (size_t i = 1; i < outputs; ++i) need_parameters = need_parameters || task_should_compute_output(i);

    variable_list grads;  // one per forward tensor, the lists flattened
    if (!c10::GradMode::is_enabled()) {
      // Below autograd: mlp_backward has no autograd kernel, and its boxed fallback would
      // box every list argument for nothing (a tiny network's step measurably).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_input, grad_weights, grad_biases] = ops::mlp_backward(
          grad_outputs[0], input, weights, biases, hidden, activation_name(network_.hidden),
          network_.params, network_.checkpoint_every, need_input, network_.output_name(),
          need_parameters);
      grads.push_back(grad_input);
      grads.insert(grads.end(), grad_weights.begin(), grad_weights.end());  // none if not needed
      grads.insert(grads.end(), grad_biases.begin(), grad_biases.end());
    } else {
      // create_graph: the same fused backward, recorded as a Function whose own backward
      // is the network's double backward (above).
      grads = mlp_backward_recorded(grad_outputs[0], input, weights, biases, hidden, network_,
                                    need_input, need_parameters);
    }
    grads.resize(outputs);
    return grads;
  }

  // Compiled autograd: the node's state, and its backward run on the saved variables it is
  // handed (mlp_backward has a fake kernel, so the backward is traced as that op).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, false);
    args.collect(weights_, false);
    args.collect(biases_, false);
    args.collect(hidden_, false);
    args.collect(static_cast<int8_t>(network_.hidden));
    args.collect(network_.output.has_value() ? static_cast<int8_t>(*network_.output) : int8_t{-1});
    args.collect(network_.params.negative_slope);
    args.collect(network_.params.beta);
    args.collect(network_.params.threshold);
    args.collect(network_.checkpoint_every);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_with_swapped(*this, grads, saved, input_, weights_, biases_, hidden_);
  }
};

// Whether a CPU network is recorded as a chain of fused layers: where each keeps its f
// (cpu::Kernels::runs_as_layers), or where a third order of it has been seen and its input
// needs a gradient (ThirdOrderNetworks). Plain CPU tensors of concrete sizes only: a tensor
// subclass (DTensor, and the fake tensors that torch.compile traces with) keeps the one op.
bool runs_as_layers(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                    const Network& network, c10::string_view activation,
                    std::optional<c10::string_view> output_activation) {
  if (!input.device().is_cpu() || network.checkpoint_every > 0 || weights.size() < 2) return false;
  const bool third_order =
      input.requires_grad() && third_order_networks().contains(input, weights, !biases.empty(), network);
  if (!third_order && !derivative_needs_preactivation(network.hidden, network.params)) return false;
  const auto plain = [](const at::Tensor& t) {
    return !t.key_set().has(c10::DispatchKey::Python) && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  };
  if (!plain(input) || !std::all_of(weights.begin(), weights.end(), plain)) return false;
  check_mlp(input, weights, biases, activation, network.params, network.checkpoint_every, output_activation);
  return third_order ||
         cpu::kernels().runs_as_layers(leading_rows(input.sizes()), weights,
                                       cpu::network_activations(activation, network.params, output_activation),
                                       network.checkpoint_every);
}

at::Tensor mlp_autograd(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        c10::string_view activation, double negative_slope,
                        int64_t checkpoint_every, std::optional<c10::string_view> output_activation, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  bool record = needs_function({&input}), tangent = has_tangent(input);
  for (const at::TensorList list : {weights, biases}) {
    for (const auto& t : list) {
      record = record || needs_function({&t});
      tangent = tangent || has_tangent(t);
    }
  }
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::mlp(input, weights, biases, activation, params, checkpoint_every,
                    output_activation);
  }
  refuse_tangent(tangent, "mlp", "handgrad.functional.mlp and handgrad.nn.MLP");
  const Network network{parse_activation(activation),
                        output_activation.has_value()
                            ? std::optional<Activation>(parse_activation(*output_activation)) : std::nullopt,
                        params, checkpoint_every};
  if (runs_as_layers(input, weights, biases, network, activation, output_activation)) {
    // Each layer records its own node (linear_activation.cpp), which keeps h and f.
    at::Tensor h = input;
    for (size_t l = 0; l + 1 < weights.size(); ++l) {
      h = ops::linear_activation(h, weights[l], ops::bias_of(biases, l), activation, params);
    }
    const size_t l = weights.size() - 1;
    if (output_activation.has_value()) {
      return ops::linear_activation(h, weights[l], ops::bias_of(biases, l), *output_activation, params);
    }
    return at::linear(h, weights[l], ops::bias_of(biases, l));
  }
  auto node = make_node<MLPBackward0>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weights, biases));
  node->network_ = network;
  at::Tensor out;
  std::vector<at::Tensor> hidden_outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, hidden_outputs) = ops::mlp_forward(input, weights, biases, activation, params,
                                                     checkpoint_every, output_activation);
  }
  torch::autograd::set_history(out, node);
  node->input_ = torch::autograd::SavedVariable(input, false);
  for (const auto& w : weights) node->weights_.emplace_back(w, false);
  for (const auto& b : biases) node->biases_.emplace_back(b, false);
  for (const auto& h : hidden_outputs) node->hidden_.emplace_back(h, false);
  return out;
}

}  // namespace

bool set_layers_after_third_order(bool enabled) { return third_order_networks().set_enabled(enabled); }

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("mlp_double_backward", &mlp_double_backward_kernel<true>);
}

TORCH_LIBRARY_IMPL(handgrad, CompositeExplicitAutograd, m) {
  m.impl("mlp_double_backward", &mlp_double_backward_kernel<false>);
}

TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("mlp", &mlp_autograd);
}

}  // namespace handgrad::autograd
