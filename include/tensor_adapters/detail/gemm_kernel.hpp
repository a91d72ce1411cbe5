// The packed matrix-product kernel behind detail::gemm and every mode-n product.
//
//   C (m, n) = alpha · A (m, k) · B (k, n) + beta · C
//
// Layouts. A is any strided matrix: A(r, p) = a[r·rs + p·cs] (row-major, or transposed with rs = 1).
// B and C have "grouped" columns: X(r, c) = x[r·rs + (c / group)·gs + (c % group)·cu]. A plain
// row-major matrix is one group (group = n, cu = 1); a transposed B has rs = 1, cu = ldb. A mode-n
// product of a (P, I, Q) tensor is one such product without any transposition:
// Y (J, P·Q) = U (J, I) · X (I, P·Q), where column c = (p, q) of X sits at p·I·Q + q and row i at i·Q.
//
// Structure (BLIS): for each NC-wide block of columns (wider with a short k: gemm_shape::b_bytes) and
// KC-deep slice of k, B is packed into KC×NR micro-panels; for each MC-tall block of rows, A is packed
// into MR×KC micro-panels; then an MR×NR register tile of C is computed per pair of micro-panels by
// the micro-kernel, the only place that does arithmetic, one strip of MR rows at a time, left to
// right. A tile with fewer than MR rows uses the micro-kernel for that many rows; a tile with fewer
// than NR columns, or whose columns are not contiguous in C, goes through a small local tile and is
// added to C run by run of consecutive columns (masked registers; element by element where C's
// columns are not unit-stride, see add_tile).
//
// Instruction set: the micro-kernel is written once over simd<T, Isa> (simd.hpp) and instantiated
// for scalar_isa (the reference, 4×4 tiles), avx2_isa (6×16 float / 6×8 double) and avx512_isa
// (14×32 float / 14×16 double). native_isa picks the widest compiled in; TA_FORCE_SCALAR forces
// scalar_isa.
//
// Narrow products (n ≤ 16, m ≥ 2n, A not transposed) take a dot-product kernel instead, which reads
// A in place (see gemm_narrow), or, when k is short or each row of C fills most of a register, one to
// four registers per row of C, ⌈n / width⌉ (register_rows_product).
//
// Cases of the plain-layout entry (the grouped entry, for middle modes, has all but the narrow one):
//   m = 0 or n = 0                      nothing to do
//   k = 0 (an empty sum)                C = beta·C (alpha = 0 is not special: 0 · NaN in A · B is NaN)
//   plain A, n ≤ 16, m ≥ 2n             gemm_narrow: dot products along k, or registers per row of
//                                       C (a short k, or 3/4 width < n ≤ width); A streamed once
//   transposed A, n ≤ 16, m ≥ 2n, small gemm_narrow_transposed: rows of C as vectors, A read once
//                                       (one thread; larger ones take the packed path on several)
//   hooks given (gemm_hooks)            packed, whatever the shape
//   otherwise                           packed: B row runs copied into panels (transposed B in 8×8
//                                       or 4×4 register blocks), A into MR panels, micro-kernel;
//                                       with n ≤ 16·NR (up to 16 column panels) a row-major A is
//                                       read in place by the micro-kernel instead of packed
//
// Memory: the packing buffers are thread_local, allocated on first use and grown when a larger
// problem needs more; a repeated call of the same size allocates nothing.
//
// Threads: when the translation unit is compiled with OpenMP (-fopenmp; the _OPENMP macro), a product
// of more than about 8 million multiply-adds is split over omp_get_max_threads() threads (one share
// of the columns or of the rows per thread), unless it is already inside a parallel region. To run on
// one thread: compile without OpenMP, set OMP_NUM_THREADS=1, or call omp_set_num_threads(1).
#pragma once

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../tensor.hpp"
#include "simd.hpp"

namespace tensor_adapters::detail {

// A(r, p) = data[r·rs + p·cs].
template <class T>
struct strided_matrix {
  const T* data;
  index rs, cs;
};

// X(r, c) = data[r·rs + (c / group)·gs + (c % group)·cu].
template <class T>
struct grouped_matrix {
  T* data;
  index rs;
  index group, gs, cu;
  index column(index c) const { return (c / group) * gs + (c % group) * cu; }
};

// Hooks into a product, for an operand or a result that is a simple function of another (GLoRA's W_eff
// of W0, its y of x · W0ᵀ), formed in cache as the kernel goes rather than in a pass over memory. Both
// receive `context`.
//   edit_b:   after each block op(B)[pc : pc + kc, c0 : c0 + nc] is packed into kc×NR micro-panels
//             (panel t holds columns c0 + t·NR …, its row p at p·NR; lanes past nc are zero), it may
//             rewrite the block in place, and the product uses what it wrote. Each thread edits the
//             panels it packs (with several threads, a block of B may be packed by more than one).
//   finish_c: once a tile of C, rows [r0, r0 + mr) and columns [c0, c0 + nc), holds its final value
//             (also when k = 0: then once, for all of C), it may read or rewrite the tile,
//             c pointing at C(r0, c0) with rows ldc apart. Rows and columns are the whole product's. For
//             a plain row-major C only (one group of contiguous columns).
// A hook must not itself call gemm or mode_product for the same T on the same thread: the product in
// progress keeps its packed operands in the thread's buffers (gemm_buffers), which the inner call
// would overwrite or move.
template <class T>
struct gemm_hooks {
  void (*edit_b)(const void* context, index pc, index kc, index c0, index nc, T* panels) = nullptr;
  void (*finish_c)(const void* context, index r0, index mr, index c0, index nc, T* c, index ldc) = nullptr;
  const void* context = nullptr;
};

// y[0 : n] = alpha · v + beta · y[0 : n] for the first min(n, width) values at y, with va, vb alpha and beta
// broadcast; with beta == 0, y is not read (its old contents may be NaN).
template <class S, class T>
inline void store_scaled_first(T* y, index n, typename S::reg v, typename S::reg va, typename S::reg vb, T beta) {
  S::store_first(y, n, beta == T(0) ? S::mul(va, v) : S::fma(va, v, S::mul(vb, S::load_first(y, n))));
}

// A product with at most this many column panels reads a row-major A in place (see gemm_serial).
constexpr index a_in_place_panels = 16;

// Register tile and cache blocking per instruction set and type.
// b_bytes: with a short k, blocks of B are made wider than nc columns, up to this many bytes packed
// (kc × columns), and a last block of up to 1.5 times the width is taken whole where its packed B
// fits in 1.5·b_bytes, rather than as a block and a short rest (0: always nc columns).
// a_bytes: an A whose panels take at most this many bytes (all of k) is packed once for all the blocks
// of columns rather than once per block (0: always per block).
template <class T, class Isa>
struct gemm_shape {
  static constexpr int mr = 4, nv = 4, dot_acc = 12;
  static constexpr index kc = 256, mc = 64, nc = 1024, b_bytes = 0, a_bytes = 0;
};
#ifdef TA_HAVE_AVX2
template <class T>
struct gemm_shape<T, avx2_isa> {
  static constexpr int mr = 6, nv = 2, dot_acc = 12;
  // (A packed once for all blocks of columns, as AVX-512 does, ran 0.99–1.05× the time: a_bytes = 0.)
  static constexpr index kc = 256, mc = 120, nc = 1024, b_bytes = 0, a_bytes = 0;
};
#endif
#ifdef TA_HAVE_AVX512
template <class T>
struct gemm_shape<T, avx512_isa> {
  // 14 rows: 28 accumulators, 2 registers of B and a broadcast of A, 31 of the 32 registers. Against 12
  // rows (interleaved, one thread, medians of 15, two runs): with g++ 12 0.95–0.98× the time on the 256³
  // mode products, 0.95–1.0× on the conv first mode and the 2-D products, 0.91–1.04× on 512×4608 with
  // k 32, 0.93–0.99× in double; with clang 14 0.95–1.04×.
  static constexpr int mr = 14, nv = 2, dot_acc = 24;
  // A strip's panel of A, kc·MR (14 KB float), stays in L1 while the kc·NR panels of B (32 KB each)
  // stream past it from L2; mc·kc (256 KB float) and kc·nc (512 KB in either type: 512 columns of
  // float, 256 of double) stay in L2. With n = 768 (a linear layer's width) the float columns are one
  // block, not 512 and 256: A is packed once and each strip of C written in one pass (one thread:
  // 512×768·768×768 0.95× the time, plain or with B transposed; the same product in double, whose B
  // would take 1.5 MB, was 1.02–1.03× slower taken whole). Double blocks of 256 columns rather than
  // 512 (1 MB of B) took 0.89–0.95× the time on the conv weights' first mode with J 32 and
  // 64×4096·(4096×4096)ᵀ, 0.96–0.97× on the 256³ modes with J 64 and the conv first mode with J 64,
  // 1.0–1.02× on 512×768·(768×768)ᵀ and 64×4096·4096×4096 (interleaved, one thread, medians of 21,
  // two runs). With a short k the blocks widen to 512 KB of B, so that a product writing a large C
  // (ΔW = B·A) writes each strip's rows in long runs: 4096×4096 with k 16 0.82–0.85× the time,
  // 1024×4608 with k 64 0.94–0.95×, FLoRA's 512×4608 with k 32 0.93–1.0×.
  static constexpr index kc = 256, mc = 252, nc = 512 * 4 / index(sizeof(T)), b_bytes = 512 * 1024,
                         a_bytes = 512 * 1024;
};
#endif

// Columns per block of the streaming kernel for small J (stream_rows_product): a row run of 2 KB of x,
// and a tile of y of at most 8 rows that stays in L1.
template <class T>
constexpr index stream_rows_block = 2048 / sizeof(T);
// The tile's row stride: one cache line more than the block, so that its rows do not fall 2 KB apart,
// where stores to them alias loads of x 4 KB apart (with rows of x 1 KB apart, J 8 ran 1.15–1.4×
// slower).
template <class T>
constexpr index stream_rows_stride = stream_rows_block<T> + 64 / sizeof(T);

// The micro-kernel: C (MR, NR) = alpha · Σ_p a_p ⊗ b_p + beta · C over kc steps, where a is a packed
// panel of A (AS ≥ MR values per step, the first MR used) or, with AS = 0, A read in place (row i at
// a + i·lda, contiguous along p), and b a packed kc×NR panel of B (NR values per step), NR = NV·width.
// C rows are ldc apart; with beta == 0 C is not read. next_a: see the k loop. With kc ≤ 16 (a rank-16 or smaller update that
// writes a large C: ΔW = B·A) the arithmetic is too short to hide the C tile's cache misses, so the
// tile's lines are requested first (768×768 with k 8 and FLoRA's 256×2304 with k 16 ran 0.78–0.90×
// the time; a 4096×4096 C, from memory, 1.03×; with k 32 it cost 2–7 %, so longer k does not).
template <class T, class Isa, int MR, int NV, int AS = MR>
inline void micro_kernel(index kc, const T* __restrict a, const T* __restrict b, T* __restrict c, index ldc, T alpha,
                         T beta, index lda = 0, const T* next_a = nullptr) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  reg acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    if (kc <= 16) {
      __builtin_prefetch(c + i * ldc, 1);
      __builtin_prefetch(c + i * ldc + NV * W - 1, 1);
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = S::zero();
  }
  // With A in place, next_a (or null): the next strip's MR rows, requested a cache line per step, the kc
  // values the next call reads of one row after the other, so that a dense A is requested in address
  // order (its first panel's call then finds them in cache; a last mode with J 64 took 0.81× the time,
  // and in address order rather than a line of every row in turn 0.93–0.97× that).
  [[maybe_unused]] const T* pf = next_a;
  [[maybe_unused]] const T* pf_end = next_a != nullptr ? next_a + kc : nullptr;
  [[maybe_unused]] int pf_row = next_a != nullptr ? 0 : MR;
  // One step of k: a rank-1 update of the tile.
  const auto step = [&]() __attribute__((always_inline)) {
    if constexpr (AS == 0) {
      if (pf_row < MR) {
        __builtin_prefetch(pf);
        pf += 64 / sizeof(T);
        if (pf >= pf_end && ++pf_row < MR) pf = next_a + pf_row * lda, pf_end = pf + kc;
      }
    }
    // B's registers are held: with fewer rows than MR (a product's last rows, the strips of
    // short_columns_product) g++ 12 read B from memory in every multiply-add, three loads for two of
    // them with 4 rows. On a Zen 3 core (bench_gemm's micro_kernel, two runs of each build): 4 rows
    // 1.14–1.58× as fast in float and 1.09–1.36× in double, 3 rows 1.11–1.54× in double but
    // 0.76–1.21× in float (latency-bound with 6 accumulators either way); 6 rows unchanged.
    reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      reg held = S::load(b + v * W);
      S::hold(held);
      bv[v] = held;
    }
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const reg ai = S::broadcast(AS == 0 ? a[i * lda] : a[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = S::fma(ai, bv[v], acc[i][v]);
    }
    a += AS == 0 ? 1 : AS;
    b += NV * W;
  };
  index p = 0;
#ifndef __clang__
  // g++ 12 on AVX-512: two steps per iteration. On 16 panels of B in L2 (k 256, one thread, medians of
  // 21–31) the 14-row kernel then ran at 93–100 % of the FMA loop beside it, one step at a time at
  // 88–93 %. clang 14 spills accumulators when the loop takes two steps (the 14-row kernel at 23–70 %
  // of the FMA loop, 512×4608 with k 32 2.5× the time), so with clang it takes one. So does AVX2, whose
  // 16 registers hold the 12 accumulators, B's two and a broadcast of A, but not a second step's: g++
  // then read B from memory in every FMA (36 loads for 24 FMAs) and moved accumulators between
  // registers, and the 6×16 float kernel ran at 51–64 % of the FMA loop on a Zen 3 core, one step at a
  // time at 79–98 % (bench_gemm's micro_kernel, 1 to 256 panels of B; docs/BENCHMARKS.md).
  if constexpr (sizeof(reg) == 64)
    for (; p + 2 <= kc; p += 2) step(), step();
#endif
  for (; p < kc; ++p) step();
  const reg va = S::broadcast(alpha);
  if (beta == T(0)) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) S::store(c + i * ldc + v * W, S::mul(va, acc[i][v]));
  } else {
    const reg vb = S::broadcast(beta);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        T* cp = c + i * ldc + v * W;
        S::store(cp, S::fma(va, acc[i][v], S::mul(vb, S::load(cp))));
      }
  }
}

