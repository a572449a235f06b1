// The activation maths of handgrad, written once.
//
// Notation follows "Understanding Deep Learning", chapter 7: a layer computes the
// pre-activation f = beta + Omega h and its output a[f].
//
// Every formula is a template over a value type V, instantiated with
//   - float or double: the CUDA kernels and the CPU loop tails;
//   - at::vec::Vectorized<float or double>: the CPU main loops (csrc/cpu/kernels/vectorized.h
//     gives `where` and `exp` for those).
// Half-precision types are widened to float before they reach these functions. The
// constants and the order of operations are eager PyTorch's (ATen/native/cpu/Activation.cpp,
// GeluKernel.cpp), so that the values are eager's.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace at {
class Tensor;
}

namespace handgrad {

enum class Activation : int8_t { ReLU, LeakyReLU, Sigmoid, Tanh, SiLU, GELU, GELUTanh, Softplus };

// The activations by the names the ops take ("relu", ..., "gelu_tanh" for GELU's tanh
// approximation), and back.
inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "tanh") return Activation::Tanh;
  if (name == "silu") return Activation::SiLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_tanh") return Activation::GELUTanh;
  if (name == "softplus") return Activation::Softplus;
  TORCH_CHECK_VALUE(
      false, "handgrad: unknown activation '", name,
      "'; expected 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'silu', 'gelu', 'gelu_tanh' or "
      "'softplus'");
}

inline c10::string_view activation_name(Activation activation) {
  switch (activation) {
    case Activation::ReLU: return "relu";
    case Activation::LeakyReLU: return "leaky_relu";
    case Activation::Sigmoid: return "sigmoid";
    case Activation::Tanh: return "tanh";
    case Activation::SiLU: return "silu";
    case Activation::GELU: return "gelu";
    case Activation::GELUTanh: return "gelu_tanh";
    case Activation::Softplus: return "softplus";
  }
  return "";
}

// The activations' parameters, named and defaulted as torch.nn names them: LeakyReLU's
// negative_slope, Softplus's beta and threshold. The others take none.
struct ActivationParameters {
  double negative_slope = 0.01;
  double beta = 1.0;
  double threshold = 20.0;
};

// The value type of V: V itself, or T for at::vec::Vectorized<T>.
template <typename V, typename = void>
struct scalar_of { using type = V; };
template <typename V>
struct scalar_of<V, std::void_t<typename V::value_type>> { using type = typename V::value_type; };

// The parameters as values of V, made once outside a kernel's loop (a SIMD register each).
template <typename V>
struct ActivationConstants {
  V negative_slope, beta, threshold;

  explicit ActivationConstants(const ActivationParameters& p)
      : negative_slope(of(p.negative_slope)), beta(of(p.beta)), threshold(of(p.threshold)) {}

 private:
  static V of(double x) { return V(static_cast<typename scalar_of<V>::type>(x)); }
};

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
    case Activation::SiLU: return body(ActivationTag<Activation::SiLU>{});
    case Activation::GELU: return body(ActivationTag<Activation::GELU>{});
    case Activation::GELUTanh: return body(ActivationTag<Activation::GELUTanh>{});
    case Activation::Softplus: return body(ActivationTag<Activation::Softplus>{});
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

template <typename T>
C10_HOST_DEVICE inline T log1p(T x) {
  return std::log1p(x);
}

// a * b + c, rounded once where the hardware fuses it: GCC and nvcc contract eager's
// `1 - out * out` so, and writing it out gives the same bits in every build of ours (a
// sanitizer's instrumentation, for one, stops the compiler from contracting). Where the
// CPU capability has no FMA instruction (DEFAULT on x86-64), eager's is two roundings.
template <typename T>
C10_HOST_DEVICE inline T multiply_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Float32 on the CPU, lanes or scalars, takes handgrad's own e^y and Phi below: float and,
// from csrc/cpu/kernels/vectorized.h, at::vec::Vectorized<float>.
template <typename V>
struct is_float32_on_cpu : std::is_same<V, float> {};

