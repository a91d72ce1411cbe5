// Merging adapters into half-precision weights: Eigen::half (IEEE binary16) and Eigen::bfloat16.
//
// The adapter stays in float (or double). ΔW is formed in the adapter's type by its own delta_weight,
// and each element of the weight becomes
//
//   w_new = round(w + ΔW)
//
// where w + ΔW is summed exactly (the half value and the float ΔW widened to double, the error of that
// sum carried along) and `round` is the one rounding to the half type, to nearest with ties to even.
// So the merged value is the correctly rounded value of w + ΔW(float): within half an ulp of the exact
// result, up to the float rounding of ΔW itself (which matters only where w + ΔW lies within that
// error of a tie). From the largest finite value plus half its ulp on (65520 for half; the largest finite
// value is 65504) the result is ±Inf, as IEEE rounding gives; safe_merge rejects it.
//
//   LoRA, FLoRA (in place, w: the weight's shape, Eigen::half or Eigen::bfloat16):
//     merge(a, w)            w ← round(w + ΔW)
//     unmerge(a, w)          w ← round(w − ΔW)            (not exact in general: see below)
//     safe_merge(a, w)       merge, but throws argument_error and leaves w bit-identical if a merged
//                            value would be ±Inf or NaN
//     merge(a, w, saved)     saved ← w (bit for bit), then merge
//     unmerge(a, w, saved)   w ← saved (bit for bit): the exact inverse of merge(a, w, saved)
//   GLoRA (out of place, as in float; w_eff and b_eff may be w0 and b0 themselves):
//     merge(a, c, w0, b0, w_eff, b_eff)        w_eff ← round(W0 + W0 ⊙ A + B), b_eff ← round(b0 + b0 ⊙ D + E + W0 · C)
//     safe_merge(a, c, w0, b0, w_eff, b_eff)   the same, checked for ±Inf and NaN before anything is written
//   (each also without a bias, and value-returning forms).
//
// Why subtraction cannot restore half weights in general. The merge keeps only the rounded sum
// w' = w + ΔW + e, with |e| ≤ ½ ulp(w'). Subtracting ΔW gives w + e, which rounds back to w only if |e|
// is below half the spacing of the half type next to w on e's side. That holds in the typical case (ΔW
// small against w, w' in w's binade) except where e is a tie or w is a power of two that e points below.
// It fails when w' lands in a coarser binade than w (|ΔW| comparable to or larger than |w|, e.g.
// w = 1 + 2⁻¹⁰ in half plus ΔW = 1 gives 2, and 2 − 1 = 1 ≠ w), so the low bits of a small w vanish
// under a large ΔW, and always after an overflow to Inf. When the original bits matter, merge with a
// saved copy and unmerge from it. For GLoRA there is no subtraction at all (W_eff = W0 ⊙ (1 + A) + B
// would need a division, impossible where A = −1), so the original W0 and b0 are what restores it.
//
// Each call allocates the ΔW buffer (the weight's size, in the adapter's type); safe_merge also a
// half-precision copy of the result. The rounding assumes the default floating-point environment
// (round to nearest).
//
// Example:
//   tensor_adapters::tensor<Eigen::bfloat16, 2> w = load_weight();
//   tensor_adapters::tensor<Eigen::bfloat16, 2> saved;
//   tensor_adapters::merge(adapter, w, saved);    // adapter: lora<float>; w now holds round(w + ΔW)
//   ...                                          // inference
//   tensor_adapters::unmerge(adapter, w, saved);  // w is bit-identical to what it was
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/check.hpp"
#include "flora.hpp"
#include "glora.hpp"
#include "lora.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

// True for the half-precision weight types merges round into: Eigen::half and Eigen::bfloat16.
template <class H>
struct is_half_precision : std::false_type {};
template <>
struct is_half_precision<Eigen::half> : std::true_type {};
template <>
struct is_half_precision<Eigen::bfloat16> : std::true_type {};

