// The handgrad operator library: every op schema, in one place, and the Python module.
//
// Kernels are registered per dispatch key in their own files: csrc/cpu and csrc/cuda (the
// backends), csrc/mlp.cpp (the whole network, on every backend), csrc/autograd (the C++
// autograd and autocast kernels); fake kernels live in pyext/handgrad/_fake.py. The
// `activation` argument is one of "relu", "leaky_relu", "sigmoid"; `negative_slope` is used
// by leaky_relu only.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"

TORCH_LIBRARY(handgrad, m) {
  // out = a[beta + Omega h] for input h of shape (*, in_features).
  m.def(
      "linear_activation(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "float negative_slope=0.01) -> Tensor");
  // out = a[input], elementwise, in input's memory format.
  m.def("activation(Tensor input, str activation, float negative_slope=0.01) -> Tensor");
  // input = a[input], in place (nn.ReLU(inplace=True)). It returns nothing, so that
  // torch.compile can functionalize it; handgrad.functional returns `input`.
  m.def("activation_(Tensor(a!) input, str activation, float negative_slope=0.01) -> ()");
  // dl/df = grad_output * a'[f], with a' read off `saved`: the activation's output, or its
  // input for leaky_relu with negative_slope < 0 (see csrc/activation.h).
  m.def(
      "activation_backward(Tensor grad_output, Tensor saved, str activation, "
      "float negative_slope=0.01) -> Tensor");
  // The same dl/df, and dl/dbeta = its sum over all leading dimensions, in one pass.
  m.def(
      "bias_activation_backward(Tensor grad_output, Tensor saved, str activation, "
      "float negative_slope=0.01) -> (Tensor grad_preactivation, Tensor grad_bias)");
  // The whole backward of linear_activation, for when it need not itself be differentiable:
  // dl/dh (7.6), dl/dOmega (7.9) and dl/dbeta, each only where output_mask asks for it.
  m.def(
      "linear_activation_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor saved, str activation, float negative_slope, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // A whole network, the chapter's backpropagation algorithm (section 7.4) as one op: hidden
  // layers h_{l+1} = a[beta_l + Omega_l h_l], then the output layer, linear or followed by
  // output_activation. weights lists the layers in order, the output layer last; biases one
  // per layer, or none (an empty list) for a network without biases. With
  // checkpoint_every = k > 0 the backward keeps every k-th hidden output only and recomputes
  // the rest (problem 7.11).
  m.def(
      "mlp(Tensor input, Tensor[] weights, Tensor[] biases, str activation, "
      "float negative_slope=0.01, int checkpoint_every=0, str? output_activation=None) -> Tensor");
  // The forward pass that stores what the backward needs: the hidden layers' outputs (every
  // k-th one with checkpointing), as (rows, features) matrices; never f.
  m.def(
      "mlp_forward(Tensor input, Tensor[] weights, Tensor[] biases, str activation, "
      "float negative_slope, int checkpoint_every, str? output_activation=None) "
      "-> (Tensor output, Tensor[] saved)");
  // The backward pass, from the output layer down: dl/dOmega (7.9), dl/dbeta and dl/dh (7.6)
  // through a' (7.7, 7.10); dl/d(input) only if input_requires_grad; grad_biases is empty
  // for a network without biases.
  m.def(
      "mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor[] biases, "
      "Tensor[] saved, str activation, float negative_slope, int checkpoint_every, "
      "bool input_requires_grad, str? output_activation=None) -> (Tensor grad_input, "
      "Tensor[] grad_weights, Tensor[] grad_biases)");
}

namespace handgrad {
namespace {

// How a non-strided tensor is described: "has layout torch.sparse_coo", "is a nested tensor".
std::string describe_layout(const at::Tensor& t) {
  if (t.is_nested()) return "is a nested tensor";
  switch (t.layout()) {
    case at::kSparse: return "has layout torch.sparse_coo";
    case at::kSparseCsr: return "has layout torch.sparse_csr";
    case at::kSparseCsc: return "has layout torch.sparse_csc";
    case at::kSparseBsr: return "has layout torch.sparse_bsr";
    case at::kSparseBsc: return "has layout torch.sparse_bsc";
    case at::kMkldnn: return "has layout torch._mkldnn";
    default: return "has a non-strided layout";
  }
}

// The kernel of every op for sparse, nested and mkldnn tensors: one line that names the
// argument and its layout, instead of the dispatcher's list of every backend.
void reject_non_strided(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto values = torch::jit::last(*stack, arguments.size());
  // The op's name as users know it: "activation" in the schema's name replaced by the
  // activation, as in "linear_relu" or "sigmoid_backward".
  std::string name = op.schema().name();
  name = name.substr(name.find("::") + 2);
  for (size_t i = 0; i < arguments.size(); ++i) {
    const size_t at = name.find("activation");
    if (arguments[i].name() == "activation" && values[i].isString() && at != std::string::npos) {
      name.replace(at, 10, values[i].toStringRef());
    }
  }
  const auto check = [&](const at::Tensor& t, const std::string& argument) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !t.defined() || (t.layout() == at::kStrided && !t.is_nested()), name, ": ", argument,
        " ", describe_layout(t), "; only dense (strided) tensors are supported");
  };
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (values[i].isTensor()) check(values[i].toTensor(), arguments[i].name());
    if (!values[i].isTensorList()) continue;
    const auto list = values[i].toTensorList();
    for (size_t j = 0; j < list.size(); ++j) {
      check(list[j], arguments[i].name() + "[" + std::to_string(j) + "]");
    }
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, name, ": only dense (strided) tensors are supported");
}

