// Gradient checkpointing of the whole network (problem 7.11), written once for every path
// (the CPU engine, the per-layer network of other devices, the checks and the fake kernels
// through _C): which hidden outputs the forward stores, and the stretches of layers the
// backward recomputes one at a time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace handgrad {

// Whether the whole-network forward stores h_made, the output of hidden layer made - 1, for
// the backward: every one, or with checkpoint_every = k > 0 every k-th below the last.
inline bool is_stored_output(size_t made, size_t hidden, int64_t checkpoint_every) {
  return checkpoint_every == 0 ||
         (made % static_cast<size_t>(checkpoint_every) == 0 && made < hidden);
}

// How many hidden outputs the whole-network forward stores.
inline size_t stored_output_count(size_t hidden, int64_t checkpoint_every) {
  size_t count = 0;
  for (size_t made = 1; made <= hidden; ++made) count += is_stored_output(made, hidden, checkpoint_every);
  return count;
}

// The hidden layers in stretches of checkpoint_every = k (all of them in one stretch
// without checkpointing): stretch s holds layers [first(s), last(s)), recomputed from its
// input, the network's for s = 0, else the stored output h_first(s).
struct Stretches {
  size_t hidden, length, count;

  Stretches(size_t hidden_layers, int64_t checkpoint_every)
      : hidden(hidden_layers),
        length(checkpoint_every > 0 ? static_cast<size_t>(checkpoint_every) : std::max<size_t>(hidden_layers, 1)),
        count(hidden_layers == 0 ? 0 : (hidden_layers + length - 1) / length) {}

  size_t first(size_t s) const { return s * length; }
  size_t last(size_t s) const { return std::min(hidden, first(s) + length); }
};

}  // namespace handgrad