namespace detail {

template <class H>
using if_half_precision = std::enable_if_t<is_half_precision<H>::value, int>;

// hi + lo (exactly, with |lo| ≤ ½ ulp(hi) in double) rounded once to H, to nearest with ties to even;
// ±Inf from H's largest finite value plus half its ulp on, the sign of a zero kept. A value that lies exactly on a tie of H only through
// lo is rounded towards lo.
template <class H>
H round_to_nearest_even(double hi, double lo) {
  using limits = std::numeric_limits<H>;
  if (!std::isfinite(hi) || hi == 0.0) return H(static_cast<float>(hi));
  int e = 0;
  std::frexp(hi, &e);  // |hi| in [2^(e−1), 2^e)
  // The spacing of H in hi's binade: 2^(e − digits), never below the smallest subnormal.
  const int q = std::max(e - limits::digits, limits::min_exponent - limits::digits);
  const double m = std::ldexp(hi, -q);  // exact: a power-of-two scaling within double's range
  double f = std::nearbyint(m);         // ties to even
  if (lo != 0.0 && std::fabs(m - std::trunc(m)) == 0.5) f = lo > 0.0 ? std::ceil(m) : std::floor(m);
  const double r = std::ldexp(f, q);
  if (std::fabs(r) >= std::ldexp(1.0, limits::max_exponent))
    return H(static_cast<float>(std::copysign(std::numeric_limits<double>::infinity(), hi)));
  return H(static_cast<float>(r));  // exact: r is a value of H
}

// round(a + b) with one rounding: the sum is carried exactly as hi + lo (Knuth's two-sum).
template <class H>
H round_sum(double a, double b) {
  const double s = a + b;
  if (!std::isfinite(s)) return H(static_cast<float>(s));
  const double bb = s - a;
  const double err = (a - (s - bb)) + (b - bb);
  return round_to_nearest_even<H>(s, err);
}

// out[i] = round(w[i] + sign · dw[i]) for i < n (out may be w).
template <class H, class T>
void add_rounded(const T* dw, double sign, const H* w, H* out, index n) {
  for (index i = 0; i < n; ++i)
    out[i] = round_sum<H>(static_cast<double>(static_cast<float>(w[i])), sign * static_cast<double>(dw[i]));
}

template <class H>
bool all_finite_half(const H* data, index n) {
  for (index i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<float>(data[i]))) return false;
  return true;
}

// Adds (sign · dw) into w with one rounding per element; with `checked`, first into a copy that is
// committed only if every value is finite (else throws argument_error naming `function`).
template <class H, class T, int N>
void commit_rounded(const tensor<T, N>& dw, double sign, bool checked, tensor_view<H, N> w, const char* function) {
  const index n = w.size();
  if (!checked) {
    add_rounded(dw.data(), sign, w.data(), w.data(), n);
    return;
  }
  std::vector<H> merged(static_cast<std::size_t>(n));
  add_rounded(dw.data(), sign, w.data(), merged.data(), n);
  TA_CHECK(all_finite_half(merged.data(), n), function,
           "the merged weight " + shape_string(w) +
               " would hold a non-finite value (beyond the half type's range, or NaN); the weight was left unchanged");
  std::copy(merged.begin(), merged.end(), w.data());
}

template <class H, int N>
void save_weight(const tensor_view<H, N>& w, tensor<H, N>& saved) {
  if (saved.dimensions() != w.dimensions()) saved.resize(w.dimensions());
  std::copy(w.data(), w.data() + w.size(), saved.data());
}

template <class H, int N>
void restore_weight(const tensor<H, N>& saved, tensor_view<H, N> w, const char* function) {
  TA_CHECK(saved.dimensions() == w.dimensions(), function,
           "the saved weight has shape " + shape_string(saved) + " but w " + shape_string(w));
  std::copy(saved.data(), saved.data() + saved.size(), w.data());
}

}  // namespace detail

