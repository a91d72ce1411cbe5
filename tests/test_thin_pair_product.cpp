#include "allocation_counter.hpp"

#include <tensor_adapters/detail/gemm.hpp>
#include <tensor_adapters/detail/thin_pair_product.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ta = tensor_adapters;
namespace td = tensor_adapters::detail;

namespace {

// The kernel's row lengths: one and two registers of Isa.
template <class T, class Isa = td::native_isa>
constexpr ta::index widths[2] = {td::simd<T, Isa>::width, 2 * td::simd<T, Isa>::width};

// X (m, ldx ≥ n), P (m, r), Qt (n, r), L (m, r), as the kernel takes them.
template <class T>
struct thin_problem {
  ta::index m, n, ldx, r;
  std::vector<T> x, p, qt, l;
  thin_problem(ta::index m_, ta::index n_, ta::index ldx_, ta::index r_, std::uint64_t seed)
      : m(m_), n(n_), ldx(ldx_), r(r_) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal;
    x.resize(std::size_t(m * ldx));
    p.resize(std::size_t(m * r));
    qt.resize(std::size_t(n * r));
    l.resize(std::size_t(m * r));
    for (auto* v : {&x, &p, &qt, &l})
      for (auto& e : *v) e = T(normal(gen));
  }
};

// |got − want| within the rounding of a k-term sum in T, given the sum of the terms' magnitudes.
template <class T>
bool close(T got, long double want, long double magnitude, ta::index k) {
  const long double bound = 4 * std::numeric_limits<T>::epsilon() * double(k + 2) * magnitude;
  return std::fabs((long double)got - want) <= bound + 1e-300;
}

// Σ a[e · sa] · b[e · sb] over e < count in long double, and the sum of the terms' magnitudes.
template <class T>
std::pair<long double, long double> long_dot(const T* a, ta::index sa, const T* b, ta::index sb, ta::index count) {
  long double sum = 0, magnitude = 0;
  for (ta::index e = 0; e < count; ++e) {
    const long double term = (long double)a[e * sa] * b[e * sb];
    sum += term;
    magnitude += std::fabs(term);
  }
  return {sum, magnitude};
}

// The first entry of L and of Rt that differs from long double loops; -1 when none does.
template <class T>
std::pair<ta::index, ta::index> first_bad(const thin_problem<T>& t, T alpha, T beta, const std::vector<T>& l_old,
                                          const std::vector<T>& l, const std::vector<T>& rt) {
  const ta::index r = t.r;
  ta::index bad_l = -1, bad_rt = -1;
  for (ta::index i = 0; i < t.m && bad_l < 0; ++i)
    for (ta::index a = 0; a < r && bad_l < 0; ++a) {
      auto [sum, magnitude] = long_dot(t.x.data() + i * t.ldx, 1, t.qt.data() + a, r, t.n);
      long double want = alpha * sum;
      magnitude *= std::fabs(alpha);
      if (beta != T(0)) {
        want += (long double)beta * l_old[std::size_t(i * r + a)];
        magnitude += std::fabs((long double)beta * l_old[std::size_t(i * r + a)]);
      }
      if (!close(l[std::size_t(i * r + a)], want, magnitude, t.n)) bad_l = i * r + a;
    }
  for (ta::index c = 0; c < t.n && bad_rt < 0; ++c)
    for (ta::index a = 0; a < r && bad_rt < 0; ++a) {
      const auto [sum, magnitude] = long_dot(t.x.data() + c, t.ldx, t.p.data() + a, r, t.m);
      if (!close(rt[std::size_t(c * r + a)], sum, magnitude, t.m)) bad_rt = c * r + a;
    }
  return {bad_l, bad_rt};
}