// The micro-kernel for the first mr ≤ MR rows of an MR-row panel (packed, or with lda > 0 read in
// place), chosen at run time.
template <class T, class Isa, int NV, int MR, int R = MR>
inline void micro_kernel_rows(int mr, index kc, const T* a, const T* b, T* c, index ldc, T alpha, T beta,
                              index lda = 0, const T* next_a = nullptr) {
  if constexpr (R >= 1) {
    if (mr == R) {
      if (lda > 0) return micro_kernel<T, Isa, R, NV, 0>(kc, a, b, c, ldc, alpha, beta, lda, next_a);
      return micro_kernel<T, Isa, R, NV, MR>(kc, a, b, c, ldc, alpha, beta);
    }
    micro_kernel_rows<T, Isa, NV, MR, R - 1>(mr, kc, a, b, c, ldc, alpha, beta, lda, next_a);
  }
}

// alpha · v + beta · x, rounded once where the target has FMA instructions (simd.hpp's fused), as the
// vector stores are; with beta == 0, x is not read (its old contents may be NaN).
template <class T>
inline T scaled_add(T alpha, T v, T beta, T x) {
  return beta == T(0) ? alpha * v : simd<T, scalar_isa>::fma(alpha, v, beta * x);
}

// A 64-byte aligned, grow-only scratch array.
template <class T>
class scratch {
 public:
  T* get(index size) {
    const auto need = static_cast<std::size_t>(size) + 64 / sizeof(T);
    if (store_.size() < need) store_.resize(need);
    const auto address = reinterpret_cast<std::uintptr_t>(store_.data());
    return store_.data() + ((64 - address % 64) % 64) / sizeof(T);
  }

 private:
  std::vector<T> store_;
};

template <class T, class Isa>
struct gemm_buffers {
  scratch<T> a, b;
  scratch<index> offsets;
  static gemm_buffers& local() {
    thread_local gemm_buffers buffers;
    return buffers;
  }
};

// Packs rows [0, mc) and steps [0, kc) of a into MR×kc panels, zero-padding the last panel's rows.
template <class T, class Isa, int MR>
void pack_a(index mc, index kc, const strided_matrix<T>& a, T* out) {
  constexpr int TB = transpose_block<T, Isa>::size;
  for (index r0 = 0; r0 < mc; r0 += MR) {
    const index mr = std::min<index>(MR, mc - r0);
    const T* src = a.data + r0 * a.rs;
    if (mr == MR && a.rs == 1) {
      // A transposed: each step's MR values are contiguous (a fixed-size copy: register moves).
      for (index p = 0; p < kc; ++p) std::memcpy(out + p * MR, src + p * a.cs, sizeof(T) * MR);
    } else if (mr == MR && a.cs == 1 && TB > 1) {
      // Rows along k: transposed in TB×TB register blocks, TB rows read side by side (TB streams
      // for the prefetcher instead of one row at a time); the last MR % TB rows element by element.
      constexpr int whole_rows = MR / TB * TB;
      const index whole = kc / TB * TB;
      for (index p0 = 0; p0 < whole; p0 += TB) {
        for (int t0 = 0; t0 < whole_rows; t0 += TB)
          transpose_block<T, Isa>::run(src + t0 * a.rs + p0, a.rs, out + p0 * MR + t0, MR);
#pragma GCC unroll 16
        for (int r = whole_rows; r < MR; ++r)
#pragma GCC unroll 16
          for (int p = 0; p < TB; ++p) out[(p0 + p) * MR + r] = src[r * a.rs + p0 + p];
      }
      for (index p = whole; p < kc; ++p)
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) out[p * MR + r] = src[r * a.rs + p];
    } else {
      for (index p = 0; p < kc; ++p)
        for (index r = 0; r < mr; ++r) out[p * MR + r] = src[r * a.rs + p * a.cs];
      for (index p = 0; p < kc; ++p)
        for (index r = mr; r < MR; ++r) out[p * MR + r] = T(0);
    }
    out += MR * kc;
  }
}