// x rounded once to H (Eigen::half or Eigen::bfloat16), to nearest with ties to even; ±Inf from H's
// largest finite value plus half its ulp on (65520 for half), as IEEE rounding gives. Unlike H(x), which
// rounds a double to float first, this rounds only once.
template <class H, detail::if_half_precision<H> = 0>
H round_to_nearest_even(double x) {
  return detail::round_to_nearest_even<H>(x, 0.0);
}

// ---------------------------------------------------------------------------------------------------
// LoRA: ΔW = scale · reshape(B · A, W.shape), formed in T.  w: (O, I1, …, Ik) of H.
// Each throws argument_error, before writing anything, if w (or saved) does not fit the adapter.

// w ← round(w + ΔW).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const lora<T>& a, tensor_view<H, N> w) {
  detail::check_weight(a, w, "lora merge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, 1.0, false, w, "lora merge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const lora<T>& a, tensor<H, N>& w) {
  merge<H, T, N>(a, writable_view(w));
}

// w ← round(w − ΔW). Not in general the inverse of merge (see the top of this header).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const lora<T>& a, tensor_view<H, N> w) {
  detail::check_weight(a, w, "lora unmerge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, -1.0, false, w, "lora unmerge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const lora<T>& a, tensor<H, N>& w) {
  unmerge<H, T, N>(a, writable_view(w));
}

// w ← round(w + ΔW) if every merged value is finite; otherwise throws argument_error and w is
// bit-identical to before.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const lora<T>& a, tensor_view<H, N> w) {
  detail::check_weight(a, w, "lora safe_merge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, 1.0, true, w, "lora safe_merge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const lora<T>& a, tensor<H, N>& w) {
  safe_merge<H, T, N>(a, writable_view(w));
}

// saved ← w (resized to w's shape), then w ← round(w + ΔW).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const lora<T>& a, tensor_view<H, N> w, tensor<H, N>& saved) {
  detail::check_weight(a, w, "lora merge", "w");
  detail::save_weight(w, saved);
  merge<H, T, N>(a, w);
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const lora<T>& a, tensor<H, N>& w, tensor<H, N>& saved) {
  merge<H, T, N>(a, writable_view(w), saved);
}

// w ← saved, bit for bit: undoes merge(a, w, saved) exactly.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const lora<T>& a, tensor_view<H, N> w, const tensor<H, N>& saved) {
  detail::check_weight(a, w, "lora unmerge", "w");
  detail::restore_weight(saved, w, "lora unmerge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const lora<T>& a, tensor<H, N>& w, const tensor<H, N>& saved) {
  unmerge<H, T, N>(a, writable_view(w), saved);
}

// ---------------------------------------------------------------------------------------------------
// FLoRA: ΔW = scale · G ×0 U0 … ×(N-1) U(N-1), formed in T.  w: (I0, …, I(N-1)) of H.
// Each throws argument_error, before writing anything, if the adapter is inconsistent or w (or saved)
// does not fit it.

// w ← round(w + ΔW).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const flora<T, N>& a, tensor_view<H, N> w) {
  detail::check_flora_weight(a, w, "flora merge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, 1.0, false, w, "flora merge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const flora<T, N>& a, tensor<H, N>& w) {
  merge<H, T, N>(a, writable_view(w));
}

// w ← round(w − ΔW). Not in general the inverse of merge (see the top of this header).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const flora<T, N>& a, tensor_view<H, N> w) {
  detail::check_flora_weight(a, w, "flora unmerge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, -1.0, false, w, "flora unmerge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const flora<T, N>& a, tensor<H, N>& w) {
  unmerge<H, T, N>(a, writable_view(w));
}

