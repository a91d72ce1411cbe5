// The one dense matrix product every adapter goes through.
//
//   C (m, n) = alpha · op(A) · op(B) + beta · C
//
// All matrices are row-major with a leading dimension (the distance between rows). op(A) is A (m, k)
// or, with trans_a, the transpose of A stored as (k, m); likewise op(B) is B (k, n) or Bᵀ stored as
// (n, k). With beta == 0 the old contents of C are ignored (they may be uninitialised or NaN).
#pragma once

#include <Eigen/Core>

#include "../tensor.hpp"

namespace tensor_adapters::detail {

template <class T>
void gemm(bool trans_a, bool trans_b, index m, index n, index k, T alpha, const T* a, index lda,
          const T* b, index ldb, T beta, T* c, index ldc) {
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using const_map = Eigen::Map<const matrix, 0, Eigen::OuterStride<>>;
  using map = Eigen::Map<matrix, 0, Eigen::OuterStride<>>;
  map cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == T(0)) {
    cm.setZero();
  } else if (beta != T(1)) {
    cm *= beta;
  }
  if (m == 0 || n == 0 || k == 0 || alpha == T(0)) return;
  const const_map am(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
  const const_map bm(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
  if (!trans_a && !trans_b) cm.noalias() += alpha * am * bm;
  if (!trans_a && trans_b) cm.noalias() += alpha * am * bm.transpose();
  if (trans_a && !trans_b) cm.noalias() += alpha * am.transpose() * bm;
  if (trans_a && trans_b) cm.noalias() += alpha * am.transpose() * bm.transpose();
}

}  // namespace tensor_adapters::detail
