// The two thin products of one matrix, in one pass over it:
//
//   L (m, r)  = alpha · X (m, n) · Qᵀ + beta · L      with Qt = Qᵀ given as (n, r)
//   Rt (n, r) = Xᵀ · P                                 (the transpose of Pᵀ · X), P (m, r)
//
// for r of one or two whole registers (thin_pair_fits: 16 or 32 floats, 8 or 16 doubles on AVX-512;
// half that on AVX2). This is the shape of a gradient that reads a large matrix with rank-r factors
// on either side: FLoRA's grad.U0 = scale · gW · Mᵀ and Y = U0ᵀ · gW, then grad.U1 and Zs from Yᵀ.
// As two GEMMs, X is read twice, and with r rows the second is dominated by copying X into panels;
// here each element of X is broadcast once and feeds FMAs whose lanes all hold useful values (a row of
// L, a row of Rt).
//
// Register tile: RT rows of X × CT columns. The RT rows of L (accumulators) and of P stay in registers
// while the rows sweep a block of columns; each tile loads its CT rows of Rt and of Qt, broadcasts its
// RT·CT elements of X in turn, and stores the rows of Rt back (tile shapes: thin_pair_columns). X is
// taken in blocks of 256 columns with rows of one register, 128 with two (the block's rows of Rt and
// of Qt, 16 KB each for floats on AVX-512, stay in L1 while all rows of X pass), its rows in order
// within a block, the next tile's rows requested a line at a time. Every matrix is row-major; all but
// X have rows of exactly r values. Rows of r < width values would make the stores of one row of Rt and
// the loads of the next overlap in a register's span, which store-to-load forwarding does not serve
// (r = 4 and 8 in masked registers ran 1.4–2× slower than two GEMMs), so those stay with the GEMMs.
//
// Threads: with OpenMP, a product of more than about 8 million multiply-adds splits the columns over
// the threads in whole cache lines; each thread sums its share of L in its own scratch, and the shares
// are added at the end.
#pragma once

#include <algorithm>
#include <type_traits>

#include "gemm_kernel.hpp"

namespace tensor_adapters::detail {

// True when the kernel serves rows of r values: one or two whole registers, on a vectorized
// instruction set (on scalar_isa it computes r = 1 and 2 correctly, but the GEMMs are the reference
// there).
template <class T>
constexpr bool thin_pair_fits(index r) {
  constexpr index w = simd<T, native_isa>::width;
  return w > 1 && (r == w || r == 2 * w);
}

// Rows [0, RT) of X (at x, rows ldx apart; L and P from the same row) against columns [c0, c1) of a
// block, with rows of NV registers. Rt's rows are written, not accumulated, when First (the block's
// first rows). L's rows become alpha · acc + beta · L in the first block (`first`), L + alpha · acc
// after it. next: the rows the next call reads (or null), requested a cache line at a time.
template <class T, class Isa, int NV, int RT, int CT, int Split, bool First>
void thin_pair_rows(index c0, index c1, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta, bool first,
                    T* l, T* rt, const T* next) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  constexpr index r = NV * W, line = 64 / sizeof(T);
  // Split accumulators per register of L's rows, taking the tile's columns in turn (see
  // thin_pair_columns).
  reg accl[RT][NV][Split], pv[RT][NV];
  const T* xr[RT];
#pragma GCC unroll 16
  for (int i = 0; i < RT; ++i) {
    xr[i] = x + i * ldx;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 2
      for (int h = 0; h < Split; ++h) accl[i][v][h] = S::zero();
      pv[i][v] = S::load(p + i * r + v * W);
    }
  }
  auto tile = [&](index c, auto columns) {
    constexpr int C = decltype(columns)::value;
    reg accr[C][NV], qv[C][NV];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        qv[j][v] = S::load(qt + (c + j) * r + v * W);
        accr[j][v] = First ? S::zero() : S::load(rt + (c + j) * r + v * W);
      }
#pragma GCC unroll 16
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        const reg b = S::broadcast(xr[i][c + j]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
          accl[i][v][j % Split] = S::fma(b, qv[j][v], accl[i][v][j % Split]);
          accr[j][v] = S::fma(b, pv[i][v], accr[j][v]);
        }
      }
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) S::store(rt + (c + j) * r + v * W, accr[j][v]);
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
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      T* li = l + i * r + v * W;
      const reg old = first ? (beta == T(0) ? S::zero() : S::mul(vb, S::load(li))) : S::load(li);
      reg acc = accl[i][v][0];
#pragma GCC unroll 2
      for (int h = 1; h < Split; ++h) acc = S::add(acc, accl[i][v][h]);
      S::store(li, S::fma(va, acc, old));
    }
}

