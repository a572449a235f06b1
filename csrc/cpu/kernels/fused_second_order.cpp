// The fused engine's double backward: the derivative of the backward pass (fused_mlp.cpp)
// in blocks of rows, for gradient penalties, eikonal losses and PINNs. The maths, and its
// tensor form (which runs where this does not), are in docs/second_order.md and
// csrc/autograd/mlp.cpp; the notation is theirs. Layer l computes
// f_l = beta_l + h_l Omega_l^T and h_{l+1} = a_l[f_l]; e_l = dl/df_l and g_l = dl/dh_{l+1}
// are the first backward's; v, V_l and u_l are the cotangents of its results dl/dh_0,
// dl/dOmega_l and dl/dbeta_l (each may be absent).
//
// Each block of rows, while it is in cache:
//   1. the first backward again, from the output layer down, keeping every e_l (and g_l
//      where a'' is read off f): g_l = e_{l+1} Omega_{l+1} (7.6), e_l = g_l * a_l';
//   2. upward, from g_bar = v: e_bar = g_bar Omega_l^T + h_l V_l^T + u_l,
//      dl/dOmega_l += e_l^T g_bar, h_bar_l = e_l V_l, f_bar_l = e_bar * (g_l or e_l) * a_l''
//      (csrc/activation.h's derivative_of_derivative), g_bar = e_bar * a_l';
//   3. downward, an ordinary backward of f_bar and h_bar: f_cot = f_bar_l + h_cot * a_l',
//      dl/dOmega_l += f_cot^T h_l (7.9), dl/dbeta_l += column sums of f_cot,
//      h_cot = f_cot Omega_l + h_bar_l.
// ReLU's and LeakyReLU's a'' = 0: with v alone (a gradient penalty), step 3 has nothing to do
// and is skipped. The weight and bias gradients are summed in slots and blocks fixed by the
// shape, as the first backward's: the same bits on every run and for every thread count.
#include "engine.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "../../checks.h"

namespace handgrad::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// out = e_bar * w * a''[out_or_f]: f_bar, with w = g (a'' read off f) or e (off the output).
template <typename T>
void second_derivative_rows(Activation activation, const ActivationParameters& params,
                            Rows<const T> e_bar, Rows<const T> w, Rows<const T> out_or_f,
                            Rows<T> out, int64_t rows, int64_t cols) {
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationConstants<Lanes<T>> k(params);
    for (int64_t i = 0; i < rows; ++i) {
      map3_lanes(
          [&](Lanes<T> eb, Lanes<T> wv, Lanes<T> s) { return eb * wv * derivative_of_derivative<A>(s, k); },
          out.row(i), e_bar.row(i), w.row(i), out_or_f.row(i), cols);
    }
  });
}

// d = a'[f] alone, for the activations whose a' is read off f at the cost of an exp or erf
// (SiLU, GELU, softplus): the double backward multiplies by it three times, and computes it
// once. (Softplus with a large beta spends most of its time on subnormal exp values.)
template <typename T>
void derivative_rows(Activation activation, const ActivationParameters& params, Rows<const T> f,
                     Rows<T> d, int64_t rows, int64_t cols) {
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationConstants<Lanes<T>> k(params);
    for (int64_t i = 0; i < rows; ++i) {
      map_lanes([&](Lanes<T> x) { return activation_backward_from_preactivation<A>(Lanes<T>(1), x, k); },
                   d.row(i), f.row(i), cols);
    }
  });
}

template <typename T>
void multiply_rows(Rows<const T> x, Rows<const T> y, Rows<T> out, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    map2_lanes([](Lanes<T> a, Lanes<T> b) { return a * b; }, out.row(i), x.row(i), y.row(i), cols);
  }
}

// y += x, row by row (y may be x's own rows shifted: no overlap is assumed).
template <typename T>
void add_rows(Rows<const T> x, Rows<T> y, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    map2_lanes([](Lanes<T> a, Lanes<T> b) { return a + b; }, y.row(i), y.row(i), x.row(i), cols);
  }
}

template <typename scalar_t>
struct SecondOrderArguments {
  const scalar_t* grad_output;                 // (rows, d_L)
  const scalar_t* input;                       // (rows, d_0)
  std::vector<const scalar_t*> hidden_outputs;  // h_1 ... h_{L-1}, every one
  const scalar_t* v;                           // (rows, d_0), or null
};

