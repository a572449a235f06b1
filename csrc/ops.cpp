// The handgrad operator library: every op schema, in one place, and the Python module init.
//
// Backends register their kernels in their own TORCH_LIBRARY_IMPL blocks (csrc/cpu,
// csrc/cuda); fake kernels and autograd live in pyext/handgrad. The `activation` argument
// is one of "relu", "leaky_relu", "sigmoid"; `negative_slope` is used by leaky_relu only.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import handgrad._C` loads this shared library, whose static initializers register the
// ops with PyTorch's dispatcher. Nothing is bound to Python here: every call goes through
// torch.ops.handgrad, so that torch.compile and torch.export see real operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(handgrad, m) {
  // out = a[beta + Omega h] for input h of shape (*, in_features).
  m.def(
      "linear_activation(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "float negative_slope=0.01) -> Tensor");
  // out = a[input], elementwise.
  m.def("activation(Tensor input, str activation, float negative_slope=0.01) -> Tensor");
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
}