// Packs columns [c0, c0 + nc) and rows [0, kc) of b into kc×NR panels, zero-padding the last panel.
template <class T, class Isa, int NR>
void pack_b(index kc, index nc, const grouped_matrix<const T>& b, index c0, T* out) {
  if (b.cu == 1 && (b.group >= 16 || c0 % b.group + nc <= b.group)) {
    // Rows of contiguous runs (one run per group of columns), read PB rows at a time from start to
    // end: the hardware prefetcher follows a few long streams far better than kc·nc/NR short hops,
    // and each panel receives PB·NR contiguous values per pass rather than NR values at a large
    // power-of-two stride (which thrashes one cache set and halves the packing speed).
    constexpr index PB = 8;
    const index full = nc / NR * NR;
    // Rows less than a page apart (a middle mode's slices, rows of Q values) share their pages, which
    // this order reads out of address order, and the hardware prefetcher falls behind: each row PB
    // further down is requested as its value is read (256³'s middle mode on a Zen 3 core: the packing
    // 1.34–1.64× as fast, the product with J 64 1.08–1.11×).
    const bool request_ahead = b.rs * index(sizeof(T)) < 4096;
    for (index p0 = 0; p0 < kc; p0 += PB) {
      const index p1 = std::min(kc, p0 + PB);
      for (index c = c0; c < c0 + nc;) {
        const index within = c % b.group;
        const index len = std::min(b.group - within, c0 + nc - c);
        const T* src = b.data + (c / b.group) * b.gs + within;
        for (index e = 0, t = c - c0; e < len;) {  // t: the column within the block
          const index lane = t % NR, chunk = std::min(NR - lane, len - e);
          T* dst = out + t / NR * NR * kc + lane;
          if (chunk == NR)
            for (index p = p0; p < p1; ++p) {
              if (request_ahead && p + PB < kc) __builtin_prefetch(src + (p + PB) * b.rs + e);
              std::memcpy(dst + p * NR, src + p * b.rs + e, sizeof(T) * NR);  // a fixed size: register moves
            }
          else  // part of a panel: masked registers (std::memcpy of a run-time size is a call per row)
            for (index p = p0; p < p1; ++p)
              for (index v = 0; v < chunk; v += simd<T, Isa>::width) {
                const index n = std::min<index>(simd<T, Isa>::width, chunk - v);
                simd<T, Isa>::store_first(dst + p * NR + v, n, simd<T, Isa>::load_first(src + p * b.rs + e + v, n));
              }
          e += chunk;
          t += chunk;
        }
        c += len;
      }
      if (full < nc)
        for (index p = p0; p < p1; ++p)
          for (index t = nc - full; t < NR; ++t) out[full * kc + p * NR + t] = T(0);
    }
    return;
  }
  index off[NR];
  for (index j0 = 0; j0 < nc; j0 += NR) {
    const index nr = std::min<index>(NR, nc - j0);
    for (index t = 0; t < nr; ++t) off[t] = b.column(c0 + j0 + t);
    const bool contiguous = b.cu == 1 && (c0 + j0) % b.group + nr <= b.group;
    if (contiguous) {
      const T* src = b.data + off[0];
      for (index p = 0; p < kc; ++p) {
        const T* row = src + p * b.rs;
        T* dst = out + p * NR;
        for (index t = 0; t < nr; ++t) dst[t] = row[t];
        for (index t = nr; t < NR; ++t) dst[t] = T(0);
      }
    } else if (b.rs == 1 && nr == NR && (c0 + j0) % b.group + nr <= b.group) {
      // A transposed B: the panel's columns are contiguous rows in memory, cu apart. Transposed in
      // TB×TB register blocks, which read whole cache lines; TB rows at a time along all of kc, so
      // that the prefetcher follows TB streams rather than NR.
      constexpr int TB = transpose_block<T, Isa>::size;
      static_assert(NR % TB == 0, "the panel width must be a multiple of the transpose block");
      const T* src = b.data + off[0];
      const index whole = kc / TB * TB;
      for (index t0 = 0; t0 < NR; t0 += TB)
        for (index p0 = 0; p0 < whole; p0 += TB)
          transpose_block<T, Isa>::run(src + t0 * b.cu + p0, b.cu, out + p0 * NR + t0, NR);
      for (index p0 = whole; p0 < kc; ++p0)
        for (index t = 0; t < NR; ++t) out[p0 * NR + t] = src[t * b.cu + p0];
    } else {
      for (index p = 0; p < kc; ++p) {
        const T* row = b.data + p * b.rs;
        T* dst = out + p * NR;
        for (index t = 0; t < nr; ++t) dst[t] = row[off[t]];
        for (index t = nr; t < NR; ++t) dst[t] = T(0);
      }
    }
    out += NR * kc;
  }
}

// C = beta · C (beta == 0: C = 0, old contents ignored).
template <class T>
void scale_matrix(index m, index n, T beta, const grouped_matrix<T>& c) {
  for (index r = 0; r < m; ++r)
    for (index j = 0; j < n; ++j) {
      T& x = c.data[r * c.rs + c.column(j)];
      x = beta == T(0) ? T(0) : beta * x;
    }
}

// C = alpha · tile + beta · C for a tile of mr × nr (rows NR apart) whose columns col … col + nr are
// not contiguous in C (off[t]: column col + t's offset; cp: C's first row of the tile). With cu = 1
// each row of the tile is a few runs of consecutive columns (the rest of a group, whole groups, the
// start of one), each moved in masked registers (FLoRA's M = H ×1 U1, groups of 9: 0.75–0.82×
// the time of moving element by element); otherwise element by element.
template <class T, class Isa, int NR>
void add_tile(index mr, index nr, const T* tile, T alpha, T beta, const grouped_matrix<T>& c, index col,
              const index* off, T* cp) {
  using S = simd<T, Isa>;
  constexpr int W = S::width;
  if (W > 1 && c.cu == 1) {
    const typename S::reg va = S::broadcast(alpha), vb = S::broadcast(beta);
    for (index t = 0; t < nr;) {
      const index run = std::min(nr - t, c.group - (col + t) % c.group);
      for (index e = 0; e < run; e += W) {
        const index n = std::min<index>(W, run - e);
        for (index r = 0; r < mr; ++r) {
          T* x = cp + r * c.rs + off[t] + e;
          store_scaled_first<S>(x, n, S::load_first(tile + r * NR + t + e, n), va, vb, beta);
        }
      }
      t += run;
    }
    return;
  }
  for (index r = 0; r < mr; ++r)
    for (index t = 0; t < nr; ++t) {
      T& x = cp[r * c.rs + off[t]];
      x = scaled_add(alpha, tile[r * NR + t], beta, x);
    }
}

