// What the Python module (csrc/python.cpp) reaches of the network's Autograd kernel (mlp.cpp).
#pragma once

namespace handgrad::autograd {

// Whether a CPU network differentiated to a third order records its later forwards whose input
// needs a gradient as a chain of layers (true, the default) or keeps its one node. Forgets the
// networks seen; returns the previous setting. For tests of either path.
bool set_layers_after_third_order(bool enabled);

}  // namespace handgrad::autograd
