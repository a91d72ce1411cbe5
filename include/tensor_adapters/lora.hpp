// LoRA: ΔW = scale · reshape(B · A, W0.shape), compatible with PyTorch PEFT.
//
// A weight W0 of shape (O, I1, …, Ik) has fan-in F = I1·…·Ik (for a linear layer F = I). The adapter
// holds A (r, F) = PEFT's lora_A.weight and B (O, r) = lora_B.weight; a conv layer's lora_A.weight
// (r, in, kh, kw) and lora_B.weight (O, r, 1, 1) are the same bytes. scale is lora_alpha / r, or
// lora_alpha / sqrt(r) with rsLoRA. The scale multiplies like any factor, as in PEFT's
// (B @ A) * scaling: with a scale of 0, a NaN or an infinity in A or B still gives NaN.
//
// Weight space (any weight rank ≥ 2):  delta_weight, delta_weight_vjp, merge, unmerge, safe_merge.
// Activation space (linear layers):    forward, backward — ΔW is never materialised.
//
// Example:
//   std::mt19937_64 gen(0);
//   auto adapter = tensor_adapters::make_lora<float>(768, 768, {/*rank=*/8, /*alpha=*/16.0}, gen);
//   tensor_adapters::tensor<float, 2> y = tensor_adapters::forward(adapter, x, w0, b0);
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "detail/check.hpp"
#include "detail/gemm.hpp"
#include "init.hpp"
#include "parameters.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

enum class lora_init {
  kaiming_uniform,  // PEFT's default: A ~ U(-1/sqrt(F), 1/sqrt(F)), B = 0
  gaussian,         // PEFT's "gaussian": A ~ N(0, (1/r)^2), B = 0
};

struct lora_options {
  index rank = 8;
  double alpha = 8.0;
  bool use_rslora = false;  // scale = alpha / sqrt(rank) instead of alpha / rank
  lora_init init = lora_init::kaiming_uniform;
};

template <class T>
struct lora {
  tensor<T, 2> A;  // (r, F)  lora_A.weight
  tensor<T, 2> B;  // (O, r)  lora_B.weight
  T scale = T(1);
};

template <class T>
index rank(const lora<T>& a) {
  return a.A.dimension(0);
}

// The scale PEFT uses: alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double lora_scale(double alpha, index rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

// A new adapter for a weight with `out` rows and fan-in `fan_in`, initialised as PEFT does; ΔW = 0.
// Throws argument_error if a size is < 1 or rank > min(out, fan_in).
template <class T, class Generator>
lora<T> make_lora(index out, index fan_in, const lora_options& options, Generator& gen) {
  const index r = options.rank;
  TA_CHECK(out >= 1 && fan_in >= 1, "make_lora",
                "weight (" + std::to_string(out) + ", " + std::to_string(fan_in) + ") must not be empty");
  TA_CHECK(r >= 1 && r <= std::min(out, fan_in), "make_lora",
                "rank " + std::to_string(r) + " must be in [1, min(out, fan_in)] for a weight (" +
                    std::to_string(out) + ", " + std::to_string(fan_in) + ")");
  lora<T> a;
  a.A.resize(r, fan_in);
  a.B.resize(out, r);
  a.B.setZero();
  a.scale = static_cast<T>(lora_scale(options.alpha, r, options.use_rslora));
  if (options.init == lora_init::kaiming_uniform) {
    fill_kaiming_uniform(a.A, fan_in, std::sqrt(5.0), gen);
  } else {
    fill_normal(a.A, 0.0, 1.0 / static_cast<double>(r), gen);
  }
  return a;
}

// The same for a weight of any rank: shape is (O, I1, …, Ik), fan-in I1·…·Ik. Throws argument_error
// also if an extent is < 1 or the fan-in is more than an index can count.
// (N is a std::size_t so that it is deduced from a shape<N> argument.)
template <class T, std::size_t N, class Generator>
lora<T> make_lora(const std::array<index, N>& weight_shape, const lora_options& options, Generator& gen) {
  static_assert(N >= 2, "a LoRA weight has rank 2 or more");
  const index fan_in = detail::bounded_product([&](int d) { return weight_shape[std::size_t(d)]; }, 1, int(N),
                                                std::numeric_limits<index>::max());
  TA_CHECK(fan_in > 0, "make_lora",
           "weight shape " + detail::dims_string(weight_shape, int(N)) +
               " needs extents of at least 1 and a fan-in an index can count");
  return make_lora<T>(weight_shape[0], fan_in, options, gen);
}

