// Every handgrad op schema, in one place.
//
// Kernels are registered per dispatch key in their own files: csrc/cpu and csrc/cuda (the
// backends), csrc/mlp_per_layer.cpp (the whole network elsewhere), csrc/autograd (the C++
// autograd kernels), csrc/autocast.cpp, csrc/reject_non_strided.cpp; fake kernels
// live in pyext/handgrad/_fake.py. The `activation` argument is one of "relu",
// "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh" (GELU's tanh approximation),
// "softplus". Its parameters are named and defaulted as torch.nn's: `negative_slope` for
// leaky_relu, `beta` and `threshold` for softplus; the other activations ignore them. beta
// and threshold came last, so they close every schema: positional calls written before
// softplus keep their meaning.
#include <torch/library.h>

TORCH_LIBRARY(handgrad, m) {
  // out = a[beta + Omega h] for input h of shape (*, in_features).
  m.def(
      "linear_activation(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "float negative_slope=0.01, float beta=1.0, float threshold=20.0) -> Tensor");
  // out = a[input], elementwise, in input's memory format.
  m.def("activation(Tensor input, str activation, float negative_slope=0.01, float beta=1.0, float threshold=20.0) -> Tensor");
  // input = a[input], in place (nn.ReLU(inplace=True)). It returns nothing, so that
  // torch.compile can functionalize it; handgrad.functional returns `input`.
  m.def("activation_(Tensor(a!) input, str activation, float negative_slope=0.01, float beta=1.0, float threshold=20.0) -> ()");
  // dl/df = grad_output * a'[f], with a' read off `out_or_f`: the activation's output, or its
  // input for leaky_relu with negative_slope < 0 (see csrc/activation.h).
  m.def(
      "activation_backward(Tensor grad_output, Tensor out_or_f, str activation, "
      "float negative_slope=0.01, float beta=1.0, float threshold=20.0) -> Tensor");
  // The same dl/df, and dl/dbeta = its sum over all leading dimensions, in one pass.
  m.def(
      "bias_activation_backward(Tensor grad_output, Tensor out_or_f, str activation, "
      "float negative_slope=0.01, float beta=1.0, float threshold=20.0) -> (Tensor grad_preactivation, Tensor grad_bias)");
  // The whole backward of linear_activation, for when it need not itself be differentiable:
  // dl/dh (7.6), dl/dOmega (7.9) and dl/dbeta, each only where output_mask asks for it.
  m.def(
      "linear_activation_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor out_or_f, str activation, float negative_slope, bool[3] output_mask, float beta=1.0, "
      "float threshold=20.0) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // A whole network, the chapter's backpropagation algorithm (section 7.4) as one op: hidden
  // layers h_{l+1} = a[beta_l + Omega_l h_l], then the output layer, linear or followed by
  // output_activation. weights lists the layers in order, the output layer last; biases one
  // per layer, or none (an empty list) for a network without biases. With
  // checkpoint_every = k > 0 the backward keeps every k-th hidden output only and recomputes
  // the rest (problem 7.11).
  m.def(
      "mlp(Tensor input, Tensor[] weights, Tensor[] biases, str activation, "
      "float negative_slope=0.01, int checkpoint_every=0, str? output_activation=None, "
      "float beta=1.0, float threshold=20.0) -> Tensor");
  // The forward pass that stores what the backward needs: the hidden layers' outputs (every
  // k-th one with checkpointing), as (rows, features) matrices; never f.
  m.def(
      "mlp_forward(Tensor input, Tensor[] weights, Tensor[] biases, str activation, "
      "float negative_slope, int checkpoint_every, str? output_activation=None, float beta=1.0, "
      "float threshold=20.0) "
      "-> (Tensor output, Tensor[] hidden_outputs)");
  // The backward pass, from the output layer down: dl/dOmega (7.9), dl/dbeta and dl/dh (7.6)
  // through a' (7.7, 7.10); dl/d(input) only if input_requires_grad; grad_weights and
  // grad_biases only if parameters_require_grad (else empty, as grad_biases is for a network
  // without biases): a gradient penalty asks for dl/d(input) alone.
  m.def(
      "mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor[] biases, "
      "Tensor[] hidden_outputs, str activation, float negative_slope, int checkpoint_every, "
      "bool input_requires_grad, str? output_activation=None, bool parameters_require_grad=True, "
      "float beta=1.0, float threshold=20.0) "
      "-> (Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");
  // The derivative of mlp_backward (a backward with create_graph=True: gradient penalties,
  // eikonal losses, PINNs), given the cotangents of its results: grad_grad_input of
  // grad_input, grad_grad_weights and grad_grad_biases of grad_weights and grad_biases (None
  // where a result has none; or the lists empty). hidden_outputs holds every hidden output.
  // output_mask asks for the gradients of grad_output, input, weights and biases; each
  // asked is returned, zero where nothing reached it. Not differentiable itself: a third
  // order differentiates the tensor formula instead (csrc/autograd/mlp.cpp).
  m.def(
      "mlp_double_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor[] biases, "
      "Tensor[] hidden_outputs, Tensor? grad_grad_input, Tensor?[] grad_grad_weights, "
      "Tensor?[] grad_grad_biases, str activation, float negative_slope, "
      "str? output_activation, bool[4] output_mask, float beta=1.0, float threshold=20.0) "
      "-> (Tensor grad_grad_output, Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");
}
