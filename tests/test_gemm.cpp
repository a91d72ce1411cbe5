#include "allocation_counter.hpp"

#include <tensor_adapters/detail/gemm.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <random>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif


namespace ta = tensor_adapters;
namespace td = tensor_adapters::detail;

namespace {

struct problem {
  bool ta, tb;
  ta::index m, n, k, lda, ldb, ldc;
};

template <class T>
struct operands {
  std::vector<T> a, b, c;
  operands(const problem& p, std::mt19937_64& gen) {
    std::normal_distribution<double> normal;
    a.resize(std::size_t((p.ta ? p.k : p.m) * p.lda));
    b.resize(std::size_t((p.tb ? p.n : p.k) * p.ldb));
    c.resize(std::size_t(p.m * p.ldc));
    for (auto& v : a) v = T(normal(gen));
    for (auto& v : b) v = T(normal(gen));
    for (auto& v : c) v = T(normal(gen));
  }
};

template <class T>
T at_a(const problem& p, const std::vector<T>& a, ta::index r, ta::index s) {
  return p.ta ? a[std::size_t(s * p.lda + r)] : a[std::size_t(r * p.lda + s)];
}
template <class T>
T at_b(const problem& p, const std::vector<T>& b, ta::index s, ta::index c) {
  return p.tb ? b[std::size_t(c * p.ldb + s)] : b[std::size_t(s * p.ldb + c)];
}

template <class T, class Isa>
void run(const problem& p, T alpha, const operands<T>& x, T beta, std::vector<T>& c) {
  td::gemm_packed<T, Isa>(p.ta, p.tb, p.m, p.n, p.k, alpha, x.a.data(), p.lda, x.b.data(), p.ldb, beta, c.data(),
                          p.ldc);
}

// Whether got is alpha · Σ + beta · old within the rounding of a k-term float sum, given the long double
// sum Σ of the terms and the sum of their magnitudes.
template <class T>
bool matches_loop(T got, long double sum, long double abs_sum, T alpha, T beta, T old, ta::index k) {
  long double want = alpha * sum;
  double scale = double(std::fabs(alpha) * abs_sum);
  if (beta != T(0)) {
    want += (long double)beta * old;
    scale += std::fabs(double(beta) * double(old));
  }
  return std::fabs(double(got) - double(want)) <= 4 * std::numeric_limits<T>::epsilon() * double(k + 2) * scale + 1e-300;
}

// The long double sums Σ_s op(A)(r, s)·op(B)(s, c) of a problem's C, and the sums of their magnitudes:
// computed once per problem, for every scaling and every kernel checked against them.
struct loop_sums {
  std::vector<long double> sum, abs_sum;  // m × n, row-major
  template <class T>
  loop_sums(const problem& p, const operands<T>& x)
      : sum(std::size_t(p.m * p.n)), abs_sum(std::size_t(p.m * p.n)) {
    for (ta::index r = 0; r < p.m; ++r)
      for (ta::index col = 0; col < p.n; ++col) {
        long double s_sum = 0, s_abs = 0;
        for (ta::index s = 0; s < p.k; ++s) {
          const long double t = (long double)at_a(p, x.a, r, s) * at_b(p, x.b, s, col);
          s_sum += t;
          s_abs += std::fabs(t);
        }
        sum[std::size_t(r * p.n + col)] = s_sum;
        abs_sum[std::size_t(r * p.n + col)] = s_abs;
      }
  }
};

// Checks c against the loops' sums; entries past n in each row must be untouched.
template <class T>
void check_against_loops(const problem& p, const loop_sums& loops, T alpha, T beta, const std::vector<T>& c_old,
                         const std::vector<T>& c) {
  // One assertion per matrix (the first bad entry), which keeps the test fast.
  ta::index bad_row = -1, bad_col = -1;
  for (ta::index r = 0; r < p.m && bad_row < 0; ++r) {
    for (ta::index col = 0; col < p.ldc && bad_row < 0; ++col) {
      const std::size_t e = std::size_t(r * p.ldc + col);
      if (col >= p.n) {
        if (!(c[e] == c_old[e]) && !(std::isnan(c[e]) && std::isnan(c_old[e]))) bad_row = r, bad_col = col;
        continue;
      }
      const std::size_t l = std::size_t(r * p.n + col);
      if (!matches_loop(c[e], loops.sum[l], loops.abs_sum[l], alpha, beta, c_old[e], p.k)) bad_row = r, bad_col = col;
    }
  }
  INFO("row " << bad_row << " column " << bad_col);
  REQUIRE(bad_row == -1);
}

template <class T>
void check_problem(const problem& p, std::mt19937_64& gen, bool all_scalings = true) {
  INFO("trans_a " << p.ta << " trans_b " << p.tb << " m " << p.m << " n " << p.n << " k " << p.k << " lda " << p.lda
                  << " ldb " << p.ldb << " ldc " << p.ldc);
  const operands<T> x(p, gen);
  const loop_sums loops(p, x);
  for (const auto& [alpha, beta] : {std::pair<T, T>{1, 0}, {T(2), T(-0.5)}, {T(-0.75), T(1)}, {T(0), T(3)}}) {
    if (!all_scalings && alpha != T(1) && alpha != T(2)) continue;
    INFO("alpha " << alpha << " beta " << beta);
    std::vector<T> c_old = x.c;
    if (beta == T(0))  // with beta == 0 old contents of C, even NaN, must not leak into the result
      for (ta::index r = 0; r < p.m; ++r)
        for (ta::index col = 0; col < p.n; ++col) c_old[std::size_t(r * p.ldc + col)] = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> native = c_old;
    run<T, td::native_isa>(p, alpha, x, beta, native);
    check_against_loops<T>(p, loops, alpha, beta, c_old, native);
    if constexpr (!std::is_same_v<td::native_isa, td::scalar_isa>) {  // else the same kernels again
      std::vector<T> scalar = c_old;
      run<T, td::scalar_isa>(p, alpha, x, beta, scalar);
      check_against_loops<T>(p, loops, alpha, beta, c_old, scalar);
    }
#if defined(TA_HAVE_AVX512)
    // The AVX2 kernels, compiled in beside AVX-512 but never native here, on the same problem.
    std::vector<T> avx2 = c_old;
    run<T, td::avx2_isa>(p, alpha, x, beta, avx2);
    check_against_loops<T>(p, loops, alpha, beta, c_old, avx2);
#endif
  }
}

}  // namespace