// w ← round(w + ΔW) if every merged value is finite; otherwise throws argument_error and w is
// bit-identical to before.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const flora<T, N>& a, tensor_view<H, N> w) {
  detail::check_flora_weight(a, w, "flora safe_merge", "w");
  tensor<T, N> dw(w.dimensions());
  delta_weight<T, N>(a, writable_view(dw));
  detail::commit_rounded<H, T, N>(dw, 1.0, true, w, "flora safe_merge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const flora<T, N>& a, tensor<H, N>& w) {
  safe_merge<H, T, N>(a, writable_view(w));
}

// saved ← w (resized to w's shape), then w ← round(w + ΔW).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const flora<T, N>& a, tensor_view<H, N> w, tensor<H, N>& saved) {
  detail::check_flora_weight(a, w, "flora merge", "w");
  detail::save_weight(w, saved);
  merge<H, T, N>(a, w);
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const flora<T, N>& a, tensor<H, N>& w, tensor<H, N>& saved) {
  merge<H, T, N>(a, writable_view(w), saved);
}

// w ← saved, bit for bit: undoes merge(a, w, saved) exactly.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const flora<T, N>& a, tensor_view<H, N> w, const tensor<H, N>& saved) {
  detail::check_flora_weight(a, w, "flora unmerge", "w");
  detail::restore_weight(saved, w, "flora unmerge");
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void unmerge(const flora<T, N>& a, tensor<H, N>& w, const tensor<H, N>& saved) {
  unmerge<H, T, N>(a, writable_view(w), saved);
}

// ---------------------------------------------------------------------------------------------------
// GLoRA: W_eff = W0 + (W0 ⊙ A + B) and b_eff = b0 + (b0 ⊙ D + E + W0 · C), the terms in brackets formed
// in T from W0 and b0 widened exactly to T, then each element rounded once to H.

namespace detail {

template <class H, class T, int N>
void glora_half_merge(const glora<T>& a, const glora_config& c, const const_tensor_view<H, N>& w0, const H* b0,
                      tensor_view<H, N> w_eff, tensor_view<H, 1> b_eff, bool checked, const char* fn) {
  const glora_dims d = check_glora_merge(a, c, w0, w_eff, b_eff, fn);
  tensor<T, N> w0t(w0.dimensions());
  for (index i = 0; i < w0.size(); ++i) w0t.data()[i] = static_cast<T>(static_cast<float>(w0.data()[i]));
  tensor<T, N> dw(w0.dimensions());
  tensor<T, 1> db(d.out);
  delta_weight<T, N>(a, c, view(w0t), writable_view(dw));
  glora_workspace<T> ws;
  std::vector<H> zero;
  if (b0 != nullptr) {
    tensor<T, 1> b0t(d.out);
    for (index o = 0; o < d.out; ++o) b0t.data()[o] = static_cast<T>(static_cast<float>(b0[o]));
    delta_bias<T, N>(a, c, view(w0t), view(b0t), writable_view(db), ws);
  } else {
    delta_bias<T, N>(a, c, view(w0t), writable_view(db), ws);
    zero.assign(static_cast<std::size_t>(d.out), H(0.0f));
    b0 = zero.data();
  }
  // Everything is read; w_eff and b_eff may now be w0 and b0 themselves.
  if (!checked) {
    add_rounded(dw.data(), 1.0, w0.data(), w_eff.data(), w0.size());
    add_rounded(db.data(), 1.0, b0, b_eff.data(), d.out);
    return;
  }
  std::vector<H> w(static_cast<std::size_t>(w0.size())), b(static_cast<std::size_t>(d.out));
  add_rounded(dw.data(), 1.0, w0.data(), w.data(), w0.size());
  add_rounded(db.data(), 1.0, b0, b.data(), d.out);
  TA_CHECK(all_finite_half(w.data(), w0.size()) && all_finite_half(b.data(), d.out), fn,
           "the merged weight " + shape_string(w0) + " or bias (" + std::to_string(d.out) +
               ") would hold a non-finite value (beyond the half type's range, or NaN); nothing was written");
  std::copy(w.begin(), w.end(), w_eff.data());
  std::copy(b.begin(), b.end(), b_eff.data());
}

}  // namespace detail

