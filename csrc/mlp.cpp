// The whole network as one op: the backpropagation algorithm of section 7.4.
//
//   forward:  h_0 = input;  h_{l+1} = a[beta_l + Omega_l h_l] for the hidden layers;
//             out = beta_L + Omega_L h_L, a linear output layer. Each h_l is stored.
//   backward: from the output layer down, with g = dl/df_l:
//             dl/dOmega_l = g h_l^T (7.9),  dl/dbeta_l = sum of g over the batch,
//             dl/dh_l = Omega_l^T g (7.6),  and below a hidden layer g = dl/dh_l * a'[f]
//             with a' read off the stored h_{l+1} (7.7, 7.10).
//
// Each layer is one of the per-layer ops (linear_activation and its fused backward), called
// through the dispatcher below autograd, so the same code serves CPU and CUDA and every
// formula stays in csrc/activation.h. What the whole-network op saves is the per-layer
// overhead: one call from Python and one autograd node for the network, not one per layer.
//
// Gradient checkpointing (problem 7.11): with checkpoint_every = k, the forward stores the
// output of every k-th hidden layer only; the backward recomputes one stretch of k layers
// at a time from its stored input, then backpropagates through it.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace handgrad {
namespace {

void check_mlp_arguments(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                         c10::string_view activation, double negative_slope,
                         int64_t checkpoint_every) {
  const OpName op{"mlp", "", ""};
  parse_activation(activation);
  check_negative_slope(op, negative_slope);
  check_floating_dtype(op, "input", input);
  TORCH_CHECK_VALUE(checkpoint_every >= 0, "mlp: checkpoint_every must be 0 (none) or a positive ",
                    "number of layers, got ", checkpoint_every);
  TORCH_CHECK(!weights.empty(), "mlp: weights must list at least the output layer, got none");
  TORCH_CHECK(biases.size() == weights.size(), "mlp: got ", weights.size(), " weights but ",
              biases.size(), " biases; each layer has one of each");
  TORCH_CHECK(input.dim() >= 1,
              "mlp: input must have shape (*, in_features) with at least 1 dimension, got a 0-D tensor");
  int64_t features = input.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const ListItem weight{"weights", l}, bias{"biases", l};
    check_same_dtype_and_device(op, weight, weights[l], "input", input);
    check_same_dtype_and_device(op, bias, biases[l], "input", input);
    TORCH_CHECK(weights[l].dim() == 2, "mlp: ", weight,
                " must be 2-D (out_features, in_features), got shape ", weights[l].sizes());
    TORCH_CHECK(weights[l].size(1) == features, "mlp: ", weight, " has ", weights[l].size(1),
                " columns but ", l == 0 ? "input has " : "the layer before has ", features,
                " features");
    TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == weights[l].size(0), "mlp: ", bias,
                " must have shape [", weights[l].size(0), "] (out_features of ", weight,
                "), got shape ", biases[l].sizes());
    features = weights[l].size(0);
  }
}

// The input as a (rows, in_features) matrix; every layer works on such matrices.
at::Tensor input_rows(const at::Tensor& input) {
  return input.dim() == 2 ? input : input.reshape({leading_rows(input), input.size(-1)});
}

// The output, (rows, out_features), in the input's leading shape.
at::Tensor output_shaped(const at::Tensor& out, const at::Tensor& input) {
  if (input.dim() == 2) return out;
  at::DimVector sizes(input.sizes());
  sizes.back() = out.size(-1);
  return out.view(sizes);  // below autograd: not a view to autograd
}

// h_{l+1} = a[beta_l + Omega_l h_l] for the hidden layers first to last - 1.
at::Tensor run_hidden(at::Tensor h, at::TensorList weights, at::TensorList biases, size_t first,
                      size_t last, c10::string_view activation, double negative_slope,
                      std::vector<at::Tensor>* outputs) {
  for (size_t l = first; l < last; ++l) {
    h = ops::linear_activation(h, weights[l], biases[l], activation, negative_slope);
    if (outputs != nullptr) outputs->push_back(h);
  }
  return h;
}