TEMPLATE_TEST_CASE("the vectorized product matches the scalar kernel and plain loops", "[gemm]", float, double) {
  std::mt19937_64 gen(11);
  const ta::index sizes[] = {1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 24, 31, 32, 33, 47, 64, 97};
  std::uniform_int_distribution<std::size_t> pick(0, std::size(sizes) - 1);
  std::uniform_int_distribution<ta::index> pad(0, 3);
  for (int trial = 0; trial < 120; ++trial) {
    problem p{};
    p.ta = trial % 2 == 1;
    p.tb = trial / 2 % 2 == 1;
    p.m = sizes[pick(gen)];
    p.n = sizes[pick(gen)];
    p.k = sizes[pick(gen)];
    p.lda = (p.ta ? p.m : p.k) + pad(gen);
    p.ldb = (p.tb ? p.k : p.n) + pad(gen);
    p.ldc = p.n + pad(gen);
    check_problem<TestType>(p, gen);
  }
}

TEMPLATE_TEST_CASE("narrow products of every width with short and ragged contractions match plain loops",
                   "[gemm]", float, double) {
  // n ≤ 16 columns, m ≥ 2n rows: one to four registers per row of C (a short k, or a row of C filling
  // most of a register: register_rows_product) or dot products along k whose last k % width steps are
  // one masked step; k on both sides of one, two and four registers of every instruction set, with B
  // plain and transposed and rows of A, B and C apart by more than their lengths.
  std::mt19937_64 gen(12);
  for (const ta::index n : {1, 3, 4, 5, 8, 9, 12, 13, 16})
    for (const ta::index k : {1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 20, 31, 32, 33, 40, 63, 64, 65})
      for (const bool tb : {false, true}) {
        const ta::index m = 2 * n + 29;
        check_problem<TestType>(problem{false, tb, m, n, k, k + 1, (tb ? k : n) + 2, n + 3}, gen, false);
      }
}