template <typename scalar_t>
struct SecondOrderOutputs {
  scalar_t* grad_output;           // or null
  scalar_t* input;                 // or null
  std::vector<scalar_t*> weights;  // per layer, or empty
  std::vector<scalar_t*> biases;   // per layer, or empty
};

template <typename scalar_t>
void double_backward_blocks(const NetworkActivations& acts, at::TensorList weights,
                            at::TensorList biases, const SecondOrderArguments<scalar_t>& in,
                            const std::vector<std::optional<at::Tensor>>& V,
                            const std::vector<std::optional<at::Tensor>>& u, int64_t rows,
                            const SecondOrderOutputs<scalar_t>& out) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  const size_t layers = weights.size();
  const auto activation = [&](size_t l) {
    return l + 1 < layers ? std::optional<Activation>(acts.hidden) : acts.output;
  };
  const auto reads_f = [&](size_t l) {  // a_l' (and a_l'') is read off f_l, not the output
    return activation(l).has_value() && derivative_needs_preactivation(*activation(l), acts.params);
  };
  const auto has_a2 = [&](size_t l) {
    return activation(l).has_value() && has_second_derivative(*activation(l));
  };
  // out_or_f, what a_l' is read off: the stored h_{l+1}, or f_l made in cache.
  const auto source_in_cache = [&](size_t l) {
    return activation(l).has_value() && (l + 1 == layers || reads_f(l));
  };
  const auto keeps_derivative = [&](size_t l) { return has_a2(l) && reads_f(l); };
  const auto has_V = [&](size_t l) { return l < V.size() && V[l].has_value(); };
  const auto has_u = [&](size_t l) { return l < u.size() && u[l].has_value(); };
  const bool need_input = out.input != nullptr, need_weights = !out.weights.empty(),
             need_biases = !out.biases.empty();
  bool downward = false;  // whether anything reaches f_bar or h_bar
  for (size_t l = 0; l < layers; ++l) downward = downward || has_a2(l) || has_V(l);
  downward = downward && (need_input || need_weights || need_biases);

  // What a block keeps per row: its layers' inputs (converted, where the dtype is not T),
  // the out_or_f made in cache, every e_l, the g_l that a'' needs, f_bar, h_bar, and the
  // working rows (g twice, e_bar, g_bar, h_cot twice, f_cot, v and dl/d(out) converted).
  std::vector<int64_t> widths{weights[0].size(1)};
  for (const auto& w : weights) widths.push_back(w.size(0));
  const int64_t width = *std::max_element(widths.begin(), widths.end());
  int64_t per_row = 9 * width;
  for (size_t l = 0; l < layers; ++l) {
    const int64_t d_in = widths[l], d_out = widths[l + 1];
    per_row += (same ? 0 : d_in) + (source_in_cache(l) ? d_out : 0) + d_out + (keeps_derivative(l) ? d_out : 0) +
               (has_a2(l) && reads_f(l) && l + 1 < layers ? d_out : 0) + (has_a2(l) ? d_out : 0) +
               (has_V(l) ? d_in : 0);
  }
  const Plan p = plan(rows, weights, sizeof(T), per_row);

  Weights<T> w = prepare<scalar_t, T>(weights, biases, /*natural=*/true, /*transposed=*/true);
  std::vector<std::optional<Weights<T>>> V_w(layers);  // V_l, natural and transposed, in T
  std::vector<std::vector<T>> u_t(layers);             // u_l in T
  for (size_t l = 0; l < layers; ++l) {
    if (has_V(l)) V_w[l].emplace(prepare<scalar_t, T>({*V[l]}, {}, true, true));
    if (has_u(l)) {
      u_t[l].resize(widths[l + 1]);
      at::vec::convert(u[l]->const_data_ptr<scalar_t>(), u_t[l].data(), widths[l + 1]);
    }
  }

  // The weight and bias gradients' sums over the blocks, zero where a block adds nothing.
  const GradientSums<scalar_t> sums(p, out.weights, out.biases, /*zeroed=*/true);

  const int64_t n_max = p.block_size;
  const int64_t per_thread = per_thread_elements(n_max * per_row + width, sizeof(T));
  const Scratch<T> scratch(sharing_threads(p.slots) * per_thread);
  share(p.slots, [&](int64_t first_slot, int64_t last_slot) {
    for (int64_t slot = first_slot; slot < last_slot; ++slot) {
      for (int64_t block = p.first_block(slot); block < p.first_block(slot + 1); ++block) {
        const int64_t row = p.first_row(block), n = p.rows_in(block);
        T* next = thread_space(scratch, per_thread);
        T* run = next + n_max * per_row;  // column_sums' run of rows
        const auto take = [&](int64_t cols) {
          T* start = next;
          next += n * cols;
          return Rows<T>{start, cols};
        };
        const auto read = [&](const scalar_t* data, int64_t cols) {  // a block's rows in T
          return as_accumulation_type<scalar_t, T>(data + row * cols, n, cols, same ? nullptr : take(cols).data);
        };
        // Working rows, each laid out at the width of the layer that uses it.
        T* g_work[2] = {take(width).data, take(width).data};
        T* e_bar = take(width).data;
        T* g_bar_space = take(width).data;
        T* h_cot_space[2] = {take(width).data, take(width).data};
        T* f_cot = take(width).data;

        // The layers' inputs h_l, and their sources (h_{l+1} or made in cache).
        std::vector<Rows<const T>> h(layers), out_or_f(layers), e(layers), g_kept(layers), derivative(layers);
        h[0] = read(in.input, widths[0]);
        for (size_t l = 1; l < layers; ++l) h[l] = read(in.hidden_outputs[l - 1], widths[l]);
        for (size_t l = 0; l < layers; ++l) {
          if (!activation(l).has_value()) continue;
          if (!source_in_cache(l)) {
            out_or_f[l] = h[l + 1];
            continue;
          }
          const Rows<T> f = take(widths[l + 1]);
          if (reads_f(l)) {
            layer_product<scalar_t, T>(p, l, w, h[l], n, f);
          } else {  // sigmoid's or tanh's output, as eager stores it: bias and a in one pass
            layer_forward<scalar_t, T>(p, l, w, h[l], n, f, *activation(l), acts.params);
            round_to_dtype<scalar_t, T>(f.data, n * widths[l + 1]);
          }
          out_or_f[l] = {f.data, f.ld};
          if (keeps_derivative(l)) {
            const Rows<T> d = take(widths[l + 1]);
            derivative_rows<T>(*activation(l), acts.params, out_or_f[l], d, n, widths[l + 1]);
            derivative[l] = {d.data, d.ld};
          }
        }
        // out = grad * a_l'[f_l], for a layer with an activation.
        const auto times_derivative = [&](size_t l, Rows<const T> grad, Rows<T> out) {
          const int64_t d_out = widths[l + 1];
          if (keeps_derivative(l)) {
            multiply_rows<T>(grad, derivative[l], out, n, d_out);
          } else {
            activation_backward_rows<T>(*activation(l), acts.params, !reads_f(l), grad, out_or_f[l], out, n, d_out);
          }
        };

        // 1. The first backward again: e_l for every layer, g_l where a'' needs it.
        Rows<const T> g = read(in.grad_output, widths[layers]);
        for (size_t l = layers; l-- > 0;) {
          const int64_t d_out = widths[l + 1];
          if (has_a2(l) && reads_f(l)) g_kept[l] = g;
          if (activation(l).has_value()) {
            const Rows<T> e_l = take(d_out);
            times_derivative(l, g, e_l);
            round_to_dtype<scalar_t, T>(e_l.data, n * d_out);
            e[l] = {e_l.data, e_l.ld};
          } else {
            e[l] = g;  // the linear output layer: e = dl/d(out)
          }
          if (l == 0) break;
          // g_{l-1} = e_l Omega_l, kept apart where a'' of layer l - 1 needs it.
          const int64_t d_in = widths[l];
          const Rows<T> dst = has_a2(l - 1) && reads_f(l - 1) ? take(d_in) : Rows<T>{g_work[l % 2], d_in};
          gemm<T>(n, d_in, d_out, e[l].data, e[l].ld, 1, w.natural[l], d_in, dst.data, d_in, Init::Zero);
          round_to_dtype<scalar_t, T>(dst.data, n * d_in);
          g = {dst.data, dst.ld};
        }

        // 2. Upward, from g_bar = v.
        std::vector<Rows<const T>> f_bar(layers), h_bar(layers);
        bool have_g_bar = in.v != nullptr;
        Rows<const T> g_bar = have_g_bar ? read(in.v, widths[0]) : Rows<const T>{nullptr, 0};
        for (size_t l = 0; l < layers; ++l) {
          const int64_t d_in = widths[l], d_out = widths[l + 1];
          bool have_e_bar = false;
          if (have_g_bar) {  // dl/dh_l = e_l Omega_l
            gemm<T>(n, d_out, d_in, g_bar.data, g_bar.ld, 1, w.transposed[l], d_out, e_bar, d_out, Init::Zero);
            if (need_weights) {
              gemm<T>(d_out, d_in, n, e[l].data, 1, e[l].ld, g_bar.data, g_bar.ld, sums.weights(slot, l), d_in,
                      Init::AddToC);
            }
            have_e_bar = true;
          }
          if (has_V(l)) {  // dl/dOmega_l = e_l^T h_l  (7.9)
            gemm<T>(n, d_out, d_in, h[l].data, h[l].ld, 1, V_w[l]->transposed[0], d_out, e_bar, d_out,
                    have_e_bar ? Init::AddToC : Init::Zero);
            const Rows<T> hb = take(d_in);
            gemm<T>(n, d_in, d_out, e[l].data, e[l].ld, 1, V_w[l]->natural[0], d_in, hb.data, d_in, Init::Zero);
            round_to_dtype<scalar_t, T>(hb.data, n * d_in);
            h_bar[l] = {hb.data, hb.ld};
            have_e_bar = true;
          }
          if (has_u(l)) {  // dl/dbeta_l = the column sums of e_l
            const Rows<T> eb{e_bar, d_out};
            for (int64_t i = 0; i < n; ++i) {
              if (have_e_bar) {
                map2_lanes([](Lanes<T> a, Lanes<T> b) { return a + b; }, eb.row(i), eb.row(i), u_t[l].data(), d_out);
              } else {
                std::copy_n(u_t[l].data(), d_out, eb.row(i));
              }
            }
            have_e_bar = true;
          }
          if (!have_e_bar) {
            have_g_bar = false;
            continue;
          }
          round_to_dtype<scalar_t, T>(e_bar, n * d_out);
          const Rows<T> gb{g_bar_space, d_out};
          if (activation(l).has_value()) {
            if (has_a2(l)) {  // e_l = g_l * a'[f_l]: f_l's cotangent
              const Rows<T> fb = take(d_out);
              second_derivative_rows<T>(*activation(l), acts.params, {e_bar, d_out},
                                        reads_f(l) ? g_kept[l] : e[l], out_or_f[l], fb, n, d_out);
              round_to_dtype<scalar_t, T>(fb.data, n * d_out);
              f_bar[l] = {fb.data, fb.ld};
            }
            times_derivative(l, {e_bar, d_out}, gb);
            round_to_dtype<scalar_t, T>(gb.data, n * d_out);
            g_bar = {gb.data, gb.ld};
          } else {  // the linear output layer, the last: g_bar = e_bar
            g_bar = {e_bar, d_out};
          }
          have_g_bar = true;
        }
        if (out.grad_output != nullptr) {  // g_bar past the output layer: dl/d(out)'s cotangent
          const int64_t d = widths[layers];
          if (have_g_bar) {
            at::vec::convert(g_bar.data, out.grad_output + row * d, n * d);  // rows of width d
          } else {
            std::fill_n(out.grad_output + row * d, n * d, scalar_t(0));
          }
        }

        // 3. Downward: an ordinary backward of f_bar and h_bar through the network.
        if (!downward) {
          if (need_input) std::fill_n(out.input + row * widths[0], n * widths[0], scalar_t(0));
          continue;
        }
        bool have_h_cot = false;  // nothing above the output layer
        Rows<const T> h_cot{nullptr, 0};
        for (size_t l = layers; l-- > 0;) {
          const int64_t d_in = widths[l], d_out = widths[l + 1];
          // F_l = f_bar_l + h_cot * a_l' (h_cot only below the output layer, where every
          // layer has its activation), or f_bar_l itself.
          Rows<const T> f_cot_rows = f_bar[l];
          if (have_h_cot) {
            const Rows<T> fc{f_cot, d_out};
            times_derivative(l, h_cot, fc);
            if (f_bar[l].data != nullptr) add_rows<T>(f_bar[l], fc, n, d_out);
            round_to_dtype<scalar_t, T>(fc.data, n * d_out);
            f_cot_rows = {fc.data, fc.ld};
          }
          if (f_cot_rows.data == nullptr) {
            h_cot = h_bar[l];
            have_h_cot = h_cot.data != nullptr;
            continue;
          }
          if (need_weights) {  // (7.9)
            gemm<T>(d_out, d_in, n, f_cot_rows.data, 1, f_cot_rows.ld, h[l].data, h[l].ld, sums.weights(slot, l),
                    d_in, Init::AddToC);
          }
          if (need_biases) column_sums<T>(f_cot_rows, n, d_out, sums.biases(block, l), run);
          have_h_cot = l > 0 || need_input;
          if (!have_h_cot) continue;
          const Rows<T> hc{h_cot_space[l % 2], d_in};  // (7.6)
          gemm<T>(n, d_in, d_out, f_cot_rows.data, f_cot_rows.ld, 1, w.natural[l], d_in, hc.data, d_in, Init::Zero);
          if (h_bar[l].data != nullptr) add_rows<T>(h_bar[l], hc, n, d_in);
          round_to_dtype<scalar_t, T>(hc.data, n * d_in);
          h_cot = {hc.data, hc.ld};
        }
        if (need_input) {
          const int64_t d = widths[0];
          if (have_h_cot) {
            at::vec::convert(h_cot.data, out.input + row * d, n * d);  // rows of width d
          } else {
            std::fill_n(out.input + row * d, n * d, scalar_t(0));
          }
        }
      }
    }
  });

  sums.finish();
}

}  // namespace

