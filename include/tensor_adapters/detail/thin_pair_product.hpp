// The two thin products of one matrix, in one pass over it:
//
//   L (m, r)  = alpha · X (m, n) · Qᵀ + beta · L      with Qt = Qᵀ given as (n, r)
//   Rt (n, r) = Xᵀ · P                                 (the transpose of Pᵀ · X), P (m, r)
//
// for r equal to the register width (thin_pair_fits: 16 floats or 8 doubles on AVX-512, 8 floats or 4
// doubles on AVX2). This is the shape of a gradient that reads a large matrix with rank-r factors on
// either side: FLoRA's grad.U0 = scale · gW · Mᵀ and Y = U0ᵀ · gW, then grad.U1 and Zs from Yᵀ. As
// two GEMMs, X is read twice, and with r rows the second is dominated by copying X into panels; here
// each element of X is broadcast once and feeds two FMAs whose lanes all hold useful values (a row of
// L, a row of Rt).
//
// Register tile: RT rows of X × CT columns. The RT rows of L (two accumulators each, for even and odd
// columns) and of P stay in registers while the rows sweep a block of columns; each tile loads its CT
// rows of Rt and of Qt, broadcasts its RT·CT elements of X in turn, and stores the rows of Rt back. X
// is taken in blocks of 256 columns (the block's rows of Rt and Qt, 16 KB each for floats on AVX-512,
// stay in L1 while all rows of X pass), its rows in order within a block, the next tile's rows
// requested a line at a time. Every matrix is row-major; all but X have rows of exactly r values.
// Rows of r < width values would make the stores of one row of Rt and the loads of the next overlap in
// a register's span, which the store-to-load forwarding does not serve (r = 4 and 8 ran 1.4–2× slower
// than two GEMMs), so those stay with the GEMMs.
//
// Threads: with OpenMP, a product of more than about 8 million multiply-adds splits the columns over
// the threads in whole cache lines; each thread sums its share of L in its own scratch, and the shares
// are added at the end.
#pragma once

#include <algorithm>
#include <type_traits>

#include "gemm_kernel.hpp"

namespace tensor_adapters::detail {

// True when the kernel serves rows of r values: one whole register, on a vectorized instruction set
// (on scalar_isa it computes r = 1 correctly, but the GEMMs are the reference there).
template <class T>
constexpr bool thin_pair_fits(index r) {
  return simd<T, native_isa>::width > 1 && r == simd<T, native_isa>::width;
}

// Rows [0, RT) of X (at x, rows ldx apart; L and P from the same row) against columns [c0, c1) of a
// block. Rt's rows are written, not accumulated, when First (the block's first rows). L's rows become
// alpha · acc + beta · L in the first block (`first`), L + alpha · acc after it. next: the rows the
// next call reads (or null), requested a cache line at a time.
template <class T, class Isa, int RT, int CT, bool First>
void thin_pair_rows(index c0, index c1, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta, bool first,
                    T* l, T* rt, const T* next) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  constexpr index line = 64 / sizeof(T);
  // Two accumulators per row of L, for even and odd columns: with one, its CT FMAs per tile form a
  // dependent chain as long as the tile's whole FMA time (one took 1.06–1.19× the time).
  reg accl[RT][2], pv[RT];
  const T* xr[RT];
#pragma GCC unroll 16
  for (int i = 0; i < RT; ++i) {
    xr[i] = x + i * ldx;
    accl[i][0] = accl[i][1] = S::zero();
    pv[i] = S::load(p + i * W);
  }
  auto tile = [&](index c, auto columns) {
    constexpr int C = decltype(columns)::value;
    reg accr[C], qv[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      qv[j] = S::load(qt + (c + j) * W);
      accr[j] = First ? S::zero() : S::load(rt + (c + j) * W);
    }
#pragma GCC unroll 16
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        const reg b = S::broadcast(xr[i][c + j]);
        accl[i][j % 2] = S::fma(b, qv[j], accl[i][j % 2]);
        accr[j] = S::fma(b, pv[i], accr[j]);
      }
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) S::store(rt + (c + j) * W, accr[j]);
  };
  index c = c0;
  for (; c + CT <= c1; c += CT) {
    if (next != nullptr && (c - c0) % line < CT)
#pragma GCC unroll 16
      for (int i = 0; i < RT; ++i) __builtin_prefetch(next + i * ldx + c);
    tile(c, std::integral_constant<int, CT>{});
  }
  for (; c < c1; ++c) tile(c, std::integral_constant<int, 1>{});
  const reg va = S::broadcast(alpha), vb = S::broadcast(beta);
