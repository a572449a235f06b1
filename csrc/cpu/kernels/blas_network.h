// The fused engine's other path: the network layer by layer with BLAS's products, where
// they are large enough that fusion saves nothing (blas_network.cpp).
#pragma once

#include "entry_points.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

// The products go to BLAS where their mean depth, weighted by their work, is at least this
// (in_features), and there are this many rows. On the DEFAULT path handgrad's tiles are
// scalar code while BLAS picks the CPU's own vectors (measured: thin64 12x eager's time),
// so every network of 32 rows or more goes to BLAS there.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr double kBlasMinDepth = 384;
#else
constexpr double kBlasMinDepth = 0;
#endif
constexpr int64_t kBlasMinRows = 32;

// Whether BLAS runs this network. output_layer_source: a' of the output layer can be read
// off a tensor the backward is given.
bool blas_pays(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
               int64_t checkpoint_every, bool output_layer_source);

at::Tensor blas_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        const NetworkActivations& activations, std::vector<at::Tensor>* hidden_outputs);

NetworkGradients blas_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               at::TensorList weights, at::TensorList biases,
                               at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                               const NetworkActivations& activations, std::array<bool, 3> output_mask);

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
