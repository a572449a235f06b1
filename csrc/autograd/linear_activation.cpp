// The Autograd kernels of the fused layer, out = a[beta + Omega h], and of its fused backward
// op. The layer records a node of its own (LinearActivationBackward0, written as PyTorch's
// generated nodes are), as the whole network does (mlp.cpp); the standalone activations use
// torch::autograd::Functions (activation.cpp). What every Autograd kernel shares is in
// function.h.
//
// The forward runs the op below autograd. A plain backward (grad mode off) runs the whole of
// it as one fused op; a recorded one (create_graph=True) is built from the differentiable
// backward pieces (activation.cpp), so double backward works.
//
// The node has no forward derivative and no torch.func rule: handgrad.functional sends those
// calls to the Python Functions of handgrad.autograd instead, which keep the same tensors
// (test_func.py checks that the two agree on what they save).
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../ops.h"
#include "function.h"

namespace handgrad {
namespace {

using namespace handgrad::autograd;

// --- The fused layer: out = a[beta + Omega h] ---

// The layer's node in the graph, written out as PyTorch's generated nodes are
// (torch/csrc/autograd/generated/Functions.h) rather than as a torch::autograd::Function:
// without the Function's context, its string-keyed map and its generic wrapping, the
// engine's work around a small layer shrinks (the actor-critic's 4 -> 128 layer at 1 row:
// 87.6 -> 74 us per training step, eager 77.6; RESULTS.md).
//
// It keeps what the chapter's backward needs: h, Omega and out, never f where out tells
// a' (nothing more for the identity, whose a' is 1). Where out does not, f is kept, as eager's
// activation keeps it: recomputing f would cost the backward a fourth product where eager's
// makes three (mid 256,512,512: 1.23-1.28 of eager's forward+backward). LeakyReLU with a
// negative slope keeps it in this node; SiLU, GELU and softplus are two nodes (below). out is
// kept only where it is read, so that an in-place edit of it is refused exactly where eager's
// would be (eager's SiLU keeps its input, ReLU its output). autograd.py's _setup_linear,
// for forward AD and torch.func, recomputes f instead: a Function there can keep only its
// inputs and outputs.
struct LinearActivationBackward0 : public torch::autograd::Node {
  // f_ where a' is read off f, out_ where it is read off out (neither for the identity).
  torch::autograd::SavedVariable input_, weight_, out_, f_;
  Activation activation_ = Activation::ReLU;
  ActivationParameters params_;
  bool has_bias_ = false;

  std::string name() const override { return "LinearActivationBackward0"; }

  // Locked as PyTorch's generated nodes lock theirs: a retained graph's backward may run on
  // several threads at once, and release_variables beside it.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    out_.reset_data();
    f_.reset_data();
  }

  // Mirrored by autograd.py's _LinearActivationFunction.backward, which forward-mode AD and
  // torch.func use.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t outputs = num_outputs();
    if (!grads[0].defined()) return no_gradients(outputs);  // an undefined gradient gives undefined ones
    const Variable input = input_.unpack(), weight = weight_.unpack();
    const bool need_input = task_should_compute_output(0), need_weight = task_should_compute_output(1);
    const bool need_bias = has_bias_ && task_should_compute_output(2);
    const Variable& grad_output = grads[0];
    const c10::string_view activation = activation_name(activation_);