namespace {

// C of a narrow product with a transposed B (101 × 5, k three elements short of three cache lines, so
// the dot kernel ends in a masked step) read in place from a copy of B on a cache line, and from a copy
// one element past one (copied into the kernel's scratch first): the same dot kernel on the same
// values, so bit for bit the same C, which must match the loops.
template <class T, class Isa>
void check_narrow_in_place(std::mt19937_64& gen) {
  constexpr ta::index line = 64 / sizeof(T);
  const problem p{false, true, 101, 5, 3 * line - 3, 3 * line, 3 * line, 7};
  const operands<T> x(p, gen);
  T* storage = static_cast<T*>(std::aligned_alloc(64, (x.b.size() + line) * sizeof(T)));
  REQUIRE(storage != nullptr);
  std::vector<T> in_place = x.c, copied = x.c;
  for (T* b : {storage, storage + 1}) {
    std::copy(x.b.begin(), x.b.end(), b);
    td::gemm_packed<T, Isa>(false, true, p.m, p.n, p.k, T(1.5), x.a.data(), p.lda, b, p.ldb, T(-1),
                            (b == storage ? in_place : copied).data(), p.ldc);
  }
  std::free(storage);
  CHECK(in_place == copied);
  check_against_loops<T>(p, loop_sums(p, x), T(1.5), T(-1), x.c, in_place);
}

}  // namespace

TEMPLATE_TEST_CASE("a narrow product reads a transposed B on cache lines in place, with the same result", "[gemm]",
                   float, double) {
  std::mt19937_64 gen(15);
  check_narrow_in_place<TestType, td::native_isa>(gen);
#if defined(TA_HAVE_AVX512)
  check_narrow_in_place<TestType, td::avx2_isa>(gen);
#endif
}

TEMPLATE_TEST_CASE("products larger than one cache block match plain loops", "[gemm]", float, double) {
  std::mt19937_64 gen(12);
  // k > KC, m > MC and n > NC of every instruction set, with ragged edges (n = 1100: on AVX-512 a
  // block of 512 columns and a rest of 588 taken whole in float); a rest of exactly 1.5·NC and one
  // column more (768: one block in float; 769 with k 300: 512 and 257), k short and long; a short k with
  // many columns, where the blocks widen (k 64 on AVX-512: float 2048 columns, double 1024, then a rest
  // taken whole or not: 5000 and 5200 columns); then up to 16 column panels (17 < n ≤ 16·NR: 250
  // columns on AVX-512 and in float on AVX2, 300 in float on AVX-512), where a row-major A is read in
  // place across several k and m blocks, and 513 columns, where it is packed; A packed once for all
  // the blocks of columns (AVX-512: panels of at most 512 KB) across two blocks of m and of k (float)
  // or of m (double); then
  // narrow products of one register per row of C (n ≤ width, more than three quarters of it: 13–16
  // floats or 7–8 doubles on AVX-512) over several k blocks, B plain, transposed and misaligned.
  for (const problem& p : {problem{false, false, 261, 45, 517, 517, 45, 45}, problem{true, true, 29, 1100, 263, 29, 263, 1100},
                           problem{false, true, 389, 53, 270, 270, 270, 53}, problem{false, true, 300, 24, 600, 611, 603, 29},
                           problem{false, false, 263, 31, 530, 530, 31, 32}, problem{false, false, 203, 14, 530, 533, 15, 17},
                           problem{false, true, 77, 16, 600, 605, 603, 16}, problem{false, true, 150, 7, 300, 301, 301, 9},
                           problem{false, true, 61, 8, 513, 513, 513, 8}, problem{false, true, 37, 768, 300, 300, 300, 768},
                           problem{false, false, 41, 769, 300, 300, 771, 770}, problem{true, false, 25, 768, 9, 25, 768, 768},
                           problem{false, false, 30, 5200, 64, 64, 5203, 5201}, problem{false, true, 29, 5000, 64, 64, 67, 5000},
                           problem{false, false, 270, 250, 530, 530, 250, 251}, problem{false, true, 130, 300, 270, 271, 270, 301},
                           problem{false, false, 100, 513, 300, 300, 513, 513}, problem{false, false, 261, 1100, 300, 300, 1100, 1100},
                           problem{false, true, 253, 1100, 200, 203, 200, 1100}}) {
    check_problem<TestType>(p, gen, false);
  }
}