// One thread's share: rows [0, m) of a and c, columns [c0, c0 + n) of b and c; a and c start at row r0 of
// the whole product (for the hooks).
template <class T, class Isa>
void gemm_serial(index m, index n, index k, T alpha, const strided_matrix<T>& a, const grouped_matrix<const T>& b,
                 T beta, const grouped_matrix<T>& c, index r0, index c0, const gemm_hooks<T>& hooks) {
  using shape = gemm_shape<T, Isa>;
  constexpr int MR = shape::mr, NR = shape::nv * simd<T, Isa>::width;
  constexpr index KC = shape::kc, MC = shape::mc, NC = (shape::nc / NR) * NR;
  // Every block of rows but the last is whole panels: the once-packed A's offsets (ic · kc) count on it.
  static_assert(MC % MR == 0, "gemm_shape: mc must be a multiple of mr");
  // With up to 16 panels of columns, a row-major A is read in place (its MR rows side by side, the
  // strip's first call bringing them into L1 for the others) rather than copied into panels first: a
  // last mode with J 64 ran 12 % faster than packed; with J 128 and 256 (4 and 8 panels) 0.83–0.87×
  // and 0.89–0.92× the time, 4096×96·96×96 0.77–0.78×, float products of 384 and 512 columns
  // 0.97–1.01× (one thread, AVX-512; on AVX2 0.81–0.99×). Beyond that the products were mixed (n 768:
  // 0.91–1.045×), and packing A once per block of columns is paid back over more panels.
  // (A row stride of 0, one row repeated, is packed: the kernel tells A in place by lda > 0.)
  const bool a_in_place = a.cs == 1 && a.rs > 0 && n <= a_in_place_panels * NR;
  auto& buffers = gemm_buffers<T, Isa>::local();
  const index kc_max = std::min(k, KC);
  // The columns' blocks: NC wide, or as many whole panels as b_bytes holds where that is more, and a
  // rest of up to 1.5 blocks in one (see gemm_shape::b_bytes).
  const index bytes_per_column = kc_max * index(sizeof(T));
  const index width = std::max(NC, shape::b_bytes / bytes_per_column / NR * NR);
  const auto block_width = [&](index rest) {
    const bool whole = rest <= width + width / 2 && 2 * rest * bytes_per_column <= 3 * shape::b_bytes;
    return whole ? rest : std::min(width, rest);
  };
  index widest = 0;
  for (index jc = 0, w = 0; jc < n; jc += w) widest = std::max(widest, w = block_width(n - jc));
  T* bpack = buffers.b.get(kc_max * ((widest + NR - 1) / NR) * NR);
  // A is packed once for all the blocks of columns where all of it, in panels, takes at most a_bytes (it
  // then stays in L2 beside a block of B; 256³ mode 0 with J 64 and 256 took 0.95–0.97× the time,
  // 512×512×3×3 mode 0 with J 32 and 64 0.93–0.945×, one thread); otherwise once per block of columns.
  const index m_panels = (m + MR - 1) / MR * MR;
  const bool a_once = !a_in_place && n > width && m_panels * k * index(sizeof(T)) <= shape::a_bytes;
  T* apack = buffers.a.get(a_once ? m_panels * k : kc_max * ((std::min(m, MC) + MR - 1) / MR * MR));
  if (a_once)
    for (index pc = 0, kc = 0; pc < k; pc += kc) {
      kc = std::min(KC, k - pc);
      for (index ic = 0; ic < m; ic += MC)
        pack_a<T, Isa, MR>(std::min(MC, m - ic), kc, strided_matrix<T>{a.data + ic * a.rs + pc * a.cs, a.rs, a.cs},
                           apack + pc * m_panels + ic * kc);
    }
  alignas(64) T tile[MR * NR];
  // Offsets of C's columns: for a C of one plain group, column c is at c; otherwise they are listed
  // for the current block of columns (grouped), without a division per column.
  const bool plain = c.cu == 1 && c0 + n <= c.group;
  index* block_off = plain ? nullptr : buffers.offsets.get(widest);
  index panel_off[NR];
  for (index jc = 0, nc = 0; jc < n; jc += nc) {
    nc = block_width(n - jc);
    if (!plain)
      for (index t = 0, g = (c0 + jc) / c.group, e = (c0 + jc) % c.group; t < nc; ++t) {
        block_off[t] = g * c.gs + e * c.cu;
        if (++e == c.group) e = 0, ++g;
      }
    for (index pc = 0; pc < k; pc += KC) {
      const index kc = std::min(KC, k - pc);
      const T beta_k = pc == 0 ? beta : T(1);
      pack_b<T, Isa, NR>(kc, nc, grouped_matrix<const T>{b.data + pc * b.rs, b.rs, b.group, b.gs, b.cu}, c0 + jc,
                         bpack);
      if (hooks.edit_b != nullptr) hooks.edit_b(hooks.context, pc, kc, c0 + jc, nc, bpack);
      const bool finish = hooks.finish_c != nullptr && pc + kc == k;
      for (index ic = 0; ic < m; ic += MC) {
        const index mc = std::min(MC, m - ic);
        if (!a_in_place && !a_once)
          pack_a<T, Isa, MR>(mc, kc, strided_matrix<T>{a.data + ic * a.rs + pc * a.cs, a.rs, a.cs}, apack);
        const T* apack_ic = a_once ? apack + pc * m_panels + ic * kc : apack;
        // A strip of MR rows of C at a time, left to right: its panel of A stays in L1 while the panels
        // of B stream from L2, and C is written along its rows, which the hardware prefetcher follows
        // (tile by tile down a column of panels, products with k 16 to 64 that write a large C, such
        // as FLoRA's ΔW, took 1.4–1.7× the time).
        for (index ir = 0; ir < mc; ir += MR) {
          const index mr = std::min<index>(MR, mc - ir);
          const T* ap = a_in_place ? a.data + (ic + ir) * a.rs + pc : apack_ic + ir * kc;
          const index lda = a_in_place ? a.rs : 0;
          // In place, the first panel's call requests the next strip's rows of A as it goes (next_a).
          const T* next_strip = a_in_place && ic + ir + 2 * MR <= m ? ap + MR * a.rs : nullptr;
          T* cp = c.data + (ic + ir) * c.rs;
          for (index jr = 0; jr < nc; jr += NR) {
            const index nr = std::min<index>(NR, nc - jr);
            const index col = c0 + jc + jr;
            const index* off = plain ? panel_off : block_off + jr;
            if (plain) panel_off[0] = col;
            // (offsets increase by at least 1 per column, so equal ends mean consecutive columns)
            const bool contiguous = nr == NR && (plain || (c.cu == 1 && off[NR - 1] == off[0] + NR - 1));
            const T* bp = bpack + jr * kc;
            const T* next_a = jr == 0 ? next_strip : nullptr;
            if (contiguous) {
              if (mr == MR && !a_in_place)
                micro_kernel<T, Isa, MR, shape::nv>(kc, ap, bp, cp + off[0], c.rs, alpha, beta_k);
              else
                micro_kernel_rows<T, Isa, shape::nv, MR>(int(mr), kc, ap, bp, cp + off[0], c.rs, alpha, beta_k, lda,
                                                         next_a);
            } else {
              if (plain)
                for (index t = 1; t < nr; ++t) panel_off[t] = col + t;
              micro_kernel_rows<T, Isa, shape::nv, MR>(int(mr), kc, ap, bp, tile, NR, T(1), T(0), lda);
              add_tile<T, Isa, NR>(mr, nr, tile, alpha, beta_k, c, col, off, cp);
            }
            if (finish) hooks.finish_c(hooks.context, r0 + ic + ir, mr, col, nr, cp + off[0], c.rs);
          }
        }
      }
    }
  }
}

// The number of threads for a product of this size: 1 without OpenMP, inside a parallel region, or
// below about 8 million multiply-adds (a few tens of microseconds: less is not worth waking a
// thread, and on a loaded machine a sleeping second core costs far more).
inline int gemm_threads(index m, index n, index k) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  if (double(m) * double(n) * double(k) < double(1 << 23)) return 1;
  return std::max(1, omp_get_max_threads());
#else
  (void)m, (void)n, (void)k;
  return 1;
#endif
}

// Runs body(begin, end) on contiguous shares of the rows [0, total), one per thread on `threads` OpenMP
// threads, or once over all of them.
template <class Body>
void split_rows(index total, int threads, Body&& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const index t = omp_get_thread_num(), nt = omp_get_num_threads();
      const index begin = total * t / nt, end = total * (t + 1) / nt;
      if (begin < end) body(begin, end);
    }
    return;
  }
#else
  (void)threads;
#endif
  body(index(0), total);
}

// C (m, n) = alpha · A (m, k) · B (k, n) + beta · C on the instruction set Isa, with the hooks given.
// With beta == 0 the old contents of C are ignored.
template <class T, class Isa>
void gemm_packed(index m, index n, index k, T alpha, const strided_matrix<T>& a, const grouped_matrix<const T>& b,
                 T beta, const grouped_matrix<T>& c, const gemm_hooks<T>& hooks = {}) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    scale_matrix<T>(m, n, beta, c);
    if (hooks.finish_c != nullptr) hooks.finish_c(hooks.context, 0, m, 0, n, c.data, c.rs);
    return;
  }
  const int threads = gemm_threads(m, n, k);
  if (threads <= 1) {
    gemm_serial<T, Isa>(m, n, k, alpha, a, b, beta, c, 0, 0, hooks);
    return;
  }
#ifdef _OPENMP
  using shape = gemm_shape<T, Isa>;
  constexpr index MR = shape::mr, NR = shape::nv * simd<T, Isa>::width;
  // Split the larger of m and n (the other operand, the smaller one, is packed by every thread).
  const bool split_columns = n >= m ? n > NR : m <= MR;
#pragma omp parallel num_threads(threads)
  {
    const index t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (split_columns) {
      const index chunk = ((n + nt - 1) / nt + NR - 1) / NR * NR;
      const index begin = std::min(n, t * chunk), end = std::min(n, begin + chunk);
      if (begin < end) gemm_serial<T, Isa>(m, end - begin, k, alpha, a, b, beta, c, 0, begin, hooks);
    } else {
      const index chunk = ((m + nt - 1) / nt + MR - 1) / MR * MR;
      const index begin = std::min(m, t * chunk), end = std::min(m, begin + chunk);
      if (begin < end)
        gemm_serial<T, Isa>(end - begin, n, k, alpha, strided_matrix<T>{a.data + begin * a.rs, a.rs, a.cs}, b, beta,
                            grouped_matrix<T>{c.data + begin * c.rs, c.rs, c.group, c.gs, c.cu}, begin, 0, hooks);
    }
  }
#endif
}