    // a' is read off out, or off the kept f; the identity's is 1 off any tensor.
    const bool identity = is_identity(activation_, params_);
    const Variable out_or_f = identity ? grad_output
                              : derivative_needs_preactivation(activation_, params_) ? f_.unpack()
                                                                                       : out_.unpack(getptr());
    Variable grad_input, grad_weight, grad_bias;
    if (!c10::GradMode::is_enabled()) {
      // A plain backward: the whole of it in one fused op.
      std::tie(grad_input, grad_weight, grad_bias) = ops::linear_activation_backward(
          grad_output, input, weight, out_or_f, activation, params_, {need_input, need_weight, need_bias});
    } else {
      // create_graph: differentiable pieces, each with its own autograd.
      Variable grad_pre = grad_output;
      if (identity) {
        if (need_bias) grad_bias = as_matrix(grad_output).sum(0);
      } else if (need_bias) {
        std::tie(grad_pre, grad_bias) = ops::bias_activation_backward(grad_output, out_or_f, activation, params_);
      } else {
        grad_pre = ops::activation_backward(grad_output, out_or_f, activation, params_);
      }
      if (need_input) grad_input = grad_pre.matmul(weight);  // dl/dh = Omega^T dl/df (7.6)
      if (need_weight) grad_weight = as_matrix(grad_pre).t().mm(as_matrix(input));  // (7.9)
    }
    variable_list result{grad_input, grad_weight, grad_bias};
    result.resize(outputs);
    return result;
  }

  // Compiled autograd: the node's state, and its backward run on the saved variables it is
  // handed (the op it calls has a fake kernel, so the backward is traced as that op).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, false);
    args.collect(weight_, false);
    args.collect(out_, true);
    args.collect(f_, false);
    args.collect(static_cast<int8_t>(activation_));
    args.collect(params_.negative_slope);
    args.collect(params_.beta);
    args.collect(params_.threshold);
    args.collect(has_bias_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_with_swapped(*this, grads, saved, input_, weight_, out_, f_);
  }
};

at::Tensor linear_activation_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      c10::string_view activation, double negative_slope, double beta, double threshold) {
  const ActivationParameters params{negative_slope, beta, threshold};
  const at::Tensor& bias_or_undefined = defined(bias) ? *bias : at::Tensor();
  const auto below_autograd = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::linear_activation(input, weight, bias, activation, params);
  };
  if (!needs_function({&input, &weight, &bias_or_undefined})) return below_autograd();
  refuse_tangent(has_tangent(input) || has_tangent(weight) || has_tangent(bias_or_undefined),
                 "linear_activation", "handgrad.functional.linear_", activation, " and the handgrad.nn layers");
  const Activation act = parse_activation(activation);
  const bool reads_f = derivative_needs_preactivation(act, params);
  if (reads_f && has_second_derivative(act)) {
    // SiLU, GELU, softplus: recorded as eager records them, as two nodes, f = beta + Omega h
    // by the layer with the identity, then a[f], which keeps f. A recorded backward
    // (create_graph) differentiates a' through f's node, where the gradients of both orders
    // meet, as in eager's graph: with one node keeping f, a second-order loss took two
    // products more per layer than eager's (a gradient penalty on 256 rows of a 512-wide SiLU
    // network: 1.25-1.37 of eager's step; 0.91-1.03 as two nodes).
    check_linear_activation(input, weight, bias, activation, params);
    return ops::activation(ops::preactivation(input, weight, bias), activation, params);
  }
  auto node = make_node<LinearActivationBackward0>();
  node->set_next_edges(defined(bias) ? torch::autograd::collect_next_edges(input, weight, *bias)
                                     : torch::autograd::collect_next_edges(input, weight));
  node->activation_ = act;
  node->params_ = params;
  node->has_bias_ = defined(bias);
  at::Tensor out, f;
  if (reads_f) {  // LeakyReLU with a negative slope: f, then a[f], both below autograd
    check_linear_activation(input, weight, bias, activation, params);
    at::AutoDispatchBelowADInplaceOrView guard;
    f = ops::preactivation(input, weight, bias);
    out = ops::activation(f, activation, params);
  } else {
    out = below_autograd();
  }
  torch::autograd::set_history(out, node);
  node->input_ = torch::autograd::SavedVariable(input, false);
  node->weight_ = torch::autograd::SavedVariable(weight, false);
  if (reads_f) {
    node->f_ = torch::autograd::SavedVariable(f, false);
  } else if (!is_identity(act, params)) {
    node->out_ = torch::autograd::SavedVariable(out, true);
  }
  return out;
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
}  // namespace

TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("linear_activation", &linear_activation_autograd);
  m.impl("linear_activation_backward", &linear_activation_backward_autograd);
}

}  // namespace handgrad