TEMPLATE_TEST_CASE("a C of grouped columns matches plain loops across groups and column blocks", "[gemm]", float,
                   double) {
  // C(r, c) = c[r·rs + (c / group)·gs + c % group], as a middle mode's y: groups side by side (gs = group,
  // where a register tile across two groups is still contiguous), apart (gs > group), narrower than a
  // register, and n past one column block (NC) with the block starting inside a group; the largest is
  // split over threads by columns, so a thread's columns start inside a group too.
  using T = TestType;
  std::mt19937_64 gen(13);
  std::normal_distribution<double> normal;
  struct grouped_case {
    ta::index m, n, k, group, gs;
  };
  for (const grouped_case& g : {grouped_case{29, 90, 37, 9, 9}, grouped_case{29, 90, 37, 9, 20}, grouped_case{13, 75, 300, 5, 6},
                                grouped_case{40, 1100, 19, 33, 33}, grouped_case{30, 1100, 45, 40, 47},
                                grouped_case{64, 1100, 200, 100, 130}, grouped_case{25, 48, 16, 1, 3}}) {
    INFO("m " << g.m << " n " << g.n << " k " << g.k << " group " << g.group << " gs " << g.gs);
    const ta::index groups = (g.n + g.group - 1) / g.group, rs = groups * g.gs + 3;
    std::vector<T> a(std::size_t(g.m * g.k)), b(std::size_t(g.k * g.n)), c_old(std::size_t(g.m * rs));
    for (auto* v : {&a, &b, &c_old})
      for (auto& x : *v) x = T(normal(gen));
    for (const auto& [alpha, beta] : {std::pair<T, T>{1, 0}, {T(-0.75), T(1)}}) {
      INFO("alpha " << alpha << " beta " << beta);
      std::vector<T> native = c_old, scalar = c_old;
      const td::strided_matrix<T> am{a.data(), g.k, 1};
      const td::grouped_matrix<const T> bm{b.data(), g.n, g.n, 0, 1};
      td::gemm_packed<T, td::native_isa>(g.m, g.n, g.k, alpha, am, bm, beta,
                                         td::grouped_matrix<T>{native.data(), rs, g.group, g.gs, 1});
      td::gemm_packed<T, td::scalar_isa>(g.m, g.n, g.k, alpha, am, bm, beta,
                                         td::grouped_matrix<T>{scalar.data(), rs, g.group, g.gs, 1});
      std::vector<bool> written(c_old.size(), false);
      ta::index bad = -1;
      for (ta::index r = 0; r < g.m; ++r)
        for (ta::index col = 0; col < g.n; ++col) {
          const std::size_t e = std::size_t(r * rs + (col / g.group) * g.gs + col % g.group);
          written[e] = true;
          long double sum = 0, abs_sum = 0;
          for (ta::index p = 0; p < g.k; ++p) {
            const long double t = (long double)a[std::size_t(r * g.k + p)] * b[std::size_t(p * g.n + col)];
            sum += t;
            abs_sum += std::fabs(t);
          }
          for (const T got : {native[e], scalar[e]})
            if (bad < 0 && !matches_loop(got, sum, abs_sum, alpha, beta, c_old[e], g.k)) bad = r * g.n + col;
        }
      for (std::size_t e = 0; e < c_old.size(); ++e)  // the gaps between groups are not written
        if (bad < 0 && !written[e] && !(native[e] == c_old[e] && scalar[e] == c_old[e])) bad = ta::index(e);
      REQUIRE(bad == -1);
    }
  }
}

TEMPLATE_TEST_CASE("an empty product scales C by beta", "[gemm]", float, double) {
  std::vector<TestType> c{1, 2, 3, 4, 5, 6};
  td::gemm<TestType>(false, false, 2, 3, 0, TestType(1), nullptr, 0, nullptr, 3, TestType(2), c.data(), 3);
  REQUIRE(c == std::vector<TestType>{2, 4, 6, 8, 10, 12});
  td::gemm<TestType>(false, false, 2, 3, 0, TestType(1), nullptr, 0, nullptr, 3, TestType(0), c.data(), 3);
  REQUIRE(c == std::vector<TestType>(6, TestType(0)));
}

TEMPLATE_TEST_CASE("the thread count does not change a single bit", "[gemm]", float, double) {
#ifdef _OPENMP
  std::mt19937_64 gen(13);
  // Packed (columns or rows split) and a narrow product with a plain A. (A narrow product with a
  // transposed A runs its own kernel on one thread and the packed one on several: the last bits may differ.)
  for (const problem& p : {problem{false, true, 300, 520, 400, 400, 400, 520},
                           problem{false, false, 900, 40, 300, 300, 40, 40},
                           problem{false, true, 700, 15, 300, 301, 301, 15}}) {
    const operands<TestType> x(p, gen);
    std::vector<TestType> one = x.c, two = x.c;
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    run<TestType, td::native_isa>(p, TestType(1.5), x, TestType(0.5), one);
    omp_set_num_threads(2);
    run<TestType, td::native_isa>(p, TestType(1.5), x, TestType(0.5), two);
    omp_set_num_threads(threads);
    REQUIRE(one == two);
    check_against_loops<TestType>(p, loop_sums(p, x), TestType(1.5), TestType(0.5), x.c, two);
  }
#else
  SUCCEED("built without OpenMP: one thread only");
#endif
}

