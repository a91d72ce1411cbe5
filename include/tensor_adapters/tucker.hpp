// Tucker chains: a core multiplied by one factor per mode, and the reverse contraction.
//
//   expansion    y = core ×0 U0 ×1 U1 … ×(N-1) U(N-1)        core (r0, …), U_n (I_n, r_n), y (I0, …)
//   compression  g = x ×0 U0ᵀ ×1 U1ᵀ … ×(N-1) U(N-1)ᵀ         x (I0, …), g (r0, …)
//   all but one  z[n] = x ×_{m≠n} U_mᵀ                        z[n] (r0, …, I_n, …, r(N-1))
//
// Every chain runs its modes in the order that needs the fewest flops. A mode product that maps extent
// a to b on a tensor of S elements costs 2·S·b flops and leaves S·b/a elements; exchanging two
// neighbours in a chain shows that the cheapest chain applies the modes by the key 1/b − 1/a,
// largest first (the ratio does not depend on what came before, so the sorted order is optimal over
// all N! orders). For expansion (r_n → I_n) the key is 1/I_n − 1/r_n; for compression (I_n → r_n) it is
// 1/r_n − 1/I_n. Example: core 16×2 → 256×3 expands mode 0 first, 19,456 flops against 24,768.
//
// The factor arrays are kept out of template deduction (std::array's extent is a std::size_t, N an
// int), so T and N come from the core or x: tucker_expand(view(core), factors, writable_view(y)). The
// orders take std::size_t N, deduced from their shape<N> arguments: expansion_order(shape_of(g), shape_of(y)).
//
// Every product goes through mode_product.hpp's kernel. Intermediates live in a tucker_workspace<T>;
// the overloads without one use a temporary workspace (allocations on every call). An output (y, g, z)
// must not overlap the inputs (the core or x, and the factors).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "detail/check.hpp"
#include "mode_product.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

// Scratch for the intermediates of a chain. Grows when needed and never shrinks, so a workspace reused
// for calls of the same shapes (tucker_expand, tucker_compress, tucker_compress_all_but_one) makes no
// allocation after the first (nor does the product kernel, on the same thread: mode_product.hpp).
template <class T>
struct tucker_workspace {
  std::vector<T> buffer[2];             // a chain's intermediates, alternately
  std::vector<std::vector<T>> partial;  // tucker_compress_all_but_one: the shared compression of each level
};

