// The network layer by layer over all rows with BLAS's products, for networks where fusion
// saves nothing (ForwardPath::Blas): what eager's F.linear
// runs (addmm, the bias inside the product; mm for the gradients), with the activation in
// one pass over each output and, in the backward, a' and the bias gradient in one pass.
// Results are eager's, bit for bit in the products; so is the determinism (BLAS's).
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include "../../shapes.h"
#include "blas_network.h"
#include "entry_points.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

namespace {

// A network's products by their shapes: the work (multiply-adds per row) and the mean depth
// of the products, weighted by their work.
struct Products {
  double work = 0, depth = 0;
  size_t layers = 0;

  // The weights average at most `per_layer` elements.
  bool weights_at_most(double per_layer) const { return work <= per_layer * static_cast<double>(layers); }
};

Products products_of(at::TensorList weights) {
  Products p;
  p.layers = weights.size();
  double depth_work = 0;
  for (const auto& w : weights) {
    const double layer = static_cast<double>(w.size(0)) * w.size(1);
    p.work += layer;
    depth_work += layer * w.size(1);
  }
  p.depth = p.work == 0 ? 0 : depth_work / p.work;
  return p;
}

// The products are few rows for the weights (kEngineBackwardMaxRows).
[[maybe_unused]] bool few_rows(int64_t rows, const Products& products) {
  return rows <= kEngineBackwardMaxRows && products.weights_at_most(kEngineBackwardMaxWeights);
}

// Whether the network is in one of the engine's regimes (blas_network.h): small weights at
// few rows (the overhead regime), or products narrower than max_depth streamed over many rows.
bool in_engine_regime(int64_t rows, at::TensorList weights, const Products& products, double max_depth) {
  const double depth = products.depth;
  const bool narrow_layer = weights.size() == 1 && weights[0].size(0) < kEngineMinLayerOutputs;
  const bool overhead = products.weights_at_most(kEngineMaxWeights) && rows <= kEngineMaxRowsSmallWeights &&
                        !narrow_layer;
  const bool streaming = depth >= kEngineMinDepth && depth < max_depth && rows >= kEngineMinRowsStreaming &&
                         static_cast<double>(rows) >= kEngineRowsPerDepth * depth;
  return overhead || streaming;
}

// Where the engine's blocks lose to BLAS's products layer by layer.
bool layer_by_layer_pays(int64_t rows, at::TensorList weights, const Products& products,
                         const NetworkActivations& activations, int64_t checkpoint_every,
                         bool output_layer_source) {
  // The engine alone recomputes, with checkpointing.
  if (checkpoint_every > 0) return false;
  if (activations.output.has_value() && !output_layer_source) return false;
  if (products.work == 0) return false;
  return !in_engine_regime(rows, weights, products, kEngineMaxDepth);
}

// The hidden layers' a' is read off f, which the network does not store.
bool hidden_layers_read_f(at::TensorList weights, const NetworkActivations& activations) {
  return weights.size() > 1 && derivative_needs_preactivation(activations.hidden, activations.params);
}

}  // namespace

ForwardPath forward_path(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                         int64_t checkpoint_every, bool output_layer_source) {
  const Products products = products_of(weights);
  if (!layer_by_layer_pays(rows, weights, products, activations, checkpoint_every, output_layer_source)) {
    return ForwardPath::Blocks;
  }
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // brgemm makes float32 products only (gemm.h). A single layer, or small weights, would not
  // pay for the pass's fixed costs (packing x^T, writing f back in rows).
  if (weights[0].scalar_type() == at::kFloat && weights.size() > 1 && rows >= kTransposedMinRows &&
      few_rows(rows, products) && !products.weights_at_most(kEngineMaxWeights)) {
    return ForwardPath::Transposed;
  }
#endif  // DEFAULT has no brgemm
  return ForwardPath::Blas;
}

bool blas_backward_pays(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                        int64_t checkpoint_every, bool output_layer_source) {
  // The engine alone recomputes f where a' cannot be read off what is stored.
  if (hidden_layers_read_f(weights, activations)) return false;
  const Products products = products_of(weights);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // Few rows for the weights stay in the engine whichever way the forward went.
  if (few_rows(rows, products)) return false;
#endif  // DEFAULT's SSE2 tiles lose to BLAS: the backward goes where the forward does
  return layer_by_layer_pays(rows, weights, products, activations, checkpoint_every, output_layer_source);
}