// Narrow products, n ≤ 16 (a mode product's last mode with a small output extent): the packed kernel
// would fill few lanes of its NR-wide tiles, so these are dot products along k instead, R rows of A
// against J ≤ 8 rows of B (both contiguous along k) at a time, reduced across lanes at the end.
// A is read once, straight from memory: nothing of it is packed. k ≥ width (shorter ones take
// register_rows_product); the last k % width steps are one step with the lanes past k zero.
template <class T, class Isa, int R, int J>
inline void dot_kernel(index k, const T* __restrict a, index lda, const T* __restrict b, index ldb, T* __restrict c,
                       index ldc, T alpha, T beta, const T* next = nullptr) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  reg acc[R][J];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) acc[r][j] = S::zero();
  index p = 0;
  for (; p + W <= k; p += W) {
    reg av[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) av[r] = S::load(a + r * lda + p);
    // next: the R rows the next call reads (or null), fetched ahead. Without it the hardware
    // prefetcher loses the R interleaved streams at each block's start (a last mode with a small J
    // ran at a quarter of the copy bandwidth).
    if (next != nullptr) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * lda + p);
    }
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const reg bv = S::load(b + j * ldb + p);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][j] = S::fma(av[r], bv, acc[r][j]);
    }
  }
  if (p < k) {
    // (Summed element by element instead, the tail cost R·J scalar sums per call: with k 20–31 floats
    // the products ran at a third of k 32's rate.)
    reg av[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) av[r] = S::load_first(a + r * lda + p, k - p);
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const reg bv = S::load_first(b + j * ldb + p, k - p);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][j] = S::fma(av[r], bv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      // (Through scaled_add, spelled out: left to the compiler's contraction, the rows of the R-row and
      // 1-row kernels were fused differently, and C's last bits depended on the thread count.)
      T& x = c[r * ldc + j];
      x = scaled_add(alpha, S::sum(acc[r][j]), beta, x);
    }
}

template <class T, class Isa, int J>
void dot_rows(index m, index k, const T* a, index lda, const T* b, index ldb, T* c, index ldc, T alpha, T beta) {
  constexpr int acc = gemm_shape<T, Isa>::dot_acc;
  constexpr int R = acc / J < 1 ? 1 : (acc / J > 4 ? 4 : acc / J);
  index r = 0;
  for (; r + R <= m; r += R)
    dot_kernel<T, Isa, R, J>(k, a + r * lda, lda, b, ldb, c + r * ldc, ldc, alpha, beta,
                             r + 2 * R <= m ? a + (r + R) * lda : nullptr);
  for (; r < m; ++r) dot_kernel<T, Isa, 1, J>(k, a + r * lda, lda, b, ldb, c + r * ldc, ldc, alpha, beta);
}

template <class T, class Isa>
void dot_columns(index m, index n, index k, T alpha, const T* a, index lda, const T* b, index ldb, T beta, T* c,
                 index ldc) {
  // A block of A's rows stays in cache while every 8 columns pass over it. With a single pass (n ≤ 8)
  // there is nothing to keep, and blocks would only break the dot kernel's fetching ahead at each
  // block's end (256³'s last mode with J 4 and 8: 0.95–0.96× the time with one block; interleaved,
  // one thread).
  const index rows = n <= 8 ? m : 64;
  for (index r0 = 0; r0 < m; r0 += rows) {
    const index mr = std::min(rows, m - r0);
    for (index j0 = 0; j0 < n; j0 += 8) {
      const T* bj = b + j0 * ldb;
      const T* ar = a + r0 * lda;
      T* cr = c + r0 * ldc + j0;
      switch (std::min<index>(8, n - j0)) {
        case 1: dot_rows<T, Isa, 1>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 2: dot_rows<T, Isa, 2>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 3: dot_rows<T, Isa, 3>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 4: dot_rows<T, Isa, 4>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 5: dot_rows<T, Isa, 5>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 6: dot_rows<T, Isa, 6>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        case 7: dot_rows<T, Isa, 7>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
        default: dot_rows<T, Isa, 8>(mr, k, ar, lda, bj, ldb, cr, ldc, alpha, beta); break;
      }
    }
  }
}

// R rows of C from R rows of A: each row of C NV registers, accumulating A[r, p] · op(B)[p, :] over the
// k steps; bp holds op(B) as k rows of NV registers each, zero past n (n > (NV − 1)·width). With
// Masked, mp holds a lane mask per entry of bp (simd::load_lanes) and A[r, p] enters only the lanes it
// keeps (simd::fma_kept): the others add nothing, not 0 · A[r, p], which is NaN for an infinite or NaN
// A[r, p]. next: the R rows of A the next call reads (or null), requested a cache line of each per line
// of steps.
template <class T, class Isa, int R, int NV, bool Masked = false>
inline void register_rows_block(index n, index k, T alpha, const T* a, index lda, const T* bp, const T* mp, T beta,
                                T* c, index ldc, const T* next = nullptr) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  reg acc[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  const auto step = [&](index p) __attribute__((always_inline)) {
    reg b[NV];
    typename S::lanes mask[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      b[v] = S::load(bp + (p * NV + v) * W);
      if constexpr (Masked) mask[v] = S::load_lanes(mp + (p * NV + v) * W);
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const reg ar = S::broadcast(a[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if constexpr (Masked)
          acc[r][v] = S::fma_kept(ar, b[v], acc[r][v], mask[v]);
        else
          acc[r][v] = S::fma(ar, b[v], acc[r][v]);
      }
    }
  };
  if (next == nullptr) {
    for (index p = 0; p < k; ++p) step(p);
  } else {
    constexpr index line = 64 / sizeof(T);
    for (index p0 = 0; p0 < k; p0 += line) {
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * lda + p0);
      for (index p = p0; p < std::min(k, p0 + line); ++p) step(p);
    }
  }
  const reg va = S::broadcast(alpha), vb = S::broadcast(beta);
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_scaled_first<S>(c + r * ldc + v * W, n - v * W, acc[r][v], va, vb, beta);
}

// C (m, n) = alpha · A (m, k) · op(B) + beta · C with op(B) packed in bp as k rows of NV registers
// (zero past n) and, with Masked, lane masks in mp (see register_rows_block): dot_acc / NV rows at a
// time, their rows of A read in place side by side, in blocks of KC steps that stay in L1, C written
// once per block.
template <class T, class Isa, int NV, bool Masked>
void register_rows_packed(index m, index n, index k, T alpha, const T* a, index lda, const T* bp, const T* mp, T beta,
                          T* c, index ldc) {
  constexpr int W = simd<T, Isa>::width, R = gemm_shape<T, Isa>::dot_acc / NV;
  constexpr index KC = gemm_shape<T, Isa>::kc;
  split_rows(m, gemm_threads(m, n, k * 8), [&](index begin, index end) {
    for (index pc = 0; pc < k; pc += KC) {
      const index kc = std::min(KC, k - pc);
      const T beta_k = pc == 0 ? beta : T(1);
      const T* ap = a + pc;
      const T* bk = bp + pc * NV * W;
      const T* mk = Masked ? mp + pc * NV * W : nullptr;
      index r = begin;
      // Rows less than 2 KB apart share pages, which the R rows side by side read out of address order,
      // and the hardware prefetcher fell behind: the next block's rows are requested as the kernel goes
      // (256³'s last mode with J 7 and 8, rows of 1 KB: 1.44–1.59× as fast on a Zen 3 core, one thread).
      // 2 KB apart, the requested lines fell in the two L1 sets of the rows being read and evicted them
      // (512×4608 by 512, J 8: 0.7–0.83× as fast), and the prefetcher kept up unaided.
      const bool request_next = lda * index(sizeof(T)) < 2048;
      for (; r + R <= end; r += R)
        register_rows_block<T, Isa, R, NV, Masked>(n, kc, alpha, ap + r * lda, lda, bk, mk, beta_k, c + r * ldc, ldc,
                                                   request_next && r + 2 * R <= end ? ap + (r + R) * lda : nullptr);
      for (; r < end; ++r)
        register_rows_block<T, Isa, 1, NV, Masked>(n, kc, alpha, ap + r * lda, lda, bk, mk, beta_k, c + r * ldc, ldc);
    }
  });
}

// Narrow products with a short k (a conv kernel mode's 3), or whose rows of C each fill more than 3/4
// of a register: the dot kernel would pay a sum across lanes per element of C for a few steps of
// arithmetic (and, with 8 < n ≤ 16, read A twice and 16 rows of B from L2 at every step); here each
// row of C is NV = ⌈n / width⌉ registers instead (register_rows_packed), op(B) packed once.
template <class T, class Isa, int NV>
void register_rows_product(index m, index n, index k, T alpha, const T* a, index lda, bool trans_b, const T* b,
                           index ldb, T beta, T* c, index ldc) {
  constexpr int W = simd<T, Isa>::width;
  assert(n > (NV - 1) * W && n <= NV * W);  // every register of a row holds at least one column
  T* bp = gemm_buffers<T, Isa>::local().b.get(k * NV * W);
  for (index p = 0; p < k; ++p)
    for (index j = 0; j < NV * W; ++j) bp[p * NV * W + j] = j < n ? (trans_b ? b[j * ldb + p] : b[p * ldb + j]) : T(0);
  register_rows_packed<T, Isa, NV, false>(m, n, k, alpha, a, lda, bp, nullptr, beta, c, ldc);
}