namespace detail {

// True when applying a mode that maps a_n → b_n before one that maps a_m → b_m is strictly cheaper,
// i.e. 1/b_n − 1/a_n > 1/b_m − 1/a_m, compared exactly by cross-multiplying (all extents > 0).
inline bool mode_goes_first(index a_n, index b_n, index a_m, index b_m) {
  using wide = long double;
  return wide(a_n - b_n) * wide(a_m) * wide(b_m) > wide(a_m - b_m) * wide(a_n) * wide(b_n);
}

// cheapest_order on the extents from[0..N) and to[0..N): a stable insertion sort (count ≤ N, a
// handful), which orders as std::stable_sort does, without the buffer std::stable_sort allocates.
inline void cheapest_order(const index* from, const index* to, int* modes, int count) {
  for (int k = 0; k < count; ++k)
    if (from[modes[k]] == 0 || to[modes[k]] == 0) return;
  for (int k = 1; k < count; ++k) {
    const int n = modes[k];
    int j = k;
    for (; j > 0 && mode_goes_first(from[n], to[n], from[modes[j - 1]], to[modes[j - 1]]); --j) modes[j] = modes[j - 1];
    modes[j] = n;
  }
}

// The cheapest order of the modes in `modes` (a subsequence of 0..N-1) for products mapping from[n] →
// to[n]; ties keep their order in `modes` (ascending in every caller: the lower mode first). With an
// empty extent every order costs nothing: the modes keep their order. Makes no allocation.
template <int N>
void cheapest_order(const shape<N>& from, const shape<N>& to, int* modes, int count) {
  cheapest_order(from.data(), to.data(), modes, count);
}

// The flops of applying `modes` in that order to a tensor of extents `dims`, mapping from[n] → to[n].
template <int N>
double chain_flops(shape<N> dims, const shape<N>& to, const int* modes, int count) {
  double flops = 0;
  for (int k = 0; k < count; ++k) {
    const auto n = static_cast<std::size_t>(modes[k]);
    flops += 2.0 * double(product(dims)) * double(to[n]);
    dims[n] = to[n];
  }
  return flops;
}

// y = alpha · x ×_{modes[0]} op(U) … ×_{modes[count-1]} op(U) + beta · y, applying the modes in the
// order given. u[n] points at mode n's factor, stored (to[n], dims[n]) or, transposed, (dims[n], to[n]).
// Intermediates alternate between the two workspace buffers. With count == 0, y = alpha·x + beta·y.
template <class T, int N>
void mode_chain(const T* x, shape<N> dims, const std::array<const T*, N>& u, const shape<N>& to, bool transposed,
                const int* modes, int count, T alpha, T beta, T* y, tucker_workspace<T>& ws) {
  if (count == 0) {
    const index size = product(dims);
    for (index e = 0; e < size; ++e) y[e] = alpha * x[e] + (beta == T(0) ? T(0) : beta * y[e]);
    return;
  }
  // Size the buffers first (step k writes buffer k % 2), so that nothing moves while in use.
  {
    shape<N> d = dims;
    index need[2] = {0, 0};
    for (int k = 0; k + 1 < count; ++k) {
      d[static_cast<std::size_t>(modes[k])] = to[static_cast<std::size_t>(modes[k])];
      need[k % 2] = std::max(need[k % 2], product(d));
    }
    for (int b = 0; b < 2; ++b)
      if (index(ws.buffer[b].size()) < need[b]) ws.buffer[b].resize(static_cast<std::size_t>(need[b]));
  }
  const T* src = x;
  for (int k = 0; k < count; ++k) {
    const int mode = modes[k];
    const auto m = static_cast<std::size_t>(mode);
    index p = 1, q = 1;
    for (int d = 0; d < mode; ++d) p *= dims[static_cast<std::size_t>(d)];
    for (int d = mode + 1; d < N; ++d) q *= dims[static_cast<std::size_t>(d)];
    const bool last = k + 1 == count;
    T* dst = last ? y : ws.buffer[k % 2].data();
    mode_product_kernel<T>(src, p, dims[m], q, u[m], transposed, to[m], last ? alpha : T(1), last ? beta : T(0),
                           dst);
    dims[m] = to[m];
    src = dst;
  }
}

template <class T, int N>
void check_factors(const std::array<const_tensor_view<T, 2>, N>& factors, const shape<N>& full, const shape<N>& core,
                   const char* function, const char* full_name, const char* core_name) {
  check_extents(full, N, function, full_name);
  for (int n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    const auto& f = factors[un];
    TA_CHECK(f.dimension(0) == full[un] && f.dimension(1) == core[un], function,
          "factors[" + std::to_string(n) + "] has shape " + shape_string(f) + " but must be (" +
              std::to_string(full[un]) + ", " + std::to_string(core[un]) + ") for " + full_name + " " +
              dims_string(full, N) + " and " + core_name + " " + dims_string(core, N));
    TA_CHECK(core[un] >= 1 && core[un] <= full[un], function,
          "factors[" + std::to_string(n) + "] has rank " + std::to_string(core[un]) + ", which must be 1 to " +
              std::to_string(full[un]) + " (the extent it factors) for " + full_name + " " + dims_string(full, N));
  }
}

template <class T, int N>
std::array<const T*, N> factor_data(const std::array<const_tensor_view<T, 2>, N>& factors) {
  std::array<const T*, N> u{};
  for (std::size_t n = 0; n < std::size_t(N); ++n) u[n] = factors[n].data();
  return u;
}

template <class T, int N, std::size_t... n>
std::array<const_tensor_view<T, 2>, N> factor_views(const std::array<tensor<T, 2>, N>& factors,
                                                    std::index_sequence<n...>) {
  return {view(factors[n])...};
}
template <class T, int N>
std::array<const_tensor_view<T, 2>, N> factor_views(const std::array<tensor<T, 2>, N>& factors) {
  return factor_views<T, N>(factors, std::make_index_sequence<std::size_t(N)>());
}

}  // namespace detail

// The flop-minimal order of an expansion core (r0, …) → (I0, …): the modes by 1/I_n − 1/r_n, largest
// first (ties: lower mode first). The first entry is the mode to apply first. Makes no allocation.
// Throws argument_error if an extent is negative or a tensor's size overflows an index.
// (N is a std::size_t so that it is deduced from shape<N> arguments: expansion_order(shape_of(g), shape_of(y)).)
template <std::size_t N>
std::array<int, N> expansion_order(const std::array<index, N>& core_extents, const std::array<index, N>& full_extents) {
  constexpr int rank = static_cast<int>(N);
  detail::check_extents(core_extents, rank, "expansion_order", "the core");
  detail::check_extents(full_extents, rank, "expansion_order", "the expanded tensor");
  std::array<int, N> order{};
  std::iota(order.begin(), order.end(), 0);
  detail::cheapest_order<rank>(core_extents, full_extents, order.data(), rank);
  return order;
}

