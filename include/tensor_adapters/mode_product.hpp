// The mode-n product of a row-major tensor with a matrix.
//
//   (x ×n u)[i0 … j … i(N-1)] = Σ_k u[j, k] · x[i0 … k … i(N-1)],   u: (J, I_n)
//
// x (I0, …, I(N-1)) is viewed as (P, I_n, Q) with P the product of the extents before mode n and Q of
// those after it. Every mode is then a single matrix product on the packed kernel of
// detail/gemm_kernel.hpp, without transposing or copying a tensor: the last mode (Q = 1) is
// y (P, J) = x (P, I)·uᵀ; any other mode is y (J, P·Q) = u · x (I, P·Q), whose columns (p, q) the
// kernel addresses in place (p·I·Q + q), so a middle mode is as fast as the first and the packing of
// u is shared by all P slices. A small output extent of the last mode (J ≤ 16, P ≥ 2J) takes the kernel's
// dot-product path, which streams x once without packing it; a tiny trailing extent (Q < 8, such as
// a conv kernel's 3×3, with I·Q ≤ 64, J·Q ≤ 16 and two registers, and at least 64 slices P) is folded
// into such a product with op(u) ⊗ 1_Q, each x value entering only the lanes of the outputs it
// feeds (so an Inf or NaN in x reaches those alone, as in the plain sum); any other trailing extent
// narrower than two registers with J ≤ 16 runs slice by slice with each row x_p[i, :] in registers
// (short_rows_product), also streaming x once;
// with a wider J, a trailing extent of 2 to 12 and a contraction I of at least four registers runs
// slice by slice with J along the vector lanes (short_columns_product). A J ≤ 8 with a trailing
// extent of 2 KB or more (the first mode, mostly) streams x once too, building y in tiles in L1
// (stream_rows_product); with a shorter one, wider than two registers, it runs as the short rows do,
// each slice in strips of two registers' columns.
//
// Threads: built with OpenMP (-fopenmp), a large product is split over omp_get_max_threads()
// threads; OMP_NUM_THREADS=1, omp_set_num_threads(1) or a build without OpenMP keeps it on one. A
// call from inside a parallel region runs on its calling thread only. Repeated calls of the same
// sizes allocate nothing.
//
// Views: x, u and y must be contiguous row-major memory (const_tensor_view / tensor_view, which
// Eigen's TensorMap always is); y must not overlap x or u.
#pragma once

#include <algorithm>
#include <string>

#include "detail/check.hpp"
#include "detail/gemm.hpp"
#include "detail/gemm_kernel.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