// A mode product with a tiny trailing extent Q, y_p (J, Q) = op(u) (J, I) · x_p (I, Q) for p < P, as
// the narrow product y (P, J·Q) = x (P, I·Q) · Kᵀ with K = op(u) ⊗ 1_Q, K[(a, t), (b, s)] =
// op(u)[a, b]·[t = s], which streams x once, each row of y in NV registers (J·Q ≤ NV·width). op(u) is
// u[a·u_rs + b·u_cs]. Step (b, s) adds x_p[b, s] only to the lanes (a, s) where K is not zero by
// construction, so an infinite or NaN x_p[b, s] reaches exactly the outputs that depend on it.
template <class T, class Isa, int NV>
void kron_rows_product(index p, index i, index q, const T* x, const T* u, index u_rs, index u_cs, index j, T alpha,
                       T beta, T* y) {
  constexpr int W = simd<T, Isa>::width;
  const index iq = i * q, jq = j * q;
  assert(jq > (NV - 1) * W && jq <= NV * W);
  T* bp = gemm_buffers<T, Isa>::local().b.get(iq * NV * W);
  T* mp = gemm_buffers<T, Isa>::local().a.get(iq * NV * W);
  T ones;
  std::memset(&ones, 0xFF, sizeof ones);
  for (index b = 0; b < i; ++b)
    for (index s = 0; s < q; ++s)
      for (index lane = 0; lane < NV * W; ++lane) {
        const index a = lane / q, t = lane % q, e = (b * q + s) * NV * W + lane;
        const bool used = lane < jq && t == s;
        bp[e] = used ? u[a * u_rs + b * u_cs] : T(0);
        mp[e] = used ? ones : T(0);
      }
  register_rows_packed<T, Isa, NV, true>(p, jq, iq, alpha, x, iq, bp, mp, beta, y, jq);
}

// C (m, n) = alpha · A (m, k) · op(B) + beta · C for n ≤ 16, A row-major. op(B) = Bᵀ is used in
// place when its rows start on cache lines; otherwise (a plain B, or rows at other addresses) it is
// first copied, transposed, into the calling thread's grow-only scratch with rows padded to whole
// lines: the dot kernel's loads of B would otherwise split across lines (a transposed B at 16-byte
// alignment, as std::vector gives, ran 1.3–1.4× slower). register_rows_product instead, with one
// register per row of C where k < width, or k < 2·width and n ≥ 3, or n > 3/4 width (1.3–2× faster
// at n = 16 floats on AVX-512; k 20–31 floats with n 4–12 2–6×; with n 1 and 2 the dot kernel, its
// tail masked, took 0.35–0.74× and 0.6–1.0× the time), with two where n ≤ 2·width and k < 4·width
// (doubles with n 9–16: k 9–31 2–3.5×), and with three or four where k < width (AVX2 doubles with
// n 9–16), so the dot kernel always has k ≥ width. (Interleaved, one thread, AVX-512, against the dot kernel.)
template <class T, class Isa>
void gemm_narrow(index m, index n, index k, T alpha, const T* a, index lda, bool trans_b, const T* b, index ldb,
                 T beta, T* c, index ldc) {
  constexpr int W = simd<T, Isa>::width;
  const index registers = (n + W - 1) / W;  // per row of C; n ≤ 16
  if (registers == 1 && (k < W || (k < 2 * W && n > 2) || 4 * n > 3 * W)) {
    register_rows_product<T, Isa, 1>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
    return;
  }
  if constexpr (W > 1 && W < 16) {  // rows of C of more than one register
    if (k < W || (registers == 2 && k < 4 * W)) {
      if (registers == 2) {
        register_rows_product<T, Isa, 2>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
        return;
      }
      if constexpr (2 * W < 16) {  // three or four: a width of 4 (AVX2 doubles)
        if (registers == 3)
          register_rows_product<T, Isa, 3>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
        else
          register_rows_product<T, Isa, 4>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
        return;
      }
    }
  }
  constexpr index line = 64 / sizeof(T);
  const bool aligned = trans_b && reinterpret_cast<std::uintptr_t>(b) % 64 == 0 && ldb % line == 0;
  if (!aligned) {
    const index ldt = (k + line - 1) / line * line;
    T* bt = gemm_buffers<T, Isa>::local().b.get(n * ldt);
    for (index j = 0; j < n; ++j)
      for (index p = 0; p < k; ++p) bt[j * ldt + p] = trans_b ? b[j * ldb + p] : b[p * ldb + j];
    b = bt;
    ldb = ldt;
  }
  // Memory-bound: worth a second thread sooner than a compute-bound product.
  split_rows(m, gemm_threads(m, n, k * 8), [&](index begin, index end) {
    dot_columns<T, Isa>(end - begin, n, k, alpha, a + begin * lda, lda, b, ldb, beta, c + begin * ldc, ldc);
  });
}

// Narrow products with a transposed A (k, m), as a gradient dB = dYᵀ·H: C's rows are A's columns,
// so V·width rows of C at a time accumulate a[p, rows] · B[p, j] over p, reading A once in rows.
template <class T, class Isa, int J>
void columns_kernel(index m, index k, const T* a, index lda, const T* b, index b_rs, index b_cs, T* c, index ldc,
                    T alpha, T beta) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  constexpr int acc_regs = gemm_shape<T, Isa>::dot_acc;
  constexpr int V = acc_regs / J < 1 ? 1 : (acc_regs / J > 4 ? 4 : acc_regs / J);
  alignas(64) T tile[V * W * J];
  index i0 = 0;
  for (; i0 + V * W <= m; i0 += V * W) {
    reg acc[V][J];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) acc[v][j] = S::zero();
    for (index p = 0; p < k; ++p) {
      reg av[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) av[v] = S::load(a + p * lda + i0 + v * W);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const reg bj = S::broadcast(b[p * b_rs + j * b_cs]);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[v][j] = S::fma(av[v], bj, acc[v][j]);
      }
    }
    for (int v = 0; v < V; ++v)
      for (int j = 0; j < J; ++j) S::store(tile + (j * V + v) * W, acc[v][j]);
    for (index r = 0; r < V * W; ++r)
      for (int j = 0; j < J; ++j) {
        T& x = c[(i0 + r) * ldc + j];
        x = scaled_add(alpha, tile[(j * V + r / W) * W + r % W], beta, x);
      }
  }
  // The last rows, fewer than V·width, counted down rather than compared with m: with the sizes known at
  // compile time (a constant-size call in a user's translation unit), g++ 12 -O3 otherwise warns that
  // this loop would overflow i0 · ldc (-Waggressive-loop-optimizations, on by default).
  const T* ai = a + i0;
  T* ci = c + i0 * ldc;
  for (index left = m - i0; left > 0; --left, ++ai, ci += ldc)
    for (int j = 0; j < J; ++j) {
      T sum = T(0);
      for (index p = 0; p < k; ++p) sum += ai[p * lda] * b[p * b_rs + j * b_cs];
      ci[j] = scaled_add(alpha, sum, beta, ci[j]);
    }
}

template <class T, class Isa>
void gemm_narrow_transposed(index m, index n, index k, T alpha, const T* a, index lda, bool trans_b, const T* b,
                            index ldb, T beta, T* c, index ldc) {
  const index b_rs = trans_b ? 1 : ldb, b_cs = trans_b ? ldb : 1;  // op(B)(p, j) = b[p·b_rs + j·b_cs]
  for (index j0 = 0; j0 < n; j0 += 8) {
    const T* bj = b + j0 * b_cs;
    T* cj = c + j0;
    switch (std::min<index>(8, n - j0)) {
      case 1: columns_kernel<T, Isa, 1>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 2: columns_kernel<T, Isa, 2>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 3: columns_kernel<T, Isa, 3>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 4: columns_kernel<T, Isa, 4>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 5: columns_kernel<T, Isa, 5>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 6: columns_kernel<T, Isa, 6>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      case 7: columns_kernel<T, Isa, 7>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
      default: columns_kernel<T, Isa, 8>(m, k, a, lda, bj, b_rs, b_cs, cj, ldc, alpha, beta); break;
    }
  }
}

// A middle mode with a small J whose trailing extent q is at most two registers wide: for each slice s
// of the batch, y_s (J, q) = alpha · op(u) (J, I) · x_s (I, q) + beta · y_s. NV registers hold one row
// x_s[r, 0:q] (the last only partly) and JB × NV accumulators the rows y_s[j, 0:q], each r adding
// op(u)[j, r] · x_s[r, :]: x is read in place, y written once, and no tile is gathered or scattered.
// op(u)[j, r] = u[j·us_j + r·us_r]. This is one tile: the columns c0 … c0 + NV·width of y_s's rows
// j0 … j0 + JB (xs, uj and ys point at the slice and at row j0).
//
// With STRIPS, for wider rows (up to stream_rows_block, with J ≤ 8: 256³'s middle mode), each slice is
// taken in strips of NV registers' columns, and as a strip passes row r it requests that row's lines of
// the next strip (or of the next slice's first strip): next. Against the packed kernel, which copied x
// into panels that only J ≤ 8 rows then read, the strips took 0.60–0.67× the time (256³ mode 1, J 2–8,
// interleaved, one thread); without the requests 1.1–1.7× (each strip reads 128 bytes of each row,
// rows 1 KB apart, and the hardware prefetcher does not follow from one strip to the next).
template <class T, class Isa, int JB, int NV>
inline void short_rows_tile(index i, index q, index c0, const T* xs, const T* next, const T* uj, index us_j,
                            index us_r, T alpha, T beta, T* ys) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  const reg va = S::broadcast(alpha), vb = S::broadcast(beta);
  index left[NV];  // columns of the strip in each register
  for (int v = 0; v < NV; ++v) left[v] = std::max<index>(0, q - c0 - v * W);
  reg acc[JB][NV];