at::Tensor mlp_kernel(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                      c10::string_view activation, double negative_slope,
                      int64_t checkpoint_every) {
  check_mlp_arguments(input, weights, biases, activation, negative_slope, checkpoint_every);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const size_t hidden = weights.size() - 1;
  // Nothing is kept: each layer's output is freed once the next has used it.
  const at::Tensor h = run_hidden(input_rows(input), weights, biases, 0, hidden, activation,
                                  negative_slope, nullptr);
  return output_shaped(at::linear(h, weights[hidden], biases[hidden]), input);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_kernel(
    const at::Tensor& input, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, double negative_slope, int64_t checkpoint_every) {
  check_mlp_arguments(input, weights, biases, activation, negative_slope, checkpoint_every);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const size_t hidden = weights.size() - 1;
  std::vector<at::Tensor> saved;  // h_1 ... h_L, or with checkpointing h_k, h_2k, ... < h_L
  at::Tensor h = input_rows(input);
  for (size_t l = 0; l < hidden; ++l) {
    h = ops::linear_activation(h, weights[l], biases[l], activation, negative_slope);
    const size_t made = l + 1;  // h is h_made
    if (checkpoint_every == 0 || (made % checkpoint_every == 0 && made < hidden)) saved.push_back(h);
  }
  return {output_shaped(at::linear(h, weights[hidden], biases[hidden]), input), saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
    at::TensorList biases, at::TensorList saved, c10::string_view activation,
    double negative_slope, int64_t checkpoint_every, bool input_requires_grad) {
  check_mlp_arguments(input, weights, biases, activation, negative_slope, checkpoint_every);
  const Activation act = parse_activation(activation);
  const size_t layers = weights.size(), hidden = layers - 1;
  const size_t stretch = checkpoint_every > 0 ? checkpoint_every : std::max<size_t>(hidden, 1);
  const size_t stretches = hidden == 0 ? 0 : (hidden + stretch - 1) / stretch;
  TORCH_CHECK(saved.size() == (checkpoint_every > 0 ? (stretches > 0 ? stretches - 1 : 0) : hidden),
              "mlp_backward: saved has ", saved.size(), " tensors, which is not what mlp_forward "
              "stores for ", hidden, " hidden layers with checkpoint_every=", checkpoint_every);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the recomputation is not recorded

  const at::Tensor x = input_rows(input);
  std::vector<at::Tensor> grad_weights(layers), grad_biases(layers);
  // g = dl/df of the output layer, as a (rows, out_features) matrix.
  at::Tensor g = grad_output.reshape({x.size(0), weights[hidden].size(0)});
  // The output layer, linear, from its input h_L: dl/dOmega_L = g h_L^T (7.9),
  // dl/dbeta_L = sum g, and g becomes dl/dh_L = Omega_L^T g (7.6) where it is wanted.
  const auto output_layer_backward = [&](const at::Tensor& h_last, bool need_input) {
    grad_weights[hidden] = at::mm(g.t(), h_last);
    grad_biases[hidden] = at::sum(g, 0);
    g = need_input ? at::mm(g, weights[hidden]) : at::Tensor();
  };
  // The stretches of hidden layers, last first; without checkpointing, one stretch of all.
  for (size_t s = stretches; s-- > 0;) {
    const size_t first = s * stretch, last = std::min(hidden, first + stretch);
    const at::Tensor stretch_input = first == 0 ? x : saved[s - 1];
    std::vector<at::Tensor> outputs;  // h_{first+1} ... h_last
    if (checkpoint_every > 0) {
      run_hidden(stretch_input, weights, biases, first, last, activation, negative_slope, &outputs);
    } else {
      outputs.assign(saved.begin() + first, saved.begin() + last);
    }
    if (last == hidden) output_layer_backward(outputs.back(), /*need_input=*/true);
    for (size_t l = last; l-- > first;) {
      // Hidden layer l: h_{l+1} = a[f], f = beta_l + Omega_l h_l. Its fused backward makes
      // dl/df = dl/dh_{l+1} * a' (read off h_{l+1}, or off f recomputed where h_{l+1} hides
      // its sign), dl/dbeta_l, dl/dOmega_l (7.9) and dl/dh_l (7.6).
      const at::Tensor& h = l == first ? stretch_input : outputs[l - first - 1];
      at::Tensor sign_source = outputs[l - first];
      if (output_hides_sign(act, negative_slope)) {
        sign_source = ops::linear_activation(h, weights[l], biases[l], "leaky_relu", 1.0);
      }
      const bool need_input = l > 0 || input_requires_grad;
      at::Tensor grad_h;
      std::tie(grad_h, grad_weights[l], grad_biases[l]) = ops::linear_activation_backward(
          g, h, weights[l], sign_source, activation, negative_slope, {need_input, true, true});
      g = grad_h;
    }
  }
  if (hidden == 0) output_layer_backward(x, input_requires_grad);  // a linear model
  at::Tensor grad_input = input_requires_grad ? g.reshape(input.sizes()) : at::Tensor();
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace

// The same algorithm on every device: each layer's work is done by that device's kernels.
TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("mlp", &mlp_kernel);
  m.impl("mlp_forward", &mlp_forward_kernel);
  m.impl("mlp_backward", &mlp_backward_kernel);
}

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("mlp", &mlp_kernel);
  m.impl("mlp_forward", &mlp_forward_kernel);
  m.impl("mlp_backward", &mlp_backward_kernel);
}

}  // namespace handgrad
