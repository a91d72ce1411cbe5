// The one dense matrix product every adapter goes through.
//
//   C (m, n) = alpha · op(A) · op(B) + beta · C
//
// All matrices are row-major with a leading dimension (the distance between rows). op(A) is A (m, k)
// or, with trans_a, the transpose of A stored as (k, m); likewise op(B) is B (k, n) or Bᵀ stored as
// (n, k). With beta == 0 the old contents of C are ignored (they may be uninitialised or NaN); alpha is
// an ordinary factor (alpha = 0 still forms the product, so 0 · NaN gives NaN, as an adapter's scale
// does in PEFT's (B @ A) * scaling); only k = 0 skips A and B. `hooks`
// may rewrite op(B) block by block as it is packed, in panels gemm_panel_width<T> wide, and C tile by
// tile as it is finished (gemm_hooks, gemm_kernel.hpp).
//
// The work is done by the packed, hand-vectorized kernel of gemm_kernel.hpp on the widest instruction
// set compiled in (AVX-512, else AVX2+FMA, else scalar; TA_FORCE_SCALAR forces scalar). Repeated
// calls allocate nothing after the first of their size. With OpenMP enabled in the build (-fopenmp),
// large products use every OpenMP thread; OMP_NUM_THREADS=1 or omp_set_num_threads(1) keeps them on one.
#pragma once

#include "../tensor.hpp"
#include "gemm_kernel.hpp"

namespace tensor_adapters::detail {

// The width of the kernel's column panels: a product with at most this many columns (n) reads A once.
template <class T>
constexpr index gemm_panel_width = gemm_shape<T, native_isa>::nv * simd<T, native_isa>::width;
// A product with at most this many columns (n) reads a row-major A in place instead of copying it into
// panels.
template <class T>
constexpr index gemm_in_place_columns = a_in_place_panels * gemm_panel_width<T>;

template <class T>
void gemm(bool trans_a, bool trans_b, index m, index n, index k, T alpha, const T* a, index lda,
          const T* b, index ldb, T beta, T* c, index ldc, const gemm_hooks<T>& hooks = {}) {
  gemm_packed<T, native_isa>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, hooks);
}

}  // namespace tensor_adapters::detail