#pragma GCC unroll 16
  for (int b = 0; b < JB; ++b)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[b][v] = S::zero();
  // Row r: whole registers where they end within the slice, a register past q reading the start of the
  // next row into lanes that are never stored; in the last rows only the strip's columns (a masked load
  // in every row, which a Zen 3 core waited on, took 1.7–2.3× the time with q 9 and J 5 or 8).
  const auto row = [&](index r, bool last) __attribute__((always_inline)) {
    reg xr[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      xr[v] = last ? S::load_first(xs + r * q + c0 + v * W, left[v]) : S::load(xs + r * q + c0 + v * W);
    if (next != nullptr) {
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) __builtin_prefetch(next + r * q + v * W);
    }
#pragma GCC unroll 16
    for (int b = 0; b < JB; ++b) {
      const reg ub = S::broadcast(uj[b * us_j + r * us_r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[b][v] = S::fma(ub, xr[v], acc[b][v]);
    }
  };
  const index span = c0 + NV * W;  // from a row's start to its registers' end
  const index whole = i * q >= span ? std::min(i, (i * q - span) / q + 1) : 0;
  index r = 0;
  for (; r < whole; ++r) row(r, false);
  for (; r < i; ++r) row(r, true);
#pragma GCC unroll 16
  for (int b = 0; b < JB; ++b)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store_scaled_first<S>(ys + b * q + c0 + v * W, left[v], acc[b][v], va, vb, beta);
}

// Rows of op(u) per tile: at most short_rows_jb (JB·NV accumulators within the dot-product kernels'
// budget: 8 with one register, 6 with two on AVX2, 8 on AVX-512); jb = B rows, chosen at run time.
template <class T, class Isa, int NV>
constexpr int short_rows_jb = std::min(8, gemm_shape<T, Isa>::dot_acc / NV);

template <class T, class Isa, int NV, int B = short_rows_jb<T, Isa, NV>>
inline void short_rows_tile_rows(int jb, index i, index q, index c0, const T* xs, const T* next, const T* uj,
                                 index us_j, index us_r, T alpha, T beta, T* ys) {
  if constexpr (B >= 1) {
    if (jb == B) return short_rows_tile<T, Isa, B, NV>(i, q, c0, xs, next, uj, us_j, us_r, alpha, beta, ys);
    short_rows_tile_rows<T, Isa, NV, B - 1>(jb, i, q, c0, xs, next, uj, us_j, us_r, alpha, beta, ys);
  }
}

// Slice by slice and strip by strip, all of J (tiles of short_rows_jb rows, the last the rest) before
// the next strip, so that x is read from memory once: a J the registers do not hold at once (8 with two
// registers on AVX2: 6 + 2 rows) takes its later tiles' x from cache. With the tiles' rows outermost, x
// was streamed once per tile: on a Zen 3 core (one thread), 256³'s middle mode and the 512×512×3×3
// conv weight's with J 8 moved 27 % and 24 % of the copy bandwidth, and took 1.4–2.1× and 1.8–2.3× the
// time they take now (with the whole-register loads above). Tiles of equal height (4 + 4) took
// 1.3–1.5× the time of 6 + 2 on the conv weights, 1.0–1.07× on 256³ (with J 7, 4 + 3 took 0.8× that of
// 6 + 1).
template <class T, class Isa, int NV, bool STRIPS>
void short_rows_blocks(index p, index i, index q, const T* x, const T* u, index us_j, index us_r, index j, T alpha,
                       T beta, T* y) {
  constexpr int JB = short_rows_jb<T, Isa, NV>;
  constexpr index SW = NV * simd<T, Isa>::width;  // columns per strip
  for (index s = 0; s < p; ++s) {
    const T* xs = x + s * i * q;
    T* ys = y + s * j * q;
    for (index c0 = 0; c0 < (STRIPS ? q : 1); c0 += SW) {
      const T* next = !STRIPS ? nullptr : c0 + SW < q ? xs + c0 + SW : s + 1 < p ? xs + i * q : nullptr;
      for (index j0 = 0; j0 < j; j0 += JB)
        short_rows_tile_rows<T, Isa, NV>(int(std::min<index>(JB, j - j0)), i, q, c0, xs, j0 == 0 ? next : nullptr,
                                         u + j0 * us_j, us_j, us_r, alpha, beta, ys + j0 * q);
    }
  }
}

template <class T, class Isa>
void short_rows_serial(index p, index i, index q, const T* x, const T* u, index us_j, index us_r, index j, T alpha,
                       T beta, T* y) {
  constexpr index W = simd<T, Isa>::width;
  if (q <= W)
    short_rows_blocks<T, Isa, 1, false>(p, i, q, x, u, us_j, us_r, j, alpha, beta, y);
  else if (q <= 2 * W)
    short_rows_blocks<T, Isa, 2, false>(p, i, q, x, u, us_j, us_r, j, alpha, beta, y);
  else
    short_rows_blocks<T, Isa, 2, true>(p, i, q, x, u, us_j, us_r, j, alpha, beta, y);
}

// With OpenMP, the slices are split over the threads (sooner than a compute-bound product: memory-bound).
template <class T, class Isa>
void short_rows_product(index p, index i, index q, const T* x, const T* u, index us_j, index us_r, index j, T alpha,
                        T beta, T* y) {
  split_rows(p, gemm_threads(p * q, j, i * 8), [&](index begin, index end) {
    short_rows_serial<T, Isa>(end - begin, i, q, x + begin * i * q, u, us_j, us_r, j, alpha, beta, y + begin * j * q);
  });
}

// The first or a middle mode with a small J (≤ 8: 2·J flops per element of x, memory-bound): for each
// slice s, y_s (J, q) = alpha · op(u) · x_s (I, q) + beta · y_s, in blocks of up to CB columns. The
// J × CB block of y accumulates in a tile in L1, each row r of x_s adding op(u)[j, r] · x_s[r, block],
// so x is read once, in row runs of up to CB values that the prefetcher follows, and nothing is packed
// (the packed kernel copies x into panels first: 256³ mode 0 with J 8 reached 73 % of the copy
// bandwidth that way). mode_product takes it for rows of x of at least CB values.
//
// tile (J, cb; rows LT apart) += op(u)[:, r : r + R] · x_s[r : r + R, 0 : cb]: R rows of x per pass
// over the tile, so that each load and store of the tile carries R multiply-adds (op(u)'s J·R values
// broadcast in registers: up to 24 of AVX-512's 32; on AVX2, with 16, part of them stay in L1). next
// (or null): the R row runs the next pass reads, requested a line per row as this pass goes (each
// pass starts R new row runs, which the hardware prefetcher picks up only after their first lines:
// 256³ mode 0 took 0.69–0.74× the time with J 8 and 0.80–0.82× with J 4, 256×256×3×3 mode 0 with J 8
// 0.87×; 512×512×3×3 0.98–1.02×; interleaved, one thread).
template <class T, class Isa, int J, int R>
inline void rows_into_tile(index r, index cb, const T* xs, index q, const T* u, index us_j, index us_r, T* tile,
                           const T* next) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  constexpr index LT = stream_rows_stride<T>;
  reg ur[R][J];
#pragma GCC unroll 4
  for (int t = 0; t < R; ++t)
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) ur[t][j] = S::broadcast(u[j * us_j + (r + t) * us_r]);
  for (index c = 0; c < cb; c += W) {
    reg xv[R];
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t) xv[t] = S::load_first(xs + (r + t) * q + c, cb - c);
    if (next != nullptr) {
#pragma GCC unroll 4
      for (int t = 0; t < R; ++t) __builtin_prefetch(next + t * q + c);
    }
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      reg acc = S::load(tile + j * LT + c);
#pragma GCC unroll 4
      for (int t = 0; t < R; ++t) acc = S::fma(ur[t][j], xv[t], acc);
      S::store(tile + j * LT + c, acc);
    }
  }
}

template <class T, class Isa, int J>
void stream_rows_serial(index begin, index end, index i, index q, const T* x, const T* u, index us_j, index us_r,
                        T alpha, T beta, T* y) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width;
  constexpr index CB = stream_rows_block<T>, LT = stream_rows_stride<T>;
  constexpr int R = 24 / J < 4 ? 24 / J : 4;  // rows of x per pass: J·R ≤ 24 registers of op(u)
  alignas(64) T tile[J * LT];
  const index blocks = (q + CB - 1) / CB;
  const reg va = S::broadcast(alpha), vb = S::broadcast(beta);
  for (index item = begin; item < end; ++item) {  // item: (slice, column block)
    const index s = item / blocks, c0 = item % blocks * CB, cb = std::min(CB, q - c0);
    const T* xs = x + s * i * q + c0;
    std::fill(tile, tile + J * LT, T(0));
    index r = 0;
    for (; r + R <= i; r += R)
      rows_into_tile<T, Isa, J, R>(r, cb, xs, q, u, us_j, us_r, tile, r + 2 * R <= i ? xs + (r + R) * q : nullptr);
    for (; r < i; ++r) rows_into_tile<T, Isa, J, 1>(r, cb, xs, q, u, us_j, us_r, tile, nullptr);
    T* ys = y + s * J * q + c0;
    for (int j = 0; j < J; ++j)
      for (index c = 0; c < cb; c += W) {
        store_scaled_first<S>(ys + j * q + c, std::min<index>(W, cb - c), S::load(tile + j * LT + c), va, vb, beta);
      }
  }
}

