// The fused CPU engine: the backpropagation algorithm of section 7.4 in blocks of rows.
// (Networks whose products are large enough that fusion saves nothing go to BLAS instead,
// layer by layer: blas_network.cpp.)
//
// Forward. A block of rows, sized so that its widest layer's input and output stay in L2,
// goes through every layer before the next block starts: f = beta + h Omega^T with the
// bias inside the accumulation (csrc/cpu/gemm.h), then a[f] while the block is in cache.
// Each stored hidden output is written once, straight from the kernel; nothing else reaches
// memory. Blocks are independent, shared among threads.
//
// Backward. Block by block, from the output layer down, with g = dl/dh of the layer:
//   g = g * a'[.]                        a prologue in cache (7.7, 7.10)
//   dl/dbeta += column sums of g
//   dl/dOmega += g^T h                   (7.9)
//   g = g Omega                          dl/dh of the layer below (7.6)
// a' is read off the stored output, or off f recomputed in cache where the output hides
// its sign (leaky_relu with a negative slope) or is not stored (the output layer). With
// checkpoint_every = k the backward goes stretch by stretch from the top: each block
// recomputes the stretch's k layers from its stored input, with Omega^T packed for that
// stretch's layers only, and dl/dh at the stretch's input is carried down for all rows.
//
// Determinism. dl/dOmega is accumulated in a fixed number of slots, each the sum of a fixed,
// contiguous run of blocks in order, and the slots are added pairwise; dl/dbeta is summed
// per block and the blocks' sums added pairwise. Slots and blocks depend on the shape alone,
// never on the thread count, so the gradients are the same bits on every run and for every
// thread count. Everything is computed in the accumulation type (float for bfloat16 and
// float16) and rounded once when written; hidden outputs are rounded to the tensor's dtype
// before the next layer reads them, as eager stores them.
#include "blas_network.h"
#include "engine.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "../../checkpoint.h"
#include "../../checks.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// --- Forward ---

template <typename scalar_t>
void forward_blocks(const Plan& p, const NetworkActivations& acts, const scalar_t* x,
                    const Weights<at::opmath_type<scalar_t>>& w, scalar_t* out,
                    c10::ArrayRef<scalar_t*> stored) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  const int64_t width = p.max_width(), d0 = p.widths[0];
  const int64_t per_thread =
      per_thread_elements(p.block_size * (2 * width + (same ? 0 : d0)), sizeof(T));
  const Scratch<T> scratch(sharing_threads(p.blocks) * per_thread);
  share(p.blocks, [&](int64_t first, int64_t last) {
    T* space = thread_space(scratch, per_thread);
    T* buffers[2] = {space, space + p.block_size * width};
    T* input_space = space + 2 * p.block_size * width;
    for (int64_t block = first; block < last; ++block) {
      const int64_t row = p.first_row(block), n = p.rows_in(block);
      Rows<const T> h = as_accumulation_type<scalar_t, T>(x + row * d0, n, d0, input_space);
      for (size_t l = 0; l < p.layers(); ++l) {
        const int64_t d = p.widths[l + 1];
        const bool is_output = l + 1 == p.layers();
        scalar_t* target = is_output ? out + row * d : (stored[l] ? stored[l] + row * d : nullptr);
        T* f = buffers[l % 2];
        if constexpr (same) {
          if (target != nullptr) f = target;  // written once, straight from the kernel
        }
        const std::optional<Activation> a = is_output ? acts.output : std::optional(acts.hidden);
        if (a.has_value()) {
          layer_forward<scalar_t, T>(p, l, w, h, n, {f, d}, *a, acts.params);
        } else {
          layer_product<scalar_t, T>(p, l, w, h, n, {f, d});
        }
        if constexpr (!same) {
          if (target != nullptr) at::vec::convert(f, target, n * d);
          if (!is_output) round_to_dtype<scalar_t, T>(f, n * d);
        }
        h = {f, d};
      }
    }
  });
}