// The hooks (gemm_hooks): edit_b maps op(B)[p, c] to op(B)[p, c]·col_scale[c] + row_add[p]; finish_c
// copies each finished tile of C into `out` as 3·C + its row index. Both count their visits.
template <class T>
struct test_hooks {
  std::vector<T> col_scale, row_add, out;
  std::vector<int> b_visits, c_visits;  // (k, n), (m, n): counted while `counting` (on one thread)
  bool counting = true;
  static void edit_b(const void* context, ta::index pc, ta::index kc, ta::index c0, ta::index nc, T* panels) {
    auto& h = *const_cast<test_hooks*>(static_cast<const test_hooks*>(context));
    const ta::index NR = td::gemm_panel_width<T>, n = ta::index(h.col_scale.size());
    for (ta::index j = 0; j < nc; ++j)
      for (ta::index p = 0; p < kc; ++p) {
        T& v = panels[j / NR * NR * kc + p * NR + j % NR];
        v = v * h.col_scale[std::size_t(c0 + j)] + h.row_add[std::size_t(pc + p)];
        if (h.counting) ++h.b_visits[std::size_t((pc + p) * n + c0 + j)];
      }
  }
  static void finish_c(const void* context, ta::index r0, ta::index mr, ta::index c0, ta::index nc, T* c, ta::index ldc) {
    auto& h = *const_cast<test_hooks*>(static_cast<const test_hooks*>(context));
    const ta::index n = ta::index(h.col_scale.size());
    for (ta::index r = 0; r < mr; ++r)
      for (ta::index t = 0; t < nc; ++t) {
        h.out[std::size_t((r0 + r) * n + c0 + t)] = 3 * c[r * ldc + t] + T(r0 + r);
        if (h.counting) ++h.c_visits[std::size_t((r0 + r) * n + c0 + t)];
      }
  }
};

