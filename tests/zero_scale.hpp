// A scale of exactly 0 multiplies like any other: PEFT forms ΔW as (B @ A) * scaling, so a NaN or an
// infinity in an adapter's factors still gives NaN in ΔW, in a merged weight and in the gradients, as
// it does in the unmerged forward. These helpers state what a result at scale 0 must be, given the same
// computation at scale 1 (tested elsewhere against PyTorch).
#pragma once

#include <tensor_adapters/tensor.hpp>

#include <cmath>

namespace zero_scale {

// base + 0 · at_one, elementwise in T: 0 where at_one is finite, NaN where it is not.
template <class T, int N>
tensor_adapters::tensor<T, N> plus_zero_times(const tensor_adapters::tensor<T, N>& base,
                                              const tensor_adapters::tensor<T, N>& at_one) {
  tensor_adapters::tensor<T, N> out = base;
  for (tensor_adapters::index e = 0; e < out.size(); ++e) out.data()[e] += T(0) * at_one.data()[e];
  return out;
}

// The same shape and the same values, NaN where either is NaN.
template <class T, int N>
bool same_or_both_nan(const tensor_adapters::tensor<T, N>& a, const tensor_adapters::tensor<T, N>& b) {
  if (a.dimensions() != b.dimensions()) return false;
  for (tensor_adapters::index e = 0; e < a.size(); ++e) {
    const T x = a.data()[e], y = b.data()[e];
    if (!(x == y || (std::isnan(x) && std::isnan(y)))) return false;
  }
  return true;
}

// True if some value is NaN (so a test of the NaN pattern is not vacuous).
template <class T, int N>
bool has_nan(const tensor_adapters::tensor<T, N>& a) {
  for (tensor_adapters::index e = 0; e < a.size(); ++e)
    if (std::isnan(a.data()[e])) return true;
  return false;
}

}  // namespace zero_scale