template <class T, class Isa = td::native_isa>
void check_thin(ta::index m, ta::index n, ta::index ldx, ta::index r, std::uint64_t seed) {
  INFO("m " << m << " n " << n << " ldx " << ldx << " r " << r);
  const thin_problem<T> t(m, n, ldx, r, seed);
  for (const auto& [alpha, beta] : {std::pair<T, T>{1, 0}, {T(-0.75), T(2)}, {T(0.5), T(1)}}) {
    INFO("alpha " << alpha << " beta " << beta);
    std::vector<T> l_old = t.l;
    if (beta == T(0))  // old contents of L, even NaN, must not leak into the result
      for (auto& e : l_old) e = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> l = l_old, rt(std::size_t(n * r), std::numeric_limits<T>::quiet_NaN());
    td::thin_pair_product<T, Isa>(m, n, r, alpha, t.x.data(), ldx, t.p.data(), t.qt.data(), beta, l.data(),
                                  rt.data());
    const auto [bad_l, bad_rt] = first_bad(t, alpha, beta, l_old, l, rt);
    INFO("first bad entry of L " << bad_l << ", of Rt " << bad_rt);
    CHECK(bad_l == -1);
    CHECK(bad_rt == -1);

    // The same two products by the scalar reference kernel: L = alpha · X · Qt + beta · L (Qt is
    // (n, r)) and Rt = Xᵀ · P.
    std::vector<T> l_ref = l_old, rt_ref(std::size_t(n * r));
    td::gemm_packed<T, td::scalar_isa>(false, false, m, r, n, alpha, t.x.data(), ldx, t.qt.data(), r, beta,
                                       l_ref.data(), r);
    td::gemm_packed<T, td::scalar_isa>(true, false, n, r, m, T(1), t.x.data(), ldx, t.p.data(), r, T(0),
                                       rt_ref.data(), r);
    const auto [bad_l_ref, bad_rt_ref] = first_bad(t, alpha, beta, l_old, l_ref, rt_ref);
    CHECK(bad_l_ref == -1);
    CHECK(bad_rt_ref == -1);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("the thin pair product matches plain loops and the scalar kernel", "[thin_pair]", float, double) {
  // Rows of one and two registers; rows of X around the register tile's (8 or 5 on AVX-512, 2 on AVX2),
  // columns around its 6, 4, 2 or 1 and around the blocks of 256 or 128 columns, rows of X longer than n.
  std::uint64_t seed = 1;
  for (ta::index r : widths<TestType>)
    for (ta::index m : {1, 2, 3, 4, 5, 7, 8, 9, 11, 17, 64, 257})
      for (ta::index n : {1, 3, 5, 6, 7, 8, 9, 13, 127, 128, 129, 255, 256, 257, 600})
        check_thin<TestType>(m, n, n + (m % 3) * 5, r, seed++);
}

#if defined(TA_HAVE_AVX512)
TEMPLATE_TEST_CASE("the AVX2 thin pair product, compiled in beside AVX-512, matches plain loops", "[thin_pair]", float,
                   double) {
  // Its 2×4 tile with split accumulators runs only where AVX2 is the widest instruction set.
  std::uint64_t seed = 1000;
  for (ta::index r : widths<TestType, td::avx2_isa>)
    for (ta::index m : {1, 2, 3, 5, 8, 17, 64})
      for (ta::index n : {1, 3, 4, 5, 7, 9, 127, 128, 129, 257})
        check_thin<TestType, td::avx2_isa>(m, n, n + (m % 3) * 5, r, seed++);
}
#endif

TEMPLATE_TEST_CASE("the thin pair product is exact on small integers", "[thin_pair]", float, double) {
  // Integer entries small enough that every sum is exact: L and Rt must equal the loops bit for bit.
  for (ta::index r : widths<TestType>) {
    INFO("r " << r);
    const ta::index m = 37, n = 531;
    std::vector<TestType> x(std::size_t(m * n)), p(std::size_t(m * r)), qt(std::size_t(n * r));
    for (std::size_t e = 0; e < x.size(); ++e) x[e] = TestType(int(e % 7) - 3);
    for (std::size_t e = 0; e < p.size(); ++e) p[e] = TestType(int(e % 5) - 2);
    for (std::size_t e = 0; e < qt.size(); ++e) qt[e] = TestType(int(e % 3) - 1);
    std::vector<TestType> l(std::size_t(m * r)), rt(std::size_t(n * r));
    td::thin_pair_product<TestType>(m, n, r, TestType(1), x.data(), n, p.data(), qt.data(), TestType(0), l.data(),
                                    rt.data());
    bool exact = true;
    for (ta::index i = 0; i < m; ++i)
      for (ta::index a = 0; a < r; ++a) {
        TestType want = 0;
        for (ta::index c = 0; c < n; ++c) want += x[std::size_t(i * n + c)] * qt[std::size_t(c * r + a)];
        exact = exact && l[std::size_t(i * r + a)] == want;
      }
    for (ta::index c = 0; c < n; ++c)
      for (ta::index a = 0; a < r; ++a) {
        TestType want = 0;
        for (ta::index i = 0; i < m; ++i) want += x[std::size_t(i * n + c)] * p[std::size_t(i * r + a)];
        exact = exact && rt[std::size_t(c * r + a)] == want;
      }
    CHECK(exact);
  }
}

TEMPLATE_TEST_CASE("an empty thin pair product scales L by beta and zeroes Rt", "[thin_pair]", float, double) {
  for (ta::index r : widths<TestType>) {
    std::vector<TestType> x(1), p(std::size_t(3 * r)), qt(std::size_t(2 * r), TestType(1));
    std::vector<TestType> l(std::size_t(3 * r), TestType(2)), rt(std::size_t(2 * r), TestType(5));
    td::thin_pair_product<TestType>(3, 0, r, TestType(1), x.data(), 1, p.data(), qt.data(), TestType(-1.5), l.data(),
                                    rt.data());
    for (auto v : l) CHECK(v == TestType(-3));
    td::thin_pair_product<TestType>(0, 2, r, TestType(1), x.data(), 2, p.data(), qt.data(), TestType(0), l.data(),
                                    rt.data());
    for (auto v : rt) CHECK(v == TestType(0));
  }
}

TEMPLATE_TEST_CASE("a thin pair product split over threads matches one thread", "[thin_pair]", float, double) {
  // Large enough for two threads (m · n · 2r ≥ 2^23); columns not a multiple of a cache line.
  for (ta::index r : widths<TestType>) {
    const ta::index m = 300, n = (ta::index(1) << 23) / (m * 2 * r) + 77;
    check_thin<TestType>(m, n, n, r, 91);
#ifdef _OPENMP
    INFO("r " << r);
    const thin_problem<TestType> t(m, n, n, r, 92);
    std::vector<TestType> l1 = t.l, l2 = t.l, rt1(std::size_t(n * r)), rt2(std::size_t(n * r));
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    td::thin_pair_product<TestType>(m, n, r, TestType(2), t.x.data(), n, t.p.data(), t.qt.data(), TestType(0.5),
                                    l1.data(), rt1.data());
    omp_set_num_threads(2);
    td::thin_pair_product<TestType>(m, n, r, TestType(2), t.x.data(), n, t.p.data(), t.qt.data(), TestType(0.5),
                                    l2.data(), rt2.data());
    omp_set_num_threads(saved);
    CHECK(rt1 == rt2);  // each column of Rt is summed by one thread, in the same order
    const auto [bad_l, bad_rt] = first_bad(t, TestType(2), TestType(0.5), t.l, l2, rt2);
    CHECK(bad_l == -1);
    CHECK(bad_rt == -1);
#endif
  }
}

TEMPLATE_TEST_CASE("a repeated thin pair product allocates nothing", "[thin_pair]", float, double) {
  for (ta::index r : widths<TestType>) {
    const ta::index m = 300, n = (ta::index(1) << 23) / (m * 2 * r) + 77;  // on two threads where there are two
    const thin_problem<TestType> t(m, n, n, r, 93);
    std::vector<TestType> l = t.l, rt(std::size_t(n * r));
    auto call = [&] {
      td::thin_pair_product<TestType>(m, n, r, TestType(1), t.x.data(), n, t.p.data(), t.qt.data(), TestType(0),
                                      l.data(), rt.data());
    };
    call();
    allocation_counter::scope counting;
    call();
    CHECK(counting.allocations() == 0);
  }
}
