// The activation maths of handgrad, written once.
//
// Notation follows "Understanding Deep Learning", chapter 7: a layer computes the
// pre-activation f = beta + Omega h and its output a[f].
//
// Every formula is a template over a value type V, instantiated with
//   - float or double: the CUDA kernels and the CPU loop tails;
//   - at::vec::Vectorized<float or double>: the CPU main loops (csrc/cpu/kernels/vectorized.h
//     gives `where` and `exp` for those).
// Half-precision types are widened to float before they reach these functions.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace handgrad {

enum class Activation : int8_t { ReLU, LeakyReLU, Sigmoid, Tanh };

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls body(ActivationTag<A>{}) with the activation as a compile-time constant, so that
// a kernel's inner loop carries no branch on it.
template <typename Body>
void dispatch_activation(Activation activation, const Body& body) {
  switch (activation) {
    case Activation::ReLU: return body(ActivationTag<Activation::ReLU>{});
    case Activation::LeakyReLU: return body(ActivationTag<Activation::LeakyReLU>{});
    case Activation::Sigmoid: return body(ActivationTag<Activation::Sigmoid>{});
    case Activation::Tanh: return body(ActivationTag<Activation::Tanh>{});
  }
}

// Scalar primitives, for host and device code.
template <typename T>
C10_HOST_DEVICE inline T where(bool condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

template <typename T>
C10_HOST_DEVICE inline T exp(T x) {
  return std::exp(x);
}

template <typename T>
C10_HOST_DEVICE inline T tanh(T x) {
  return std::tanh(x);
}

// Forward: out = a[f].
template <Activation A, typename V>
C10_HOST_DEVICE inline V activate(V f, V negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return where(f < V(0), V(0), f);  // max(0, f); written so that NaN propagates
  } else if constexpr (A == Activation::LeakyReLU) {
    return where(f > V(0), f, f * negative_slope);
  } else if constexpr (A == Activation::Sigmoid) {
    return V(1) / (V(1) + exp(-f));  // sig[f]; saturates to 0 or 1, never NaN
  } else {
    return tanh(f);  // saturates to -1 or 1
  }
}

// Backward: dl/df = dl/d(out) * a'[f], with a'[f] read off `out_or_f`.
//
// `out_or_f` is the output out = a[f], except for LeakyReLU with a negative slope, where
// the output no longer tells the sign of f and the caller passes f itself. For slopes
// >= 0, out > 0 exactly when f > 0, so one sign test serves both.
//
// At the kink f = 0 we follow PyTorch: ReLU'(0) = 0 and LeakyReLU'(0) = negative_slope.
// Each branch selects rather than multiplies, so that a NaN gradient on the flat side of
// ReLU gives 0, exactly as eager PyTorch does.
template <Activation A, typename V>
C10_HOST_DEVICE inline V activation_backward(V grad, V out_or_f, V negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return where(out_or_f <= V(0), V(0), grad);  // a' = I[out > 0]
  } else if constexpr (A == Activation::LeakyReLU) {
    return where(out_or_f > V(0), grad, grad * negative_slope);  // a' = I[out > 0] + alpha I[out <= 0]  (7.10)
  } else if constexpr (A == Activation::Sigmoid) {
    return grad * (V(1) - out_or_f) * out_or_f;  // a' = sig[f] (1 - sig[f]) = out (1 - out)  (7.7)
  } else {
    return grad * (V(1) - out_or_f * out_or_f);  // a' = 1 - tanh[f]^2 = 1 - out^2, as eager's tanh_backward
  }
}

// The same dl/df with a' read off f itself, where the output is not at hand (the fused
// MLP recomputes f in cache rather than store it). ReLU's and LeakyReLU's a' need only the
// sign of f, which f tells for every slope; sigmoid's and tanh's need a[f].
template <Activation A, typename V>
C10_HOST_DEVICE inline V activation_backward_from_preactivation(V grad, V f, V negative_slope) {
  if constexpr (A == Activation::Sigmoid || A == Activation::Tanh) {
    return activation_backward<A>(grad, activate<A>(f, negative_slope), negative_slope);
  } else {
    return activation_backward<A>(grad, f, negative_slope);
  }
}

// Double backward: whether a' varies with the output (sigmoid's, tanh's), and then its
// derivative by the output: d/d(out) of out (1 - out) is 1 - 2 out, of 1 - out^2 is -2 out.
// ReLU's and LeakyReLU's a' are constant wherever they are differentiable: a'' = 0. V is
// also at::Tensor here, for the autograd kernels and, through handgrad._C, the Python ones.
inline bool derivative_varies_with_output(Activation activation) {
  return activation == Activation::Sigmoid || activation == Activation::Tanh;
}

template <typename V>
inline V derivative_by_output(Activation activation, const V& out) {
  return activation == Activation::Sigmoid ? 1 - 2 * out : -2 * out;
}

// Whether a' cannot be read off the output: leaky_relu with a negative slope gives
// out >= 0 on both sides of f = 0, so its backward needs f itself.
inline bool output_hides_sign(Activation activation, double negative_slope) {
  return activation == Activation::LeakyReLU && negative_slope < 0;
}

}  // namespace handgrad
