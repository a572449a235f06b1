// The fused engine's other path: the network layer by layer with BLAS's products, where
// they are large enough that fusion saves nothing (blas_network.cpp).
#pragma once

#include "entry_points.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

// The engine runs a network in two regimes only, BLAS every other (measured, single layers
// and networks against eager, rows 8 to 16384, widths 40 to 784: RESULTS.md):
//  - overhead: small weights (mean d_in d_out at most kEngineMaxWeights) and at most
//    kEngineMaxRowsSmallWeights rows, where a BLAS call's fixed cost is most of the time;
//  - streaming: many rows for the depth (rows >= kEngineRowsPerDepth times the products'
//    mean depth, weighted by their work, and >= kEngineMinRowsStreaming; that depth in
//    [kEngineMinDepth, kEngineMaxDepth)), where blocks in cache save passes over memory and
//    enough blocks run in parallel. (Both bounds depend on the shape alone, never on the
//    thread count, so that the path, and so the bits, do not either.)
// Elsewhere the engine loses: few rows pay for packing Omega^T on every call (up to 3x eager
// at 32 x 256 x 256), and fewer blocks than threads share columns inside each product.
// On the DEFAULT path handgrad's tiles have SSE2's registers (NEON's on aarch64) while BLAS
// picks the CPU's own vectors (measured with the tiles at at::vec's portable Vectorized:
// thin64 12x eager's time; they are 6x faster since, at 64-70 % of SSE2's limit), so only
// the overhead regime is left there.
constexpr double kEngineMaxWeights = 64 * 64;
// A single layer with fewer outputs than this goes to BLAS even with small weights: the
// tiles' vectors run across the outputs, mostly masked off (a 256 -> 1 layer at 64 rows took
// 2.1x eager's forward, 256 -> 8 1.08x).
constexpr int64_t kEngineMinLayerOutputs = 16;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kEngineMaxRowsSmallWeights = 256, kEngineMinRowsStreaming = 2048;
constexpr double kEngineRowsPerDepth = 16, kEngineMinDepth = 64, kEngineMaxDepth = 384;
#else
constexpr int64_t kEngineMaxRowsSmallWeights = 31, kEngineMinRowsStreaming = 0;
constexpr double kEngineRowsPerDepth = 0, kEngineMinDepth = 0, kEngineMaxDepth = 0;  // none
#endif
// Where BLAS runs the forward, the backward of at most kEngineBackwardMaxRows rows still runs
// in the engine while the weights are at most kEngineBackwardMaxWeights on average: it packs
// nothing (it reads Omega as it is), and BLAS's weight gradient g^T h, a product only rows
// deep, ran slower on 2 threads than on 1 where in_features > out_features (MKL, 64 x 784 x
// 256: 405 us against 270). Measured per capability and thread count (RESULTS.md): the
// MNIST-sized network at 16-64 rows 0.77-0.92 of torch.nn against BLAS's 0.94-1.00, 512-wide
// ones 0.80-0.93 against 0.97-1.13; from 1024 x 1024 weights AVX2's engine loses (1.13-1.17).
constexpr int64_t kEngineBackwardMaxRows = 64;
constexpr double kEngineBackwardMaxWeights = 512 * 512;
// The forward of such few rows runs in the engine too, for networks of two layers or more,
// from kTransposedMinRows rows and for weights larger than kEngineMaxWeights on average, as
// f^T = Omega h^T (fused_mlp.cpp): it reads Omega as it is and packs only x^T, each layer's
// output is the next one's operand as it lies, and its vectors run across the rows. Float32
// only, where brgemm makes the products (oneDNN's AVX2/AVX-512 kernels; measured, 2 threads,
// AVX512: 784 -> 256 at 64 rows 231 GFLOP/s, 98 % of the FMA limit, where BLAS's addmm
// reached 168). Below kTransposedMinRows most of each vector would be masked off. For a
// single layer, packing x^T and writing f back in rows ate the gain (784 -> 256 and 256 ->
// 256 at 64 rows: 0.96-1.30 of eager's forward); for small weights (256 -> 1, 64 -> 8) the
// pass's fixed costs took 1.2-2.3x BLAS's time.
constexpr int64_t kTransposedMinRows = 16;

// Which pass runs a network's forward: the engine's blocks, where a regime above says so;
// else the transposed pass over few rows (kTransposedMinRows); else BLAS. output_layer_source:
// a' of the output layer can be read off a tensor the backward is given.
ForwardPath forward_path(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                         int64_t checkpoint_every, bool output_layer_source);

// Whether BLAS runs this network's backward: where it would run the forward but for the
// transposed pass, unless the rows are few for the weights (kEngineBackwardMaxRows), and
// never where the hidden layers' a' is read off f, which only the engine recomputes. The
// engine's backward reads the hidden outputs BLAS's forward stored as it reads its own.
bool blas_backward_pays(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                        int64_t checkpoint_every, bool output_layer_source);

// Whether the network's graph is better recorded as a chain of fused layers, each keeping
// its f, than as one node that keeps the hidden outputs only: where the hidden layers' a' is
// read off f (SiLU, GELU, softplus; LeakyReLU with a negative slope), the engine's backward
// recomputes every f, one product more per hidden layer than eager makes. That pays only in
// the engine's regimes, and there only for products narrower than kLayersMinDepth. Measured
// (2 threads, AVX512, SiLU, forward+backward against torch.nn; the network / the chain):
// 64 x 784-256-256-10 1.30 / 0.91; 256 x 512-512-512-512-10 1.51 / 1.00; 4096 x 1024-wide
// 1.59 / 0.99; 16384 x 256-wide 0.98 / 0.79; 16384 x 128-wide 0.77 / 0.71; 65536 x 64-wide
// 0.67 / 0.67; 8192 x 3-128x4-1 0.66 / 0.71; figure 7.8 at 10 rows 0.65 / 0.94. The chain
// keeps eager's memory (h and f of each layer), the network half of it. Not with
// checkpointing, whose point is the memory.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr double kLayersMinDepth = 192;
#else
constexpr double kLayersMinDepth = 0;  // no streaming regime
#endif
bool runs_as_layers(int64_t rows, at::TensorList weights, const NetworkActivations& activations,
                    int64_t checkpoint_every);

// Whether the double backward runs as its tensor formula on BLAS's products rather than in
// the engine (fused_second_order.cpp). Measured against each other per capability
// (RESULTS.md, "The fused double backward"): the engine's pass wins wherever the products
// are narrow (mean depth below kEngineMaxDepth) and either the weights are small or the rows
// many for the depth (the PINNs' narrow networks most, where the formula's elementwise passes
// and calls dominate); the formula wins on wide layers and on few rows of mid-sized weights.
// On the DEFAULT path the engine's SSE2 tiles lose to BLAS's wider vectors everywhere.
bool second_order_blas_pays(int64_t rows, at::TensorList weights);

at::Tensor blas_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                        const NetworkActivations& activations, std::vector<at::Tensor>* hidden_outputs);

NetworkGradients blas_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               at::TensorList weights, at::TensorList biases,
                               at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                               const NetworkActivations& activations, std::array<bool, 3> output_mask);

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
