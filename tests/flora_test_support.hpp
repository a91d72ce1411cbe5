// Helpers shared by the FLoRA test programs: random adapters and tensors, and error measures.
#pragma once

#include <tensor_adapters/flora.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

namespace flora_test {

namespace ta = tensor_adapters;

template <class Tensor>
double max_abs(const Tensor& t) {
  double m = 0;
  for (ta::index i = 0; i < t.size(); ++i) m = std::max(m, std::abs(static_cast<double>(t.data()[i])));
  return m;
}

// max |a − b| / (1 + max |b|)
template <class A, class B>
double relative_error(const A& a, const B& b) {
  REQUIRE(a.size() == b.size());
  double e = 0;
  for (ta::index i = 0; i < a.size(); ++i)
    e = std::max(e, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
  return e / (1.0 + max_abs(b));
}

template <class T>
double tolerance(double size) {
  return 16.0 * std::numeric_limits<T>::epsilon() * std::max(1.0, size);
}

// An adapter with every parameter random (the core too), so that ΔW and every gradient are non-zero.
template <class T, int N>
ta::flora<T, N> random_flora(const ta::shape<N>& weight, const ta::shape<N>& ranks, double scale, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto a = ta::make_flora<T, N>(weight, ranks, scale, gen);
  ta::fill_normal(a.G, 0.0, 1.0, gen);
  return a;
}

template <class T, int N>
ta::tensor<T, N> random_tensor(const ta::shape<N>& s, std::uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 gen(seed);
  ta::tensor<T, N> t(s);
  ta::fill_normal(t, 0.0, stddev, gen);
  return t;
}

}  // namespace flora_test