template <class T, class Isa, int J = 8>
void stream_rows_dispatch(index j, index begin, index end, index i, index q, const T* x, const T* u, index us_j,
                          index us_r, T alpha, T beta, T* y) {
  if constexpr (J >= 1) {
    if (j == J) return stream_rows_serial<T, Isa, J>(begin, end, i, q, x, u, us_j, us_r, alpha, beta, y);
    stream_rows_dispatch<T, Isa, J - 1>(j, begin, end, i, q, x, u, us_j, us_r, alpha, beta, y);
  }
}

// 1 ≤ j ≤ 8, q ≥ 1. op(u)[j, r] = u[j·us_j + r·us_r]. With OpenMP, the (slice, column block) pairs are
// split over the threads (memory-bound: sooner than a compute-bound product).
template <class T, class Isa>
void stream_rows_product(index p, index i, index q, const T* x, const T* u, index us_j, index us_r, index j, T alpha,
                         T beta, T* y) {
  const index items = p * ((q + stream_rows_block<T> - 1) / stream_rows_block<T>);
  split_rows(items, gemm_threads(p * q, j, i * 8), [&](index begin, index end) {
    stream_rows_dispatch<T, Isa>(j, begin, end, i, q, x, u, us_j, us_r, alpha, beta, y);
  });
}

// A middle mode whose trailing extent q is short (2 to 12) and whose J is wide (> 16): a conv
// kernel's 3×3 = 9 with a rank of 32 or 64. For each slice s, y_s (J, q) = alpha · op(u) · x_s (I, q) +
// beta · y_s is computed transposed, y_sᵀ (Q, J) = x_sᵀ · op(u)ᵀ, with J along the vector lanes: x_s
// (I, Q) row-major is already a packed panel of the micro-kernel's A (Q values per step, of which a
// strip of rows t0 … reads those from t0 on), and op(u)ᵀ is packed once per thread into panels of two
// registers. Every lane does useful work (the short-rows kernel fills only q of each register's lanes);
// each Q × 2·width tile is written to y_s element by element (Q·J stores against I·Q·J multiply-adds).
//
// The tile's rows T0 … Q - 1 go in strips of equal height (±1), each with two registers of accumulators
// per row and as many rows as fit (AVX2: 6, so q 9 is 5 + 4 rows; AVX-512: 12, one strip). One register
// per row on AVX2 (a 9×8 tile) took a broadcast of x for every multiply-add, and bound the loop there.
// In strips, with B held in registers (micro_kernel), the conv middle modes with J 64 ran 1.14–1.24×
// faster on a Zen 3 core, and q from 3 to 12 with I 256 1.0–1.5× (one thread, float).
template <class T, class Isa, int Q, int T0 = 0>
inline void short_columns_strips(index i, const T* xs, const T* panel, T* tile) {
  if constexpr (T0 < Q) {
    constexpr int NV = 2, most = gemm_shape<T, Isa>::dot_acc / NV, strips = (Q + most - 1) / most;
    constexpr int rows = std::min((Q + strips - 1) / strips, Q - T0);
    constexpr index PW = NV * simd<T, Isa>::width;
    micro_kernel<T, Isa, rows, NV, Q>(i, xs + T0, panel, tile + T0 * PW, PW, T(1), T(0));
    short_columns_strips<T, Isa, Q, T0 + rows>(i, xs, panel, tile);
  }
}

template <class T, class Isa, int Q>
void short_columns_serial(index p, index i, const T* x, const T* u, index us_j, index us_r, index j, T alpha, T beta,
                          T* y) {
  constexpr int NV = 2;
  constexpr index PW = NV * simd<T, Isa>::width;
  const index panels = (j + PW - 1) / PW;
  T* ut = gemm_buffers<T, Isa>::local().b.get(panels * i * PW);  // panel b: (I, PW), zero past J
  for (index b = 0; b < panels; ++b)
    for (index r = 0; r < i; ++r)
      for (index c = 0; c < PW; ++c) {
        const index col = b * PW + c;
        ut[(b * i + r) * PW + c] = col < j ? u[col * us_j + r * us_r] : T(0);
      }
  alignas(64) T tile[Q * PW];
  for (index s = 0; s < p; ++s) {
    const T* xs = x + s * i * Q;
    T* ys = y + s * j * Q;
    for (index b = 0; b < panels; ++b) {
      short_columns_strips<T, Isa, Q>(i, xs, ut + b * i * PW, tile);
      const index width = std::min(PW, j - b * PW);
      for (index c = 0; c < width; ++c)
        for (int t = 0; t < Q; ++t) {
          T& out = ys[(b * PW + c) * Q + t];
          out = scaled_add(alpha, tile[t * PW + c], beta, out);
        }
    }
  }
}

template <class T, class Isa, int Q = 12>
void short_columns_dispatch(index q, index p, index i, const T* x, const T* u, index us_j, index us_r, index j,
                            T alpha, T beta, T* y) {
  if constexpr (Q >= 2) {
    if (q == Q) return short_columns_serial<T, Isa, Q>(p, i, x, u, us_j, us_r, j, alpha, beta, y);
    short_columns_dispatch<T, Isa, Q - 1>(q, p, i, x, u, us_j, us_r, j, alpha, beta, y);
  }
}

// 2 ≤ q ≤ 12. op(u)[j, r] = u[j·us_j + r·us_r]. With OpenMP, the slices are split over the threads.
template <class T, class Isa>
void short_columns_product(index p, index i, index q, const T* x, const T* u, index us_j, index us_r, index j,
                           T alpha, T beta, T* y) {
  split_rows(p, gemm_threads(p * q, j, i), [&](index begin, index end) {
    short_columns_dispatch<T, Isa>(q, end - begin, i, x + begin * i * q, u, us_j, us_r, j, alpha, beta,
                                   y + begin * j * q);
  });
}

// The plain row-major product with leading dimensions, in the layouts above; with hooks, always the
// packed path.
template <class T, class Isa>
void gemm_packed(bool trans_a, bool trans_b, index m, index n, index k, T alpha, const T* a, index lda, const T* b,
                 index ldb, T beta, T* c, index ldc, const gemm_hooks<T>& hooks = {}) {
  const bool hooked = hooks.edit_b != nullptr || hooks.finish_c != nullptr;
  const bool narrow = !hooked && n >= 1 && n <= 16 && m >= 2 * n && k > 0;
  if (narrow && !trans_a) {
    gemm_narrow<T, Isa>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
    return;
  }
  if (narrow && gemm_threads(m, n, k) <= 1) {
    gemm_narrow_transposed<T, Isa>(m, n, k, alpha, a, lda, trans_b, b, ldb, beta, c, ldc);
    return;
  }
  const index group = std::max<index>(n, 1);
  gemm_packed<T, Isa>(m, n, k, alpha, strided_matrix<T>{a, trans_a ? 1 : lda, trans_a ? lda : 1},
                      grouped_matrix<const T>{b, trans_b ? 1 : ldb, group, 0, trans_b ? ldb : 1}, beta,
                      grouped_matrix<T>{c, ldc, group, 0, 1}, hooks);
}

// The kernels' entry points on native_isa, for float and double, as explicit instantiations (keyword
// empty: definitions; `extern`: declarations). With TENSOR_ADAPTERS_SEPARATE_KERNELS defined, every
// translation unit only declares them and one compiles them (tensor_adapters/kernel_instances.hpp).
#define TA_KERNEL_INSTANCES(keyword, T)                                                                          \
  keyword template void gemm_packed<T, native_isa>(bool, bool, index, index, index, T, const T*, index, const T*, \
                                                   index, T, T*, index, const gemm_hooks<T>&);                   \
  keyword template void gemm_packed<T, native_isa>(index, index, index, T, const strided_matrix<T>&,              \
                                                   const grouped_matrix<const T>&, T, const grouped_matrix<T>&,   \
                                                   const gemm_hooks<T>&);                                         \
  keyword template void short_rows_product<T, native_isa>(index, index, index, const T*, const T*, index, index,  \
                                                          index, T, T, T*);                                      \
  keyword template void short_columns_product<T, native_isa>(index, index, index, const T*, const T*, index,      \
                                                             index, index, T, T, T*);                            \
  keyword template void stream_rows_product<T, native_isa>(index, index, index, const T*, const T*, index, index, \
                                                           index, T, T, T*);                                     \
  keyword template void kron_rows_product<T, native_isa, 1>(index, index, index, const T*, const T*, index, index, \
                                                            index, T, T, T*);                                    \
  keyword template void kron_rows_product<T, native_isa, 2>(index, index, index, const T*, const T*, index, index, \
                                                            index, T, T, T*);

#ifdef TENSOR_ADAPTERS_SEPARATE_KERNELS
TA_KERNEL_INSTANCES(extern, float)
TA_KERNEL_INSTANCES(extern, double)
#endif

}  // namespace tensor_adapters::detail