// Visits lora_A.weight then lora_B.weight.
template <class T, class F>
void for_each_parameter(lora<T>& a, F&& fn) {
  fn("lora_A.weight", a.A);
  fn("lora_B.weight", a.B);
}
template <class T, class F>
void for_each_parameter(const lora<T>& a, F&& fn) {
  fn("lora_A.weight", a.A);
  fn("lora_B.weight", a.B);
}
template <class T, class F>
void for_each_parameter(lora<T>& params, const lora<T>& grads, F&& fn) {
  fn("lora_A.weight", params.A, grads.A);
  fn("lora_B.weight", params.B, grads.B);
}

namespace detail {

template <class T>
void check_lora(const lora<T>& a, const char* function) {
  const index r = a.A.dimension(0);
  TA_CHECK(r >= 1 && a.A.dimension(1) >= 1 && a.B.dimension(0) >= 1, function,
        "adapter A " + shape_string(a.A) + " and B " + shape_string(a.B) + " must not be empty");
  TA_CHECK(a.B.dimension(1) == r, function,
        "adapter A " + shape_string(a.A) + " and B " + shape_string(a.B) + " disagree on the rank");
  const index most = std::min(a.B.dimension(0), a.A.dimension(1));
  TA_CHECK(r <= most, function,
        "adapter A " + shape_string(a.A) + " and B " + shape_string(a.B) + " have rank " + std::to_string(r) +
            ", which must be at most min(out, fan_in) = " + std::to_string(most));
}

// The weight (O, I1, …, Ik) seen as (O, F) must match the adapter.
template <class T, class Weight>
void check_weight(const lora<T>& a, const Weight& w, const char* function, const char* name) {
  check_lora(a, function);
  const index fan_in =
      bounded_product([&](int d) { return w.dimension(d); }, 1, Weight::NumIndices, a.A.dimension(1));
  TA_CHECK(w.dimension(0) == a.B.dimension(0) && fan_in == a.A.dimension(1), function,
        std::string(name) + " has shape " + shape_string(w) + " but the adapter (A " + shape_string(a.A) +
            ", B " + shape_string(a.B) + ") needs (" + std::to_string(a.B.dimension(0)) +
            ", …) with fan-in " + std::to_string(a.A.dimension(1)));
}

// w (O, F) += alpha · B · A
template <class T>
void add_scaled_delta(const lora<T>& a, T alpha, T* w) {
  const index out = a.B.dimension(0), r = a.A.dimension(0), fan_in = a.A.dimension(1);
  gemm<T>(false, false, out, fan_in, r, alpha, a.B.data(), r, a.A.data(), fan_in, T(1), w, fan_in);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// Weight space

// dw = scale · reshape(B · A, dw.shape).  dw: (O, I1, …, Ik).  Throws if dw does not fit the adapter.
template <class T, int N>
void delta_weight(const lora<T>& a, tensor_view<T, N> dw) {
  detail::check_weight(a, dw, "lora delta_weight", "dw");
  const index out = a.B.dimension(0), r = a.A.dimension(0), fan_in = a.A.dimension(1);
  detail::gemm<T>(false, false, out, fan_in, r, a.scale, a.B.data(), r, a.A.data(), fan_in, T(0), dw.data(),
                  fan_in);
}

// ΔW of a linear weight, (O, F).
template <class T>
tensor<T, 2> delta_weight(const lora<T>& a) {
  detail::check_lora(a, "lora delta_weight");
  tensor<T, 2> dw(a.B.dimension(0), a.A.dimension(1));
  delta_weight<T, 2>(a, writable_view(dw));
  return dw;
}

// ΔW reshaped to a weight of shape (O, I1, …, Ik), e.g. delta_weight(a, shape_of(w0)). (N is a
// std::size_t so that it is deduced from a shape<N>, which is a std::array.)
template <class T, std::size_t N>
tensor<T, static_cast<int>(N)> delta_weight(const lora<T>& a, const std::array<index, N>& weight_shape) {
  // The shape is checked before ΔW is allocated (a negative extent would otherwise fail in the allocation).
  const char* fn = "lora delta_weight";
  detail::check_lora(a, fn);
  const index fan_in = detail::bounded_product([&](int d) { return weight_shape[std::size_t(d)]; }, 1, int(N),
                                                a.A.dimension(1));
  TA_CHECK(weight_shape[0] == a.B.dimension(0) && fan_in == a.A.dimension(1), fn,
           "the weight shape " + detail::dims_string(weight_shape, int(N)) + " does not fit the adapter (A " +
               detail::shape_string(a.A) + ", B " + detail::shape_string(a.B) + "), which needs (" +
               std::to_string(a.B.dimension(0)) + ", …) with fan-in " + std::to_string(a.A.dimension(1)));
  tensor<T, static_cast<int>(N)> dw(weight_shape);
  delta_weight<T, static_cast<int>(N)>(a, writable_view(dw));
  return dw;
}

// Given gW = ∂L/∂W (O, I1, …, Ik), viewed as (O, F):  grad.A = scale · Bᵀ · gW,  grad.B = scale · gW · Aᵀ.
// grad is resized to the adapter's shapes if needed and overwritten; it must not be the adapter itself.
template <class T, int N>
void delta_weight_vjp(const lora<T>& a, const_tensor_view<T, N> gw, lora<T>& grad) {
  detail::check_weight(a, gw, "lora delta_weight_vjp", "gW");
  const index out = a.B.dimension(0), r = a.A.dimension(0), fan_in = a.A.dimension(1);
  if (grad.A.dimensions() != a.A.dimensions()) grad.A.resize(r, fan_in);
  if (grad.B.dimensions() != a.B.dimensions()) grad.B.resize(out, r);
  grad.scale = a.scale;
  detail::gemm<T>(true, false, r, fan_in, out, a.scale, a.B.data(), r, gw.data(), fan_in, T(0), grad.A.data(),
                  fan_in);
  detail::gemm<T>(false, true, out, r, fan_in, a.scale, gw.data(), fan_in, a.A.data(), fan_in, T(0),
                  grad.B.data(), r);
}

template <class T, int N>
lora<T> delta_weight_vjp(const lora<T>& a, const tensor<T, N>& gw) {
  lora<T> grad;
  delta_weight_vjp<T, N>(a, view(gw), grad);
  return grad;
}

// w ← w + ΔW.  w: (O, I1, …, Ik).  Throws (and leaves w untouched) if w does not fit the adapter.
// ΔW is formed as scale · (B · A), the order PEFT uses, B · A summed over r in blocks of 256: where
// B · A or w + ΔW exceeds T's range the result is ±Inf (NaN where infinities of both signs meet), even
// if scale · B · A alone would be finite. Where the build has FMA instructions (-mfma, -march=haswell or
// later, or -march=native on such a machine) scaling a block's sum and adding it to w is one fused
// step, so where scale · (B · A) alone would overflow but w + ΔW is in range, the result is finite
// (PEFT's is ±Inf); without them the two steps may round apart, and the result is then ±Inf as PEFT's.
// safe_merge rejects a merge with a non-finite result. Subnormal values take part with no flush to zero.
template <class T, int N>
void merge(const lora<T>& a, tensor_view<T, N> w) {
  detail::check_weight(a, w, "lora merge", "w");
  detail::add_scaled_delta(a, a.scale, w.data());
}
template <class T, int N>
void merge(const lora<T>& a, tensor<T, N>& w) {
  merge<T, N>(a, writable_view(w));
}

// w ← w − ΔW.  Restores a merged weight up to rounding.
template <class T, int N>
void unmerge(const lora<T>& a, tensor_view<T, N> w) {
  detail::check_weight(a, w, "lora unmerge", "w");
  detail::add_scaled_delta(a, static_cast<T>(-a.scale), w.data());
}
template <class T, int N>
void unmerge(const lora<T>& a, tensor<T, N>& w) {
  unmerge<T, N>(a, writable_view(w));
}

// w ← w + ΔW, computed into a copy first; only if every merged value is finite is it committed.
// Throws argument_error otherwise, and then w is bit-identical to before.
template <class T, int N>
void safe_merge(const lora<T>& a, tensor_view<T, N> w) {
  detail::check_weight(a, w, "lora safe_merge", "w");
  std::vector<T> merged(w.data(), w.data() + w.size());
  detail::add_scaled_delta(a, a.scale, merged.data());
  TA_CHECK(detail::all_finite(merged.data(), static_cast<index>(merged.size())), "lora safe_merge",
                "the merged weight " + detail::shape_string(w) +
                    " would hold a non-finite value; the weight was left unchanged");
  std::copy(merged.begin(), merged.end(), w.data());
}
template <class T, int N>
void safe_merge(const lora<T>& a, tensor<T, N>& w) {
  safe_merge<T, N>(a, writable_view(w));
}

// ---------------------------------------------------------------------------------------------------
// Linear layers in activation space

// Scratch for forward and backward, sized on first use by either call for both. Once a forward with a
// bias and a backward of n rows have run on a workspace and thread (the product kernel keeps its own
// buffers per thread), no later call of up to n rows on them allocates.
template <class T>
struct lora_workspace {
  std::vector<T> h;   // (n, r + 1): x · Aᵀ (and a column of ones for the bias)
  std::vector<T> dh;  // (n, r): scale · dy · B
  std::vector<T> u;   // (r + 1, O): scale · Bᵀ (and the bias row)
};

namespace detail {

template <class T>
void check_linear(const lora<T>& a, const const_tensor_view<T, 2>& x, const const_tensor_view<T, 2>& w0,
                  const char* function) {
  check_weight(a, w0, function, "w0");
  TA_CHECK(x.dimension(1) == w0.dimension(1), function,
        "x has shape " + shape_string(x) + " but w0 " + shape_string(w0) + " needs (n, " +
            std::to_string(w0.dimension(1)) + ")");
}

template <class T>
void check_same_shape(const char* function, const char* name, const Eigen::DSizes<index, 2>& dims, index rows,
                      index cols) {
  TA_CHECK(dims[0] == rows && dims[1] == cols, function,
        std::string(name) + " has shape " + dims_string(dims, 2) + " but must be (" + std::to_string(rows) +
            ", " + std::to_string(cols) + ")");
}

template <class T>
void grow(std::vector<T>& buffer, index size) {
  if (static_cast<index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
}

// Every buffer at the size any call for n rows needs, so that neither call allocates after the other.
template <class T>
void reserve(lora_workspace<T>& ws, index n, index r, index out) {
  grow(ws.h, n * (r + 1));
  grow(ws.dh, n * r);
  grow(ws.u, (r + 1) * out);
}

template <class T>
void linear_forward(const lora<T>& a, const const_tensor_view<T, 2>& x, const const_tensor_view<T, 2>& w0,
                    const T* b0, tensor_view<T, 2> y, lora_workspace<T>& ws) {
  const index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0), r = a.A.dimension(0);
  // h = [x · Aᵀ, 1] (n, r + 1) and u = [scale · Bᵀ; b0] (r + 1, O), the column of ones and the bias row
  // only with a bias; then y = x · W0ᵀ and y += h · u. y is written twice in all, as by the frozen
  // layer alone (its product, then its bias).
  const index k = b0 != nullptr ? r + 1 : r;
  reserve(ws, n, r, out);
  T* h = ws.h.data();
  T* u = ws.u.data();
  gemm<T>(false, true, n, r, in, T(1), x.data(), in, a.A.data(), in, T(0), h, k);
  const T* b = a.B.data();
  for (index j = 0; j < r; ++j)
    for (index o = 0; o < out; ++o) u[j * out + o] = a.scale * b[o * r + j];
  if (b0 != nullptr) {
    for (index i = 0; i < n; ++i) h[i * k + r] = T(1);
    std::copy(b0, b0 + out, u + r * out);
  }
  gemm<T>(false, true, n, out, in, T(1), x.data(), in, w0.data(), in, T(0), y.data(), out);
  gemm<T>(false, false, n, out, k, T(1), h, k, u, out, T(1), y.data(), out);
}

}  // namespace detail

// y (n, O) = x · W0ᵀ + b0 + scale · (x · Aᵀ) · Bᵀ
//   x: (n, I), w0: (O, I), b0: (O), y: (n, O).  y must not overlap x or w0 (it may be b0).
// Throws argument_error, before writing anything, if a shape does not fit. Makes no allocation on a
// warm workspace (see lora_workspace).
template <class T>
void forward(const lora<T>& a, nondeduced<const_tensor_view<T, 2>> x, nondeduced<const_tensor_view<T, 2>> w0,
             nondeduced<const_tensor_view<T, 1>> b0, nondeduced<tensor_view<T, 2>> y,
             lora_workspace<T>& ws) {
  const char* fn = "lora forward";
  detail::check_linear(a, x, w0, fn);
  TA_CHECK(b0.dimension(0) == w0.dimension(0), fn,
                "b0 has shape " + detail::shape_string(b0) + " but w0 " + detail::shape_string(w0) + " needs (" +
                    std::to_string(w0.dimension(0)) + ")");
  detail::check_same_shape<T>(fn, "y", y.dimensions(), x.dimension(0), w0.dimension(0));
  detail::linear_forward(a, x, w0, b0.data(), y, ws);
}

// The same without a bias: y = x · W0ᵀ + scale · (x · Aᵀ) · Bᵀ.
template <class T>
void forward(const lora<T>& a, nondeduced<const_tensor_view<T, 2>> x, nondeduced<const_tensor_view<T, 2>> w0,
             nondeduced<tensor_view<T, 2>> y, lora_workspace<T>& ws) {
  const char* fn = "lora forward";
  detail::check_linear(a, x, w0, fn);
  detail::check_same_shape<T>(fn, "y", y.dimensions(), x.dimension(0), w0.dimension(0));
  detail::linear_forward(a, x, w0, static_cast<const T*>(nullptr), y, ws);
}

// Value-returning forms.
template <class T>
tensor<T, 2> forward(const lora<T>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0, const tensor<T, 1>& b0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  lora_workspace<T> ws;
  forward(a, x, w0, b0, y, ws);
  return y;
}
template <class T>
tensor<T, 2> forward(const lora<T>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  lora_workspace<T> ws;
  forward(a, x, w0, y, ws);
  return y;
}

// Backward of the linear forward with W0 and b0 frozen, given dy = ∂L/∂y (n, O):
//   h = x · Aᵀ;  grad.B = scale · dyᵀ · h;  dh = scale · dy · B;  grad.A = dhᵀ · x;  dx = dy · W0 + dh · A.
//   x: (n, I), w0: (O, I), dy: (n, O), dx: (n, I).  grad is resized if needed and overwritten
//   (it must not be the adapter itself); dx must not overlap dy or w0 (it may be x).
// (The bias does not enter: ∂L/∂b0 would be Σ_rows dy, and b0 is frozen.)
// Throws argument_error, before writing anything, if a shape does not fit. Makes no allocation on a
// warm workspace (see lora_workspace) when grad has the adapter's shapes.
template <class T>
void backward(const lora<T>& a, nondeduced<const_tensor_view<T, 2>> x,
              nondeduced<const_tensor_view<T, 2>> w0, nondeduced<const_tensor_view<T, 2>> dy,
              nondeduced<tensor_view<T, 2>> dx, lora<T>& grad, lora_workspace<T>& ws) {
  const char* fn = "lora backward";
  detail::check_linear(a, x, w0, fn);
  const index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0), r = a.A.dimension(0);
  detail::check_same_shape<T>(fn, "dy", dy.dimensions(), n, out);
  detail::check_same_shape<T>(fn, "dx", dx.dimensions(), n, in);
  if (grad.A.dimensions() != a.A.dimensions()) grad.A.resize(r, in);
  if (grad.B.dimensions() != a.B.dimensions()) grad.B.resize(out, r);
  grad.scale = a.scale;
  detail::reserve(ws, n, r, out);
  T* h = ws.h.data();
  T* dh = ws.dh.data();
  detail::gemm<T>(false, true, n, r, in, T(1), x.data(), in, a.A.data(), in, T(0), h, r);
  detail::gemm<T>(true, false, out, r, n, a.scale, dy.data(), out, h, r, T(0), grad.B.data(), r);
  detail::gemm<T>(false, false, n, r, out, a.scale, dy.data(), out, a.B.data(), r, T(0), dh, r);
  detail::gemm<T>(true, false, r, in, n, T(1), dh, r, x.data(), in, T(0), grad.A.data(), in);
  detail::gemm<T>(false, false, n, in, out, T(1), dy.data(), out, w0.data(), in, T(0), dx.data(), in);
  detail::gemm<T>(false, false, n, in, r, T(1), dh, r, a.A.data(), in, T(1), dx.data(), in);
}

template <class T>
struct lora_gradients {
  tensor<T, 2> dx;  // (n, I)
  lora<T> grad;     // the adapter's shapes
};

// Value-returning form.
template <class T>
lora_gradients<T> backward(const lora<T>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0, const tensor<T, 2>& dy) {
  lora_gradients<T> g;
  g.dx.resize(x.dimension(0), x.dimension(1));
  lora_workspace<T> ws;
  backward(a, x, w0, dy, g.dx, g.grad, ws);
  return g;
}

}  // namespace tensor_adapters