// --- Forward of few rows, transposed ---
//
// Where the rows are few for the weights (ForwardPath::Transposed), packing Omega^T for
// f = h Omega^T would cost as much as the product, and BLAS's products of so few rows ran at
// 64-72 % of the FMA limit. This pass computes f^T = Omega h^T instead, layer by layer over
// all rows: brgemm reads Omega as it lies, its other operand is h^T (x^T, packed once, then
// each layer's output), and its vectors run across the rows. Each layer's outputs (rows of
// f^T) are shared among threads in chunks; a chunk gets its bias and activation while in
// cache and is written, transposed, to the stored hidden output or the network's output.
// Chunks follow from the shape alone: the same bits for every thread count. Each element is
// the product, summed in pieces of the depth (gemm.h), plus the bias, then a, as in the
// blocks' pass. Float32 only (brgemm's).
//
// A layer's outputs go in kTransposedChunks near-equal chunks (12 shares evenly among 1, 2,
// 3, 4 or 6 threads), of at least kTransposedMinChunk outputs each.
constexpr int64_t kTransposedChunks = 12, kTransposedMinChunk = 8;

// f[i, :] = a[f[i, :] + bias[i]] for the rows of a chunk of f^T: one bias per row, in the
// activation's pass where it has one of its own (tanh runs eager's VML over whole rows).
void add_row_bias_and_activate(float* f, int64_t rows, int64_t cols, const float* bias,
                               std::optional<Activation> activation, const ActivationParameters& params) {
  using V = Lanes<float>;
  if (bias == nullptr || !activation.has_value() || *activation == Activation::Tanh) {
    for (int64_t i = 0; i < rows && bias != nullptr; ++i) {
      const V b(bias[i]);
      map_lanes([&](V x) { return x + b; }, f + i * cols, f + i * cols, cols);
    }
    if (activation.has_value()) activate_rows<float>(*activation, params, {f, cols}, rows, cols);
    return;
  }
  dispatch_activation(*activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationConstants<V> k(params);
    for (int64_t i = 0; i < rows; ++i) {
      const V b(bias[i]);
      map_lanes([&](V x) { return activate<A>(x + b, k); }, f + i * cols, f + i * cols, cols);
    }
  });
}

void transposed_forward(const Plan& p, const NetworkActivations& acts, at::TensorList weights,
                        at::TensorList biases, const float* x, float* out, c10::ArrayRef<float*> stored) {
  const Weights<float> w = prepare<float, float>(weights, biases, /*natural=*/true, /*transposed=*/false);
  const int64_t n = p.rows, d0 = p.widths[0];
  const int64_t width = *std::max_element(p.widths.begin() + 1, p.widths.end());
  const Scratch<float> space(n * (d0 + 2 * width));
  const float* h = space.get();  // h^T: x^T, then each layer's output
  float* outputs[2] = {space.get() + n * d0, space.get() + n * (d0 + width)};
  // On one thread: shared among two, x^T of the MNIST-sized network's 64 rows took 55-60 us
  // inside a forward, against 16 on one (AVX512).
  transpose(x, d0, space.get(), n, n, d0);
  for (size_t l = 0; l < p.layers(); ++l) {
    const int64_t d_in = p.widths[l], d_out = p.widths[l + 1];
    const bool is_output = l + 1 == p.layers();
    const std::optional<Activation> a = is_output ? acts.output : std::optional(acts.hidden);
    float* f = outputs[l % 2];
    float* target = is_output ? out : stored[l];
    const bool brgemm = brgemm_runs<float>(d_out, n, d_in, d_in, 1);
    const int64_t chunks = std::clamp<int64_t>(d_out / kTransposedMinChunk, 1, kTransposedChunks);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t row = chunk * d_out / chunks, count = (chunk + 1) * d_out / chunks - row;
        float* f_chunk = f + row * n;
        gemm_on_this_thread<float>(brgemm, count, n, d_in, w.natural[l] + row * d_in, d_in, 1, h, n,
                                   f_chunk, n, Init::Zero, nullptr);
        add_row_bias_and_activate(f_chunk, count, n, w.bias[l] == nullptr ? nullptr : w.bias[l] + row, a,
                                  acts.params);
        if (target != nullptr) transpose(f_chunk, n, target + row, d_out, count, n);
      }
    });
    h = f;
  }
}

