// What the Autograd kernels (csrc/autograd/*.cpp) share: the activation kept in a
// Function's context, and when a call must go through its Function at all.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <initializer_list>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

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

// Whether t carries a forward-mode tangent.
inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

// Whether a call must go through its Function or node: autograd will record it, or an input
// carries a forward-mode tangent (which the Function, or refuse_tangent, then refuses rather
// than dropping it). Any other call runs the op below autograd directly, which is cheaper.
inline bool needs_function(std::initializer_list<const at::Tensor*> tensors) {
  const bool grad_mode = c10::GradMode::is_enabled();
  for (const at::Tensor* t : tensors) {
    if ((grad_mode && t->defined() && t->requires_grad()) || has_tangent(*t)) return true;
  }
  return false;
}

// The hand-written nodes have no forward derivative: a tangent that reaches their op directly
// (handgrad.functional sends tangents to the Python Functions) is refused, naming what
// carries it. The message's pieces are joined only for a refusal: this runs on every call.
template <typename... CarriedBy>
void refuse_tangent(bool tangent, const char* op, const CarriedBy&... carried_by) {
  TORCH_CHECK(!tangent, "Trying to use forward AD with handgrad::", op,
              ", which has no forward derivative; ", carried_by...,
              " support it in eager mode, through Python (under TorchScript, or called as torch.ops.handgrad.",
              op, ", the op itself is reached)");
}

// A new node of type N, held as the engine holds nodes: by std::shared_ptr (deleted by
// deleteNode, which unwinds long graphs without deep recursion) before torch 2.13's
// c10::intrusive_ptr. (The aarch64 build's torch is 2.10.)
using NodePointer = decltype(std::declval<torch::autograd::Node&>().getptr());

template <typename N>
void delete_node(N* node) {
  deleteNode(node);  // torch::autograd::deleteNode, found through N's base
}

template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), &delete_node<N>);
  } else {
    return c10::make_intrusive<N>();
  }
}

// Compiled autograd's apply_with_saved for a node whose state is its saved variables: they
// are swapped for the compiler's proxies around the node's own apply, as PyTorch's
// generated nodes do.
template <typename N, typename... Saved>
variable_list apply_with_swapped(N& node, const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved, Saved&... members) {
  (saved.before(members), ...);
  variable_list result = node.apply(variable_list(grads));
  (saved.after(members), ...);
  return result;
}

// Every Function here turns off the materialization of undefined output gradients: autograd
// would fill them with plain zeros, which a tensor subclass (DTensor) cannot be mixed
// with under create_graph. An undefined gradient in gives undefined gradients out.
inline variable_list no_gradients(size_t count) {
  return variable_list(count);
}

}  // namespace handgrad::autograd
