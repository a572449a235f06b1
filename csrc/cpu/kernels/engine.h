// The fused CPU engine's pieces, shared by its passes: the first backward's
// (fused_mlp.cpp) and the double backward's (fused_second_order.cpp). Blocks of rows, their
// plan and scratch, the weights in the accumulation type, and the passes over a block while
// it is in cache.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/ceil_div.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <type_traits>
#include <utility>

#include "entry_points.h"
#include "gemm.h"
#include "vectorized.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {

// A block's widest layer (its input and output rows) in about this many bytes: a third of a
// 1 MiB L2, leaving room for a panel of weights.
constexpr int64_t kBlockBytes = 384 * 1024;
constexpr int64_t kMaxBlockRows = 256, kMinBlockRows = 16;
// Weight-gradient slots. Fewer than kSlottedBlocks blocks share one slot: they run in order,
// their products' columns shared among threads, and the weight gradient is accumulated in
// the output itself. More blocks run in parallel, each thread on its own slots: at most
// kMaxSlots (12 shares evenly among 1, 2, 3, 4 or 6 threads), in at most kSlotBytes.
constexpr int64_t kSlottedBlocks = 8, kMaxSlots = 12, kSlotBytes = int64_t{32} << 20;

// A short list with an entry per layer, held inline up to 8 layers: std::vector's operator
// new and delete, some 60 a training step, cost figure 7.8's ~11,000 instructions (callgrind).
template <typename T>
using PerLayer = c10::SmallVector<T, 8>;

// Small blocks of scratch memory that each thread keeps from call to call. A tiny network's
// forward and backward make eight scratch buffers, and glibc serves blocks over 1 KiB from
// its bins: keeping them took figure 7.8's training step from 499,400 to 490,900
// instructions (callgrind), ~1,000 a buffer. Capacities are powers of two from 256 bytes,
// so that a block serves the next call's buffer of about the same size; a thread keeps at
// most kKeptBlocks of them, 512 KiB in all, and frees them when it ends.
constexpr size_t kKeptBlockBytes = 64 * 1024;
constexpr int kKeptBlocks = 8;

class KeptBlocks {
 public:
  KeptBlocks() = default;
  KeptBlocks(const KeptBlocks&) = delete;
  KeptBlocks& operator=(const KeptBlocks&) = delete;
  ~KeptBlocks() {
    for (int i = 0; i < count_; ++i) std::free(blocks_[i].data);
  }

  struct Block {
    void* data;
    size_t capacity;
  };

  // The smallest kept block of at least `bytes` (at most kKeptBlockBytes), or a new one.
  Block take(size_t bytes) {
    int best = -1;
    for (int i = 0; i < count_; ++i) {
      if (blocks_[i].capacity >= bytes && (best < 0 || blocks_[i].capacity < blocks_[best].capacity)) best = i;
    }
    if (best >= 0) {
      const Block block = blocks_[best];
      blocks_[best] = blocks_[--count_];
      return block;
    }
    size_t capacity = 256;
    while (capacity < bytes) capacity *= 2;
    void* data = std::aligned_alloc(64, capacity);
    TORCH_CHECK(data != nullptr, "handgrad: out of memory for ", capacity, " bytes of scratch");
    return {data, capacity};
  }

  void give_back(Block block) {
    if (count_ < kKeptBlocks) {
      blocks_[count_++] = block;
    } else {
      std::free(block.data);
    }
  }

 private:
  Block blocks_[kKeptBlocks] = {};
  int count_ = 0;
};

inline KeptBlocks& kept_blocks() {
  thread_local KeptBlocks blocks;
  return blocks;
}