// The flop-minimal order of a compression (I0, …) → (r0, …): the modes by 1/r_n − 1/I_n, largest first.
// Makes no allocation. Throws argument_error if an extent is negative or a tensor's size overflows an
// index. (N is a std::size_t, deduced from shape<N> arguments, as for expansion_order.)
template <std::size_t N>
std::array<int, N> compression_order(const std::array<index, N>& full_extents,
                                     const std::array<index, N>& core_extents) {
  constexpr int rank = static_cast<int>(N);
  detail::check_extents(full_extents, rank, "compression_order", "the tensor");
  detail::check_extents(core_extents, rank, "compression_order", "the core");
  std::array<int, N> order{};
  std::iota(order.begin(), order.end(), 0);
  detail::cheapest_order<rank>(full_extents, core_extents, order.data(), rank);
  return order;
}

// y = alpha · core ×0 U0 ×1 U1 … ×(N-1) U(N-1) + beta · y, in expansion_order.
//   core: (r0, …, r(N-1)), factors[n]: (I_n, r_n), y: (I0, …, I(N-1)).
// With beta == 0, y's old contents are ignored. Throws argument_error, before writing, if a factor
// does not fit the core and y, or a rank r_n is 0 or above I_n.
template <class T, int N>
void tucker_expand(const_tensor_view<T, N> core, const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                   nondeduced<tensor_view<T, N>> y, tucker_workspace<T>& ws, T alpha = T(1), T beta = T(0)) {
  const shape<N> r = shape_of(core), full = shape_of(y);
  detail::check_factors<T, N>(factors, full, r, "tucker_expand", "y", "core");
  const std::array<int, N> order = expansion_order<N>(r, full);
  detail::mode_chain<T, N>(core.data(), r, detail::factor_data<T, N>(factors), full, false, order.data(), N, alpha,
                           beta, y.data(), ws);
}
template <class T, int N>
void tucker_expand(const_tensor_view<T, N> core, const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                   nondeduced<tensor_view<T, N>> y, T alpha = T(1), T beta = T(0)) {
  tucker_workspace<T> ws;
  tucker_expand<T, N>(core, factors, y, ws, alpha, beta);
}

// g = alpha · x ×0 U0ᵀ ×1 U1ᵀ … ×(N-1) U(N-1)ᵀ + beta · g, in compression_order.
//   x: (I0, …, I(N-1)), factors[n]: (I_n, r_n), g: (r0, …, r(N-1)).
// With beta == 0, g's old contents are ignored. Throws argument_error, before writing, if a factor
// does not fit x and g, or a rank r_n is 0 or above I_n.
template <class T, int N>
void tucker_compress(const_tensor_view<T, N> x, const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                     nondeduced<tensor_view<T, N>> g, tucker_workspace<T>& ws, T alpha = T(1), T beta = T(0)) {
  const shape<N> full = shape_of(x), r = shape_of(g);
  detail::check_factors<T, N>(factors, full, r, "tucker_compress", "x", "g");
  const std::array<int, N> order = compression_order<N>(full, r);
  detail::mode_chain<T, N>(x.data(), full, detail::factor_data<T, N>(factors), r, true, order.data(), N, alpha, beta,
                           g.data(), ws);
}
template <class T, int N>
void tucker_compress(const_tensor_view<T, N> x, const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                     nondeduced<tensor_view<T, N>> g, T alpha = T(1), T beta = T(0)) {
  tucker_workspace<T> ws;
  tucker_compress<T, N>(x, factors, g, ws, alpha, beta);
}

