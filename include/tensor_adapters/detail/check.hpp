// Argument checking shared by the public entry points.
#pragma once

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "../error.hpp"
#include "../tensor.hpp"

// TA_CHECK(condition, function, message): throws argument_error("<function>: <message>") when the
// condition does not hold; the message expression is evaluated only then.
#define TA_CHECK(condition, function, message)                                  \
  do {                                                                          \
    if (!(condition)) ::tensor_adapters::detail::fail((function), (message));   \
  } while (false)

namespace tensor_adapters::detail {

// "(4, 7, 3)" for any Eigen tensor, map or std::array of extents.
template <class Dims>
std::string dims_string(const Dims& dims, int rank) {
  std::ostringstream os;
  os << '(';
  for (int d = 0; d < rank; ++d) os << (d ? ", " : "") << dims[static_cast<std::size_t>(d)];
  os << ')';
  return os.str();
}

template <class Tensor>
std::string shape_string(const Tensor& t) {
  return dims_string(t.dimensions(), Tensor::NumIndices);
}

[[noreturn]] inline void fail(const char* function, const std::string& message) {
  throw argument_error(std::string(function) + ": " + message);
}

template <class T>
bool all_finite(const T* data, index n) {
  for (index i = 0; i < n; ++i)
    if (!std::isfinite(data[i])) return false;
  return true;
}

// Π extent(d) over d in [first, last), or -1 if an extent is below 1 or the product would pass
// `limit` (each extent is bounded before it multiplies, so nothing overflows).
template <class Extent>
index bounded_product(Extent extent, int first, int last, index limit) {
  index p = 1;
  for (int d = first; d < last; ++d) {
    const index e = extent(d);
    if (e < 1 || e > limit / p) return -1;
    p *= e;
  }
  return p;
}

// True if every extent is at least 0 and the product of the nonzero ones fits in an index, so that the
// product of any of them (a size, a slice count, a fan-in) does, whether or not another extent is zero.
template <class Dims>
bool extents_fit(const Dims& dims, int rank) {
  index p = 1;
  for (int d = 0; d < rank; ++d) {
    const index e = dims[static_cast<std::size_t>(d)];
    if (e < 0 || e > std::numeric_limits<index>::max() / p) return false;
    if (e > 0) p *= e;
  }
  return true;
}

// Throws argument_error unless extents_fit. `name` names the tensor (its message is built only to throw,
// so a check makes no allocation).
template <class Dims>
void check_extents(const Dims& dims, int rank, const char* function, const char* name) {
  TA_CHECK(extents_fit(dims, rank), function,
           std::string(name) + " has extents " + dims_string(dims, rank) +
               "; they must be at least 0, and their product one an index can count");
}

// The number of elements of a tensor of these extents.
template <std::size_t N>
index product(const std::array<index, N>& dims) {
  index p = 1;
  for (index d : dims) p *= d;
  return p;
}

}  // namespace tensor_adapters::detail