#pragma GCC unroll 16
  for (int i = 0; i < RT; ++i) {
    T* li = l + i * W;
    const reg old = first ? (beta == T(0) ? S::zero() : S::mul(vb, S::load(li))) : S::load(li);
    S::store(li, S::fma(va, S::add(accl[i][0], accl[i][1]), old));
  }
}

// Columns [c0, c1) of X, all m rows, block by block.
template <class T, class Isa>
void thin_pair_columns(index m, index c0, index c1, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta,
                       T* l, T* rt) {
  constexpr int W = simd<T, Isa>::width;
  // 3·RT + 2·CT + 1 registers of the 32 (AVX-512) or 16 (AVX2), with CT = 2·RT.
  constexpr int RT = W * sizeof(T) >= 64 ? 4 : 2, CT = 2 * RT;
  constexpr index block = 256;
  for (index b0 = c0; b0 < c1; b0 += block) {
    const index b1 = std::min(c1, b0 + block);
    const bool first = b0 == c0;
    index i = 0;
    if (m >= RT) {
      thin_pair_rows<T, Isa, RT, CT, true>(b0, b1, alpha, x, ldx, p, qt, beta, first, l, rt,
                                           2 * RT <= m ? x + RT * ldx : nullptr);
      for (i = RT; i + RT <= m; i += RT)
        thin_pair_rows<T, Isa, RT, CT, false>(b0, b1, alpha, x + i * ldx, ldx, p + i * W, qt, beta, first, l + i * W,
                                              rt, i + 2 * RT <= m ? x + (i + RT) * ldx : nullptr);
    }
    // The last rows, fewer than RT, counted down with row pointers: compared with m, g++ 12 -O3 warns
    // that the loop would overflow i · ldx when the sizes are known at compile time.
    const T* xi = x + i * ldx;
    const T* pi = p + i * W;
    T* li = l + i * W;
    for (index left = m - i; left > 0; --left, xi += ldx, pi += W, li += W) {
      if (xi == x)
        thin_pair_rows<T, Isa, 1, CT, true>(b0, b1, alpha, xi, ldx, pi, qt, beta, first, li, rt, nullptr);
      else
        thin_pair_rows<T, Isa, 1, CT, false>(b0, b1, alpha, xi, ldx, pi, qt, beta, first, li, rt, nullptr);
    }
  }
}

// L = alpha · X · Qᵀ + beta · L and Rt = Xᵀ · P (see the top of this file), r = the register width;
// requires thin_pair_fits<T>(r). With beta == 0 the old contents of L are ignored. L and Rt must not
// overlap the inputs.
template <class T, class Isa = native_isa>
void thin_pair_product(index m, index n, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta, T* l, T* rt) {
  constexpr index r = simd<T, Isa>::width;
  if (m <= 0 || n <= 0) {
    if (m > 0) scale_matrix<T>(m, r, beta, grouped_matrix<T>{l, r, r, 0, 1});
    std::fill(rt, rt + std::max<index>(n, 0) * r, T(0));
    return;
  }
  const int threads = std::min(gemm_threads(m, n, 2 * r), 16);
  if (threads <= 1) {
    thin_pair_columns<T, Isa>(m, 0, n, alpha, x, ldx, p, qt, beta, l, rt);
    return;
  }
#ifdef _OPENMP
  constexpr index line = 64 / sizeof(T);
  const index lines = (n + line - 1) / line;
  T* shares[16];
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    T* share = gemm_buffers<T, Isa>::local().a.get(m * r);
    shares[t] = share;
    const index c0 = std::min(n, lines * t / nt * line), c1 = std::min(n, lines * (t + 1) / nt * line);
    if (c0 < c1)
      thin_pair_columns<T, Isa>(m, c0, c1, alpha, x, ldx, p, qt, T(0), share, rt);
    else
      std::fill(share, share + m * r, T(0));
#pragma omp barrier
    // L = beta · L + the sum of the shares, its rows split over the threads.
    for (index e = m * t / nt * r; e < m * (t + 1) / nt * r; ++e) {
      T sum = beta == T(0) ? T(0) : beta * l[e];
      for (int u = 0; u < nt; ++u) sum += shares[u][e];
      l[e] = sum;
    }
  }
#endif
}

}  // namespace tensor_adapters::detail