// The transposed pass for the dtype the dispatch gives: float32, the only one forward_path
// sends there.
template <typename scalar_t>
void transposed_forward(const Plan& p, const NetworkActivations& acts, at::TensorList weights,
                        at::TensorList biases, const scalar_t* x, scalar_t* out,
                        c10::ArrayRef<scalar_t*> stored) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    transposed_forward(p, acts, weights, biases, x, out, stored);
  } else {
    TORCH_INTERNAL_ASSERT(false, "handgrad's transposed forward runs float32 networks only");
  }
}

// --- Backward ---

template <typename scalar_t>
struct Gradients {
  scalar_t* input;                  // (rows, d_0) or nullptr
  PerLayer<scalar_t*> weights;  // per layer, or empty
  PerLayer<scalar_t*> biases;   // per layer, or empty
};

template <typename scalar_t>
void backward_blocks(const Plan& p, const NetworkActivations& acts, int64_t checkpoint_every,
                     const scalar_t* x, at::TensorList weights, Weights<at::opmath_type<scalar_t>>& w,
                     c10::ArrayRef<const scalar_t*> hidden_outputs, const scalar_t* grad_output,
                     const scalar_t* out_or_f, const Gradients<scalar_t>& grads) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  const size_t layers = p.layers(), hidden = p.hidden();
  const int64_t width = p.max_width(), d0 = p.widths[0];
  const bool checkpointing = checkpoint_every > 0;
  const Stretches stretches(hidden, checkpoint_every);
  const bool hides_sign = derivative_needs_preactivation(acts.hidden, acts.params);

  const bool need_weights = !grads.weights.empty(), need_biases = !grads.biases.empty();
  const GradientSums<scalar_t> sums(p, grads.weights, grads.biases, /*zeroed=*/false);
  // Stretch by stretch, from the top, so that Omega^T (for recomputing f) is packed for one
  // stretch's layers at a time: dl/dh at a stretch's input is carried to the one below for
  // all rows. Without checkpointing the hidden layers are one stretch (checkpoint.h).
  const bool recomputes_output = acts.output.has_value() && out_or_f == nullptr;
  const size_t passes = std::max<size_t>(stretches.count, 1);
  // The hidden outputs a block holds in T: a stretch of them where they are recomputed or
  // converted, none where they are read where they lie.
  int64_t held_width = 0;
  for (size_t s = 0; s < stretches.count && (checkpointing || !same); ++s) {
    int64_t sum = 0;
    for (size_t j = stretches.first(s) + 1; j <= stretches.last(s); ++j) sum += p.widths[j];
    held_width = std::max(held_width, sum);
  }
  // Layer l's product is recomputed in stretch s: to rebuild its output, or to read a' off f.
  const auto packs = [&](size_t s, size_t l) {
    if (l == layers - 1) return recomputes_output && stretches.last(s) == hidden;
    return l >= stretches.first(s) && l < stretches.last(s) && (checkpointing || hides_sign);
  };
  int64_t packed_size = 0, carried_width = 0;
  for (size_t s = 0; s < passes; ++s) {
    int64_t size = 0;
    for (size_t l = 0; l < layers; ++l) size += packs(s, l) ? weights[l].numel() : 0;
    packed_size = std::max(packed_size, size);
    if (s > 0) carried_width = std::max(carried_width, p.widths[stretches.first(s)]);
  }
  // Two, one read and one written by each stretch: their blocks' rows of different widths
  // would overlap in one.
  const Scratch<T> packed(packed_size), carried(2 * p.rows * carried_width);
  const auto carried_into = [&](size_t s) { return carried.get() + (s % 2) * p.rows * carried_width; };

  // A block's rows of dl/dh and dl/df (g), f and the output layer's a' source are at most
  // the widest layer's output wide, or the input's where dl/dx is made in place and converted;
  // the input is held only where it is converted. (Everything max_width wide, the MNIST-sized
  // backward at 64 rows took 1 MB of fresh memory per call, not 260 KB.)
  const int64_t n_max = p.block_size;
  const int64_t inner = *std::max_element(p.widths.begin() + 1, p.widths.end());
  const int64_t g_width = std::max(inner, !same && grads.input != nullptr ? d0 : 0);
  const int64_t input_width = same ? 0 : width;
  const int64_t per_thread = per_thread_elements(
      n_max * (2 * g_width + 2 * inner + held_width + input_width) + inner, sizeof(T));
  const Scratch<T> scratch(sharing_threads(p.slots) * per_thread);
  for (size_t s = passes; s-- > 0;) {
    const size_t first = stretches.first(s), last = stretches.last(s);
    T* next = packed.get();
    for (size_t l = 0; l < layers; ++l) {
      w.transposed[l] = nullptr;
      if (!packs(s, l)) continue;
      transpose_weight<scalar_t, T>(weights[l], w.natural[l], next);
      w.transposed[l] = next;
      next += weights[l].numel();
    }
    share(p.slots, [&](int64_t first_slot, int64_t last_slot) {
      T* space = thread_space(scratch, per_thread);
      T* g_space[2] = {space, space + n_max * g_width};
      T* f_space = space + 2 * n_max * g_width;
      T* source_space = f_space + n_max * inner;
      T* held_space = source_space + n_max * inner;
      T* input_space = held_space + n_max * held_width;  // a stretch's input
      T* run = input_space + n_max * input_width;

      for (int64_t slot = first_slot; slot < last_slot; ++slot) {
        for (int64_t block = p.first_block(slot); block < p.first_block(slot + 1); ++block) {
          const bool first_in_slot = block == p.first_block(slot);
          const int64_t row = p.first_row(block), n = p.rows_in(block);
          PerLayer<Rows<const T>> h(layers);  // h[l]: the input of layer l, in this block
          int current = 0;
          // g starts as dl/d(out) of the block, or dl/dh[last] carried from the stretch above.
          Rows<const T> g = last == hidden
              ? as_accumulation_type<scalar_t, T>(grad_output + row * p.widths[layers], n,
                                                  p.widths[layers], g_space[current])
              : Rows<const T>{carried_into(s + 1) + row * p.widths[last], p.widths[last]};

          // The backward of layer l, from its input h[l]: g is dl/d(its output) on entry and
          // dl/dh[l] on exit. source: its output (for a'), if at hand.
          const auto layer_backward = [&](size_t l, std::optional<Activation> a,
                                          Rows<const T> source, bool from_output) {
            const int64_t d_in = p.widths[l], d_out = p.widths[l + 1];
            if (a.has_value()) {
              if (!from_output) {  // f = beta + Omega h, recomputed in cache
                layer_product<scalar_t, T>(p, l, w, h[l], n, {f_space, d_out});
                source = {f_space, d_out};
              }
              Rows<T> dst{g_space[current], d_out};
              activation_backward_rows<T>(*a, acts.params, from_output, g, source, dst, n, d_out);
              round_to_dtype<scalar_t, T>(dst.data, n * d_out);  // dl/df as eager stores it
              g = {dst.data, dst.ld};
            }
            if (need_biases) column_sums<T>(g, n, d_out, sums.biases(block, l), run);
            if (need_weights) {  // dl/dOmega += g^T h  (7.9)
              gemm<T>(d_out, d_in, n, g.data, 1, g.ld, h[l].data, h[l].ld, sums.weights(slot, l), d_in,
                      first_in_slot ? Init::Zero : Init::AddToC);
            }
            if (l > 0 || grads.input != nullptr) {  // dl/dh = g Omega  (7.6)
              current = 1 - current;
              T* dst = g_space[current];
              if (s > 0 && l == first) dst = carried_into(s) + row * d_in;  // for the stretch below
              if constexpr (same) {
                if (l == 0) dst = grads.input + row * d0;
              }
              gemm<T>(n, d_in, d_out, g.data, g.ld, 1, w.natural[l], d_in, dst, d_in, Init::Zero);
              if constexpr (!same) {
                if (l == 0) at::vec::convert(dst, grads.input + row * d0, n * d0);
                round_to_dtype<scalar_t, T>(dst, n * d_in);  // dl/dh as eager stores it
              }
              g = {dst, d_in};
            }
          };

          // The stretch's input: the network's, or stored (with checkpointing only).
          const int64_t d_first = p.widths[first];
          h[first] = as_accumulation_type<scalar_t, T>(
              first == 0 ? x + row * d0 : hidden_outputs[s - 1] + row * d_first, n, d_first, input_space);
          T* held = held_space;
          for (size_t j = first + 1; j <= last; ++j) {  // h[j], the output of hidden layer j - 1
            const int64_t d = p.widths[j];
            if (checkpointing) {
              layer_forward<scalar_t, T>(p, j - 1, w, h[j - 1], n, {held, d}, acts.hidden, acts.params);
              round_to_dtype<scalar_t, T>(held, n * d);
              h[j] = {held, d};
            } else {
              h[j] = as_accumulation_type<scalar_t, T>(hidden_outputs[j - 1] + row * d, n, d, held);
            }
            held += n * d;
          }
          if (last == hidden) {  // the output layer
            const size_t l = layers - 1;
            const int64_t d = p.widths[layers];
            if (recomputes_output || !acts.output.has_value()) {
              layer_backward(l, acts.output, {nullptr, 0}, /*from_output=*/false);
            } else {
              layer_backward(l, acts.output,
                             as_accumulation_type<scalar_t, T>(out_or_f + row * d, n, d, source_space),
                             /*from_output=*/true);
            }
          }
          for (size_t l = last; l-- > first;) {
            // a' of hidden layer l, read off its output h[l + 1] unless that hides the sign.
            layer_backward(l, acts.hidden, h[l + 1], /*from_output=*/!hides_sign);
          }
        }
      }
    });
  }

  sums.finish();
}

}  // namespace

