#include <ATen/TensorOperators.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/tanh.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"
#include "autograd/mlp.h"
#include "autograd/tensor_formulas.h"
#include "checkpoint.h"
#include "shapes.h"

// The Python module handgrad._C. Loading it registers the ops (the static initializers of
// every file in this library). It offers the fast way in from Python to four of them, and
// each op's argument check (csrc/checks.h) to the fake kernels.
//
// handgrad.functional calls these in eager mode. Each is the op itself, called through
// PyTorch's dispatcher, so autograd, autocast, fake tensors and tracing modes all see
// handgrad::<op> as from torch.ops.handgrad; it only skips the boxed argument parsing of
// torch.ops, which costs a tiny layer about as much as its matrix product. Under
// torch.compile, functional calls torch.ops,
// which Dynamo can trace.
namespace {

using handgrad::ActivationParameters;

// Without the GIL, as PyTorch's own bindings: other Python threads run meanwhile.
at::Tensor linear_activation(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::string_view activation,
                             double negative_slope, double beta, double threshold) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::linear_activation(input, weight, bias, activation,
                                          {negative_slope, beta, threshold});
}

at::Tensor activation(const at::Tensor& input, c10::string_view activation, double negative_slope,
                      double beta, double threshold) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::activation(input, activation, {negative_slope, beta, threshold});
}

void activation_(const at::Tensor& input, c10::string_view activation, double negative_slope,
                 double beta, double threshold) {
  pybind11::gil_scoped_release no_gil;
  handgrad::ops::activation_(input, activation, {negative_slope, beta, threshold});
}

