// LoRA invariants: backward ≡ finite differences (double), merged ≡ unmerged, merge/unmerge round trip,
// safe_merge atomicity, PEFT's initialisation, parameter visiting, no allocation on the hot path, and
// every bad-input path. PyTorch references are compared in test_lora_pytorch.cpp.
#include "allocation_counter.hpp"
#include "zero_scale.hpp"

#include <tensor_adapters/lora.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace ta = tensor_adapters;

namespace {

template <class T>
T tolerance(double size) {
  return static_cast<T>(64 * std::numeric_limits<T>::epsilon() * size);
}

template <class T, int N>
T max_abs_diff(const ta::tensor<T, N>& a, const ta::tensor<T, N>& b) {
  REQUIRE(a.dimensions() == b.dimensions());
  T m = 0;
  for (ta::index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i] - b.data()[i]));
  return m;
}

template <class T, int N>
T max_abs(const ta::tensor<T, N>& a) {
  T m = 0;
  for (ta::index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i]));
  return m;
}

// An adapter with every parameter random, as if trained.
template <class T>
ta::lora<T> trained_lora(ta::index out, ta::index fan_in, ta::index r, std::mt19937_64& gen, bool rslora = false) {
  ta::lora<T> a = ta::make_lora<T>(out, fan_in, {r, 2.5 * double(r), rslora}, gen);
  ta::fill_normal(a.B, 0.0, 0.3, gen);
  return a;
}

// Plain nested loops: y = x·W0ᵀ + b0 + scale·(x·Aᵀ)·Bᵀ in long double.
template <class T>
ta::tensor<T, 2> loop_forward(const ta::lora<T>& a, const ta::tensor<T, 2>& x, const ta::tensor<T, 2>& w0,
                              const ta::tensor<T, 1>* b0) {
  const ta::index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0), r = a.A.dimension(0);
  ta::tensor<T, 2> y(n, out);
  for (ta::index i = 0; i < n; ++i)
    for (ta::index o = 0; o < out; ++o) {
      long double s = b0 ? (*b0)(o) : 0;
      for (ta::index k = 0; k < in; ++k) {
        long double w = w0(o, k);
        for (ta::index j = 0; j < r; ++j) w += static_cast<long double>(a.scale) * a.B(o, j) * a.A(j, k);
        s += w * x(i, k);
      }
      y(i, o) = static_cast<T>(s);
    }
  return y;
}

struct linear_shape {
  ta::index n, in, out, r;
};
const linear_shape linear_shapes[] = {
    {5, 7, 6, 1},  // rank 1
    {4, 7, 6, 6},  // rank = the smaller dimension
    {1, 9, 4, 2},  // batch 1
    {3, 1, 5, 1},  // fan-in 1
    {6, 12, 3, 3},
};

}  // namespace

TEMPLATE_TEST_CASE("make_lora follows PEFT's initialisation and scale", "[lora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(1), same(1);
  const ta::index out = 40, in = 300, r = 6;
  auto a = ta::make_lora<T>(out, in, {r, 12.0}, gen);
  auto b = ta::make_lora<T>(out, in, {r, 12.0}, same);
  CHECK(ta::rank(a) == r);
  CHECK(a.A.dimension(0) == r);
  CHECK(a.A.dimension(1) == in);
  CHECK(a.B.dimension(0) == out);
  CHECK(a.B.dimension(1) == r);
  CHECK(a.scale == T(2));
  CHECK(std::memcmp(a.A.data(), b.A.data(), sizeof(T) * std::size_t(a.A.size())) == 0);
  CHECK(max_abs(a.B) == T(0));
  const double bound = 1.0 / std::sqrt(double(in));
  CHECK(double(max_abs(a.A)) <= bound);
  CHECK(double(max_abs(a.A)) > 0.95 * bound);

  auto rs = ta::make_lora<T>(out, in, {r, 12.0, /*use_rslora=*/true}, gen);
  CHECK(double(rs.scale) == Approx(12.0 / std::sqrt(6.0)));

  auto g = ta::make_lora<T>(out, in, {r, 12.0, false, ta::lora_init::gaussian}, gen);
  double sq = 0;
  for (ta::index i = 0; i < g.A.size(); ++i) sq += double(g.A.data()[i]) * g.A.data()[i];
  CHECK(std::sqrt(sq / double(g.A.size())) == Approx(1.0 / double(r)).epsilon(0.05));
  CHECK(max_abs(g.B) == T(0));

  // A conv weight (O, I, kh, kw) has fan-in I·kh·kw.
  auto c = ta::make_lora<T>(ta::shape<4>{8, 3, 3, 3}, {2, 2.0}, gen);
  CHECK(c.A.dimension(1) == 27);
  CHECK(c.B.dimension(0) == 8);
}