// Uninitialized memory for n elements, without a tensor around it: a tiny layer's call makes
// several, and at::empty's dispatch and TensorImpl cost each of them measurable time. Up to
// kKeptBlockBytes it is one of the thread's kept blocks; larger memory comes from PyTorch's
// CPU allocator, as at::empty's, so that the profiler sees it (the packed weights of a
// backward, whose peak the chapter's problem 7.11 measures).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (bytes <= kKeptBlockBytes) {
      kept_ = kept_blocks().take(bytes);
      data_ = static_cast<T*>(kept_.data);
    } else {
      memory_ = c10::GetCPUAllocator()->allocate(bytes);
      data_ = static_cast<T*>(memory_.get());
    }
  }
  Scratch(Scratch&& other) noexcept
      : memory_(std::move(other.memory_)), kept_(std::exchange(other.kept_, {})), data_(other.data_) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch& operator=(Scratch&&) = delete;
  ~Scratch() {
    if (kept_.data != nullptr) kept_blocks().give_back(kept_);
  }

  T* get() const { return data_; }

 private:
  c10::DataPtr memory_;
  KeptBlocks::Block kept_ = {};
  T* data_;
};

// A tensor that the kernel fills in full (an output, a stored hidden output, a gradient), from
// the same allocator as at::empty's but without its dispatch: a tiny network's step makes ten.
inline at::Tensor uninitialized(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::Tensor(at::detail::empty_cpu(sizes, like.scalar_type()));
}

// Per-thread scratch of n elements each, a cache line apart: thread_space(scratch, n) is the
// calling thread's.
inline int64_t per_thread_elements(int64_t n, int64_t element_size) {
  const int64_t line = 64 / element_size;
  return (n + line - 1) / line * line;
}

template <typename T>
T* thread_space(const Scratch<T>& scratch, int64_t per_thread) {
  return scratch.get() + at::get_thread_num() * per_thread;
}

// body(first, last) over [0, count) shared among threads. Fewer items than two per thread
// run in order on the calling thread, outside a parallel region, so that their products
// share their columns instead: a few rows through wide layers, where each thread then reads
// part of the weights and none waits for another's extra block. The bits are the same.
// How many threads share(count, ...) runs on, so that each of them gets scratch.
inline int64_t sharing_threads(int64_t count) {
  return count < 2 * at::get_num_threads() ? 1 : at::get_num_threads();
}

template <typename Body>
void share(int64_t count, const Body& body) {
  if (sharing_threads(count) == 1) {
    body(int64_t{0}, count);
  } else {
    at::parallel_for(0, count, 1, body);
  }
}

// A row-major matrix as the kernels read it: row i starts at data + i * ld.
template <typename T>
struct Rows {
  T* data;
  int64_t ld;
  T* row(int64_t i) const { return data + i * ld; }
};

// The network's widths d_0 ... d_L and its blocks of rows.
struct Plan {
  int64_t rows;
  PerLayer<int64_t> widths;
  int64_t block_size, blocks, slots;

  size_t layers() const { return widths.size() - 1; }
  size_t hidden() const { return layers() - 1; }
  int64_t first_row(int64_t block) const { return block * block_size; }
  int64_t rows_in(int64_t block) const { return std::min(block_size, rows - first_row(block)); }
  int64_t max_width() const { return *std::max_element(widths.begin(), widths.end()); }
  // Blocks [first_block(s), first_block(s + 1)) add into slot s, in order.
  int64_t first_block(int64_t slot) const { return slot * blocks / slots; }
};

// row_elements: how many elements a block holds per row, if not its widest layer's input
// and output.
inline Plan plan(int64_t rows, at::TensorList weights, int64_t element_size,
                 int64_t row_elements = 0) {
  Plan p{rows, {weights[0].size(1)}, 0, 0, 0};
  int64_t widest_pair = 1, weight_elements = 0;
  for (const auto& w : weights) {
    widest_pair = std::max(widest_pair, w.size(0) + w.size(1));
    weight_elements += w.numel();
    p.widths.push_back(w.size(0));
  }
  const int64_t held = row_elements > 0 ? row_elements : widest_pair;
  const int64_t cap =
      std::clamp(kBlockBytes / (element_size * held), kMinBlockRows, kMaxBlockRows);
  const int64_t blocks = at::ceil_div<int64_t>(rows, cap);
  p.block_size = rows == 0 ? 1 : at::ceil_div<int64_t>(rows, std::max<int64_t>(blocks, 1));
  p.blocks = rows == 0 ? 0 : at::ceil_div<int64_t>(rows, p.block_size);
  const int64_t by_memory = kSlotBytes / std::max<int64_t>(1, weight_elements * element_size);
  p.slots = p.blocks < kSlottedBlocks ? std::min<int64_t>(p.blocks, 1)
                                       : std::min({p.blocks, kMaxSlots, std::max<int64_t>(1, by_memory)});
  return p;
}