SecondOrderGradients fused_double_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weight_list,
    at::TensorList bias_list, at::TensorList hidden_outputs, const std::optional<at::Tensor>& v,
    const std::vector<std::optional<at::Tensor>>& V, const std::vector<std::optional<at::Tensor>>& u,
    const NetworkActivations& activations, std::array<bool, 4> output_mask) {
  const PerLayer<at::Tensor> weights = contiguous(weight_list), biases = contiguous(bias_list);
  const int64_t rows = leading_rows(input.sizes());
  const at::Tensor x = contiguous(input), grad = contiguous(grad_output);
  const PerLayer<at::Tensor> hidden = contiguous(hidden_outputs);
  const at::Tensor v_data = v.has_value() ? contiguous(*v) : at::Tensor();
  std::vector<std::optional<at::Tensor>> V_data(V.size()), u_data(u.size());
  for (size_t l = 0; l < V.size(); ++l) if (V[l].has_value()) V_data[l] = contiguous(*V[l]);
  for (size_t l = 0; l < u.size(); ++l) if (u[l].has_value()) u_data[l] = contiguous(*u[l]);
  const auto [need_grad_output, need_input, need_weights, need_biases_asked] = output_mask;
  const bool need_biases = need_biases_asked && !biases.empty();

  SecondOrderGradients found;
  const auto options = input.options();
  const auto make = [&](at::IntArrayRef sizes) { return rows == 0 ? at::zeros(sizes, options) : uninitialized(sizes, input); };
  if (need_grad_output) found.grad_output = make(grad_output.sizes());
  if (need_input) found.input = make(input.sizes());
  for (size_t l = 0; l < weights.size(); ++l) {
    if (need_weights) found.weights.push_back(make(weights[l].sizes()));
    if (need_biases) found.biases.push_back(make({weights[l].size(0)}));
  }
  if (rows == 0) return found;  // no rows: every sum is zero
  HANDGRAD_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad_fused_double_backward", [&] {
    SecondOrderArguments<scalar_t> in{grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), {},
                                      v_data.defined() ? v_data.const_data_ptr<scalar_t>() : nullptr};
    for (const auto& t : hidden) in.hidden_outputs.push_back(t.const_data_ptr<scalar_t>());
    SecondOrderOutputs<scalar_t> out{
        need_grad_output ? found.grad_output.data_ptr<scalar_t>() : nullptr,
        need_input ? found.input.data_ptr<scalar_t>() : nullptr, {}, {}};
    for (auto& t : found.weights) out.weights.push_back(t.data_ptr<scalar_t>());
    for (auto& t : found.biases) out.biases.push_back(t.data_ptr<scalar_t>());
    double_backward_blocks<scalar_t>(activations, weights, biases, in, V_data, u_data, rows, out);
  });
  return found;
}

}  // namespace CPU_CAPABILITY
}  // namespace handgrad::cpu