TEMPLATE_TEST_CASE("the hooks see every element of op(B) and of C once, on every path", "[gemm]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(15);
  std::normal_distribution<double> normal;
  // Narrow shapes (n ≤ 16, m ≥ 2n: a packed product only because of the hooks), one or two column panels
  // (A read in place), more than one cache block of k, m and n (with two threads, split by columns, then
  // by rows), each with both layouts of B; and k = 0.
  for (const problem& base : {problem{false, false, 40, 5, 19, 19, 5, 7}, problem{false, false, 70, 45, 33, 33, 45, 45},
                              problem{false, false, 261, 1100, 517, 517, 1100, 1100}, problem{false, false, 1100, 45, 300, 300, 45, 45},
                              problem{false, false, 9, 20, 0, 1, 20, 20}}) {
    for (const bool tb : {false, true}) {
      problem p = base;
      p.tb = tb;
      p.ldb = std::max<ta::index>(1, tb ? p.k : p.n);
      INFO("trans_b " << tb << " m " << p.m << " n " << p.n << " k " << p.k);
      operands<T> x(p, gen);
      test_hooks<T> hooks;
      for (ta::index c = 0; c < p.n; ++c) hooks.col_scale.push_back(T(normal(gen)));
      for (ta::index q = 0; q < p.k; ++q) hooks.row_add.push_back(T(normal(gen)));
      hooks.out.assign(std::size_t(p.m * p.n), T(0));
      hooks.b_visits.assign(std::size_t(p.k * p.n), 0);
      hooks.c_visits.assign(std::size_t(p.m * p.n), 0);
      operands<T> edited = x;  // op(B) edited by hand, for the loops
      for (ta::index q = 0; q < p.k; ++q)
        for (ta::index c = 0; c < p.n; ++c) {
          T& v = tb ? edited.b[std::size_t(c * p.ldb + q)] : edited.b[std::size_t(q * p.ldb + c)];
          v = v * hooks.col_scale[std::size_t(c)] + hooks.row_add[std::size_t(q)];
        }
      const td::gemm_hooks<T> both{test_hooks<T>::edit_b, test_hooks<T>::finish_c, &hooks};
      const auto check = [&](const std::vector<T>& c) {
        check_against_loops<T>(p, loop_sums(p, edited), T(2), T(0.5), x.c, c);
        bool same = true;
        for (ta::index r = 0; r < p.m; ++r)
          for (ta::index col = 0; col < p.n; ++col)
            same = same && hooks.out[std::size_t(r * p.n + col)] == 3 * c[std::size_t(r * p.ldc + col)] + T(r);
        CHECK(same);
      };
      std::vector<T> c = x.c;
#ifdef _OPENMP
      const int threads = omp_get_max_threads();
      omp_set_num_threads(1);
#endif
      td::gemm<T>(false, tb, p.m, p.n, p.k, T(2), x.a.data(), p.lda, x.b.data(), p.ldb, T(0.5), c.data(), p.ldc, both);
#ifdef _OPENMP
      omp_set_num_threads(threads);
#endif
      CHECK(std::all_of(hooks.b_visits.begin(), hooks.b_visits.end(), [](int v) { return v == 1; }));
      CHECK(std::all_of(hooks.c_visits.begin(), hooks.c_visits.end(), [](int v) { return v == 1; }));
      check(c);
#ifdef _OPENMP
      // With two threads (each packs and edits its own share of B, or all of it): the same product, bit
      // for bit (checked against the one-thread result rather than the loops again, which under the
      // sanitizers were a quarter of this program's time).
      const std::vector<T> one_thread = c, one_thread_out = hooks.out;
      c = x.c;
      hooks.counting = false;
      std::fill(hooks.out.begin(), hooks.out.end(), T(0));
      omp_set_num_threads(2);  // whatever OMP_NUM_THREADS says
      td::gemm<T>(false, tb, p.m, p.n, p.k, T(2), x.a.data(), p.lda, x.b.data(), p.ldb, T(0.5), c.data(), p.ldc, both);
      omp_set_num_threads(threads);
      CHECK(c == one_thread);
      CHECK(hooks.out == one_thread_out);
#endif
    }
  }
}

TEMPLATE_TEST_CASE("a repeated product allocates nothing", "[gemm]", float, double) {
  std::mt19937_64 gen(14);
  // One product below the threading threshold, one above it (on every OpenMP thread).
  for (const problem& p : {problem{false, false, 40, 50, 60, 60, 50, 50}, problem{false, true, 300, 600, 500, 500, 500, 600}}) {
    const operands<TestType> x(p, gen);
    std::vector<TestType> c = x.c;
    td::gemm<TestType>(p.ta, p.tb, p.m, p.n, p.k, TestType(1), x.a.data(), p.lda, x.b.data(), p.ldb, TestType(0), c.data(),
                       p.ldc);
    allocation_counter::scope counting;
    td::gemm<TestType>(p.ta, p.tb, p.m, p.n, p.k, TestType(1), x.a.data(), p.lda, x.b.data(), p.ldb, TestType(0), c.data(),
                       p.ldc);
    REQUIRE(counting.allocations() == 0);
  }
  // The counter does count: a vector allocates.
  allocation_counter::scope counting;
  std::vector<TestType> v(100);
  REQUIRE(counting.allocations() == 1);
}

TEMPLATE_TEST_CASE("vector_sum matches a sum in double for every length and alignment", "[gemm][simd]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(7);
  std::normal_distribution<double> normal;
  std::vector<T> values(300);
  for (auto& v : values) v = T(normal(gen));
  for (ta::index offset : {0, 1, 3})
    for (ta::index n = 0; n + offset <= 280; n += (n < 70 ? 1 : 13)) {
      double exact = 0, magnitude = 0;
      for (ta::index i = 0; i < n; ++i) exact += double(values[offset + i]), magnitude += std::abs(double(values[offset + i]));
      const T got = td::vector_sum(values.data() + offset, n);
      CAPTURE(offset, n);
      // Any summation order is within n·ε·Σ|v| of the exact sum.
      CHECK(std::abs(double(got) - exact) <= double(n) * double(std::numeric_limits<T>::epsilon()) * magnitude);
    }
  CHECK(td::vector_sum(values.data(), 0) == T(0));
  const std::vector<T> ones(257, T(1));
  CHECK(td::vector_sum(ones.data(), 257) == T(257));
}
