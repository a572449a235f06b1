// The kernel of every handgrad op for sparse, nested and mkldnn tensors: a clear error
// that names the op, the argument and its layout, instead of the dispatcher's list of every
// backend.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <string>

#include "checks.h"

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
  // The op's name as users know it ("linear_relu", "sigmoid_backward", ...).
  c10::string_view activation;
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (arguments[i].name() == "activation" && values[i].isString()) {
      activation = values[i].toStringView();
    }
  }
  const std::string& schema = op.schema().name();
  const OpName name = OpName::of(c10::string_view(schema).substr(schema.find("::") + 2), activation);
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