// w_eff ← round(W0 + W0 ⊙ A + B),  b_eff ← round(b0 + b0 ⊙ D + E + W0 · C).
//   w0, w_eff: (O, I1, …, Ik) of H; b0, b_eff: (O) of H. w_eff and b_eff may be w0 and b0 (in place).
// Throws argument_error, before writing anything, if a shape or the configuration does not fit.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<H, N>> w0,
           nondeduced<const_tensor_view<H, 1>> b0, tensor_view<H, N> w_eff, tensor_view<H, 1> b_eff) {
  const char* fn = "glora merge";
  detail::check_glora_vector(b0, detail::check_glora_store(a, fn).out, fn, "b0");
  detail::glora_half_merge<H, T, N>(a, c, w0, b0.data(), w_eff, b_eff, false, fn);
}
// Without a bias: b_eff ← round(E + W0 · C).
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<H, N>> w0, tensor_view<H, N> w_eff,
           tensor_view<H, 1> b_eff) {
  detail::glora_half_merge<H, T, N>(a, c, w0, static_cast<const H*>(nullptr), w_eff, b_eff, false, "glora merge");
}

// The same, but if a merged value would be ±Inf or NaN, throws argument_error and writes nothing.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<H, N>> w0,
                nondeduced<const_tensor_view<H, 1>> b0, tensor_view<H, N> w_eff, tensor_view<H, 1> b_eff) {
  const char* fn = "glora safe_merge";
  detail::check_glora_vector(b0, detail::check_glora_store(a, fn).out, fn, "b0");
  detail::glora_half_merge<H, T, N>(a, c, w0, b0.data(), w_eff, b_eff, true, fn);
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
void safe_merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<H, N>> w0,
                tensor_view<H, N> w_eff, tensor_view<H, 1> b_eff) {
  detail::glora_half_merge<H, T, N>(a, c, w0, static_cast<const H*>(nullptr), w_eff, b_eff, true, "glora safe_merge");
}

// Value-returning forms: the merged layer in H.
template <class H, class T, int N, detail::if_half_precision<H> = 0>
glora_merged<H, N> merge(const glora<T>& a, const glora_config& c, const tensor<H, N>& w0, const tensor<H, 1>& b0) {
  glora_merged<H, N> m{tensor<H, N>(w0.dimensions()), tensor<H, 1>(w0.dimension(0))};
  merge<H, T, N>(a, c, view(w0), view(b0), writable_view(m.weight), writable_view(m.bias));
  return m;
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
glora_merged<H, N> merge(const glora<T>& a, const glora_config& c, const tensor<H, N>& w0) {
  glora_merged<H, N> m{tensor<H, N>(w0.dimensions()), tensor<H, 1>(w0.dimension(0))};
  merge<H, T, N>(a, c, view(w0), writable_view(m.weight), writable_view(m.bias));
  return m;
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
glora_merged<H, N> safe_merge(const glora<T>& a, const glora_config& c, const tensor<H, N>& w0, const tensor<H, 1>& b0) {
  glora_merged<H, N> m{tensor<H, N>(w0.dimensions()), tensor<H, 1>(w0.dimension(0))};
  safe_merge<H, T, N>(a, c, view(w0), view(b0), writable_view(m.weight), writable_view(m.bias));
  return m;
}
template <class H, class T, int N, detail::if_half_precision<H> = 0>
glora_merged<H, N> safe_merge(const glora<T>& a, const glora_config& c, const tensor<H, N>& w0) {
  glora_merged<H, N> m{tensor<H, N>(w0.dimensions()), tensor<H, 1>(w0.dimension(0))};
  safe_merge<H, T, N>(a, c, view(w0), writable_view(m.weight), writable_view(m.bias));
  return m;
}

}  // namespace tensor_adapters