at::Tensor fused_forward(const at::Tensor& input, at::TensorList weight_list,
                         at::TensorList bias_list, const NetworkActivations& activations,
                         int64_t checkpoint_every, std::vector<at::Tensor>* hidden_outputs) {
  const ForwardPath path = forward_path(leading_rows(input.sizes()), weight_list, activations, checkpoint_every, true);
  if (path == ForwardPath::Blas) return blas_forward(input, weight_list, bias_list, activations, hidden_outputs);
  const at::Tensor x = contiguous(input);
  const PerLayer<at::Tensor> weights = contiguous(weight_list), biases = contiguous(bias_list);
  const Plan p = plan(leading_rows(input.sizes()), weights, at::elementSize(at::toOpMathType(input.scalar_type())));
  at::DimVector out_sizes(input.sizes());
  out_sizes.back() = p.widths.back();
  at::Tensor out = uninitialized(out_sizes, input);
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad_fused_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    PerLayer<scalar_t*> stored(p.hidden(), nullptr);
    if (hidden_outputs != nullptr) {
      hidden_outputs->reserve(p.hidden());
      for (size_t l = 0; l < p.hidden(); ++l) {
        if (!is_stored_output(l + 1, p.hidden(), checkpoint_every)) continue;
        hidden_outputs->push_back(uninitialized({p.rows, p.widths[l + 1]}, input));
        stored[l] = hidden_outputs->back().data_ptr<scalar_t>();
      }
    }
    if (path == ForwardPath::Transposed) {
      transposed_forward<scalar_t>(p, activations, weights, biases, x.const_data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>(), stored);
      return;
    }
    const Weights<T> w = prepare<scalar_t, T>(weights, biases, /*natural=*/false, /*transposed=*/true);
    forward_blocks<scalar_t>(p, activations, x.const_data_ptr<scalar_t>(), w,
                             out.data_ptr<scalar_t>(), stored);
  });
  return out;
}