// Columns [c0, c1) of X, all m rows, block by block, with rows of NV registers.
template <class T, class Isa, int NV>
void thin_pair_columns(index m, index c0, index c1, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta,
                       T* l, T* rt) {
  constexpr int W = simd<T, Isa>::width;
  constexpr index r = NV * W;
  // Registers: NV · ((Split + 1) · RT + 2 · CT) + 1 of the 32 (AVX-512) or 16 (AVX2). Each tile loads
  // and stores its CT rows of Rt, so the more rows of X a tile takes, the fewer of those per FMA: on
  // AVX-512, 8 rows × 6 columns with rows of one register, 5 × 2 with two (29 registers each), against
  // 4 × 8 and 4 × 2 before: 0.91–0.93× the time for 256 × 2304 at r = 16, 0.93–0.95× for 512 × 4608
  // at r = 32 (one thread, X from memory). L's rows keep one accumulator each (Split 1): their chain of
  // CT FMAs per tile is at most half the tile's FMA time. With 4 rows × 8 columns that chain was as long
  // as the tile's FMAs (1.06–1.19× the time), hence two accumulators (even and odd columns), as AVX2's
  // 2 × 4 still has; AVX2's rows of two registers take 2 × 1.
  constexpr bool wide = W * sizeof(T) >= 64;
  constexpr int RT = wide ? (NV == 1 ? 8 : 5) : 2, CT = wide ? (NV == 1 ? 6 : 2) : (NV == 1 ? 4 : 1);
  constexpr int Split = !wide && NV == 1 ? 2 : 1;
  constexpr index block = 256 / NV;
  for (index b0 = c0; b0 < c1; b0 += block) {
    const index b1 = std::min(c1, b0 + block);
    const bool first = b0 == c0;
    index i = 0;
    if (m >= RT) {
      thin_pair_rows<T, Isa, NV, RT, CT, Split, true>(b0, b1, alpha, x, ldx, p, qt, beta, first, l, rt,
                                                      2 * RT <= m ? x + RT * ldx : nullptr);
      for (i = RT; i + RT <= m; i += RT)
        thin_pair_rows<T, Isa, NV, RT, CT, Split, false>(b0, b1, alpha, x + i * ldx, ldx, p + i * r, qt, beta, first,
                                                         l + i * r, rt,
                                                         i + 2 * RT <= m ? x + (i + RT) * ldx : nullptr);
    }
    // The last rows, fewer than RT, counted down with row pointers: compared with m, g++ 12 -O3 warns
    // that the loop would overflow i · ldx when the sizes are known at compile time.
    const T* xi = x + i * ldx;
    const T* pi = p + i * r;
    T* li = l + i * r;
    for (index left = m - i; left > 0; --left, xi += ldx, pi += r, li += r) {
      if (xi == x)
        thin_pair_rows<T, Isa, NV, 1, CT, Split, true>(b0, b1, alpha, xi, ldx, pi, qt, beta, first, li, rt, nullptr);
      else
        thin_pair_rows<T, Isa, NV, 1, CT, Split, false>(b0, b1, alpha, xi, ldx, pi, qt, beta, first, li, rt, nullptr);
    }
  }
}

// L = alpha · X · Qᵀ + beta · L and Rt = Xᵀ · P (see the top of this file) for r of one or two
// registers; requires thin_pair_fits<T>(r) (or, on Isa, r = width or 2·width). With beta == 0 the old
// contents of L are ignored. L and Rt must not overlap the inputs.
template <class T, class Isa = native_isa>
void thin_pair_product(index m, index n, index r, T alpha, const T* x, index ldx, const T* p, const T* qt, T beta,
                       T* l, T* rt) {
  constexpr index W = simd<T, Isa>::width;
  if (m <= 0 || n <= 0) {
    if (m > 0) scale_matrix<T>(m, r, beta, grouped_matrix<T>{l, r, r, 0, 1});
    std::fill(rt, rt + std::max<index>(n, 0) * r, T(0));
    return;
  }
  const auto columns = [&](index c0, index c1, T b, T* lp) {
    if (r == W)
      thin_pair_columns<T, Isa, 1>(m, c0, c1, alpha, x, ldx, p, qt, b, lp, rt);
    else
      thin_pair_columns<T, Isa, 2>(m, c0, c1, alpha, x, ldx, p, qt, b, lp, rt);
  };
  constexpr int max_threads = 16;  // the shares' pointers below
  const int threads = std::min(gemm_threads(m, n, 2 * r), max_threads);
  if (threads <= 1) {
    columns(0, n, beta, l);
    return;
  }
#ifdef _OPENMP
  constexpr index line = 64 / sizeof(T);
  const index lines = (n + line - 1) / line;
  T* shares[max_threads];
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    T* share = gemm_buffers<T, Isa>::local().a.get(m * r);
    shares[t] = share;
    const index c0 = std::min(n, lines * t / nt * line), c1 = std::min(n, lines * (t + 1) / nt * line);
    if (c0 < c1)
      columns(c0, c1, T(0), share);
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
