// Tensor aliases shared by every adapter.
//
// Everything is row-major, PyTorch's own layout: a linear weight is (out, in), a conv2d weight is
// (out, in/groups, kh, kw), an activation batch is (batch, features). A checkpoint written by PyTorch
// maps onto these tensors byte for byte.
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>

#include <unsupported/Eigen/CXX11/Tensor>

namespace tensor_adapters {

using index = Eigen::Index;

// An owning row-major tensor of rank N.
template <class T, int N>
using tensor = Eigen::Tensor<T, N, Eigen::RowMajor, index>;

// A writable view of contiguous row-major memory.
template <class T, int N>
using tensor_view = Eigen::TensorMap<tensor<T, N>>;

// A read-only view of contiguous row-major memory.
template <class T, int N>
using const_tensor_view = Eigen::TensorMap<const tensor<T, N>>;

// The extents of a rank-N tensor, outermost first.
template <int N>
using shape = std::array<index, N>;

// view(t): a read-only view of an owning tensor or of another view. writable_view(t): a writable one.
// Functions that take views accept owning tensors where their element type is fixed by another
// argument; these make the type explicit where it is not (e.g. mode_product(view(x), u, 1, y)).
template <class T, int N>
const_tensor_view<T, N> view(const tensor<T, N>& t) {
  return const_tensor_view<T, N>(t.data(), t.dimensions());
}
template <class T, int N>
tensor_view<T, N> writable_view(tensor<T, N>& t) {
  return tensor_view<T, N>(t.data(), t.dimensions());
}
template <class T, int N>
const_tensor_view<T, N> view(const tensor_view<T, N>& t) {
  return const_tensor_view<T, N>(t.data(), t.dimensions());
}
template <class T, int N>
const_tensor_view<T, N> view(const const_tensor_view<T, N>& t) {
  return t;
}

// nondeduced<X> is X, but keeps a function argument out of template deduction: a function that takes
// an adapter<T> and nondeduced<const_tensor_view<T, 2>> accepts an owning tensor<T, 2> there too.
template <class X>
using nondeduced = typename std::enable_if<true, X>::type;

// The extents of any Eigen tensor or tensor map as a std::array.
template <class Tensor>
shape<Tensor::NumIndices> shape_of(const Tensor& t) {
  shape<Tensor::NumIndices> s{};
  for (int d = 0; d < Tensor::NumIndices; ++d) s[static_cast<std::size_t>(d)] = t.dimension(d);
  return s;
}

}  // namespace tensor_adapters