// The weights in the accumulation type T: as they are where they already are, converted
// otherwise; transposed (d_in, d_out) for the products that make f.
template <typename T>
struct Weights {
  PerLayer<const T*> natural, transposed, bias;
  Scratch<T> storage;
};

// t = Omega^T (d_in, d_out) in T, from Omega in scalar_t, or from natural (Omega in T) where
// it is at hand. Rows of Omega are shared among threads: for a wide layer and a few rows,
// packing costs as much as a product. Without Omega in T, the packing converts as it goes.
template <typename scalar_t, typename T>
void transpose_weight(const at::Tensor& weight, const T* natural, T* t) {
  const scalar_t* data = weight.const_data_ptr<scalar_t>();
  const int64_t d_out = weight.size(0), d_in = weight.size(1);
  const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(d_in, 1));
  at::parallel_for(0, d_out, grain, [&](int64_t first, int64_t last) {
    if (natural != nullptr) {
      transpose<T>(natural + first * d_in, d_in, t + first, d_out, last - first, d_in);
      return;
    }
    for (int64_t i = first; i < last; ++i) {
      for (int64_t j = 0; j < d_in; ++j) t[j * d_out + i] = static_cast<T>(data[i * d_in + j]);
    }
  });
}

template <typename scalar_t, typename T>
Weights<T> prepare(at::TensorList weights, at::TensorList biases, bool natural, bool transposed) {
  constexpr bool same = std::is_same_v<scalar_t, T>;
  int64_t size = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const int64_t n = weights[l].numel();
    size += (natural && !same ? n : 0) + (transposed ? n : 0) + (!biases.empty() && !same ? weights[l].size(0) : 0);
  }
  Weights<T> w{{}, {}, {}, Scratch<T>(size)};
  T* next = w.storage.get();
  for (size_t l = 0; l < weights.size(); ++l) {
    const scalar_t* data = weights[l].const_data_ptr<scalar_t>();
    const int64_t d_out = weights[l].size(0), n = weights[l].numel();
    const T* natural_data = nullptr;  // Omega in T, where it is at hand
    if constexpr (same) {
      natural_data = data;
    } else {
      if (natural) {
        at::vec::convert(data, next, n);
        natural_data = next;
        next += n;
      }
    }
    w.natural.push_back(natural ? natural_data : nullptr);
    if (transposed) {
      transpose_weight<scalar_t, T>(weights[l], natural_data, next);
      w.transposed.push_back(next);
      next += n;
    } else {
      w.transposed.push_back(nullptr);
    }
    if (biases.empty()) {
      w.bias.push_back(nullptr);
    } else if constexpr (same) {
      w.bias.push_back(biases[l].const_data_ptr<scalar_t>());
    } else {
      at::vec::convert(biases[l].const_data_ptr<scalar_t>(), next, d_out);
      w.bias.push_back(next);
      next += d_out;
    }
  }
  return w;
}

// --- The passes over a block while it is in cache ---

template <typename T>
void activate_rows(Activation activation, const ActivationParameters& params, Rows<T> x, int64_t rows,
                   int64_t cols) {
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for (int64_t i = 0; i < rows; ++i) {
      activate_span<A, T>(x.row(i), x.row(i), cols, params);
    }
  });
}

// g = grad * a'[.], with a' read off the activation's output (from_output) or off f.
template <typename T>
void activation_backward_rows(Activation activation, const ActivationParameters& params, bool from_output,
                              Rows<const T> grad, Rows<const T> out_or_f, Rows<T> g, int64_t rows,
                              int64_t cols) {
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationConstants<Lanes<T>> k(params);
    for (int64_t i = 0; i < rows; ++i) {
      if (from_output) {
        map2_lanes([&](Lanes<T> d, Lanes<T> s) { return activation_backward<A>(d, s, k); },
                      g.row(i), grad.row(i), out_or_f.row(i), cols);
      } else {
        map2_lanes(
            [&](Lanes<T> d, Lanes<T> f) { return activation_backward_from_preactivation<A>(d, f, k); },
            g.row(i), grad.row(i), out_or_f.row(i), cols);
      }
    }
  });
}