at::Tensor mlp(const at::Tensor& input, const std::vector<at::Tensor>& weights,
               const std::vector<at::Tensor>& biases, c10::string_view activation,
               double negative_slope, int64_t checkpoint_every,
               std::optional<c10::string_view> output_activation, double beta, double threshold) {
  pybind11::gil_scoped_release no_gil;
  return handgrad::ops::mlp(input, weights, biases, activation, {negative_slope, beta, threshold},
                            checkpoint_every, output_activation);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "handgrad's operator library; the ops are torch.ops.handgrad.*";
  m.def("linear_activation", &linear_activation, "torch.ops.handgrad.linear_activation");
  m.def("activation", &activation, "torch.ops.handgrad.activation");
  m.def("activation_", &activation_, "torch.ops.handgrad.activation_");
  m.def("mlp", &mlp, "torch.ops.handgrad.mlp");

  // The CPU kernels of one capability (csrc/cpu/kernels.h), loaded by handgrad's import.
  m.def("load_cpu_kernels", &handgrad::cpu::load_kernels,
        "loads a capability library of CPU kernels and runs them; returns its capability",
        pybind11::arg("path"));
  m.def("cpu_kernels", [] {
    const auto& k = handgrad::cpu::kernels();
    return std::make_pair(std::string(k.capability), std::string(k.micro_kernel));
  }, "the capability and micro-kernel of the CPU kernels that run");
  m.def("cpu_products_go_to_blas", [](int64_t rows, const std::vector<at::Tensor>& weights,
                                      c10::string_view activation, double negative_slope,
                                      int64_t checkpoint_every,
                                      std::optional<c10::string_view> output_activation,
                                      bool output_layer_source, double beta, double threshold,
                                      bool backward) {
    const auto activations = handgrad::cpu::network_activations(activation, {negative_slope, beta, threshold},
                                                                 output_activation);
    const auto& k = handgrad::cpu::kernels();
    if (backward) return k.blas_backward_pays(rows, weights, activations, checkpoint_every, output_layer_source);
    return k.forward_path(rows, weights, activations, checkpoint_every, output_layer_source) ==
           handgrad::cpu::ForwardPath::Blas;
  }, "whether the CPU engine gives this network's products to BLAS (by their shapes), in the "
     "forward or (backward=True) in the backward",
        pybind11::arg("rows"), pybind11::arg("weights"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"), pybind11::arg("checkpoint_every"),
        pybind11::arg("output_activation"), pybind11::arg("output_layer_source"),
        pybind11::arg("beta") = 1.0, pybind11::arg("threshold") = 20.0, pybind11::arg("backward") = false);
  m.def("cpu_forward_path", [](int64_t rows, const std::vector<at::Tensor>& weights,
                               c10::string_view activation, double negative_slope, int64_t checkpoint_every,
                               std::optional<c10::string_view> output_activation, bool output_layer_source,
                               double beta, double threshold) {
    const auto activations = handgrad::cpu::network_activations(activation, {negative_slope, beta, threshold},
                                                                 output_activation);
    switch (handgrad::cpu::kernels().forward_path(rows, weights, activations, checkpoint_every,
                                                  output_layer_source)) {
      case handgrad::cpu::ForwardPath::Blocks: return "blocks";
      case handgrad::cpu::ForwardPath::Transposed: return "transposed";
      case handgrad::cpu::ForwardPath::Blas: return "blas";
    }
    return "";
  }, "which pass runs this network's CPU forward (by its shapes and dtype): 'blocks' (the fused "
     "engine's blocks of rows), 'transposed' (the engine's pass over few rows, f^T = Omega h^T) or "
     "'blas' (BLAS's products layer by layer)",
        pybind11::arg("rows"), pybind11::arg("weights"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"), pybind11::arg("checkpoint_every"),
        pybind11::arg("output_activation"), pybind11::arg("output_layer_source"),
        pybind11::arg("beta") = 1.0, pybind11::arg("threshold") = 20.0);
  m.def("cpu_network_runs_as_layers", [](int64_t rows, const std::vector<at::Tensor>& weights,
                                         c10::string_view activation, double negative_slope,
                                         int64_t checkpoint_every, double beta, double threshold) {
    const auto activations = handgrad::cpu::network_activations(activation, {negative_slope, beta, threshold},
                                                                 std::nullopt);
    return handgrad::cpu::kernels().runs_as_layers(rows, weights, activations, checkpoint_every);
  }, "whether the mlp op records this CPU network, when autograd records it, as a chain of "
     "fused layers that each keep f (by its shapes; hidden activations whose a' is read off f)",
        pybind11::arg("rows"), pybind11::arg("weights"), pybind11::arg("activation"),
        pybind11::arg("negative_slope") = 0.01, pybind11::arg("checkpoint_every") = 0,
        pybind11::arg("beta") = 1.0, pybind11::arg("threshold") = 20.0);
  m.def("cpu_second_order_goes_to_blas", [](int64_t rows, const std::vector<at::Tensor>& weights) {
    return handgrad::cpu::kernels().second_order_blas_pays(rows, weights);
  }, "whether the CPU double backward (mlp_double_backward) runs as its tensor formula on BLAS's "
     "products rather than in the fused engine (by the network's shapes)",
        pybind11::arg("rows"), pybind11::arg("weights"));

  m.def("set_layers_after_third_order", &handgrad::autograd::set_layers_after_third_order,
        "whether a CPU network differentiated to a third order records its later forwards whose "
        "input needs a gradient as a chain of layers (the default) or as one node; forgets the "
        "networks seen, and returns the previous setting (for tests of either path)",
        pybind11::arg("enabled"));

  // For the Python Functions (handgrad.autograd), the pieces the C++ autograd kernels use,
  // so that each is written once.
  m.def("derivative_needs_preactivation", [](c10::string_view activation, double negative_slope,
                                             double beta, double threshold) {
    return handgrad::derivative_needs_preactivation(handgrad::parse_activation(activation),
                                                    {negative_slope, beta, threshold});
  }, "whether a' is read off f rather than the output (silu, gelu, softplus, leaky_relu with a negative slope)");
  m.def("has_second_derivative", [](c10::string_view activation) {
    return handgrad::has_second_derivative(handgrad::parse_activation(activation));
  }, "whether a'' is not zero (all but relu and leaky_relu): a double backward through a'", pybind11::arg("activation"));
  m.def("derivative_of_derivative", [](c10::string_view activation, const at::Tensor& source,
                                       double negative_slope, double beta, double threshold) {
    return handgrad::derivative_of_derivative(handgrad::parse_activation(activation), source,
                                              {negative_slope, beta, threshold});
  }, "d(a')/d(source), source the tensor a' is read off: 1 - 2 out for sigmoid, -2 out for tanh, a''[f] for the others");
  m.def("preactivation", &handgrad::ops::preactivation, "f = beta + Omega h",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"));
  m.def("as_matrix", &handgrad::as_matrix, "(*, n) as a (rows, n) matrix", pybind11::arg("t"));
  // For the fake kernel of mlp_forward: which hidden outputs it stores.
  m.def("is_stored_output", &handgrad::is_stored_output, "whether mlp_forward stores h_made",
        pybind11::arg("made"), pybind11::arg("hidden"), pybind11::arg("checkpoint_every"));
  // The fake kernels' checks: each op's, as its C++ kernels make it.
  using Tensor = const at::Tensor&;
  using Tensors = const std::vector<at::Tensor>&;
  using Name = c10::string_view;
  using OptionalName = std::optional<c10::string_view>;
  m.def("check_linear_activation", [](Tensor input, Tensor weight, const std::optional<at::Tensor>& bias,
                                      Name activation, double negative_slope, double beta, double threshold) {
    handgrad::check_linear_activation(input, weight, bias, activation, {negative_slope, beta, threshold});
  });
  m.def("check_activation", [](Tensor input, Name activation, double negative_slope, double beta,
                               double threshold, bool inplace) {
    handgrad::check_activation(input, activation, {negative_slope, beta, threshold}, inplace);
  });
  m.def("check_activation_backward", [](Tensor grad_output, Tensor out_or_f, Name activation,
                                        double negative_slope, double beta, double threshold) {
    handgrad::check_activation_backward(grad_output, out_or_f, activation, {negative_slope, beta, threshold});
  });
  m.def("check_bias_activation_backward", [](Tensor grad_output, Tensor out_or_f, Name activation,
                                             double negative_slope, double beta, double threshold) {
    handgrad::check_bias_activation_backward(grad_output, out_or_f, activation,
                                             {negative_slope, beta, threshold});
  });
  m.def("check_linear_activation_backward", [](Tensor grad_output, Tensor input, Tensor weight,
                                               Tensor out_or_f, Name activation, double negative_slope,
                                               double beta, double threshold) {
    handgrad::check_linear_activation_backward(grad_output, input, weight, out_or_f, activation,
                                               {negative_slope, beta, threshold});
  });
  m.def("check_mlp", [](Tensor input, Tensors weights, Tensors biases, Name activation,
                        double negative_slope, int64_t checkpoint_every, OptionalName output_activation,
                        double beta, double threshold) {
    handgrad::check_mlp(input, weights, biases, activation, {negative_slope, beta, threshold},
                        checkpoint_every, output_activation);
  });
  m.def("check_mlp_backward", [](Tensor input, Tensors weights, Tensors biases, Tensors hidden_outputs,
                                 Name activation, double negative_slope, int64_t checkpoint_every,
                                 OptionalName output_activation, double beta, double threshold) {
    handgrad::check_mlp_backward(input, weights, biases, hidden_outputs, activation,
                                 {negative_slope, beta, threshold}, checkpoint_every, output_activation);
  });
  m.def("check_mlp_double_backward", [](Tensor grad_output, Tensor input, Tensors weights, Tensors biases,
                                        Tensors hidden_outputs, const std::optional<at::Tensor>& grad_grad_input,
                                        const std::vector<std::optional<at::Tensor>>& grad_grad_weights,
                                        const std::vector<std::optional<at::Tensor>>& grad_grad_biases,
                                        Name activation, double negative_slope,
                                        OptionalName output_activation, double beta, double threshold) {
    const auto list = [](const std::vector<std::optional<at::Tensor>>& v) {
      return c10::List<std::optional<at::Tensor>>(v);
    };
    handgrad::check_mlp_double_backward(grad_output, input, weights, biases, hidden_outputs, grad_grad_input,
                                        list(grad_grad_weights), list(grad_grad_biases), activation,
                                        {negative_slope, beta, threshold}, output_activation);
  });
}