bool runs_as_layers(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                    int64_t checkpoint_every) {
  if (checkpoint_every > 0 || !hidden_layers_read_f(weights, activations)) return false;
  const Products products = products_of(weights);
  return products.work > 0 && !in_engine_regime(rows, weights, products, kLayersMinDepth);
}

bool second_order_blas_pays(int64_t rows, at::TensorList weights) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const Products products = products_of(weights);
  if (products.work == 0) return false;
  const double depth = products.depth;
  const bool small_weights = products.weights_at_most(kEngineMaxWeights);
  const bool many_rows = static_cast<double>(rows) >= kEngineRowsPerDepth * depth;
  return !(depth < kEngineMaxDepth && (small_weights || many_rows));
#else
  (void)rows;
  (void)weights;
  return true;
#endif
}

at::Tensor blas_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        const NetworkActivations& activations, std::vector<at::Tensor>* hidden_outputs) {
  at::Tensor h = as_matrix(input).contiguous();
  for (size_t l = 0; l < weights.size(); ++l) {
    const bool is_output = l + 1 == weights.size();
    const at::Tensor f = biases.empty() ? at::mm(h, weights[l].t()) : at::addmm(biases[l], h, weights[l].t());
    const std::optional<Activation> a = is_output ? activations.output : std::optional(activations.hidden);
    if (a.has_value()) activation_kernel(f, f, *a, activations.params);
    if (!is_output && hidden_outputs != nullptr) hidden_outputs->push_back(f);
    h = f;
  }
  at::DimVector sizes(input.sizes());
  sizes.back() = h.size(1);
  return h.view(sizes);
}

NetworkGradients blas_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               at::TensorList weights, at::TensorList biases,
                               at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                               const NetworkActivations& activations, std::array<bool, 3> output_mask) {
  const auto [need_input, need_weights, need_biases] = output_mask;
  const size_t layers = weights.size();
  const at::Tensor x = as_matrix(input).contiguous();
  at::Tensor g = as_matrix(grad_output).contiguous();
  // The gradients the call returns, made first and the large ones before the small, as
  // eager's end with its bias gradients: glibc gives the top of its heap back to the system
  // once enough is free there, and a weight gradient left on top, freed by the next
  // zero_grad(), was faulted in again on every step (2048-2048-10 at 64 rows, 12 processes:
  // 806-1635 minor page faults per step before, 13-26 in 7 of them and about 1,200 in 5
  // after; eager 0-26).
  std::vector<at::Tensor> grad_weights, grad_biases;
  for (size_t l = 0; l < layers && need_weights; ++l) grad_weights.push_back(at::empty(weights[l].sizes(), x.options()));
  for (size_t l = 0; l < layers && need_biases; ++l) grad_biases.push_back(at::empty({weights[l].size(0)}, x.options()));
  at::Tensor grad_input;
  for (size_t l = layers; l-- > 0;) {
    const bool is_output = l + 1 == layers;
    const std::optional<Activation> a = is_output ? activations.output : std::optional(activations.hidden);
    if (a.has_value()) {  // dl/df = dl/dh * a'[.], read off the layer's output (7.7, 7.10)
      const at::Tensor layer_out_or_f = is_output ? as_matrix(out_or_f).contiguous() : hidden_outputs[l];
      const at::Tensor grad_pre = at::empty(layer_out_or_f.sizes(), layer_out_or_f.options());
      if (need_biases) {
        bias_activation_backward_kernel(g, layer_out_or_f, grad_pre, grad_biases[l], *a, activations.params);
      } else {
        activation_backward_kernel(g, layer_out_or_f, grad_pre, *a, activations.params);
      }
      g = grad_pre;
    } else if (need_biases) {
      at::sum_out(grad_biases[l], g, 0);
    }
    const at::Tensor& h = l == 0 ? x : hidden_outputs[l - 1];
    if (need_weights) at::mm_out(grad_weights[l], g.t(), h);  // dl/dOmega = g^T h  (7.9)
    if (l > 0 || need_input) g = at::mm(g, weights[l]);       // dl/dh = g Omega  (7.6)
  }
  if (need_input) grad_input = g.view(input.sizes());
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