// sums[j] = sum over the block's rows of g[i, j], in runs of rows (add_row_to_sums).
template <typename T>
void column_sums(Rows<const T> g, int64_t rows, int64_t cols, T* sums, T* run) {
  std::fill_n(sums, cols, T(0));
  for (int64_t i = 0; i < rows; ++i) add_row_to_sums(i, i == rows - 1, g.row(i), run, sums, cols);
}

// rows of a scalar_t matrix in T: the memory itself where the types agree, else converted
// into `space`.
template <typename scalar_t, typename T>
Rows<const T> as_accumulation_type(const scalar_t* data, int64_t rows, int64_t cols, T* space) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return {data, cols};
  } else {
    at::vec::convert(data, space, rows * cols);
    return {space, cols};
  }
}

// Rounds x to scalar_t and back (a no-op for float and double): what eager would store
// between its ops, a hidden output or a gradient, so that every product sees eager's
// operands and rounds once itself.
template <typename scalar_t, typename T>
void round_to_dtype(T* x, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, T>) {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<scalar_t>(x[i]));
  }
}

// f = beta + h Omega^T for a block of rows (f contiguous), rounded to scalar_t as eager's
// F.linear rounds it before the activation sees it.
template <typename scalar_t, typename T>
void layer_product(const Plan& p, size_t layer, const Weights<T>& w, Rows<const T> h,
                   int64_t rows, Rows<T> f) {
  const int64_t d_in = p.widths[layer], d_out = p.widths[layer + 1];
  gemm<T>(rows, d_out, d_in, h.data, h.ld, 1, w.transposed[layer], d_out, f.data, f.ld,
          w.bias[layer] != nullptr ? Init::BiasRow : Init::Zero, w.bias[layer]);
  round_to_dtype<scalar_t, T>(f.data, rows * d_out);
}

// h_next = a[beta + h Omega^T] for a block of rows (f contiguous). Where brgemm makes the
// product (it has no bias of its own), the bias and the activation are one pass over each row
// while the row is in L1, not two over the block; the tiles add the bias in their epilogue.
// The sums are the same either way: the finished product, plus the bias, then a.
template <typename scalar_t, typename T>
void layer_forward(const Plan& p, size_t layer, const Weights<T>& w, Rows<const T> h, int64_t rows,
                   Rows<T> f, Activation activation, const ActivationParameters& params) {
  const int64_t d_in = p.widths[layer], d_out = p.widths[layer + 1];
  const T* bias = w.bias[layer];
  if (!std::is_same_v<scalar_t, T> || bias == nullptr ||
      !brgemm_runs<T>(rows, d_out, d_in, h.ld, 1)) {
    layer_product<scalar_t, T>(p, layer, w, h, rows, f);
    activate_rows<T>(activation, params, f, rows, d_out);
    return;
  }
  gemm<T>(rows, d_out, d_in, h.data, h.ld, 1, w.transposed[layer], d_out, f.data, f.ld, Init::Zero);
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationConstants<Lanes<T>> k(params);
    for (int64_t i = 0; i < rows; ++i) {
      T* row = f.row(i);
      if constexpr (A == Activation::Tanh) {  // eager's VML tanh, as activate_span runs it
        map2_lanes([](Lanes<T> x, Lanes<T> b) { return x + b; }, row, row, bias, d_out);
        activate_span<A, T>(row, row, d_out, params);
      } else {
        map2_lanes([&](Lanes<T> x, Lanes<T> b) { return activate<A>(x + b, k); }, row, row, bias, d_out);
      }
    }
  });
}

// Where a backward pass sums its weight and bias gradients over the blocks of rows: each
// weight gradient in a fixed number of slots (slot s the sum of blocks
// [first_block(s), first_block(s + 1)), in order), each bias gradient per block; finish()
// adds them pairwise and rounds once into the gradients. Slots and blocks depend on the shape
// alone, never on the thread count: the same bits on every run and for every thread count.
// weights and biases are the gradients' memory, one per layer, or empty where not asked.
template <typename scalar_t>
class GradientSums {
 public:
  using T = at::opmath_type<scalar_t>;