namespace detail {

// The levels of compress_all_but_one's recursion below the top: halving `count` modes (the larger half
// keeps ⌈count/2⌉) down to one.
inline int all_but_one_depth(int count) {
  int depth = 0;
  for (; count > 1; count -= count / 2) ++depth;
  return depth;
}

// z[n] for every n in modes[0..count): t has every mode in `modes` at full extent and every other
// mode compressed already. The modes split in two halves; each half's outputs need the other half
// compressed, which is computed once and shared by the whole half (N·log2 N mode products in all,
// instead of N·(N-1)). The shared compression of recursion level `level` goes to ws.partial[level]
// (sized to all_but_one_depth(N) levels by the caller); the chains' intermediates to ws.buffer.
template <class T, int N>
void compress_all_but_one(const T* t, const shape<N>& dims, const std::array<const T*, N>& u, const shape<N>& r,
                          const int* modes, int count, std::array<tensor<T, N>, N>& z, tucker_workspace<T>& ws,
                          std::size_t level = 0) {
  if (count == 1) {
    const auto n = static_cast<std::size_t>(modes[0]);
    std::copy(t, t + product(dims), z[n].data());
    return;
  }
  const int half = count / 2;
  std::vector<T>& next = ws.partial[level];  // t is the level above's (or x): never this one
  for (int side = 0; side < 2; ++side) {
    const int* keep = side == 0 ? modes : modes + half;  // modes left at full extent
    const int keep_count = side == 0 ? half : count - half;
    std::array<int, N> other{};
    int other_count = 0;
    for (int k = 0; k < count; ++k)
      if (std::find(keep, keep + keep_count, modes[k]) == keep + keep_count)
        other[std::size_t(other_count++)] = modes[k];
    cheapest_order<N>(dims, r, other.data(), other_count);
    shape<N> reduced = dims;
    for (int k = 0; k < other_count; ++k) {
      const auto m = static_cast<std::size_t>(other[std::size_t(k)]);
      reduced[m] = r[m];
    }
    // The first side's recursion has finished with `next` before the second side overwrites it.
    if (index(next.size()) < product(reduced)) next.resize(static_cast<std::size_t>(product(reduced)));
    mode_chain<T, N>(t, dims, u, r, true, other.data(), other_count, T(1), T(0), next.data(), ws);
    compress_all_but_one<T, N>(next.data(), reduced, u, r, keep, keep_count, z, ws, level + 1);
  }
}

}  // namespace detail

// For every mode n: z[n] = x ×_{m≠n} U_mᵀ, of shape (r0, …, I_n, …, r(N-1)) — the contraction a
// Tucker gradient needs for factor n. Partial products are shared: the modes are split in halves
// recursively, and each half's common compression is computed once, each in the cheapest order.
//   x: (I0, …, I(N-1)), factors[n]: (I_n, r_n). z is resized to fit (kept if it fits already).
// With z of those shapes already and a workspace that has served a call of the same shapes, makes no
// allocation. Throws argument_error, before writing, if a factor does not contract its mode of x, or a
// rank r_n is 0 or above I_n.
template <class T, int N>
void tucker_compress_all_but_one(const_tensor_view<T, N> x,
                                 const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                                 nondeduced<std::array<tensor<T, N>, N>>& z, tucker_workspace<T>& ws) {
  const shape<N> full = shape_of(x);
  shape<N> r{};
  for (std::size_t n = 0; n < std::size_t(N); ++n) r[n] = factors[n].dimension(1);
  detail::check_factors<T, N>(factors, full, r, "tucker_compress_all_but_one", "x", "core");
  for (int n = 0; n < N; ++n) {
    shape<N> d = r;
    d[std::size_t(n)] = full[std::size_t(n)];
    if (shape_of(z[std::size_t(n)]) != d) z[std::size_t(n)].resize(d);
  }
  const auto levels = static_cast<std::size_t>(detail::all_but_one_depth(N));
  if (ws.partial.size() < levels) ws.partial.resize(levels);  // before the recursion holds any of them
  std::array<int, N> modes{};
  std::iota(modes.begin(), modes.end(), 0);
  detail::compress_all_but_one<T, N>(x.data(), full, detail::factor_data<T, N>(factors), r, modes.data(), N, z, ws);
}
template <class T, int N>
void tucker_compress_all_but_one(const_tensor_view<T, N> x,
                                 const nondeduced<std::array<const_tensor_view<T, 2>, N>>& factors,
                                 nondeduced<std::array<tensor<T, N>, N>>& z) {
  tucker_workspace<T> ws;
  tucker_compress_all_but_one<T, N>(x, factors, z, ws);
}

// Value-returning forms.
template <class T, int N>
tensor<T, N> tucker_expand(const tensor<T, N>& core, const nondeduced<std::array<tensor<T, 2>, N>>& factors) {
  shape<N> full{};
  for (std::size_t n = 0; n < std::size_t(N); ++n) full[n] = factors[n].dimension(0);
  detail::check_extents(full, N, "tucker_expand", "y");
  tensor<T, N> y(full);
  tucker_expand<T, N>(view(core), detail::factor_views<T, N>(factors), writable_view(y));
  return y;
}
template <class T, int N>
tensor<T, N> tucker_compress(const tensor<T, N>& x, const nondeduced<std::array<tensor<T, 2>, N>>& factors) {
  shape<N> r{};
  for (std::size_t n = 0; n < std::size_t(N); ++n) r[n] = factors[n].dimension(1);
  tensor<T, N> g(r);
  tucker_compress<T, N>(view(x), detail::factor_views<T, N>(factors), writable_view(g));
  return g;
}

}  // namespace tensor_adapters
