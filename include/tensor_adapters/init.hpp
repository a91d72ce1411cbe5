// Seeded initialisation from a caller-supplied random generator.
//
// The generator is any UniformRandomBitGenerator (std::mt19937_64 is the usual choice). The values
// are derived from its raw bits by formulas written here, not by the standard library's
// distributions, so the same generator state gives the same bytes with every compiler and library.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "detail/check.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

namespace detail {

// 64 random bits from a generator of any output width.
template <class Generator>
std::uint64_t random_bits64(Generator& gen) {
  using result = typename Generator::result_type;
  static_assert(std::is_unsigned_v<result>, "the generator must produce unsigned integers");
  constexpr std::uint64_t range = static_cast<std::uint64_t>(Generator::max() - Generator::min());
  if constexpr (range == std::numeric_limits<std::uint64_t>::max()) {
    return static_cast<std::uint64_t>(gen() - Generator::min());
  } else {
    static_assert(range == 0xffffffffULL, "the generator must produce 32 or 64 uniform bits");
    const std::uint64_t hi = static_cast<std::uint64_t>(gen() - Generator::min());
    const std::uint64_t lo = static_cast<std::uint64_t>(gen() - Generator::min());
    return (hi << 32) | lo;
  }
}

// Uniform on [0, 1) with 53 random bits.
template <class Generator>
double uniform01(Generator& gen) {
  return static_cast<double>(random_bits64(gen) >> 11) * 0x1.0p-53;
}

// Standard normal by the Box-Muller transform (one value per call; the partner value is dropped so
// that no state is kept outside the generator).
template <class Generator>
double standard_normal(Generator& gen) {
  const double u1 = 1.0 - uniform01(gen);  // (0, 1]: log is finite
  const double u2 = uniform01(gen);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace detail

namespace detail {

template <class T, class Generator>
void fill_uniform(T* data, index n, double bound, Generator& gen) {
  for (index i = 0; i < n; ++i) data[i] = static_cast<T>((2.0 * uniform01(gen) - 1.0) * bound);
}

template <class T, class Generator>
void fill_normal(T* data, index n, double mean, double stddev, Generator& gen) {
  for (index i = 0; i < n; ++i) data[i] = static_cast<T>(mean + stddev * standard_normal(gen));
}

}  // namespace detail

// Fills t with values uniform on [-bound, bound).
template <class T, int N, class Generator>
void fill_uniform(tensor_view<T, N> t, double bound, Generator& gen) {
  detail::fill_uniform(t.data(), t.size(), bound, gen);
}
template <class T, int N, class Generator>
void fill_uniform(tensor<T, N>& t, double bound, Generator& gen) {
  detail::fill_uniform(t.data(), t.size(), bound, gen);
}

// Fills t with normal values of the given mean and standard deviation.
template <class T, int N, class Generator>
void fill_normal(tensor_view<T, N> t, double mean, double stddev, Generator& gen) {
  detail::fill_normal(t.data(), t.size(), mean, stddev, gen);
}
template <class T, int N, class Generator>
void fill_normal(tensor<T, N>& t, double mean, double stddev, Generator& gen) {
  detail::fill_normal(t.data(), t.size(), mean, stddev, gen);
}

// PyTorch's kaiming_uniform_(w, a) for a weight whose fan-in is `fan_in`:
// bound = sqrt(6 / ((1 + a^2) * fan_in)); with a = sqrt(5) that is 1 / sqrt(fan_in). Throws
// argument_error for fan_in < 1 (where PyTorch, on an empty weight, warns and fills nothing).
inline double kaiming_uniform_bound(index fan_in, double a) {
  TA_CHECK(fan_in >= 1, "kaiming_uniform_bound", "fan_in " + std::to_string(fan_in) + " must be at least 1");
  return std::sqrt(6.0 / ((1.0 + a * a) * static_cast<double>(fan_in)));
}
template <class T, int N, class Generator>
void fill_kaiming_uniform(tensor<T, N>& t, index fan_in, double a, Generator& gen) {
  fill_uniform(t, kaiming_uniform_bound(fan_in, a), gen);
}

// PyTorch's xavier_uniform_(w): bound = sqrt(6 / (fan_in + fan_out)). Throws argument_error for a
// negative fan or fan_in + fan_out < 1.
inline double xavier_uniform_bound(index fan_in, index fan_out) {
  TA_CHECK(fan_in >= 0 && fan_out >= 0 && fan_in + fan_out >= 1, "xavier_uniform_bound",
           "fan_in " + std::to_string(fan_in) + " and fan_out " + std::to_string(fan_out) +
               " must be at least 0, with a sum of at least 1");
  return std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
}
template <class T, int N, class Generator>
void fill_xavier_uniform(tensor<T, N>& t, index fan_in, index fan_out, Generator& gen) {
  fill_uniform(t, xavier_uniform_bound(fan_in, fan_out), gen);
}

}  // namespace tensor_adapters