  // zeroed: every slot and block sum starts at zero (for a pass that only adds to them);
  // otherwise each slot's first block writes its product with Init::Zero.
  GradientSums(const Plan& p, c10::ArrayRef<scalar_t*> weight_grads, c10::ArrayRef<scalar_t*> bias_grads,
               bool zeroed)
      : plan_(p), weights_(weight_grads.begin(), weight_grads.end()), biases_(bias_grads.begin(), bias_grads.end()),
        weight_offset_(p.layers() + 1, 0), bias_offset_(p.layers() + 1, 0),
        in_place_(std::is_same_v<scalar_t, T> && p.slots == 1),
        slots_(!weights_.empty() && !in_place_ ? p.slots * total_weights(p) : 0),
        block_sums_(!biases_.empty() ? p.blocks * total_biases(p) : 0) {
    for (size_t l = 0; l < p.layers(); ++l) {
      weight_offset_[l + 1] = weight_offset_[l] + p.widths[l] * p.widths[l + 1];
      bias_offset_[l + 1] = bias_offset_[l] + p.widths[l + 1];
    }
    if (!zeroed) return;
    for (int64_t slot = 0; slot < p.slots && !weights_.empty(); ++slot) {
      for (size_t l = 0; l < p.layers(); ++l) std::fill_n(weights(slot, l), layer_weights(l), T(0));
    }
    if (!biases_.empty()) std::fill_n(block_sums_.get(), p.blocks * bias_offset_.back(), T(0));
  }

  // Layer l's weight gradient in `slot` (the gradient itself, where one slot of a float or
  // double network holds it), and its bias gradient's sum over `block`.
  T* weights(int64_t slot, size_t l) const {
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (in_place_) return weights_[l];
    }
    return slots_.get() + slot * weight_offset_.back() + weight_offset_[l];
  }
  T* biases(int64_t block, size_t l) const {
    return block_sums_.get() + block * bias_offset_.back() + bias_offset_[l];
  }

  void finish() const {
    for (size_t l = 0; l < weights_.size() && !in_place_; ++l) {
      T* first = slots_.get() + weight_offset_[l];
      at::parallel_for(0, layer_weights(l), 16384, [&](int64_t begin, int64_t end) {
        add_pairwise<T>(first + begin, plan_.slots, weight_offset_.back(), end - begin);
        at::vec::convert(first + begin, weights_[l] + begin, end - begin);
      });
    }
    for (size_t l = 0; l < biases_.size(); ++l) {
      T* first = block_sums_.get() + bias_offset_[l];
      add_pairwise<T>(first, plan_.blocks, bias_offset_.back(), plan_.widths[l + 1]);
      at::vec::convert(first, biases_[l], plan_.widths[l + 1]);
    }
  }

 private:
  static int64_t total_weights(const Plan& p) {
    int64_t n = 0;
    for (size_t l = 0; l < p.layers(); ++l) n += p.widths[l] * p.widths[l + 1];
    return n;
  }
  static int64_t total_biases(const Plan& p) {
    int64_t n = 0;
    for (size_t l = 0; l < p.layers(); ++l) n += p.widths[l + 1];
    return n;
  }
  int64_t layer_weights(size_t l) const { return weight_offset_[l + 1] - weight_offset_[l]; }

  const Plan& plan_;
  PerLayer<scalar_t*> weights_, biases_;
  PerLayer<int64_t> weight_offset_, bias_offset_;
  bool in_place_;
  Scratch<T> slots_, block_sums_;
};

// t's elements in row-major order: t itself where it is contiguous (its data is then the
// (rows, features) matrix, whatever its dimensions), else a contiguous copy. The check is
// inline; a call of t.contiguous() would cost a tiny network a dispatch per tensor.
inline at::Tensor contiguous(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

inline PerLayer<at::Tensor> contiguous(at::TensorList tensors) {
  PerLayer<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(contiguous(t));
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