// e^y for float32 on the CPU where y <= 0, as 2^n e^r with n = round(y / ln 2) and
// r = y - n ln 2 (ln 2 in two parts, Cody and Waite's), e^r by its Taylor polynomial to
// degree 7 (|r| <= ln 2 / 2: within 1e-8 of it): code every capability vectorizes, where
// libm's exp is a call per element and Sleef's (at::vec's) made GELU's forward 1.04-1.15 of
// eager's on AVX2 (this one: 0.92-0.96). 0 below -87 (e^y no longer normal). NaN gives a
// number: GELU, its one user, multiplies by f, and so stays NaN; one select fewer made GELU's
// forward on the DEFAULT capability (GCC's SSE2 vectorization of these scalars) 3.98 -> 2.54
// ns an element.
// Scalars here, lanes in vectorized.h, operation for operation.
#if !defined(__CUDACC__)
constexpr float kExpShifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2High = 0.693145751953125f, kLn2Low = 1.428606765330187e-06f;
constexpr float kExpTaylor[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

inline float exp_of_nonpositive(float y) {
  const float x = y > -87.f ? y : -87.f;  // NaN too, so that n is an integer
  const float n = multiply_add(x, kLog2E, kExpShifter) - kExpShifter;
  const float r = multiply_add(-n, kLn2Low, multiply_add(-n, kLn2High, x));
  float p = kExpTaylor[0];
  for (int i = 1; i < 8; ++i) p = multiply_add(p, r, kExpTaylor[i]);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y < -87.f ? 0.f : p * scale;
}

inline float magnitude(float x) {
  return std::fabs(x);
}
#endif

// e^{-f^2 / 2}, the normal density's shape in GELU's a'.
template <typename V>
C10_HOST_DEVICE inline V exp_minus_half_square(V f) {
#if !defined(__CUDACC__)
  if constexpr (is_float32_on_cpu<V>::value) return exp_of_nonpositive(f * f * V(-0.5f));
  else
#endif
    return exp(f * f * V(-0.5));
}

template <typename T>
C10_HOST_DEVICE inline T erf(T x) {
  return std::erf(x);
}

// GELU's constants: 1/sqrt(2); 1/sqrt(2 pi), the normal density's; sqrt(2/pi) and 0.044715
// of the tanh approximation.
constexpr double kGeluAlpha = M_SQRT1_2;
constexpr double kGeluDensity = M_2_SQRTPI * M_SQRT1_2 * 0.5;
constexpr double kGeluTanhBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
constexpr double kGeluTanhKappa = 0.044715;

// Phi[f] = (1 + erf[f / sqrt 2]) / 2, the normal distribution function of GELU, given the
// density's shape e = e^{-f^2 / 2}. Float32 on the CPU takes erfc(z) = t P(t) e^{-z^2},
// t = 1 / (1 + p z), z = |f| / sqrt 2 (Abramowitz and Stegun 7.1.26, at most 1.5e-7 from
// erfc; at::vec's erf uses it too), and Phi = erfc(z) / 2 below 0, 1 - erfc(z) / 2 above:
// nothing cancels in the tail, and a' shares e with the density. GELU's forward is then
// within 4.1e-7 of the float64 truth on [-10, 10] (eager's oneDNN: 3.8e-7), a' within 2.7e-7
// (2.6e-7), with FMA and without. (Eigen's rational erf, used before, was 9e-7 to 1.2e-6
// from it: near 1, x P / Q carries its rounding.) Multiply-adds, a division and the exp that
// every capability vectorizes, where libm's erf is a call per element. Other types: erf
// itself. NaN stays NaN (through t).
template <typename V>
C10_HOST_DEVICE inline V normal_cdf(V f, V density_shape) {
#if !defined(__CUDACC__)
  if constexpr (is_float32_on_cpu<V>::value) {
    const V z = magnitude(f) * V(static_cast<float>(kGeluAlpha));
    const V t = V(1.f) / multiply_add(V(0.3275911f), z, V(1.f));
    V p = V(1.061405429f);
    for (const float a : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) {
      p = multiply_add(p, t, V(a));
    }
    const V half_t_p = V(0.5f) * t * p;  // 1 - erfc / 2 by multiply_add, as a' below
    return where(f < V(0.f), half_t_p * density_shape,
                 multiply_add(-half_t_p, density_shape, V(1.f)));
  } else
#endif
  {
    (void)density_shape;
    return V(0.5) * (V(1) + erf(f * V(kGeluAlpha)));
  }
}

// Phi[f] alone, as the forward needs it.
template <typename V>
C10_HOST_DEVICE inline V normal_cdf(V f) {
#if !defined(__CUDACC__)
  if constexpr (is_float32_on_cpu<V>::value) return normal_cdf(f, exp_minus_half_square(f));
#endif
  return normal_cdf(f, V(0));  // erf's formula, which has no use for the density's shape
}

// Forward: out = a[f].
template <Activation A, typename V>
C10_HOST_DEVICE inline V activate(V f, const ActivationConstants<V>& k) {
  if constexpr (A == Activation::ReLU) {
    return where(f < V(0), V(0), f);  // max(0, f); written so that NaN propagates
  } else if constexpr (A == Activation::LeakyReLU) {
    return where(f > V(0), f, f * k.negative_slope);
  } else if constexpr (A == Activation::Sigmoid) {
    return V(1) / (V(1) + exp(-f));  // sig[f]; saturates to 0 or 1, never NaN
  } else if constexpr (A == Activation::Tanh) {
    return tanh(f);  // saturates to -1 or 1
  } else if constexpr (A == Activation::SiLU) {
    return f / (V(1) + exp(-f));  // f sig[f]
  } else if constexpr (A == Activation::GELU) {
    return f * normal_cdf(f);  // f Phi[f]
  } else if constexpr (A == Activation::GELUTanh) {
    const V inner = V(kGeluTanhBeta) * (f + V(kGeluTanhKappa) * (f * f * f));
    return V(0.5) * f * (V(1) + tanh(inner));
  } else {  // log(1 + exp(beta f)) / beta, and f itself once beta f passes the threshold
    const V scaled = f * k.beta;
    return where(scaled > k.threshold, f, log1p(exp(scaled)) / k.beta);
  }
}

// Backward: dl/df = dl/d(out) * a'[f], with a'[f] read off `out_or_f`.
//
// `out_or_f` is the output out = a[f] where a' is a function of it (ReLU, sigmoid, tanh,
// LeakyReLU with a slope >= 0, for which out > 0 exactly when f > 0), and f itself where it
// is not (derivative_needs_preactivation below: SiLU, GELU, softplus, and LeakyReLU with a negative
// slope, whose output no longer tells the sign of f).
//
// At the kink f = 0 we follow PyTorch: ReLU'(0) = 0 and LeakyReLU'(0) = negative_slope.
// Each branch selects rather than multiplies, so that a NaN gradient on the flat side of
// ReLU gives 0, exactly as eager PyTorch does.
template <Activation A, typename V>
C10_HOST_DEVICE inline V activation_backward(V grad, V out_or_f, const ActivationConstants<V>& k) {
  if constexpr (A == Activation::ReLU) {
    return where(out_or_f <= V(0), V(0), grad);  // a' = I[out > 0]
  } else if constexpr (A == Activation::LeakyReLU) {
    return where(out_or_f > V(0), grad, grad * k.negative_slope);  // a' = I[out > 0] + alpha I[out <= 0]  (7.10)
  } else if constexpr (A == Activation::Sigmoid) {
    return grad * (V(1) - out_or_f) * out_or_f;  // a' = sig[f] (1 - sig[f]) = out (1 - out)  (7.7)
  } else if constexpr (A == Activation::Tanh) {
    return grad * multiply_add(-out_or_f, out_or_f, V(1));  // a' = 1 - tanh[f]^2 = 1 - out^2, as eager's tanh_backward
  } else if constexpr (A == Activation::SiLU) {
    const V f = out_or_f, sig = V(1) / (V(1) + exp(-f));
    return grad * sig * (V(1) + f * (V(1) - sig));  // a' = sig[f] (1 + f (1 - sig[f]))
  } else if constexpr (A == Activation::GELU) {
    const V f = out_or_f;
    const V density_shape = exp_minus_half_square(f);
    const V pdf = V(kGeluDensity) * density_shape;
    // a' = Phi[f] + f phi[f], by multiply_add: lanes and scalars then round it alike in
    // every build (a sanitizer's build contracted it in one and not the other).
    return grad * multiply_add(f, pdf, normal_cdf(f, density_shape));
  } else if constexpr (A == Activation::GELUTanh) {
    const V f = out_or_f, f_squared = f * f;
    const V t = tanh(V(kGeluTanhBeta) * (f + V(kGeluTanhKappa) * (f_squared * f)));
    const V inner_derivative = V(kGeluTanhBeta) * (V(1) + V(3) * V(kGeluTanhKappa) * f_squared);
    const V left = V(0.5) * f, right = V(1) + t;
    return grad * (V(0.5) * right + left * (V(1) - t * t) * inner_derivative);
  } else {  // a' = sig[beta f] = z / (z + 1), z = exp(beta f); 1 past the threshold
    const V scaled = out_or_f * k.beta, z = exp(scaled);
    return where(scaled > k.threshold, grad, grad * z / (z + V(1)));
  }
}

// The same dl/df with a' read off f itself, where the output is not at hand (the fused
// MLP recomputes f in cache rather than store it). sigmoid's and tanh's a' need a[f]; the
// others' are read off f.
template <Activation A, typename V>
C10_HOST_DEVICE inline V activation_backward_from_preactivation(V grad, V f, const ActivationConstants<V>& k) {
  if constexpr (A == Activation::Sigmoid || A == Activation::Tanh) {
    return activation_backward<A>(grad, activate<A>(f, k), k);
  } else {
    return activation_backward<A>(grad, f, k);
  }
}

// Whether a' is read off f rather than the output (see activation_backward): SiLU's,
// GELU's and softplus's are functions of f alone (softplus's, as eager's, so that it keeps
// its accuracy where out is near 0 or large); leaky_relu with a negative slope gives
// out >= 0 on both sides of f = 0.
inline bool derivative_needs_preactivation(Activation activation, const ActivationParameters& params) {
  return activation == Activation::SiLU || activation == Activation::GELU ||
         activation == Activation::GELUTanh || activation == Activation::Softplus ||
         (activation == Activation::LeakyReLU && params.negative_slope < 0);
}

// LeakyReLU of slope 1, the identity (ops::preactivation's): a' is 1 wherever it is read.
inline bool is_identity(Activation activation, const ActivationParameters& params) {
  return activation == Activation::LeakyReLU && params.negative_slope == 1.0;
}

// Double backward: whether a'' is not zero (ReLU's and LeakyReLU's a' is constant wherever
// it is defined), and then d(a')/d(out_or_f) for the tensor a' is read off: by the output for
// sigmoid (d/d(out) of out (1 - out) = 1 - 2 out) and tanh (-2 out), a''[f] for the others.
inline bool has_second_derivative(Activation activation) {
  return activation != Activation::ReLU && activation != Activation::LeakyReLU;
}

// 1 where a < b, else 0 (0 for NaN): a mask that multiplies, so that NaN still propagates
// through the other factor, as eager's `* (x < threshold)`. Vectorized's is in
// csrc/cpu/kernels/vectorized.h; at::Tensor's, declared here so that the formula below finds
// it, in csrc/autograd/activation.cpp.
template <typename T>
C10_HOST_DEVICE inline T less_than(T a, T b) {
  return a < b ? T(1) : T(0);
}
at::Tensor less_than(const at::Tensor& a, double b);

// The constants of a formula over V: V itself, or double where V is at::Tensor (a Scalar in
// its expressions), so that the formula below serves scalars, SIMD vectors and, for the
// differentiable double backward of the autograd kernels, whole tensors.
template <typename V>
struct constant_of { using type = V; };  // at::Tensor's: csrc/autograd/tensor_formulas.h
template <typename V>
using Constant = typename constant_of<V>::type;

// d(a')/d(out_or_f) of activation A. V is float or double, at::vec::Vectorized (the fused
// double backward, csrc/cpu/kernels/fused_second_order.cpp) or at::Tensor (with at::exp,
// at::tanh and a less_than of its own: csrc/autograd/tensor_formulas.h).
template <Activation A, typename V>
inline V derivative_of_derivative(const V& out_or_f, const ActivationConstants<Constant<V>>& k) {
  using C = Constant<V>;
  if constexpr (A == Activation::Sigmoid) {
    return C(1) - C(2) * out_or_f;
  } else if constexpr (A == Activation::Tanh) {
    return C(-2) * out_or_f;
  } else if constexpr (A == Activation::SiLU) {  // sig' (2 + f (1 - 2 sig))
    const V sig = C(1) / (C(1) + exp(-out_or_f));
    return sig * (C(1) - sig) * (C(2) + out_or_f * (C(1) - C(2) * sig));
  } else if constexpr (A == Activation::GELU) {  // phi[f] (2 - f^2)
    return C(kGeluDensity) * exp(C(-0.5) * out_or_f * out_or_f) * (C(2) - out_or_f * out_or_f);
  } else if constexpr (A == Activation::GELUTanh) {  // (1 - t^2) (u' + f/2 (u'' - 2 t u'^2)), t = tanh[u]
    const V u_prime = C(kGeluTanhBeta) * (C(1) + C(3 * kGeluTanhKappa) * out_or_f * out_or_f);
    const V t = tanh(C(kGeluTanhBeta) * (out_or_f + C(kGeluTanhKappa) * out_or_f * out_or_f * out_or_f));
    const V u_second = C(6 * kGeluTanhBeta * kGeluTanhKappa) * out_or_f;
    return (C(1) - t * t) * (u_prime + C(0.5) * out_or_f * (u_second - C(2) * t * u_prime * u_prime));
  } else if constexpr (A == Activation::Softplus) {  // beta sig'[beta f], 0 from the threshold on (as eager's)
    const V scaled = k.beta * out_or_f;
    const V sig = C(1) / (C(1) + exp(-scaled));
    return (k.beta * sig * (C(1) - sig)) * less_than(scaled, k.threshold);
  } else {  // ReLU, LeakyReLU: has_second_derivative is false
    return C(0) * out_or_f;
  }
}

}  // namespace handgrad