namespace detail {

template <class X, class Y>
void check_mode_product(const X& x, index u_rows, index u_cols, bool transposed, int mode, const Y& y,
                        const char* function) {
  constexpr int N = X::NumIndices;
  check_extents(x.dimensions(), N, function, "x");
  check_extents(y.dimensions(), N, function, "y");
  TA_CHECK(mode >= 0 && mode < N, function,
           "mode " + std::to_string(mode) + " is out of range for x " + shape_string(x));
  const index j = transposed ? u_cols : u_rows;
  const index k = transposed ? u_rows : u_cols;
  const char* u_name = transposed ? "ut" : "u";
  TA_CHECK(k == x.dimension(mode), function,
           std::string(u_name) + " (" + std::to_string(u_rows) + ", " + std::to_string(u_cols) +
              ") does not contract mode " + std::to_string(mode) + " of x " + shape_string(x));
  bool fits = true;
  for (int d = 0; d < N; ++d) fits = fits && y.dimension(d) == (d == mode ? j : x.dimension(d));
  TA_CHECK(fits, function,
           "y has shape " + shape_string(y) + " but x " + shape_string(x) + " ×" + std::to_string(mode) + " " +
              u_name + " (" + std::to_string(u_rows) + ", " + std::to_string(u_cols) + ") has extent " +
              std::to_string(j) + " in mode " + std::to_string(mode));
}

// y (P, J, Q) = alpha · op(u) · x_p (I, Q) + beta · y for every p; op(u) is u (J, I) or, transposed,
// the transpose of u stored as (I, J). Isa selects the instruction set (simd.hpp).
template <class T, class Isa = native_isa>
void mode_product_kernel(const T* x, index p, index i, index q, const T* u, bool transposed, index j, T alpha,
                         T beta, T* y) {
  if (p <= 0 || j <= 0 || q <= 0) return;
  if (i <= 0) {
    // An empty sum: y = beta · y, x and u not read.
    scale_matrix<T>(p, j * q, beta, grouped_matrix<T>{y, j * q, j * q, 0, 1});
    return;
  }
  const index ldu = transposed ? j : i;
  if (q == 1) {
    // y (P, J) = x (P, I) · op(u)ᵀ
    gemm_packed<T, Isa>(false, !transposed, p, j, i, alpha, x, i, u, ldu, beta, y, j);
    return;
  }
  constexpr int W = simd<T, Isa>::width;
  if constexpr (W > 1) {
    if (q < 8 && i * q <= 64 && j * q <= std::min<index>(16, 2 * W) && p >= 64) {
      // A tiny trailing extent (a conv kernel's 3×3) with small I and J: y (P, J·Q) = x (P, I·Q)·Kᵀ
      // with K = op(u) ⊗ 1_Q, one narrow product that streams x once (see kron_rows_product).
      const index u_rs = transposed ? 1 : ldu, u_cs = transposed ? ldu : 1;
      if (j * q <= W)
        kron_rows_product<T, Isa, 1>(p, i, q, x, u, u_rs, u_cs, j, alpha, beta, y);
      else
        kron_rows_product<T, Isa, 2>(p, i, q, x, u, u_rs, u_cs, j, alpha, beta, y);
      return;
    }
  }
  if ((q < 2 * W && j <= 16) || (j <= 8 && q < stream_rows_block<T> && W > 1)) {
    // A trailing extent of at most two registers (a conv kernel's 3×3 = 9 in mode 1) and a small J: slice
    // by slice, one row of x in one or two registers, x read once in place (see short_rows_product). So
    // too, in strips of two registers, rows shorter than the streaming kernel's block with J ≤ 8.
    short_rows_product<T, Isa>(p, i, q, x, u, transposed ? 1 : ldu, transposed ? ldu : 1, j, alpha, beta, y);
    return;
  }
  if (q >= 2 && q <= 12 && W > 1 && i >= 4 * W) {
    // The same short trailing extent with a wide J: J along the lanes instead (see short_columns_product).
    // Its tile is written element by element, which a long contraction (I ≥ 4 registers) amortizes;
    // FLoRA's VJP at ranks 16 (I = 16, J = 256) ran 13 % slower through it than through the GEMM.
    short_columns_product<T, Isa>(p, i, q, x, u, transposed ? 1 : ldu, transposed ? ldu : 1, j, alpha, beta, y);
    return;
  }
  if (j <= 8 && q >= stream_rows_block<T> && W > 1) {
    // A small J (memory-bound) with a trailing extent of at least one column block (2 KB): x streamed
    // once, y built in L1 tiles (see stream_rows_product). With shorter rows (256³'s middle mode, rows
    // of 1 KB) the tile's stores alias the loads of x 4 KB apart; those take the strips above.
    stream_rows_product<T, Isa>(p, i, q, x, u, transposed ? 1 : ldu, transposed ? ldu : 1, j, alpha, beta, y);
    return;
  }
  // y (J, P·Q) = op(u) (J, I) · x (I, P·Q): column (s, t) of x sits at s·I·Q + t, row r at r·Q.
  gemm_packed<T, Isa>(j, p * q, i, alpha, strided_matrix<T>{u, transposed ? 1 : ldu, transposed ? ldu : 1},
                      grouped_matrix<const T>{x, q, q, i * q, 1}, beta, grouped_matrix<T>{y, q, q, j * q, 1});
}

template <class T, int N>
void mode_product(const_tensor_view<T, N> x, const T* u, index u_rows, index u_cols, bool transposed, int mode,
                  tensor_view<T, N> y, T alpha, T beta, const char* function) {
  check_mode_product(x, u_rows, u_cols, transposed, mode, y, function);
  index p = 1, q = 1;
  for (int d = 0; d < mode; ++d) p *= x.dimension(d);
  for (int d = mode + 1; d < N; ++d) q *= x.dimension(d);
  mode_product_kernel<T>(x.data(), p, x.dimension(mode), q, u, transposed, y.dimension(mode), alpha, beta, y.data());
}

}  // namespace detail

// y = alpha · (x ×mode u) + beta · y.
//   x: (I0, …, I(N-1)), u: (J, I_mode), y: x's shape with J in place of I_mode.
// With beta == 0, y's old contents are ignored. alpha is an ordinary factor: with alpha == 0 a NaN or
// an infinity in x or u still gives NaN (0 · NaN), as alpha · (x ×mode u) does in PyTorch (BLAS and
// torch.addmm skip the product instead). With I_mode == 0, an empty sum, x and u are not read
// (y = beta · y). Throws argument_error, before writing, if the mode is out of range, a shape does not
// fit, or an extent is negative or the product of x's or y's nonzero extents overflows an index.
template <class T, int N>
void mode_product(const_tensor_view<T, N> x, nondeduced<const_tensor_view<T, 2>> u, int mode,
                  nondeduced<tensor_view<T, N>> y, T alpha = T(1), T beta = T(0)) {
  detail::mode_product<T, N>(x, u.data(), u.dimension(0), u.dimension(1), false, mode, y, alpha, beta,
                             "mode_product");
}