void register_rejection(torch::Library& m) {
  for (const char* op : {"linear_activation", "activation", "activation_", "activation_backward",
                         "bias_activation_backward", "linear_activation_backward", "mlp",
                         "mlp_forward", "mlp_backward"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&reject_non_strided>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(handgrad, SparseCPU, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, SparseCUDA, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, SparseCsrCPU, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, SparseCsrCUDA, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, NestedTensorCPU, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, NestedTensorCUDA, m) { register_rejection(m); }
TORCH_LIBRARY_IMPL(handgrad, MkldnnCPU, m) { register_rejection(m); }

}  // namespace handgrad

// The Python module handgrad._C. Loading it registers the ops (the static initializers of
// every file in this library), and it offers the fast way in from Python to four of them.
//
// handgrad.functional calls these in eager mode. Each is the op itself, called through
// PyTorch's dispatcher, so autograd, autocast, fake tensors and tracing modes all see
// handgrad::<op> as from torch.ops.handgrad; it only skips the boxed argument parsing of
// torch.ops, which costs a tiny layer as much as its matrix product (measured: 3.8 us
// against 5.7 us a call at 10x10 -> 40). Under torch.compile, functional calls torch.ops,
// which Dynamo can trace.
namespace {

// Without the GIL, as PyTorch's own bindings: other Python threads run meanwhile.
at::Tensor linear_activation(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::string_view activation,
                             double negative_slope) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::linear_activation(input, weight, bias, activation, negative_slope);
}

at::Tensor activation(const at::Tensor& input, c10::string_view activation, double negative_slope) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::activation(input, activation, negative_slope);
}

void activation_(const at::Tensor& input, c10::string_view activation, double negative_slope) {
  pybind11::gil_scoped_release no_gil;
  handgrad::ops::activation_(input, activation, negative_slope);
}

at::Tensor mlp(const at::Tensor& input, const std::vector<at::Tensor>& weights,
               const std::vector<at::Tensor>& biases, c10::string_view activation,
               double negative_slope, int64_t checkpoint_every,
               std::optional<c10::string_view> output_activation) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::mlp(input, weights, biases, activation, negative_slope, checkpoint_every,
                            output_activation);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "handgrad's operator library; the ops are torch.ops.handgrad.*";
  m.def("linear_activation", &linear_activation, "torch.ops.handgrad.linear_activation",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"));
  m.def("activation", &activation, "torch.ops.handgrad.activation", pybind11::arg("input"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"));
  m.def("activation_", &activation_, "torch.ops.handgrad.activation_", pybind11::arg("input"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"));
  m.def("mlp", &mlp, "torch.ops.handgrad.mlp", pybind11::arg("input"), pybind11::arg("weights"),
        pybind11::arg("biases"), pybind11::arg("activation"), pybind11::arg("negative_slope"),
        pybind11::arg("checkpoint_every"), pybind11::arg("output_activation"));
}