TEMPLATE_TEST_CASE("a new LoRA adapter is an exact no-op", "[lora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(2);
  auto a = ta::make_lora<T>(8, 12, {2, 4.0}, gen);
  CHECK(max_abs(ta::delta_weight(a)) == T(0));
  ta::tensor<T, 2> x(3, 12), w0(8, 12);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(w0, 0, 1, gen);
  ta::lora<T> none = ta::zeros_like(a);
  CHECK(max_abs_diff(ta::forward(a, x, w0), ta::forward(none, x, w0)) == T(0));
}

TEMPLATE_TEST_CASE("linear forward matches nested loops, with and without bias", "[lora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(3);
  for (const auto& s : linear_shapes) {
    auto a = trained_lora<T>(s.out, s.in, s.r, gen);
    ta::tensor<T, 2> x(s.n, s.in), w0(s.out, s.in);
    ta::tensor<T, 1> b0(s.out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    const T tol = tolerance<T>(double(s.in) * 4);
    CHECK(max_abs_diff(ta::forward(a, x, w0, b0), loop_forward(a, x, w0, &b0)) <= tol);
    CHECK(max_abs_diff(ta::forward(a, x, w0), loop_forward<T>(a, x, w0, nullptr)) <= tol);
  }
}

TEST_CASE("linear backward matches central finite differences", "[lora]") {
  std::mt19937_64 gen(4);
  const double h = 1e-6;
  for (const auto& s : linear_shapes) {
    auto a = trained_lora<double>(s.out, s.in, s.r, gen);
    ta::tensor<double, 2> x(s.n, s.in), w0(s.out, s.in), dy(s.n, s.out);
    ta::tensor<double, 1> b0(s.out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    ta::fill_normal(dy, 0, 1, gen);
    // L = Σ dy ⊙ y
    auto loss = [&](const ta::lora<double>& p, const ta::tensor<double, 2>& xx) {
      ta::tensor<double, 0> l = (ta::forward(p, xx, w0, b0) * dy).sum();
      return l();
    };
    ta::lora_gradients<double> g = ta::backward(a, x, w0, dy);
    for_each_parameter(a, g.grad, [&](const char* name, auto& p, const auto& grad) {
      for (ta::index i = 0; i < p.size(); ++i) {
        const double keep = p.data()[i];
        p.data()[i] = keep + h;
        const double up = loss(a, x);
        p.data()[i] = keep - h;
        const double down = loss(a, x);
        p.data()[i] = keep;
        INFO(name << "[" << i << "] shape n=" << s.n << " in=" << s.in << " out=" << s.out << " r=" << s.r);
        CHECK(grad.data()[i] == Approx((up - down) / (2 * h)).margin(1e-6).epsilon(1e-6));
      }
    });
    for (ta::index i = 0; i < x.size(); ++i) {
      ta::tensor<double, 2> xp = x, xm = x;
      xp.data()[i] += h;
      xm.data()[i] -= h;
      CHECK(g.dx.data()[i] == Approx((loss(a, xp) - loss(a, xm)) / (2 * h)).margin(1e-6).epsilon(1e-6));
    }
  }
}

namespace {

// Finite-difference check of delta_weight_vjp for a weight of shape `dims`: L = Σ gW ⊙ ΔW(θ).
template <int N>
void check_vjp_by_finite_differences(const ta::shape<N>& dims, ta::index r, std::mt19937_64& gen) {
  ta::index fan_in = 1;
  for (int d = 1; d < N; ++d) fan_in *= dims[std::size_t(d)];
  auto a = trained_lora<double>(dims[0], fan_in, r, gen);
  ta::tensor<double, N> gw(dims);
  ta::fill_normal(gw, 0, 1, gen);
  auto loss = [&](const ta::lora<double>& p) {
    ta::tensor<double, 0> l = (ta::delta_weight<double, N>(p, dims) * gw).sum();
    return l();
  };
  ta::lora<double> grad = ta::delta_weight_vjp(a, gw);
  const double h = 1e-6;
  for_each_parameter(a, grad, [&](const char* name, auto& p, const auto& g) {
    for (ta::index i = 0; i < p.size(); ++i) {
      const double keep = p.data()[i];
      p.data()[i] = keep + h;
      const double up = loss(a);
      p.data()[i] = keep - h;
      const double down = loss(a);
      p.data()[i] = keep;
      INFO(name << "[" << i << "] weight rank " << N << " r=" << r);
      CHECK(g.data()[i] == Approx((up - down) / (2 * h)).margin(1e-6).epsilon(1e-6));
    }
  });
}

}  // namespace

TEST_CASE("delta_weight_vjp matches central finite differences for every weight rank", "[lora]") {
  std::mt19937_64 gen(5);
  check_vjp_by_finite_differences<2>({6, 5}, 1, gen);
  check_vjp_by_finite_differences<2>({6, 5}, 5, gen);
  check_vjp_by_finite_differences<3>({4, 3, 3}, 2, gen);            // conv1d
  check_vjp_by_finite_differences<4>({5, 2, 3, 3}, 3, gen);         // conv2d
  check_vjp_by_finite_differences<4>({3, 4, 1, 1}, 3, gen);         // 1x1 conv, rank = min
  check_vjp_by_finite_differences<5>({3, 2, 2, 2, 2}, 2, gen);      // conv3d
}

TEMPLATE_TEST_CASE("delta_weight is scale·B·A reshaped, for every weight rank", "[lora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(6);
  const ta::shape<4> dims{7, 3, 2, 3};
  auto a = trained_lora<T>(7, 18, 4, gen);
  ta::tensor<T, 4> dw = ta::delta_weight<T, 4>(a, dims);
  for (ta::index o = 0; o < 7; ++o)
    for (ta::index f = 0; f < 18; ++f) {
      long double s = 0;
      for (ta::index j = 0; j < 4; ++j) s += static_cast<long double>(a.B(o, j)) * a.A(j, f);
      CHECK(double(dw.data()[o * 18 + f]) == Approx(double(a.scale * s)).margin(double(tolerance<T>(8))));
    }
}

TEMPLATE_TEST_CASE("merged forward equals unmerged forward; merge then unmerge restores the weight", "[lora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(7);
  for (const auto& s : linear_shapes) {
    auto a = trained_lora<T>(s.out, s.in, s.r, gen, /*rslora=*/s.r % 2 == 0);
    ta::tensor<T, 2> x(s.n, s.in), w0(s.out, s.in);
    ta::tensor<T, 1> b0(s.out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    ta::tensor<T, 2> merged = w0;
    ta::merge(a, merged);
    const ta::lora<T> none = ta::zeros_like(a);
    CHECK(max_abs_diff(ta::forward(a, x, w0, b0), ta::forward(none, x, merged, b0)) <= tolerance<T>(double(s.in) * 8));
    ta::unmerge(a, merged);
    CHECK(max_abs_diff(merged, w0) <= tolerance<T>(double(s.r) * 4));
  }
  // A conv weight.
  auto c = trained_lora<T>(6, 4 * 3 * 3, 3, gen);
  ta::tensor<T, 4> w(6, 4, 3, 3);
  ta::fill_normal(w, 0, 1, gen);
  ta::tensor<T, 4> m = w;
  ta::merge(c, m);
  ta::tensor<T, 4> expected = w + ta::delta_weight<T, 4>(c, ta::shape_of(w));
  CHECK(max_abs_diff(m, expected) <= tolerance<T>(4));
  ta::unmerge(c, m);
  CHECK(max_abs_diff(m, w) <= tolerance<T>(12));
}

TEMPLATE_TEST_CASE("safe_merge commits finite results and leaves the weight untouched otherwise", "[lora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(8);
  auto a = trained_lora<T>(5, 6, 2, gen);
  ta::tensor<T, 2> w(5, 6);
  ta::fill_normal(w, 0, 1, gen);
  ta::tensor<T, 2> merged = w, expected = w;
  ta::safe_merge(a, merged);
  ta::merge(a, expected);
  CHECK(max_abs_diff(merged, expected) == T(0));

  for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    ta::lora<T> broken = a;
    broken.B(3, 1) = bad;
    ta::tensor<T, 2> target = w;
    CHECK_THROWS_AS(ta::safe_merge(broken, target), ta::argument_error);
    CHECK(std::memcmp(target.data(), w.data(), sizeof(T) * std::size_t(w.size())) == 0);
  }
  // Finite parameters whose product overflows are caught too.
  ta::lora<T> huge = a;
  huge.A.setConstant(std::numeric_limits<T>::max() / 2);
  huge.B.setConstant(T(4));
  ta::tensor<T, 2> target = w;
  CHECK_THROWS_WITH(ta::safe_merge(huge, target), Catch::Contains("non-finite"));
  CHECK(std::memcmp(target.data(), w.data(), sizeof(T) * std::size_t(w.size())) == 0);
}

TEMPLATE_TEST_CASE("parameters are visited under PEFT's names", "[lora]", float, double) {
  std::mt19937_64 gen(9);
  auto a = ta::make_lora<TestType>(10, 20, {3, 6.0}, gen);
  std::vector<std::string> names;
  for_each_parameter(a, [&](const char* name, const auto&) { names.emplace_back(name); });
  CHECK(names == std::vector<std::string>{"lora_A.weight", "lora_B.weight"});
  CHECK(ta::parameter_count(a) == 3 * (10 + 20));
}

TEMPLATE_TEST_CASE("forward and backward make no allocation with a warm workspace", "[lora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(10);
  const ta::index n = 48, in = 96, out = 80, r = 8;
  auto a = trained_lora<T>(out, in, r, gen);
  ta::tensor<T, 2> x(n, in), w0(out, in), y(n, out), dy(n, out), dx(n, in);
  ta::tensor<T, 1> b0(out);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(dy, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::lora_workspace<T> ws;
  ta::lora<T> grad = ta::zeros_like(a);
  ta::backward(a, x, w0, dy, dx, grad, ws);
  // One call sizes the workspace for both (a forward with a bias needs n·(r + 1) of h, (r + 1)·O of u).
  CHECK(ws.h.size() >= std::size_t(n * (r + 1)));
  CHECK(ws.u.size() >= std::size_t((r + 1) * out));
  ta::forward(a, x, w0, b0, y, ws);  // warms the product kernel's buffers for the forward's products
  const ta::tensor<T, 2> dx_first = dx;
  {
    allocation_counter::scope counting;
    ta::forward(a, x, w0, b0, y, ws);
    ta::forward(a, x, w0, y, ws);
    ta::backward(a, x, w0, dy, dx, grad, ws);
    ta::delta_weight_vjp<T, 2>(a, ta::view(w0), grad);
    ta::merge(a, w0);
    ta::unmerge(a, w0);
    CHECK(counting.allocations() == 0);
  }
  CHECK(max_abs_diff(dx, dx_first) == T(0));
  // A forward without a bias right after one with a bias, on the same workspace, gives what a fresh
  // workspace gives (nothing of the bias is left in it).
  ta::forward(a, x, w0, b0, y, ws);
  ta::forward(a, x, w0, y, ws);
  ta::lora_workspace<T> fresh;
  ta::tensor<T, 2> y_fresh(y.dimensions());
  ta::forward(a, x, w0, y_fresh, fresh);
  CHECK(max_abs_diff(y, y_fresh) == T(0));
}

TEMPLATE_TEST_CASE("bad input throws argument_error naming the function and shapes, and writes nothing", "[lora]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(11);
  CHECK_THROWS_AS(ta::make_lora<T>(4, 6, {0, 1.0}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_lora<T>(4, 6, {5, 1.0}, gen), ta::argument_error);  // rank above min(out, fan_in)
  CHECK_THROWS_AS(ta::make_lora<T>(0, 6, {1, 1.0}, gen), ta::argument_error);
  CHECK_THROWS_WITH(ta::make_lora<T>(4, 6, {7, 1.0}, gen), Catch::Contains("make_lora") && Catch::Contains("rank 7"));
  static_assert(std::is_base_of<std::invalid_argument, ta::argument_error>::value, "argument_error is invalid_argument");

  auto a = trained_lora<T>(4, 6, 2, gen);
  ta::tensor<T, 2> x(3, 6), w0(4, 6), y(3, 4), dy(3, 4), dx(3, 6);
  ta::tensor<T, 1> b0(4);
  for (auto* t : {&x, &w0, &y, &dy, &dx}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::tensor<T, 2> y_before = y, dx_before = dx, w_before = w0;
  ta::lora_workspace<T> ws;
  ta::lora<T> grad;

  ta::tensor<T, 2> x_bad(3, 5), w_bad(5, 6), y_bad(3, 5), dx_bad(2, 6);
  ta::tensor<T, 1> b_bad(5);
  CHECK_THROWS_WITH(ta::forward(a, x_bad, w0, b0, y, ws), Catch::Contains("lora forward") && Catch::Contains("(3, 5)"));
  CHECK_THROWS_AS(ta::forward(a, x, w_bad, b0, y, ws), ta::argument_error);
  CHECK_THROWS_WITH(ta::forward(a, x, w0, b_bad, y, ws), Catch::Contains("b0"));
  CHECK_THROWS_WITH(ta::forward(a, x, w0, y_bad, ws), Catch::Contains("y has shape (3, 5)"));
  CHECK_THROWS_AS(ta::backward(a, x, w0, y_bad, dx, grad, ws), ta::argument_error);
  CHECK_THROWS_WITH(ta::backward(a, x, w0, dy, dx_bad, grad, ws), Catch::Contains("dx"));
  CHECK(max_abs_diff(y, y_before) == T(0));
  CHECK(max_abs_diff(dx, dx_before) == T(0));

  // Weight space: a weight or gradient that does not fit, and an adapter whose A and B disagree.
  ta::tensor<T, 4> conv_bad(4, 2, 2, 2);  // fan-in 8, adapter has 6
  CHECK_THROWS_WITH(ta::merge(a, conv_bad), Catch::Contains("lora merge") && Catch::Contains("(4, 2, 2, 2)"));
  CHECK_THROWS_AS(ta::unmerge(a, conv_bad), ta::argument_error);
  CHECK_THROWS_AS(ta::safe_merge(a, conv_bad), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight_vjp(a, conv_bad), ta::argument_error);
  const ta::shape<4> bad_dims{4, 2, 2, 2};
  CHECK_THROWS_AS((ta::delta_weight<T, 4>(a, bad_dims)), ta::argument_error);
  // Extents whose product is the fan-in but which are not a weight's: negative, zero, overflowing.
  CHECK_THROWS_WITH((ta::delta_weight<T, 3>(a, ta::shape<3>{4, -2, -3})),
                    Catch::Contains("lora delta_weight") && Catch::Contains("(4, -2, -3)"));
  CHECK_THROWS_AS((ta::delta_weight<T, 3>(a, ta::shape<3>{4, 0, 6})), ta::argument_error);
  CHECK_THROWS_AS((ta::delta_weight<T, 3>(a, ta::shape<3>{4, ta::index(1) << 62, 4})), ta::argument_error);
  CHECK_THROWS_AS((ta::delta_weight<T, 2>(a, ta::shape<2>{5, 6})), ta::argument_error);
  CHECK((ta::delta_weight<T, 3>(a, ta::shape<3>{4, 2, 3})).dimensions() == ta::shape<3>{4, 2, 3});
  // The right fan-in with another number of output rows (w_bad is (5, 6), the adapter's B has 4 rows).
  CHECK_THROWS_WITH(ta::merge(a, w_bad), Catch::Contains("lora merge") && Catch::Contains("needs (4, …)"));
  CHECK_THROWS_AS(ta::unmerge(a, w_bad), ta::argument_error);
  CHECK_THROWS_AS(ta::safe_merge(a, w_bad), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight_vjp(a, w_bad), ta::argument_error);
  CHECK_THROWS_WITH(ta::forward(a, x, w_bad, y_bad, ws), Catch::Contains("needs (4, …)"));
  ta::lora<T> mismatched = a;
  mismatched.B.resize(4, 3);
  CHECK_THROWS_WITH(ta::merge(mismatched, w0), Catch::Contains("disagree on the rank"));
  CHECK(max_abs_diff(w0, w_before) == T(0));
  // A rank above min(out, fan_in) (which make_lora refuses) is refused by every operation as well.
  ta::lora<T> too_wide;
  too_wide.A.resize(5, 6);
  too_wide.B.resize(4, 5);
  too_wide.A.setConstant(T(0.5));
  too_wide.B.setConstant(T(0.25));
  CHECK_THROWS_WITH(ta::merge(too_wide, w0), Catch::Contains("lora merge") && Catch::Contains("rank 5") &&
                                                 Catch::Contains("min(out, fan_in) = 4"));
  CHECK_THROWS_AS(ta::unmerge(too_wide, w0), ta::argument_error);
  CHECK_THROWS_AS(ta::safe_merge(too_wide, w0), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight(too_wide), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight_vjp(too_wide, w0), ta::argument_error);
  CHECK_THROWS_AS(ta::forward(too_wide, x, w0, b0, y, ws), ta::argument_error);
  CHECK_THROWS_AS(ta::backward(too_wide, x, w0, dy, dx, grad, ws), ta::argument_error);
  CHECK(max_abs_diff(w0, w_before) == T(0));
  CHECK(max_abs_diff(y, y_before) == T(0));
  CHECK(max_abs_diff(dx, dx_before) == T(0));
  ta::lora<T> empty;
  CHECK_THROWS_AS(ta::delta_weight(empty), ta::argument_error);
}

// ---------------------------------------------------------------------------------------------------
// Numerical edge cases

namespace {

template <class T, int N>
bool same_bits(const ta::tensor<T, N>& a, const ta::tensor<T, N>& b) {
  return a.dimensions() == b.dimensions() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

// A rank-r adapter with every entry of B equal to b and of A equal to s, scale `scale`: ΔW = scale·r·b·s.
template <class T>
ta::lora<T> constant_lora(ta::index out, ta::index fan_in, ta::index r, T b, T s, T scale) {
  ta::lora<T> a;
  a.A.resize(r, fan_in);
  a.B.resize(out, r);
  a.A.setConstant(s);
  a.B.setConstant(b);
  a.scale = scale;
  return a;
}

}  // namespace

TEMPLATE_TEST_CASE("zero-rank and empty adapters and weights are rejected everywhere", "[lora][edge]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(12);
  // Constructors: an empty weight, a zero or negative rank, in both forms.
  CHECK_THROWS_WITH(ta::make_lora<T>(4, 0, {1, 1.0}, gen), Catch::Contains("make_lora") && Catch::Contains("(4, 0)"));
  CHECK_THROWS_AS(ta::make_lora<T>(-3, 6, {1, 1.0}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_lora<T>(4, 6, {-2, 1.0}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_lora<T>(ta::shape<4>{4, 0, 3, 3}, {1, 1.0}, gen), ta::argument_error);
  // Extents whose product would be a fan-in but which are not a weight's: negative, overflowing.
  CHECK_THROWS_WITH(ta::make_lora<T>(ta::shape<3>{4, -3, -3}, {2, 1.0}, gen),
                    Catch::Contains("make_lora") && Catch::Contains("(4, -3, -3)"));
  CHECK_THROWS_AS(ta::make_lora<T>(ta::shape<3>{4, ta::index(1) << 32, (ta::index(1) << 32) + 1}, {2, 1.0}, gen),
                  ta::argument_error);
  CHECK_THROWS_AS(ta::make_lora<T>(ta::shape<2>{0, 6}, {1, 1.0}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_lora<T>(ta::shape<3>{4, 6, 1}, {0, 1.0}, gen), ta::argument_error);

  // Adapters with an empty tensor: rank 0, fan-in 0, no output rows.
  auto good = trained_lora<T>(4, 6, 2, gen);
  ta::lora<T> rank0 = good, fan0 = good, out0 = good;
  rank0.A.resize(0, 6);
  rank0.B.resize(4, 0);
  fan0.A.resize(2, 0);
  out0.B.resize(0, 2);
  ta::tensor<T, 2> x(3, 6), w0(4, 6), y(3, 4), dy(3, 4), dx(3, 6);
  ta::tensor<T, 1> b0(4);
  for (auto* t : {&x, &w0, &y, &dy, &dx}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::tensor<T, 2> w_before = w0, y_before = y, dx_before = dx;
  ta::lora_workspace<T> ws;
  for (const ta::lora<T>* bad : {&rank0, &fan0, &out0}) {
    INFO("A " << bad->A.dimension(0) << "x" << bad->A.dimension(1) << ", B " << bad->B.dimension(0) << "x"
              << bad->B.dimension(1));
    ta::lora<T> grad = good;
    const ta::lora<T> grad_before = grad;
    CHECK_THROWS_WITH(ta::merge(*bad, w0), Catch::Contains("lora merge") && Catch::Contains("empty"));
    CHECK_THROWS_AS(ta::unmerge(*bad, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::safe_merge(*bad, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight(*bad), ta::argument_error);
    CHECK_THROWS_AS((ta::delta_weight<T, 2>(*bad, ta::shape<2>{4, 6})), ta::argument_error);
    CHECK_THROWS_AS((ta::delta_weight<T, 2>(*bad, ta::writable_view(dx))), ta::argument_error);
    CHECK_THROWS_AS((ta::delta_weight_vjp<T, 2>(*bad, ta::view(w0), grad)), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, x, w0, b0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, x, w0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, x, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(*bad, x, w0, dy, dx, grad, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(*bad, x, w0, dy), ta::argument_error);
    CHECK(same_bits(grad.A, grad_before.A));
    CHECK(same_bits(grad.B, grad_before.B));
  }
  // Weights with an empty mode never fit an adapter (its fan-in is at least 1).
  ta::tensor<T, 3> empty_mode(4, 6, 0);
  CHECK_THROWS_WITH(ta::merge(good, empty_mode), Catch::Contains("(4, 6, 0)"));
  CHECK_THROWS_AS(ta::safe_merge(good, empty_mode), ta::argument_error);
  CHECK_THROWS_AS((ta::delta_weight<T, 3>(good, ta::shape<3>{4, 0, 6})), ta::argument_error);
  CHECK(same_bits(w0, w_before));
  CHECK(same_bits(y, y_before));
  CHECK(same_bits(dx, dx_before));
  CHECK(ws.h.empty());

  // An empty batch is not an empty adapter or weight: it gives an empty output and exactly zero
  // gradients, as the sums over zero rows are.
  ta::tensor<T, 2> x0(0, 6), y0(0, 4), dy0(0, 4), dx0(0, 6);
  ta::forward(good, x0, w0, b0, y0, ws);
  ta::lora<T> g0;
  ta::backward(good, x0, w0, dy0, dx0, g0, ws);
  CHECK(max_abs(g0.A) == T(0));
  CHECK(max_abs(g0.B) == T(0));
  CHECK(g0.A.dimensions() == good.A.dimensions());
}

TEMPLATE_TEST_CASE("NaN or Inf anywhere in the adapter or the weight is caught by safe_merge", "[lora][edge]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(13);
  const auto a = trained_lora<T>(5, 6, 2, gen);
  ta::tensor<T, 2> w(5, 6);
  ta::fill_normal(w, 0, 1, gen);
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (T bad : {nan, inf, -inf}) {
    ta::lora<T> in_a = a, in_scale = a;
    in_a.A(1, 4) = bad;
    in_scale.scale = bad;
    ta::tensor<T, 2> bad_w = w;
    bad_w(2, 2) = bad;
    for (const ta::lora<T>* p : {&in_a, &in_scale}) {
      ta::tensor<T, 2> target = w;
      CHECK_THROWS_WITH(ta::safe_merge(*p, target), Catch::Contains("lora safe_merge") && Catch::Contains("non-finite"));
      CHECK(same_bits(target, w));
    }
    ta::tensor<T, 2> target = bad_w;
    CHECK_THROWS_AS(ta::safe_merge(a, target), ta::argument_error);
    CHECK(same_bits(target, bad_w));
  }
}

TEMPLATE_TEST_CASE("a scale of 0 still multiplies: NaN or Inf in the factors gives NaN, merged as unmerged",
                   "[lora][edge]", float, double) {
  using T = TestType;
  using zero_scale::plus_zero_times;
  using zero_scale::same_or_both_nan;
  std::mt19937_64 gen(17);
  // 40 rows and 20 columns take the packed kernel; 40 × 3 (a narrow product) the dot-product kernels.
  for (const ta::index fan_in : {ta::index(20), ta::index(3)}) {
    ta::lora<T> one = trained_lora<T>(40, fan_in, 2, gen);
    one.scale = T(1);
    one.B(1, 0) = std::numeric_limits<T>::quiet_NaN();
    one.A(1, 2) = std::numeric_limits<T>::infinity();
    ta::lora<T> off = one;
    off.scale = T(0);
    ta::tensor<T, 2> w(40, fan_in), x(5, fan_in), gw(40, fan_in), none(40, fan_in);
    ta::fill_normal(w, 0, 1, gen);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(gw, 0, 1, gen);
    none.setZero();
    INFO("fan-in " << fan_in);

    const ta::tensor<T, 2> dw = ta::delta_weight(off);
    CHECK(zero_scale::has_nan(dw));
    CHECK(same_or_both_nan(dw, plus_zero_times(none, ta::delta_weight(one))));
    ta::tensor<T, 2> merged = w;
    ta::merge(off, merged);
    CHECK(same_or_both_nan(merged, plus_zero_times(w, ta::delta_weight(one))));
    ta::tensor<T, 2> unmerged = w;
    ta::unmerge(off, unmerged);
    CHECK(same_or_both_nan(unmerged, merged));
    ta::tensor<T, 2> target = w;
    CHECK_THROWS_WITH(ta::safe_merge(off, target), Catch::Contains("non-finite"));
    // The merged weight's forward has NaN where the adapter's forward has.
    const ta::lora<T> zero = ta::zeros_like(off);
    const ta::tensor<T, 2> y = ta::forward(off, x, w), y_merged = ta::forward(zero, x, merged);
    for (ta::index e = 0; e < y.size(); ++e) CHECK(std::isnan(y.data()[e]) == std::isnan(y_merged.data()[e]));

    ta::lora<T> g_off, g_one;
    ta::delta_weight_vjp<T, 2>(off, ta::view(gw), g_off);
    ta::delta_weight_vjp<T, 2>(one, ta::view(gw), g_one);
    CHECK(zero_scale::has_nan(g_off.A));
    CHECK(same_or_both_nan(g_off.A, plus_zero_times(ta::zeros_like(g_one).A, g_one.A)));
    CHECK(same_or_both_nan(g_off.B, plus_zero_times(ta::zeros_like(g_one).B, g_one.B)));
  }
}

TEMPLATE_TEST_CASE("merges near the largest and the subnormal values of T", "[lora][edge]", float, double) {
  using T = TestType;
  using limits = std::numeric_limits<T>;
  const T max = limits::max();
  SECTION("results near max are exact and finite: no spurious overflow") {
    // ΔW = 2 · (max/8 · 1) = max/4 exactly; max/2 + max/4 and −max + max/4 round once.
    const auto a = constant_lora<T>(3, 4, 1, max / 8, T(1), T(2));
    ta::tensor<T, 2> w(3, 4);
    w.setConstant(max / 2);
    w(1, 2) = -max;
    const ta::tensor<T, 2> w0 = w;
    ta::safe_merge(a, w);
    for (ta::index i = 0; i < w.size(); ++i) {
      const T expected = w0.data()[i] + max / 4;
      CHECK(w.data()[i] == expected);
      CHECK(std::isfinite(w.data()[i]));
    }
    ta::unmerge(a, w);
    CHECK(w(1, 2) == (-max + max / 4) - max / 4);  // each step rounds once, in range
    CHECK(w(0, 0) == (max / 2 + max / 4) - max / 4);
  }
  SECTION("a sum beyond max: merge gives Inf, safe_merge throws and writes nothing") {
    const auto a = constant_lora<T>(3, 4, 1, max / 8, T(1), T(4));  // ΔW = max/2
    ta::tensor<T, 2> w(3, 4);
    w.setConstant(T(1));
    w(2, 1) = max * T(0.75);
    w(0, 3) = -max;
    const ta::tensor<T, 2> w0 = w;
    CHECK_THROWS_WITH(ta::safe_merge(a, w), Catch::Contains("non-finite"));
    CHECK(same_bits(w, w0));
    ta::merge(a, w);
    CHECK(std::isinf(w(2, 1)));
    CHECK(w(2, 1) > 0);
    CHECK(w(0, 3) == -max + max / 2);
    CHECK(w(0, 0) == T(1) + max / 2);
  }
  SECTION("ΔW itself beyond max: Inf, or NaN where infinities of both signs meet") {
    ta::lora<T> a = constant_lora<T>(2, 3, 2, max, T(4), T(1));
    a.A(1, 2) = T(-4);  // column 2: max·4 + max·(−4), Inf − Inf unless a fused multiply-add meets it
    ta::tensor<T, 2> w(2, 3);
    w.setConstant(T(1));
    const ta::tensor<T, 2> w0 = w;
    CHECK_THROWS_AS(ta::safe_merge(a, w), ta::argument_error);
    CHECK(same_bits(w, w0));
    ta::merge(a, w);
    CHECK(std::isinf(w(0, 0)));
    CHECK_FALSE(std::isfinite(w(1, 2)));
    // scale · (B · A), as PEFT orders it: B · A overflows although scale · B · A would be 2^k.
    const int k = limits::max_exponent - 28;
    const auto b = constant_lora<T>(2, 3, 1, std::ldexp(T(1), k), std::ldexp(T(1), k), std::ldexp(T(1), -k));
    ta::tensor<T, 2> v(2, 3);
    v.setZero();
    CHECK_THROWS_AS(ta::safe_merge(b, v), ta::argument_error);
    ta::merge(b, v);
    CHECK(std::isinf(v(0, 0)));
  }
  SECTION("scale · (B · A) beyond max but w + ΔW in range: finite where the build fuses the two steps") {
    // B · A = max/2, scale 4: scale · (B · A) = 2·max alone, w + ΔW = −max + 2·max = max. Through the
    // narrow kernel (8 × 3), the packed kernel's edge tiles (3 × 3, 3 × 5) and its micro-kernel (3 × 40).
    const std::pair<ta::index, ta::index> shapes[] = {{8, 3}, {3, 3}, {3, 5}, {3, 40}};
    for (const auto& [out, fan_in] : shapes) {
      INFO(out << " x " << fan_in);
      const auto a = constant_lora<T>(out, fan_in, 1, max / 2, T(1), T(4));
      ta::tensor<T, 2> w(out, fan_in);
      w.setConstant(-max);
      ta::tensor<T, 2> safe = w;
      ta::merge(a, w);
      if (ta::detail::simd<T, ta::detail::native_isa>::fused) {
        for (ta::index i = 0; i < w.size(); ++i) CHECK(w.data()[i] == max);
        ta::safe_merge(a, safe);
        CHECK(same_bits(safe, w));
      } else {  // rounded apart on some paths: merge and safe_merge still agree
        bool finite = true;
        for (ta::index i = 0; i < w.size(); ++i) finite = finite && std::isfinite(w.data()[i]);
        if (finite) CHECK_NOTHROW(ta::safe_merge(a, safe));
        else CHECK_THROWS_AS(ta::safe_merge(a, safe), ta::argument_error);
      }
    }
  }
  SECTION("subnormal values: exact results, no flush to zero") {
    const T tiny = limits::denorm_min();
    const int e = limits::min_exponent - limits::digits + 4;  // 2^e = 16 · tiny
    // ΔW = 2 · 2^(e/2) · 2^(e − e/2) = 32 · tiny in every element (rank 2, scale 1).
    const auto a = constant_lora<T>(3, 5, 2, std::ldexp(T(1), e / 2), std::ldexp(T(1), e - e / 2), T(1));
    ta::tensor<T, 2> w(3, 5);
    w.setConstant(3 * tiny);
    w(1, 1) = -40 * tiny;
    w(2, 4) = limits::min();  // the smallest normal: min + 32 tiny is exact
    const ta::tensor<T, 2> w0 = w;
    ta::safe_merge(a, w);
    CHECK(w(0, 0) == 35 * tiny);
    CHECK(w(1, 1) == -8 * tiny);
    CHECK(w(2, 4) == limits::min() + 32 * tiny);
    const ta::tensor<T, 2> dw = ta::delta_weight(a);
    CHECK(dw(0, 0) == 32 * tiny);
    ta::unmerge(a, w);
    CHECK(same_bits(w, w0));  // every step exact
    // A scale below 1 keeps the subnormal result: 0.25 · 32 tiny = 8 tiny.
    const auto q = constant_lora<T>(3, 5, 2, std::ldexp(T(1), e / 2), std::ldexp(T(1), e - e / 2), T(0.25));
    ta::tensor<T, 2> z(3, 5);
    z.setZero();
    ta::merge(q, z);
    CHECK(z(1, 3) == 8 * tiny);
    // ΔW below the smallest subnormal rounds to zero (and safe_merge accepts it).
    const auto u = constant_lora<T>(3, 5, 1, tiny, T(0.25), T(1));
    z.setZero();
    ta::safe_merge(u, z);
    CHECK(max_abs(z) == T(0));
  }
}
