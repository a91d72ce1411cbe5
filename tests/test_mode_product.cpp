#include "allocation_counter.hpp"

#include <tensor_adapters/init.hpp>
#include <tensor_adapters/mode_product.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <random>
#include <vector>

#if defined(__unix__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ta = tensor_adapters;
namespace td = tensor_adapters::detail;

namespace {

template <int N>
ta::shape<N> unravel(ta::index flat, const ta::shape<N>& dims) {
  ta::shape<N> i{};
  for (int d = N - 1; d >= 0; --d) {
    i[std::size_t(d)] = flat % dims[std::size_t(d)];
    flat /= dims[std::size_t(d)];
  }
  return i;
}

template <int N>
ta::index ravel(const ta::shape<N>& i, const ta::shape<N>& dims) {
  ta::index flat = 0;
  for (int d = 0; d < N; ++d) flat = flat * dims[std::size_t(d)] + i[std::size_t(d)];
  return flat;
}

// y = alpha · (x ×mode op(u)) + beta · y by plain loops in long double; abs receives the scale of
// each entry's rounding error.
template <class T, int N>
void reference(const ta::tensor<T, N>& x, const ta::tensor<T, 2>& u, bool transposed, int mode, T alpha, T beta,
               ta::tensor<T, N>& y, std::vector<double>& abs) {
  const ta::shape<N> dx = ta::shape_of(x), dy = ta::shape_of(y);
  ta::index stride = 1;  // between x's elements along `mode`
  for (int d = mode + 1; d < N; ++d) stride *= dx[std::size_t(d)];
  abs.assign(std::size_t(y.size()), 0.0);
  for (ta::index o = 0; o < y.size(); ++o) {
    ta::shape<N> i = unravel<N>(o, dy);
    const ta::index j = i[std::size_t(mode)];
    i[std::size_t(mode)] = 0;
    const T* fiber = x.data() + ravel<N>(i, dx);  // x's elements along `mode` that y's element o sums
    long double sum = 0, a = 0;
    for (ta::index k = 0; k < dx[std::size_t(mode)]; ++k) {
      const long double t = (long double)(transposed ? u(k, j) : u(j, k)) * fiber[k * stride];
      sum += t;
      a += std::fabs(t);
    }
    const T old = y.data()[o];
    y.data()[o] = T(alpha * sum + (beta == T(0) ? 0.0L : (long double)beta * old));
    abs[std::size_t(o)] = double(std::fabs(alpha) * a) + std::fabs(double(beta) * double(old));
  }
}

template <class T, int N>
void require_close(const ta::tensor<T, N>& got, const ta::tensor<T, N>& want, const std::vector<double>& abs,
                   ta::index depth) {
  const double eps = std::numeric_limits<T>::epsilon();
  ta::index bad = -1;  // the first element out of tolerance (one assertion per tensor keeps the test fast)
  for (ta::index e = 0; e < got.size() && bad < 0; ++e)
    if (!(std::fabs(double(got.data()[e]) - double(want.data()[e])) <=
          4 * eps * double(depth + 2) * abs[std::size_t(e)] + 1e-300))
      bad = e;
  INFO("element " << bad << " got " << (bad < 0 ? T(0) : got.data()[bad]) << " want "
                  << (bad < 0 ? T(0) : want.data()[bad]));
  REQUIRE(bad == -1);
}

// Every mode of random shapes of rank N, both factor layouts, three (alpha, beta): the vectorized
// kernel against the scalar one and against plain loops.
template <class T, int N>
void check_rank(std::mt19937_64& gen, int trials) {
  const ta::index extents[] = {1, 2, 3, 5, 7, 13, 17, 34};
  const ta::index outputs[] = {1, 2, 3, 8, 11, 16, 33};
  std::uniform_int_distribution<std::size_t> pick_extent(0, std::size(extents) - 1), pick_output(0, std::size(outputs) - 1);
  for (int trial = 0; trial < trials; ++trial) {
    ta::shape<N> dims{};
    ta::index size = 1;
    for (auto& d : dims) {
      d = extents[pick_extent(gen)];
      while (size * d > 4096) d = 1 + d / 3;  // keep the loops quick
      size *= d;
    }
    ta::tensor<T, N> x(dims);
    ta::fill_normal(x, 0, 1, gen);
    for (int mode = 0; mode < N; ++mode) {
      const ta::index i = dims[std::size_t(mode)], j = outputs[pick_output(gen)];
      const bool transposed = (trial + mode) % 2 == 1;
      ta::tensor<T, 2> u(transposed ? i : j, transposed ? j : i);
      ta::fill_normal(u, 0, 1, gen);
      ta::shape<N> ydims = dims;
      ydims[std::size_t(mode)] = j;
      const T alpha = trial % 3 == 0 ? T(1) : T(-1.25);
      const T beta = trial % 3 == 0 ? T(0) : T(trial % 3 == 1 ? 1 : 0.5);
      INFO("rank " << N << " x " << td::dims_string(dims, N) << " mode " << mode << " J " << j << " transposed "
                   << transposed << " alpha " << alpha << " beta " << beta);
      ta::tensor<T, N> y0(ydims);
      ta::fill_normal(y0, 0, 1, gen);
      ta::tensor<T, N> want = y0, got = y0, scalar = y0;
      if (beta == T(0)) got.setConstant(std::numeric_limits<T>::quiet_NaN());
      std::vector<double> abs;
      reference<T, N>(x, u, transposed, mode, alpha, beta, want, abs);
      if (transposed)
        ta::mode_product_transposed<T, N>(ta::view(x), u, mode, ta::writable_view(got), alpha, beta);
      else
        ta::mode_product<T, N>(ta::view(x), u, mode, ta::writable_view(got), alpha, beta);
      ta::index p = 1, q = 1;
      for (int d = 0; d < mode; ++d) p *= dims[std::size_t(d)];
      for (int d = mode + 1; d < N; ++d) q *= dims[std::size_t(d)];
      td::mode_product_kernel<T, td::scalar_isa>(x.data(), p, i, q, u.data(), transposed, j, alpha, beta,
                                                 scalar.data());
      require_close<T, N>(got, want, abs, i);
      require_close<T, N>(scalar, want, abs, i);
#if defined(TA_HAVE_AVX512)
      // The AVX2 kernels, compiled in beside AVX-512 but never native here.
      ta::tensor<T, N> avx2 = y0;
      if (beta == T(0)) avx2.setConstant(std::numeric_limits<T>::quiet_NaN());
      td::mode_product_kernel<T, td::avx2_isa>(x.data(), p, i, q, u.data(), transposed, j, alpha, beta, avx2.data());
      require_close<T, N>(avx2, want, abs, i);
#endif
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("mode products of ranks 1 to 6 match the scalar kernel and plain loops", "[mode_product]", float,
                   double) {
  std::mt19937_64 gen(21);
  check_rank<TestType, 1>(gen, 12);
  check_rank<TestType, 2>(gen, 30);
  check_rank<TestType, 3>(gen, 30);
  check_rank<TestType, 4>(gen, 20);
  check_rank<TestType, 5>(gen, 12);
  check_rank<TestType, 6>(gen, 8);
}

TEMPLATE_TEST_CASE("mode products with full register tiles and several cache blocks", "[mode_product]", float, double) {
  std::mt19937_64 gen(22);
  // A middle mode whose trailing extent is a multiple of every tile width, and one that is not;
  // a contracted extent past one KC block; a last mode with many rows; a conv-like middle mode whose
  // trailing extent 9 is shorter than a register, large enough to be split over threads at J 8 and 13
  // (and over J 29 and 64 with J along the lanes where I ≥ 4 registers); trailing extents 2, 5 and 12 with
  // J along the lanes; with J 4 and 8, trailing extents of several column blocks of the streaming kernel
  // (2 KB each, the last one partial) and contracted extents that its row blocking does not divide, and
  // shorter trailing extents wider than two registers (64, 97, 200, 335), taken in strips of two
  // registers with the last strip whole, partly in its second register, or only in its first.
  for (const ta::shape<3>& dims : {ta::shape<3>{3, 40, 64}, ta::shape<3>{5, 300, 9}, ta::shape<3>{2, 19, 97},
                                   ta::shape<3>{400, 3, 3}, ta::shape<3>{600, 40, 9}, ta::shape<3>{7, 70, 2},
                                   ta::shape<3>{3, 67, 5}, ta::shape<3>{4, 131, 12}, ta::shape<3>{3, 41, 1100},
                                   ta::shape<3>{4, 23, 200}}) {
    ta::tensor<TestType, 3> x(dims);
    ta::fill_normal(x, 0, 1, gen);
    for (int mode = 0; mode < 3; ++mode) {
      for (ta::index j : {ta::index(4), ta::index(8), ta::index(13), ta::index(29), ta::index(64)}) {
        INFO("x " << td::dims_string(dims, 3) << " mode " << mode << " J " << j);
        ta::tensor<TestType, 2> u(j, dims[std::size_t(mode)]);
        ta::fill_normal(u, 0, 1, gen);
        ta::tensor<TestType, 3> got = ta::mode_product(x, u, mode);
        ta::tensor<TestType, 3> want = got;
        std::vector<double> abs;
        reference<TestType, 3>(x, u, false, mode, TestType(1), TestType(0), want, abs);
        require_close<TestType, 3>(got, want, abs, dims[std::size_t(mode)]);
        // The output form with beta 0 into NaN: y's old contents must not leak into it.
        ta::tensor<TestType, 3> into = got;
        into.setConstant(std::numeric_limits<TestType>::quiet_NaN());
        ta::mode_product<TestType, 3>(ta::view(x), u, mode, ta::writable_view(into));
        require_close<TestType, 3>(into, want, abs, dims[std::size_t(mode)]);
        // The factor given transposed, accumulating.
        ta::tensor<TestType, 2> ut = u.shuffle(std::array<int, 2>{1, 0});
        ta::tensor<TestType, 3> acc = got;
        ta::fill_normal(acc, 0, 1, gen);
        want = acc;
        reference<TestType, 3>(x, ut, true, mode, TestType(0.5), TestType(2), want, abs);
        ta::mode_product_transposed<TestType, 3>(ta::view(x), ut, mode, ta::writable_view(acc), TestType(0.5),
                                                 TestType(2));
        require_close<TestType, 3>(acc, want, abs, dims[std::size_t(mode)]);
      }
    }
  }
}

TEMPLATE_TEST_CASE("mode_inner_product is the contraction over every other mode", "[mode_product]", float, double) {
  std::mt19937_64 gen(23);
  ta::tensor<TestType, 4> x(3, 5, 4, 2), y(3, 7, 4, 2);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(y, 0, 1, gen);
  ta::tensor<TestType, 2> out(5, 7);
  // beta 1, 0.5 and 0 (out's NaN ignored): beta scales out once, not once per slice of the sum.
  for (const TestType beta : {TestType(1), TestType(0.5), TestType(0)}) {
    INFO("beta " << beta);
    out.setConstant(beta == TestType(0) ? std::numeric_limits<TestType>::quiet_NaN() : TestType(1));
    ta::mode_inner_product<TestType, 4>(ta::view(x), y, 1, ta::writable_view(out), TestType(2), beta);
    for (ta::index a = 0; a < 5; ++a)
      for (ta::index b = 0; b < 7; ++b) {
        long double sum = 0, abs = 0;
        for (ta::index i = 0; i < 3; ++i)
          for (ta::index k = 0; k < 4; ++k)
            for (ta::index l = 0; l < 2; ++l) {
              sum += (long double)x(i, a, k, l) * y(i, b, k, l);
              abs += std::fabs((long double)x(i, a, k, l) * y(i, b, k, l));
            }
        REQUIRE(std::fabs(double(out(a, b)) - double(2 * sum + beta)) <=
                64 * std::numeric_limits<TestType>::epsilon() * double(2 * abs + 1));
      }
  }
}

TEMPLATE_TEST_CASE("mode_inner_product of a last mode, of an empty sum, and with beta 0 into NaN", "[mode_product]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(25);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  // A last mode (Q = 1): out (3, 2) = x (6, 3)ᵀ · y (6, 2).
  ta::tensor<T, 2> x(6, 3), y(6, 2), out(3, 2);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(y, 0, 1, gen);
  out.setConstant(nan);
  ta::mode_inner_product<T, 2>(ta::view(x), y, 1, ta::writable_view(out), T(1), T(0));
  for (ta::index a = 0; a < 3; ++a)
    for (ta::index b = 0; b < 2; ++b) {
      long double sum = 0, abs = 0;
      for (ta::index i = 0; i < 6; ++i) {
        sum += (long double)x(i, a) * y(i, b);
        abs += std::fabs((long double)x(i, a) * y(i, b));
      }
      REQUIRE(std::fabs(double(out(a, b)) - double(sum)) <= 16 * std::numeric_limits<T>::epsilon() * double(abs));
    }
  // No slices before the mode (P = 0), with and without slices after it: out = beta · out.
  for (const ta::index q : {ta::index(1), ta::index(4)}) {
    INFO("Q " << q);
    ta::tensor<T, 3> x0(0, 3, q), y0(0, 2, q);
    ta::tensor<T, 2> o(3, 2);
    o.setConstant(T(1.5));
    ta::mode_inner_product<T, 3>(ta::view(x0), y0, 1, ta::writable_view(o), T(1), T(2));
    for (ta::index e = 0; e < o.size(); ++e) REQUIRE(o.data()[e] == T(3));
    o.setConstant(nan);
    ta::mode_inner_product<T, 3>(ta::view(x0), y0, 1, ta::writable_view(o), T(1), T(0));
    for (ta::index e = 0; e < o.size(); ++e) REQUIRE(o.data()[e] == T(0));
  }
  // No slices after it (Q = 0) but 2³¹ before: an empty sum, answered at once, not slice by slice
  // (which took about 15 ns per slice, half a minute here).
  {
    const ta::index p = ta::index(1) << 31;
    ta::tensor<T, 3> x0(p, 3, 0), y0(p, 2, 0);
    ta::tensor<T, 2> o(3, 2);
    o.setConstant(T(1.5));
    const auto start = std::chrono::steady_clock::now();
    ta::mode_inner_product<T, 3>(ta::view(x0), y0, 1, ta::writable_view(o), T(1), T(2));
    CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 1.0);
    for (ta::index e = 0; e < o.size(); ++e) REQUIRE(o.data()[e] == T(3));
  }
}

TEMPLATE_TEST_CASE("a mode product over an empty extent is beta · y, with alpha 0 still a product, on every path",
                   "[mode_product]", float, double) {
  using T = TestType;
  struct product_case {
    ta::shape<3> dims;
    int mode;
    ta::index j;
  };
  // The shapes of every kernel behind mode_product: a tiny trailing extent folded into a narrow product
  // (64, I, 3), short rows (4, I, 5), J along the lanes (4, I ≥ 64, 5), streamed rows (4, I, 1100), the
  // packed product of a middle mode, and a last mode; each with its contracted extent 0 (x, u not read)
  // and with alpha 0, which multiplies the product as any factor does: 0 · inf is NaN, as in PyTorch's
  // alpha * (x ×n u), and 0 · a finite product adds nothing to beta · y.
  const product_case cases[] = {{{64, 3, 3}, 1, 2},  {{4, 3, 5}, 1, 2},   {{4, 64, 5}, 1, 29},
                                {{4, 3, 1100}, 1, 4}, {{3, 40, 64}, 1, 29}, {{5, 7, 6}, 2, 3}};
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  for (const product_case& pc : cases) {
    for (const bool empty : {true, false}) {
      ta::shape<3> dims = pc.dims;
      if (empty) dims[std::size_t(pc.mode)] = 0;
      INFO("x " << td::dims_string(dims, 3) << " mode " << pc.mode << " J " << pc.j);
      ta::tensor<T, 3> x(dims);
      ta::tensor<T, 2> u(pc.j, dims[std::size_t(pc.mode)]);
      u.setConstant(T(1));
      ta::shape<3> ydims = dims;
      ydims[std::size_t(pc.mode)] = pc.j;
      ta::tensor<T, 3> y(ydims);
      const T alpha = empty ? T(1) : T(0);
      for (const T value : {T(-0.5), inf}) {
        x.setConstant(value);
        const bool poisoned = !empty && value == inf;  // some term of every sum is 0 · inf
        y.setConstant(T(1.5));
        ta::mode_product<T, 3>(ta::view(x), u, pc.mode, ta::writable_view(y), alpha, T(2));
        for (ta::index e = 0; e < y.size(); ++e) REQUIRE((poisoned ? std::isnan(y.data()[e]) : y.data()[e] == T(3)));
        y.setConstant(nan);
        ta::mode_product<T, 3>(ta::view(x), u, pc.mode, ta::writable_view(y), alpha, T(0));
        for (ta::index e = 0; e < y.size(); ++e) REQUIRE((poisoned ? std::isnan(y.data()[e]) : y.data()[e] == T(0)));
      }
    }
  }
  // Nothing to write: an empty y (P = 0 or J = 0).
  ta::tensor<T, 3> x(0, 4, 3), y(0, 2, 3);
  ta::tensor<T, 2> u(2, 4);
  u.setConstant(T(1));
  ta::mode_product<T, 3>(ta::view(x), u, 1, ta::writable_view(y));
  ta::tensor<T, 3> x1(2, 4, 3), y1(2, 0, 3);
  x1.setConstant(T(1));
  ta::tensor<T, 2> u1(0, 4);
  ta::mode_product<T, 3>(ta::view(x1), u1, 1, ta::writable_view(y1));
  REQUIRE(y1.size() == 0);
}

namespace {

// y = x ×1 op(u) for x (P, I, Q) on instruction set Isa, with one Inf and one NaN in x, against plain
// loops: NaN exactly where the loops give NaN, the same infinities, the rest within rounding.
template <class T, class Isa>
void check_non_finite(const ta::shape<3>& dims, ta::index j, bool transposed, std::mt19937_64& gen) {
  ta::tensor<T, 3> x(dims);
  ta::fill_normal(x, 0, 1, gen);
  x.data()[1] = std::numeric_limits<T>::infinity();
  x.data()[x.size() / 2] = std::numeric_limits<T>::quiet_NaN();
  const ta::index i = dims[1];
  ta::tensor<T, 2> u(transposed ? i : j, transposed ? j : i);
  ta::fill_normal(u, 0, 1, gen);
  ta::tensor<T, 3> want(dims[0], j, dims[2]), got(dims[0], j, dims[2]);
  std::vector<double> abs;
  want.setZero();
  reference<T, 3>(x, u, transposed, 1, T(1), T(0), want, abs);
  got.setConstant(std::numeric_limits<T>::quiet_NaN());
  td::mode_product_kernel<T, Isa>(x.data(), dims[0], i, dims[2], u.data(), transposed, j, T(1), T(0), got.data());
  const double eps = std::numeric_limits<T>::epsilon();
  ta::index bad = -1, nans = 0;
  for (ta::index e = 0; e < got.size() && bad < 0; ++e) {
    const T g = got.data()[e], w = want.data()[e];
    nans += std::isnan(w);
    const bool ok = std::isnan(w) ? bool(std::isnan(g))
                    : std::isinf(w) ? g == w
                                    : std::fabs(double(g) - double(w)) <= 4 * eps * double(i + 2) * abs[std::size_t(e)];
    if (!ok) bad = e;
  }
  constexpr int width = td::simd<T, Isa>::width;
  INFO("x " << td::dims_string(dims, 3) << " J " << j << " transposed " << transposed << " width " << width
            << ": element " << bad << " got " << (bad < 0 ? T(0) : got.data()[bad])
            << " want " << (bad < 0 ? T(0) : want.data()[bad]));
  REQUIRE(bad == -1);
  REQUIRE(nans < got.size());  // the NaN does not reach every output
}

}  // namespace

TEMPLATE_TEST_CASE("an Inf or a NaN in x reaches exactly the outputs that depend on it, on every path",
                   "[mode_product]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(91);
  // Every kernel behind mode_product (see the empty-extent case above), and the Kronecker fold of a
  // tiny trailing extent with one and two registers per row, a contraction I·Q of 32, and Q = 7.
  const std::pair<ta::shape<3>, ta::index> cases[] = {
      {{64, 3, 3}, 2},   {{4, 3, 5}, 2},   {{4, 64, 5}, 29}, {{4, 3, 1100}, 4}, {{3, 40, 64}, 29},
      {{5, 7, 6}, 3},    {{64, 2, 3}, 2},  {{64, 3, 3}, 3},  {{70, 5, 3}, 4},   {{64, 16, 2}, 4},
      {{100, 4, 7}, 2},  {{80, 3, 1}, 5}};
  for (const auto& [dims, j] : cases)
    for (const bool transposed : {false, true}) {
      check_non_finite<T, td::native_isa>(dims, j, transposed, gen);
      check_non_finite<T, td::scalar_isa>(dims, j, transposed, gen);
#if defined(TA_HAVE_AVX512)
      check_non_finite<T, td::avx2_isa>(dims, j, transposed, gen);
#endif
    }
}

#if defined(__unix__)
namespace {

// n values that end where an unreadable page begins: reading or writing past the last one faults.
template <class T>
class guarded {
 public:
  explicit guarded(ta::index n) : n_(n) {
    const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
    const std::size_t bytes = std::size_t(n) * sizeof(T);
    size_ = (bytes + page - 1) / page * page + page;
    void* base = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(base != MAP_FAILED);
    base_ = static_cast<char*>(base);
    REQUIRE(mprotect(base_ + size_ - page, page, PROT_NONE) == 0);
    data_ = reinterpret_cast<T*>(base_ + size_ - page - bytes);
  }
  ~guarded() { munmap(base_, size_); }
  guarded(const guarded&) = delete;
  guarded& operator=(const guarded&) = delete;
  T* data() const { return data_; }
  ta::index size() const { return n_; }

 private:
  ta::index n_;
  std::size_t size_ = 0;
  char* base_ = nullptr;
  T* data_ = nullptr;
};

// x ×1 op(u) for x (P, I, Q) with x, u and y each ending at an unreadable page, on instruction set Isa,
// against the scalar kernel (with beta 1, so that y is read as well as written).
template <class T, class Isa>
void check_within_bounds(const ta::shape<3>& dims, ta::index j, bool transposed, std::mt19937_64& gen) {
  const ta::index p = dims[0], i = dims[1], q = dims[2];
  guarded<T> x(p * i * q), u(j * i), y(p * j * q);
  std::normal_distribution<double> normal;
  for (const guarded<T>* g : {&x, &u, &y})
    for (ta::index e = 0; e < g->size(); ++e) g->data()[e] = T(normal(gen));
  std::vector<T> want(y.data(), y.data() + y.size());
  td::mode_product_kernel<T, td::scalar_isa>(x.data(), p, i, q, u.data(), transposed, j, T(1.5), T(1), want.data());
  td::mode_product_kernel<T, Isa>(x.data(), p, i, q, u.data(), transposed, j, T(1.5), T(1), y.data());
  const double eps = std::numeric_limits<T>::epsilon();
  ta::index bad = -1;
  for (ta::index e = 0; e < y.size() && bad < 0; ++e)
    if (!(std::fabs(double(y.data()[e]) - double(want[std::size_t(e)])) <=
          8 * eps * double(i + 2) * (1 + std::fabs(double(want[std::size_t(e)])))))
      bad = e;
  constexpr int width = td::simd<T, Isa>::width;
  INFO("x " << td::dims_string(dims, 3) << " J " << j << " transposed " << transposed << " width " << width
            << ": element " << bad);
  REQUIRE(bad == -1);
}

}  // namespace

TEMPLATE_TEST_CASE("mode products touch no memory past x, u or y, on every path", "[mode_product]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(57);
  // Every kernel behind mode_product (see the empty-extent case above), and the short-rows kernel's
  // rows read in whole registers (past q into the next row, but never past x): trailing extents of 2
  // to 17 with J from 1 to 9, in slices of a few rows.
  std::vector<std::pair<ta::shape<3>, ta::index>> cases = {
      {{64, 3, 3}, 2}, {{4, 64, 5}, 29}, {{4, 3, 1100}, 4}, {{3, 40, 64}, 29}, {{5, 7, 6}, 3}, {{70, 5, 3}, 4},
      {{80, 3, 1}, 5}, {{3, 70, 9}, 33}, {{2, 33, 300}, 8}};
  for (const ta::index q : {2, 3, 5, 8, 9, 12, 17})
    for (const ta::index j : {1, 5, 7, 8, 9}) cases.push_back({{3, q % 2 == 0 ? 4 : 3, q}, j});
  for (const auto& [dims, j] : cases)
    for (const bool transposed : {false, true}) {
      check_within_bounds<T, td::native_isa>(dims, j, transposed, gen);
#if defined(TA_HAVE_AVX512)
      check_within_bounds<T, td::avx2_isa>(dims, j, transposed, gen);
#endif
    }
}
#endif

TEMPLATE_TEST_CASE("mode products reject bad arguments before writing", "[mode_product]", float, double) {
  ta::tensor<TestType, 3> x(2, 3, 4), y(2, 5, 4);
  x.setConstant(1);
  y.setConstant(TestType(42));
  ta::tensor<TestType, 2> u(5, 3), wrong(5, 4);
  u.setConstant(1);
  wrong.setConstant(1);
  // Run-time modes: a constant out-of-range mode makes g++ warn about the (unreachable) access.
  volatile int past_end = 3, negative = -1;
  REQUIRE_THROWS_AS((ta::mode_product<TestType, 3>(ta::view(x), u, past_end, ta::writable_view(y))), ta::argument_error);
  REQUIRE_THROWS_AS((ta::mode_product<TestType, 3>(ta::view(x), u, negative, ta::writable_view(y))), ta::argument_error);
  REQUIRE_THROWS_AS((ta::mode_product<TestType, 3>(ta::view(x), wrong, 1, ta::writable_view(y))), ta::argument_error);
  REQUIRE_THROWS_AS((ta::mode_product<TestType, 3>(ta::view(x), u, 2, ta::writable_view(y))), ta::argument_error);
  REQUIRE_THROWS_AS((ta::mode_product_transposed<TestType, 3>(ta::view(x), u, 1, ta::writable_view(y))),
                    ta::argument_error);
  REQUIRE_THROWS_WITH(ta::mode_product(x, wrong, 1), Catch::Contains("mode_product") && Catch::Contains("(5, 4)"));
  // Views whose extents are negative, or whose sizes an index cannot count (x is empty, y is not): they
  // used to pass as an empty product and overwrite y with beta · y. Nothing behind them is read.
  using cview = ta::const_tensor_view<TestType, 2>;
  using cview3 = ta::const_tensor_view<TestType, 3>;
  const ta::index big = ta::index(1) << 40;
  ta::tensor_view<TestType, 2> y2(y.data(), 3, 4);
  REQUIRE_THROWS_WITH((ta::mode_product<TestType, 2>(cview(x.data(), -2, 4), cview(u.data(), 3, -2), 0, y2)),
                      Catch::Contains("mode_product") && Catch::Contains("(-2, 4)"));
  REQUIRE_THROWS_WITH((ta::mode_product<TestType, 3>(cview3(x.data(), 0, big, big), cview(u.data(), 3, 0), 0,
                                                     ta::tensor_view<TestType, 3>(y.data(), 3, big, big))),
                      Catch::Contains("x has extents"));
  REQUIRE_THROWS_WITH((ta::mode_product<TestType, 3>(cview3(x.data(), 0, big, 2), cview(u.data(), big, 0), 0,
                                                     ta::tensor_view<TestType, 3>(y.data(), big, big, 2))),
                      Catch::Contains("y has extents"));
  ta::tensor<TestType, 2> out(3, 3);
  out.setConstant(TestType(42));
  REQUIRE_THROWS_AS((ta::mode_inner_product<TestType, 2>(cview(x.data(), -1, 0), cview(x.data(), 1, 0), 0,
                                                         ta::tensor_view<TestType, 2>(out.data(), -1, 1))),
                    ta::argument_error);
  REQUIRE_THROWS_AS((ta::mode_inner_product<TestType, 3>(cview3(x.data(), big, big, 0), cview3(x.data(), big, big, 0),
                                                         2, ta::writable_view(out))),
                    ta::argument_error);
  for (ta::index e = 0; e < y.size(); ++e) REQUIRE(y.data()[e] == TestType(42));
  for (ta::index e = 0; e < out.size(); ++e) REQUIRE(out.data()[e] == TestType(42));
}

TEMPLATE_TEST_CASE("a repeated mode product allocates nothing", "[mode_product]", float, double) {
  std::mt19937_64 gen(24);
  // The packed product of a middle mode (J 32, trailing extent 81) and of a first mode (J 20), and a
  // tiny trailing extent folded into a narrow product (its op(u) ⊗ 1_Q in scratch).
  struct product_case {
    ta::shape<4> dims;
    int mode;
    ta::index j;
  };
  const product_case cases[] = {{{16, 32, 9, 9}, 1, 32}, {{64, 40, 8, 8}, 0, 20}, {{96, 5, 1, 3}, 1, 4}};
  for (const product_case& pc : cases) {
    INFO("x " << td::dims_string(pc.dims, 4) << " mode " << pc.mode << " J " << pc.j);
    ta::tensor<TestType, 4> x(pc.dims);
    ta::shape<4> ydims = pc.dims;
    ydims[std::size_t(pc.mode)] = pc.j;
    ta::tensor<TestType, 4> y(ydims);
    ta::tensor<TestType, 2> u(pc.j, pc.dims[std::size_t(pc.mode)]);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(u, 0, 1, gen);
    ta::mode_product<TestType, 4>(ta::view(x), u, pc.mode, ta::writable_view(y));  // sizes the scratch buffers
    allocation_counter::scope counting;
    ta::mode_product<TestType, 4>(ta::view(x), u, pc.mode, ta::writable_view(y));
    REQUIRE(counting.allocations() == 0);
  }
}