NetworkGradients fused_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                at::TensorList weight_list, at::TensorList bias_list,
                                at::TensorList hidden_outputs, const at::Tensor& out_or_f,
                                const NetworkActivations& activations, int64_t checkpoint_every,
                                std::array<bool, 3> output_mask) {
  if (blas_backward_pays(leading_rows(input.sizes()), weight_list, activations, checkpoint_every,
                         out_or_f.defined() || !activations.output.has_value())) {
    return blas_backward(grad_output, input, weight_list, bias_list, contiguous(hidden_outputs),
                         out_or_f, activations, output_mask);
  }
  const at::Tensor x = contiguous(input);
  const PerLayer<at::Tensor> weights = contiguous(weight_list), biases = contiguous(bias_list);
  const Plan p = plan(leading_rows(input.sizes()), weights, at::elementSize(at::toOpMathType(input.scalar_type())));
  const at::Tensor grad = contiguous(grad_output);
  const at::Tensor source = out_or_f.defined() ? contiguous(out_or_f) : at::Tensor();
  const PerLayer<at::Tensor> stored = contiguous(hidden_outputs);
  const auto [need_input, need_weights, need_biases] = output_mask;

  at::Tensor grad_input = need_input ? uninitialized({p.rows, p.widths[0]}, input) : at::Tensor();
  std::vector<at::Tensor> grad_weights, grad_biases;
  grad_weights.reserve(need_weights ? p.layers() : 0);
  grad_biases.reserve(need_biases ? p.layers() : 0);
  for (size_t l = 0; l < p.layers(); ++l) {
    if (need_weights) grad_weights.push_back(uninitialized(weights[l].sizes(), input));
    if (need_biases) grad_biases.push_back(uninitialized({p.widths[l + 1]}, input));
  }
  if (p.blocks == 0) {  // no rows: the sums are zero
    for (auto& t : grad_weights) t.zero_();
    for (auto& t : grad_biases) t.zero_();
  } else {
    HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad_fused_backward", [&] {
      using T = at::opmath_type<scalar_t>;
      // Omega^T, where f is recomputed, is packed by backward_blocks one stretch at a time.
      Weights<T> w = prepare<scalar_t, T>(weights, biases, /*natural=*/true, /*transposed=*/false);
      PerLayer<const scalar_t*> saved_data;
      for (const auto& t : stored) saved_data.push_back(t.const_data_ptr<scalar_t>());
      Gradients<scalar_t> g{need_input ? grad_input.data_ptr<scalar_t>() : nullptr, {}, {}};
      for (auto& t : grad_weights) g.weights.push_back(t.data_ptr<scalar_t>());
      for (auto& t : grad_biases) g.biases.push_back(t.data_ptr<scalar_t>());
      backward_blocks<scalar_t>(p, activations, checkpoint_every, x.const_data_ptr<scalar_t>(), weights, w,
                                saved_data, grad.const_data_ptr<scalar_t>(),
                                source.defined() ? source.const_data_ptr<scalar_t>() : nullptr, g);
    });
  }
  if (need_input) grad_input = grad_input.view(input.sizes());
  return {grad_input, grad_weights, grad_biases};
}

const char* micro_kernel_description() { return kMicroKernel; }

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