// The same with the factor given transposed, without copying it: y = alpha · (x ×mode utᵀ) + beta · y.
//   ut: (I_mode, J).
template <class T, int N>
void mode_product_transposed(const_tensor_view<T, N> x, nondeduced<const_tensor_view<T, 2>> ut, int mode,
                             nondeduced<tensor_view<T, N>> y, T alpha = T(1), T beta = T(0)) {
  detail::mode_product<T, N>(x, ut.data(), ut.dimension(0), ut.dimension(1), true, mode, y, alpha, beta,
                             "mode_product_transposed");
}

// The contraction of two tensors over every mode but one:
//   out (Jx, Jy) = alpha · unfold_n(x) · unfold_n(y)ᵀ + beta · out,
//   i.e. out[a, b] = Σ x[i0 … a … i(N-1)] · y[i0 … b … i(N-1)].
// x and y agree on every extent but that of mode n (Jx and Jy). This is the gradient of a mode-n
// factor: for z = x ×n u, ∂L/∂u = mode_inner_product(∂L/∂z, x, n). With beta == 0, out's old contents
// are ignored; alpha is an ordinary factor (as in mode_product); with an empty sum, out = beta · out.
// out must not overlap x or y. Throws argument_error, before writing, if the mode is out of range, a
// shape does not fit, or an extent is negative or the product of a tensor's nonzero extents overflows
// an index.
template <class T, int N>
void mode_inner_product(const_tensor_view<T, N> x, nondeduced<const_tensor_view<T, N>> y, int mode,
                        nondeduced<tensor_view<T, 2>> out, T alpha = T(1), T beta = T(0)) {
  const char* fn = "mode_inner_product";
  detail::check_extents(x.dimensions(), N, fn, "x");
  detail::check_extents(y.dimensions(), N, fn, "y");
  detail::check_extents(out.dimensions(), 2, fn, "out");
  TA_CHECK(mode >= 0 && mode < N, fn,
                "mode " + std::to_string(mode) + " is out of range for x " + detail::shape_string(x));
  bool fits = true;
  for (int d = 0; d < N; ++d) fits = fits && (d == mode || x.dimension(d) == y.dimension(d));
  TA_CHECK(fits, fn,
                "x " + detail::shape_string(x) + " and y " + detail::shape_string(y) +
                    " must agree on every mode but " + std::to_string(mode));
  const index jx = x.dimension(mode), jy = y.dimension(mode);
  TA_CHECK(out.dimension(0) == jx && out.dimension(1) == jy, fn,
                "out has shape " + detail::shape_string(out) + " but must be (" + std::to_string(jx) + ", " +
                    std::to_string(jy) + ")");
  index p = 1, q = 1;
  for (int d = 0; d < mode; ++d) p *= x.dimension(d);
  for (int d = mode + 1; d < N; ++d) q *= x.dimension(d);
  if (q == 1 || p == 0 || q == 0) {
    // out (Jx, Jy) = x (P, Jx)ᵀ · y (P, Jy); with P = 0 or Q = 0 an empty sum, out = beta · out, at once
    // (not once per slice)
    detail::gemm<T>(true, false, jx, jy, q == 0 ? 0 : p, alpha, x.data(), jx, y.data(), jy, beta, out.data(), jy);
    return;
  }
  for (index s = 0; s < p; ++s)
    detail::gemm<T>(false, true, jx, jy, q, alpha, x.data() + s * jx * q, q, y.data() + s * jy * q, q,
                    s == 0 ? beta : T(1), out.data(), jy);
}

// Value-returning forms.
template <class T, int N>
tensor<T, N> mode_product(const tensor<T, N>& x, const tensor<T, 2>& u, int mode) {
  TA_CHECK(mode >= 0 && mode < N, "mode_product",
                "mode " + std::to_string(mode) + " is out of range for x " + detail::shape_string(x));
  auto dims = x.dimensions();
  dims[mode] = u.dimension(0);
  detail::check_extents(dims, N, "mode_product", "y");
  tensor<T, N> y(dims);
  mode_product<T, N>(view(x), u, mode, y);
  return y;
}
template <class T, int N>
tensor<T, N> mode_product_transposed(const tensor<T, N>& x, const tensor<T, 2>& ut, int mode) {
  TA_CHECK(mode >= 0 && mode < N, "mode_product_transposed",
                "mode " + std::to_string(mode) + " is out of range for x " + detail::shape_string(x));
  auto dims = x.dimensions();
  dims[mode] = ut.dimension(1);
  detail::check_extents(dims, N, "mode_product_transposed", "y");
  tensor<T, N> y(dims);
  mode_product_transposed<T, N>(view(x), ut, mode, y);
  return y;
}

}  // namespace tensor_adapters
