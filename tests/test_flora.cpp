// FLoRA invariants: the official init, ΔW ≡ the defining sum (N = 2 … 5), delta_weight_vjp and the
// linear backward ≡ finite differences (double; ranks 1, full and mixed), merged forward ≡ unmerged
// forward, merge/unmerge round trip, safe_merge atomicity, the official checkpoint conversion,
// parameter visiting and every bad-input path. PyTorch references are compared in
// test_flora_pytorch.cpp, and the allocation-free hot paths in test_flora_allocation.cpp.
#include <tensor_adapters/flora.hpp>

#include "flora_test_support.hpp"
#include "zero_scale.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ta = tensor_adapters;

using namespace flora_test;

namespace {

// ΔW by the defining sum, ΔW[i] = scale · Σ_a G[a] · Π_n U_n[i_n, a_n], in double.
template <class T, int N>
ta::tensor<double, N> naive_delta(const ta::flora<T, N>& a) {
  const ta::shape<N> ws = ta::weight_shape(a), rs = ta::ranks(a);
  ta::tensor<double, N> dw(ws);
  std::array<ta::index, N> i{}, r{};
  for (ta::index fi = 0; fi < dw.size(); ++fi) {
    ta::index rem = fi;
    for (int n = N - 1; n >= 0; --n) i[n] = rem % ws[n], rem /= ws[n];
    double sum = 0;
    for (ta::index fr = 0; fr < a.G.size(); ++fr) {
      ta::index rr = fr;
      for (int n = N - 1; n >= 0; --n) r[n] = rr % rs[n], rr /= rs[n];
      double term = static_cast<double>(a.G.data()[fr]);
      for (int n = 0; n < N; ++n) term *= static_cast<double>(a.U[n](i[n], r[n]));
      sum += term;
    }
    dw.data()[fi] = static_cast<double>(a.scale) * sum;
  }
  return dw;
}

template <class T, class Tensor>
bool bit_identical(const Tensor& a, const Tensor& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Construction, names, counts

TEMPLATE_TEST_CASE("a new FLoRA adapter has the official init and is a no-op", "[flora]", float, double) {
  std::mt19937_64 gen(3), same(3);
  const ta::shape<4> w{64, 48, 3, 3}, r{16, 12, 2, 3};
  auto a = ta::make_flora<TestType, 4>(w, r, 4.0, gen);
  auto b = ta::make_flora<TestType, 4>(w, r, 4.0, same);
  CHECK(ta::ranks(a) == r);
  CHECK(ta::weight_shape(a) == w);
  CHECK(a.scale == TestType(4));
  for (ta::index i = 0; i < a.G.size(); ++i) REQUIRE(a.G.data()[i] == TestType(0));
  for (std::size_t n = 0; n < 4; ++n) {
    CHECK(a.U[n].dimension(0) == w[n]);
    CHECK(a.U[n].dimension(1) == r[n]);
    CHECK(bit_identical<TestType>(a.U[n], b.U[n]));
  }
  // ΔW of a zero core is exactly zero, whatever the factors.
  ta::tensor<TestType, 4> dw = ta::delta_weight(a);
  for (ta::index i = 0; i < dw.size(); ++i) REQUIRE(dw.data()[i] == TestType(0));
  // Merging a zero ΔW leaves the weight bit-identical.
  ta::tensor<TestType, 4> w0 = random_tensor<TestType, 4>(w, 5), w1 = w0;
  ta::merge(a, w1);
  CHECK(bit_identical<TestType>(w0, w1));
}

TEST_CASE("make_flora and flora_parameter_count deduce N from shape<N> arguments", "[flora]") {
  const ta::tensor<float, 4> w0(8, 6, 3, 3);
  std::mt19937_64 gen(4), same(4), again(4);
  auto a = ta::make_flora<float>(ta::shape_of(w0), ta::shape<4>{2, 2, 2, 2}, 1.0, gen);
  static_assert(std::is_same<decltype(a), ta::flora<float, 4>>::value, "N = 4 deduced");
  const auto b = ta::make_flora<float, 4>(ta::shape_of(w0), {2, 2, 2, 2}, 1.0, same);  // N named, as before
  const auto c = ta::make_flora<float>(ta::shape_of(w0), {2, 2, 2, 2}, 1.0, again);   // N from the first argument
  CHECK(ta::weight_shape(a) == ta::shape_of(w0));
  CHECK(ta::ranks(a) == ta::shape<4>{2, 2, 2, 2});
  ta::for_each_parameter(a, b, [](const char*, auto& p, const auto& q) { CHECK(bit_identical<float>(p, q)); });
  ta::for_each_parameter(a, c, [](const char*, auto& p, const auto& q) { CHECK(bit_identical<float>(p, q)); });
  const auto d = ta::make_flora<double>(ta::shape<2>{5, 4}, ta::shape<2>{2, 3}, 2.0, gen);
  static_assert(std::is_same<decltype(d), const ta::flora<double, 2>>::value, "N = 2 deduced");
  CHECK(d.scale == 2.0);
  CHECK_THROWS_WITH(ta::make_flora<float>(ta::shape<2>{8, 6}, ta::shape<2>{2, 7}, 1.0, gen),
                    Catch::Contains("make_flora"));

  CHECK(ta::flora_parameter_count(ta::shape_of(w0), ta::shape<4>{2, 2, 2, 2}) == ta::parameter_count(a));
  CHECK(ta::flora_parameter_count(ta::weight_shape(d), ta::ranks(d)) == ta::parameter_count(d));
  CHECK(ta::flora_parameter_count(ta::shape_of(w0), {2, 2, 2, 2}) ==
        ta::flora_parameter_count<4>({8, 6, 3, 3}, {2, 2, 2, 2}));
  CHECK_THROWS_AS(ta::flora_parameter_count(ta::shape<2>{4, 5}, ta::shape<2>{5, 1}), ta::argument_error);
}

TEST_CASE("FLoRA factors are normal with variance 1/(2 r_n)", "[flora]") {
  std::mt19937_64 gen(17);
  auto a = ta::make_flora<double, 2>({4000, 3000}, {5, 40}, 1.0, gen);
  for (std::size_t n = 0; n < 2; ++n) {
    const ta::tensor<double, 2>& u = a.U[n];
    double sum = 0, sq = 0;
    for (ta::index i = 0; i < u.size(); ++i) sum += u.data()[i], sq += u.data()[i] * u.data()[i];
    const double mean = sum / double(u.size()), var = sq / double(u.size()) - mean * mean;
    const double expected = 1.0 / (2.0 * double(u.dimension(1)));
    CHECK(std::abs(mean) < 5.0 * std::sqrt(expected / double(u.size())));
    CHECK(var == Approx(expected).epsilon(0.02));
  }
}

TEST_CASE("FLoRA visits its parameters under stable names and counts them", "[flora]") {
  std::mt19937_64 gen(1);
  auto a = ta::make_flora<float, 5>({8, 6, 3, 2, 3}, {3, 2, 2, 1, 3}, 0.5, gen);
  std::vector<std::string> names;
  std::vector<ta::index> sizes;
  ta::for_each_parameter(a, [&](const char* name, const auto& p) {
    names.emplace_back(name);
    sizes.push_back(p.size());
  });
  CHECK(names == std::vector<std::string>{"flora_G", "flora_U0", "flora_U1", "flora_U2", "flora_U3", "flora_U4"});
  CHECK(sizes == std::vector<ta::index>{3 * 2 * 2 * 1 * 3, 8 * 3, 6 * 2, 3 * 2, 2 * 1, 3 * 3});
  const ta::index expected = 36 + 24 + 12 + 6 + 2 + 9;
  CHECK(ta::parameter_count(a) == expected);
  CHECK(ta::flora_parameter_count<5>({8, 6, 3, 2, 3}, {3, 2, 2, 1, 3}) == expected);
  CHECK(ta::flora_parameter_count<4>({256, 256, 3, 3}, {16, 16, 2, 2}) == 16 * 16 * 2 * 2 + 2 * 256 * 16 + 2 * 3 * 2);
  CHECK_THROWS_AS(ta::flora_parameter_count<2>({4, 0}, {1, 1}), ta::argument_error);
  CHECK_THROWS_AS(ta::flora_parameter_count<2>({4, 5}, {5, 1}), ta::argument_error);
  // A weight of 2^40 elements whose mode-0 term I0 · r0 = 2^80 would overflow.
  CHECK_THROWS_WITH(ta::flora_parameter_count<2>({ta::index(1) << 40, 1}, {ta::index(1) << 40, 1}),
                    Catch::Contains("more than an index can count"));

  auto z = ta::zeros_like(a);
  int visited = 0;
  ta::for_each_parameter(a, z, [&](const char* name, auto& p, const auto& g) {
    CHECK(p.dimensions() == g.dimensions());
    CHECK(std::string(name) == names[static_cast<std::size_t>(visited++)]);
  });
  CHECK(visited == 6);
}

// ---------------------------------------------------------------------------------------------------
// Weight space

TEMPLATE_TEST_CASE("FLoRA N = 2 is scale · U0 · G · U1ᵀ", "[flora]", float, double) {
  using T = TestType;
  for (const ta::shape<2>& r : {ta::shape<2>{1, 1}, ta::shape<2>{3, 5}, ta::shape<2>{9, 7}}) {
    auto a = random_flora<T, 2>({9, 7}, r, 1.75, 11);
    ta::tensor<T, 2> dw = ta::delta_weight(a);
    ta::tensor<double, 2> expected(9, 7);
    for (ta::index i = 0; i < 9; ++i)
      for (ta::index j = 0; j < 7; ++j) {
        double s = 0;
        for (ta::index p = 0; p < r[0]; ++p)
          for (ta::index q = 0; q < r[1]; ++q) s += double(a.U[0](i, p)) * double(a.G(p, q)) * double(a.U[1](j, q));
        expected(i, j) = 1.75 * s;
      }
    CHECK(relative_error(dw, expected) < tolerance<T>(double(r[0] * r[1])));
  }
}

TEMPLATE_TEST_CASE("FLoRA delta_weight equals the defining sum for N = 3, 4, 5", "[flora]", float, double) {
  using T = TestType;
  {
    auto a = random_flora<T, 3>({7, 5, 4}, {3, 5, 2}, 3.0, 21);
    CHECK(relative_error(ta::delta_weight(a), naive_delta(a)) < tolerance<T>(30));
  }
  {
    auto a = random_flora<T, 4>({12, 8, 3, 3}, {4, 2, 2, 3}, 4.0, 22);
    CHECK(relative_error(ta::delta_weight(a), naive_delta(a)) < tolerance<T>(48));
    // The output-view form writes the same values over whatever the view held.
    ta::tensor<T, 4> dw(12, 8, 3, 3);
    dw.setConstant(std::numeric_limits<T>::quiet_NaN());
    ta::delta_weight(a, dw);
    CHECK(relative_error(dw, naive_delta(a)) < tolerance<T>(48));
  }
  {
    auto a = random_flora<T, 5>({6, 5, 3, 2, 3}, {2, 5, 1, 2, 2}, 0.5, 23);
    CHECK(relative_error(ta::delta_weight(a), naive_delta(a)) < tolerance<T>(40));
  }
}

namespace {

// L(θ) = Σ ΔW(θ) · gW. Each parameter enters ΔW linearly, so central differences are exact up to
// rounding; every entry of every parameter is checked.
template <int N>
void check_vjp_by_finite_differences(const ta::shape<N>& weight, const ta::shape<N>& ranks, std::uint64_t seed,
                                     ta::detail::flora_plan plan) {
  INFO("weight " << ta::detail::dims_string(weight, N) << " ranks " << ta::detail::dims_string(ranks, N)
                 << " plan " << static_cast<int>(plan));
  auto a = random_flora<double, N>(weight, ranks, 1.5, seed);
  const ta::tensor<double, N> gw = random_tensor<double, N>(weight, seed + 1);
  ta::flora<double, N> grad;
  ta::flora_weight_workspace<double, N> ws;
  ta::detail::vjp<double, N>(a, ta::view(gw), grad, ws, plan);
  CHECK(grad.scale == a.scale);

  auto loss = [&](const ta::flora<double, N>& p) {
    const ta::tensor<double, N> dw = ta::delta_weight(p);
    double l = 0;
    for (ta::index i = 0; i < dw.size(); ++i) l += dw.data()[i] * gw.data()[i];
    return l;
  };
  const double h = 1e-3;
  double worst = 0, largest = 0;
  ta::flora<double, N> p = a;
  ta::for_each_parameter(p, grad, [&](const char*, auto& param, const auto& g) {
    for (ta::index i = 0; i < param.size(); ++i) {
      const double keep = param.data()[i];
      param.data()[i] = keep + h;
      const double up = loss(p);
      param.data()[i] = keep - h;
      const double down = loss(p);
      param.data()[i] = keep;
      const double fd = (up - down) / (2 * h);
      worst = std::max(worst, std::abs(fd - g.data()[i]));
      largest = std::max(largest, std::abs(fd));
    }
  });
  CHECK(largest > 0);
  CHECK(worst <= 1e-9 * (1.0 + largest));
}

}  // namespace

namespace {

template <int N>
void check_vjp_all_plans(const ta::shape<N>& weight, const ta::shape<N>& ranks, std::uint64_t seed) {
  for (auto plan : {ta::detail::flora_plan::automatic, ta::detail::flora_plan::chain, ta::detail::flora_plan::channel})
    check_vjp_by_finite_differences<N>(weight, ranks, seed, plan);
}

}  // namespace

TEST_CASE("FLoRA delta_weight_vjp matches finite differences", "[flora][fd]") {
  constexpr ta::index double_width = ta::detail::simd<double, ta::detail::native_isa>::width;
  SECTION("N = 2") {
    check_vjp_all_plans<2>({7, 5}, {1, 1}, 31);
    check_vjp_all_plans<2>({7, 5}, {7, 5}, 32);
    check_vjp_all_plans<2>({7, 5}, {3, 2}, 33);
    check_vjp_all_plans<2>({double_width + 2, 7}, {double_width, 3}, 133);  // r0 = the register width
  }
  SECTION("N = 3") {
    check_vjp_all_plans<3>({5, 4, 3}, {1, 1, 1}, 34);
    check_vjp_all_plans<3>({5, 4, 3}, {5, 4, 3}, 35);
    check_vjp_all_plans<3>({5, 4, 3}, {2, 4, 1}, 36);
  }
  SECTION("N = 4") {
    check_vjp_all_plans<4>({6, 4, 3, 3}, {1, 1, 1, 1}, 37);
    check_vjp_all_plans<4>({6, 4, 3, 3}, {6, 4, 3, 3}, 38);
    check_vjp_all_plans<4>({6, 4, 3, 3}, {3, 2, 2, 1}, 39);
    check_vjp_all_plans<4>({10, 30, 3, 3}, {3, 4, 2, 2}, 139);  // gW read in two blocks of columns
    // r0 and r1 the register width: grad.U0 and Y, then grad.U1 and Zs, each pair in one pass over its
    // operand (thin_pair_product), gW in two blocks of columns; either one alone.
    check_vjp_all_plans<4>({double_width + 3, 30, 3, 3}, {double_width, double_width, 2, 1}, 140);
    check_vjp_all_plans<4>({double_width + 3, 30, 3, 3}, {double_width, 3, 2, 1}, 141);
    check_vjp_all_plans<4>({10, double_width + 1, 3, 3}, {3, double_width, 2, 2}, 142);
    // Rows of two registers: r0 = r1 = twice the register width.
    constexpr ta::index two = 2 * double_width;
    check_vjp_all_plans<4>({two + 2, two + 1, 3, 1}, {two, two, 2, 1}, 143);
  }
  SECTION("N = 5") {
    check_vjp_all_plans<5>({4, 3, 3, 2, 3}, {1, 1, 1, 1, 1}, 40);
    check_vjp_all_plans<5>({4, 3, 3, 2, 3}, {4, 3, 3, 2, 3}, 41);
    check_vjp_all_plans<5>({4, 3, 3, 2, 3}, {2, 3, 1, 2, 2}, 42);
  }
}

namespace {

// Both plans, and the automatic choice, give the same ΔW, merge and gradient.
template <class T, int N>
void check_plans_agree(const ta::shape<N>& weight, const ta::shape<N>& ranks, std::uint64_t seed) {
  INFO("weight " << ta::detail::dims_string(weight, N) << " ranks " << ta::detail::dims_string(ranks, N));
  using ta::detail::flora_plan;
  const auto a = random_flora<T, N>(weight, ranks, 2.0, seed);
  const auto gw = random_tensor<T, N>(weight, seed + 1);
  const auto naive = naive_delta(a);
  const double k = double(a.G.size()) + double(ta::detail::product(weight));
  ta::flora_weight_workspace<T, N> ws;
  ta::flora<T, N> chain_grad;
  ta::detail::vjp<T, N>(a, ta::view(gw), chain_grad, ws, flora_plan::chain);
  for (auto plan : {flora_plan::automatic, flora_plan::chain, flora_plan::channel}) {
    ta::tensor<T, N> dw(weight);
    ta::detail::expand<T, N>(a, a.scale, T(0), ta::writable_view(dw), ws, plan);
    CHECK(relative_error(dw, naive) < tolerance<T>(k));
    ta::flora<T, N> grad;
    ta::detail::vjp<T, N>(a, ta::view(gw), grad, ws, plan);
    ta::for_each_parameter(grad, chain_grad,
                           [&](const char*, auto& g, const auto& e) { CHECK(relative_error(g, e) < tolerance<T>(k)); });
  }
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA's chain and channel plans agree", "[flora]", float, double) {
  check_plans_agree<TestType, 2>({9, 6}, {3, 4}, 43);
  check_plans_agree<TestType, 3>({8, 6, 5}, {2, 6, 3}, 44);
  check_plans_agree<TestType, 4>({12, 8, 3, 3}, {4, 2, 2, 3}, 45);
  check_plans_agree<TestType, 4>({16, 4, 1, 1}, {3, 2, 1, 1}, 46);  // a 1x1 conv
  check_plans_agree<TestType, 4>({40, 6, 3, 3}, {20, 3, 2, 2}, 146);
  // gW of more than one block of 256 columns (I1·S = 360 and 270), read once by grad.U0 and Y together;
  // then products large enough to be split over threads, which run whole (with OpenMP and more than one
  // thread; block by block otherwise).
  check_plans_agree<TestType, 4>({24, 40, 3, 3}, {5, 4, 2, 2}, 147);
  check_plans_agree<TestType, 4>({48, 30, 3, 3}, {40, 6, 2, 3}, 148);
  // r0 beyond the columns for which the kernel reads A in place: grad.U0 formed transposed.
  constexpr ta::index in_place = ta::detail::gemm_in_place_columns<TestType>;
  check_plans_agree<TestType, 4>({in_place + 4, 30, 3, 1}, {in_place + 3, 2, 1, 1}, 156);
  check_plans_agree<TestType, 4>({128, 256, 3, 3}, {32, 2, 1, 1}, 149);
  {
    // The same transposed grad.U0 over several blocks of 256 columns of gW (I1·S = 300), which it
    // accumulates block by block on one thread (on several the product runs whole).
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    check_plans_agree<TestType, 4>({in_place + 8, 100, 3, 1}, {in_place + 4, 1, 1, 1}, 158);
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
  }
  // r0 = the register width (16 floats or 8 doubles on AVX-512): grad.U0 and Y in one pass over gW
  // (thin_pair_product), for a conv weight of several blocks of columns, a linear weight, and a product
  // large enough to be split over threads.
  constexpr ta::index width = ta::detail::simd<TestType, ta::detail::native_isa>::width;
  check_plans_agree<TestType, 4>({40, 70, 3, 3}, {width, 3, 2, 2}, 150);
  check_plans_agree<TestType, 2>({3 * width + 1, 300}, {width, 5}, 151);
  check_plans_agree<TestType, 4>({256, 128, 3, 3}, {width, 1, 1, 1}, 152);
  // r1 = the register width: grad.U1 and Zs in one pass over Y (thin_pair_product), with and without
  // r0 = width (the kernel's split over threads is tested in test_thin_pair_product).
  check_plans_agree<TestType, 4>({40, 70, 3, 3}, {width, width, 2, 2}, 153);
  check_plans_agree<TestType, 4>({40, 70, 3, 3}, {5, width, 1, 2}, 154);
  // Rows of two registers (r0 = r1 = 2 · width), as the 512×512×3×3 weight at ranks 32 runs.
  check_plans_agree<TestType, 4>({40, 36, 3, 3}, {2 * width, 2 * width, 1, 1}, 155);
  check_plans_agree<TestType, 5>({6, 5, 3, 2, 3}, {2, 5, 1, 2, 2}, 47);
  // The automatic choice: the channel plan for linear weights and conv weights of small kernel ranks;
  // the chain where the channel plan would need more than twice its flops (a full-rank first mode).
  std::mt19937_64 gen(48);
  CHECK(ta::detail::use_channel_plan(ta::make_flora<TestType, 4>({256, 256, 3, 3}, {16, 16, 2, 2}, 1.0, gen)));
  CHECK(ta::detail::use_channel_plan(ta::make_flora<TestType, 4>({512, 512, 3, 3}, {32, 32, 3, 3}, 1.0, gen)));
  CHECK_FALSE(ta::detail::use_channel_plan(ta::make_flora<TestType, 3>({64, 4, 4}, {64, 1, 1}, 1.0, gen)));
  CHECK(ta::detail::use_channel_plan(ta::make_flora<TestType, 2>({64, 48}, {8, 8}, 1.0, gen)));
}

TEST_CASE("FLoRA's conv kernels expand in the flop-minimal order", "[flora]") {
  // The chain plan's order (tucker.hpp's expansion_order, tested against every order there): a rank-2
  // core of a 3×3 kernel goes last, a rank-3 one, which expands nothing, first.
  REQUIRE(ta::expansion_order<4>({16, 16, 2, 2}, {256, 256, 3, 3}) == std::array<int, 4>{0, 1, 2, 3});
  REQUIRE(ta::expansion_order<4>({32, 32, 3, 3}, {512, 512, 3, 3}) == std::array<int, 4>{2, 3, 0, 1});
}

TEMPLATE_TEST_CASE("FLoRA delta_weight_vjp reuses its gradient and workspace", "[flora]", float, double) {
  using T = TestType;
  auto a = random_flora<T, 4>({10, 6, 3, 3}, {3, 4, 2, 1}, 2.0, 51);
  auto b = random_flora<T, 4>({10, 6, 3, 3}, {2, 2, 3, 3}, 2.0, 52);
  const auto gw = random_tensor<T, 4>({10, 6, 3, 3}, 53);
  const auto expected_a = ta::delta_weight_vjp(a, gw);
  const auto expected_b = ta::delta_weight_vjp(b, gw);
  ta::flora<T, 4> grad;
  ta::flora_weight_workspace<T, 4> ws;
  ta::delta_weight_vjp(a, gw, grad, ws);
  ta::delta_weight_vjp(b, gw, grad, ws);  // other ranks: grad is resized
  ta::for_each_parameter(grad, expected_b, [](const char*, auto& g, const auto& e) { CHECK(bit_identical<T>(g, e)); });
  ta::delta_weight_vjp(a, gw, grad, ws);
  ta::for_each_parameter(grad, expected_a, [](const char*, auto& g, const auto& e) { CHECK(bit_identical<T>(g, e)); });

  // The chain plan keeps tucker_compress_all_but_one's shared compressions in the workspace: adapters of
  // other ranks in turn on one workspace give what a fresh one gives.
  auto c = random_flora<T, 3>({24, 4, 4}, {24, 1, 1}, 2.0, 54);
  auto e = random_flora<T, 3>({24, 4, 4}, {20, 2, 1}, 2.0, 55);
  REQUIRE_FALSE(ta::detail::use_channel_plan(c));
  REQUIRE_FALSE(ta::detail::use_channel_plan(e));
  const auto gw3 = random_tensor<T, 3>({24, 4, 4}, 56);
  const auto expected_c = ta::delta_weight_vjp(c, gw3);
  const auto expected_e = ta::delta_weight_vjp(e, gw3);
  ta::flora<T, 3> grad3;
  ta::flora_weight_workspace<T, 3> ws3;
  for (const auto* adapter : {&c, &e, &c, &e}) {
    ta::delta_weight_vjp(*adapter, gw3, grad3, ws3);
    const auto& expected = adapter == &c ? expected_c : expected_e;
    ta::for_each_parameter(grad3, expected, [](const char*, auto& g, const auto& x) { CHECK(bit_identical<T>(g, x)); });
  }
}

TEMPLATE_TEST_CASE("FLoRA merge, unmerge and safe_merge", "[flora]", float, double) {
  using T = TestType;
  const ta::shape<4> s{16, 8, 3, 3};
  auto a = random_flora<T, 4>(s, {4, 3, 2, 2}, 4.0, 61);
  const ta::tensor<T, 4> w0 = random_tensor<T, 4>(s, 62);
  const ta::tensor<T, 4> dw = ta::delta_weight(a);

  ta::tensor<T, 4> w = w0;
  ta::merge(a, w);
  ta::tensor<T, 4> sum = w0 + dw;
  CHECK(relative_error(w, sum) < tolerance<T>(48));

  ta::tensor<T, 4> safe = w0;
  ta::safe_merge(a, safe);
  CHECK(bit_identical<T>(safe, w));

  ta::unmerge(a, w);
  CHECK(relative_error(w, w0) < tolerance<T>(48) * (1.0 + max_abs(dw)));

  // A merge that would overflow or meet a NaN throws and leaves the weight bit-identical.
  ta::flora<T, 4> huge = a;
  huge.G.setConstant(std::numeric_limits<T>::max());
  huge.scale = std::numeric_limits<T>::max();
  ta::tensor<T, 4> kept = w0;
  CHECK_THROWS_AS(ta::safe_merge(huge, kept), ta::argument_error);
  CHECK(bit_identical<T>(kept, w0));
  ta::flora<T, 4> nan = a;
  nan.U[2](1, 0) = std::numeric_limits<T>::quiet_NaN();
  CHECK_THROWS_AS(ta::safe_merge(nan, kept), ta::argument_error);
  CHECK(bit_identical<T>(kept, w0));
}

// ---------------------------------------------------------------------------------------------------
// The official code's tensors

TEST_CASE("FLoRA converts the official tensors and back", "[flora]") {
  // Official order (in 5, out 7, kh 3, kw 2), ranks (r_in 2, r_out 3, 2, 1).
  const ta::tensor<double, 4> g = random_tensor<double, 4>({2, 3, 2, 1}, 71);
  const std::array<ta::tensor<double, 2>, 4> p{random_tensor<double, 2>({5, 2}, 72), random_tensor<double, 2>({7, 3}, 73),
                                               random_tensor<double, 2>({3, 2}, 74), random_tensor<double, 2>({2, 1}, 75)};
  const auto a = ta::flora_from_official(g, p, 4.0);
  CHECK(ta::weight_shape(a) == ta::shape<4>{7, 5, 3, 2});
  CHECK(ta::ranks(a) == ta::shape<4>{3, 2, 2, 1});
  CHECK(bit_identical<double>(a.U[0], p[1]));
  CHECK(bit_identical<double>(a.U[1], p[0]));
  CHECK(bit_identical<double>(a.U[2], p[2]));
  for (ta::index i = 0; i < 2; ++i)
    for (ta::index j = 0; j < 3; ++j)
      for (ta::index k = 0; k < 2; ++k) CHECK(a.G(j, i, k, 0) == g(i, j, k, 0));

  ta::tensor<double, 4> g2;
  std::array<ta::tensor<double, 2>, 4> p2;
  ta::flora_to_official(a, g2, p2);
  CHECK(bit_identical<double>(g2, g));
  for (std::size_t n = 0; n < 4; ++n) CHECK(bit_identical<double>(p2[n], p[n]));

  // Wrong shapes: a factor whose columns do not match the core, a rank above its extent.
  auto bad = p;
  bad[1] = random_tensor<double, 2>({7, 2}, 76);
  CHECK_THROWS_AS(ta::flora_from_official(g, bad, 1.0), ta::argument_error);
  bad = p;
  bad[3] = random_tensor<double, 2>({2, 1}, 77);
  const ta::tensor<double, 4> g_wide = random_tensor<double, 4>({2, 3, 2, 3}, 78);
  CHECK_THROWS_AS(ta::flora_from_official(g_wide, bad, 1.0), ta::argument_error);
}

// ---------------------------------------------------------------------------------------------------
// Linear layers in activation space

TEMPLATE_TEST_CASE("FLoRA merged forward equals the unmerged forward", "[flora]", float, double) {
  using T = TestType;
  const ta::index n = 9, in = 14, out = 11;
  auto a = random_flora<T, 2>({out, in}, {4, 6}, 2.5, 81);
  const auto x = random_tensor<T, 2>({n, in}, 82);
  const auto w0 = random_tensor<T, 2>({out, in}, 83, 0.3);
  const auto b0 = random_tensor<T, 1>({out}, 84);

  ta::tensor<T, 2> merged = w0;
  ta::merge(a, merged);
  ta::tensor<T, 2> expected(n, out), expected_nobias(n, out);
  for (ta::index i = 0; i < n; ++i)
    for (ta::index o = 0; o < out; ++o) {
      double s = 0;
      for (ta::index k = 0; k < in; ++k) s += double(x(i, k)) * double(merged(o, k));
      expected(i, o) = static_cast<T>(s + double(b0(o)));
      expected_nobias(i, o) = static_cast<T>(s);
    }
  CHECK(relative_error(ta::forward(a, x, w0, b0), expected) < tolerance<T>(in * 6));
  CHECK(relative_error(ta::forward(a, x, w0), expected_nobias) < tolerance<T>(in * 6));
}

namespace {

// L = Σ y · dy with y = forward(a, x, w0, b0); W0 and b0 are frozen.
void check_linear_backward_by_finite_differences(ta::index out, ta::index in, const ta::shape<2>& ranks,
                                                 std::uint64_t seed) {
  INFO("weight (" << out << ", " << in << ") ranks " << ta::detail::dims_string(ranks, 2));
  const ta::index n = 4;
  auto a = random_flora<double, 2>({out, in}, ranks, 1.25, seed);
  ta::tensor<double, 2> x = random_tensor<double, 2>({n, in}, seed + 1);
  const auto w0 = random_tensor<double, 2>({out, in}, seed + 2);
  const auto b0 = random_tensor<double, 1>({out}, seed + 3);
  const auto dy = random_tensor<double, 2>({n, out}, seed + 4);
  const auto back = ta::backward(a, x, w0, dy);

  auto loss = [&](const ta::flora<double, 2>& p, const ta::tensor<double, 2>& xx) {
    const auto y = ta::forward(p, xx, w0, b0);
    double l = 0;
    for (ta::index i = 0; i < y.size(); ++i) l += y.data()[i] * dy.data()[i];
    return l;
  };
  const double h = 1e-3;
  double worst = 0, largest = 0;
  auto probe = [&](double& value, double analytic, const ta::flora<double, 2>& p) {
    const double keep = value;
    value = keep + h;
    const double up = loss(p, x);
    value = keep - h;
    const double down = loss(p, x);
    value = keep;
    const double fd = (up - down) / (2 * h);
    worst = std::max(worst, std::abs(fd - analytic));
    largest = std::max(largest, std::abs(fd));
  };
  ta::flora<double, 2> p = a;
  ta::for_each_parameter(p, back.grad, [&](const char*, auto& param, const auto& g) {
    for (ta::index i = 0; i < param.size(); ++i) probe(param.data()[i], g.data()[i], p);
  });
  for (ta::index i = 0; i < x.size(); ++i) probe(x.data()[i], back.dx.data()[i], a);
  CHECK(largest > 0);
  CHECK(worst <= 1e-8 * (1.0 + largest));
}

}  // namespace

TEST_CASE("FLoRA linear backward matches finite differences", "[flora][fd]") {
  check_linear_backward_by_finite_differences(6, 5, {1, 1}, 91);
  check_linear_backward_by_finite_differences(6, 5, {6, 5}, 92);
  check_linear_backward_by_finite_differences(6, 5, {2, 4}, 93);
  check_linear_backward_by_finite_differences(3, 8, {3, 2}, 94);
}

// ---------------------------------------------------------------------------------------------------
// Bad input

TEST_CASE("FLoRA rejects bad input before writing anything", "[flora][errors]") {
  std::mt19937_64 gen(111);
  using ta::argument_error;

  SECTION("construction") {
    CHECK_THROWS_AS((ta::make_flora<float, 2>({8, 6}, {0, 2}, 1.0, gen)), argument_error);
    CHECK_THROWS_AS((ta::make_flora<float, 2>({8, 6}, {2, 7}, 1.0, gen)), argument_error);
    CHECK_THROWS_AS((ta::make_flora<float, 4>({8, 6, 3, 3}, {2, 2, 4, 1}, 1.0, gen)), argument_error);
    CHECK_THROWS_AS((ta::make_flora<float, 3>({8, 0, 3}, {2, 1, 1}, 1.0, gen)), argument_error);
    CHECK_THROWS_AS((ta::make_flora<float, 3>({8, 4, 3}, {2, -1, 1}, 1.0, gen)), argument_error);
    try {
      ta::make_flora<float, 2>({8, 6}, {2, 7}, 1.0, gen);
    } catch (const argument_error& e) {
      const std::string what = e.what();
      CHECK(what.find("make_flora") != std::string::npos);
      CHECK(what.find("(8, 6)") != std::string::npos);
      CHECK(what.find("rank 7") != std::string::npos);
    }
  }

  auto a = random_flora<double, 4>({8, 6, 3, 3}, {2, 3, 2, 1}, 2.0, 112);
  const ta::tensor<double, 4> w0 = random_tensor<double, 4>({8, 6, 3, 3}, 113);

  SECTION("weights and gradients of the wrong shape") {
    ta::tensor<double, 4> w = random_tensor<double, 4>({8, 6, 3, 2}, 114);
    const ta::tensor<double, 4> w_before = w;
    CHECK_THROWS_AS(ta::merge(a, w), argument_error);
    CHECK_THROWS_AS(ta::unmerge(a, w), argument_error);
    CHECK_THROWS_AS(ta::safe_merge(a, w), argument_error);
    CHECK_THROWS_AS(ta::delta_weight(a, w), argument_error);
    CHECK(bit_identical<double>(w, w_before));

    ta::flora<double, 4> grad = zeros_like(a);
    grad.G.setConstant(7.0);
    const ta::flora<double, 4> grad_before = grad;
    CHECK_THROWS_AS(ta::delta_weight_vjp(a, ta::view(w), grad), argument_error);
    CHECK_THROWS_AS(ta::delta_weight_vjp(a, w), argument_error);
    ta::for_each_parameter(grad, grad_before, [](const char*, auto& g, const auto& e) { CHECK(bit_identical<double>(g, e)); });
    const ta::tensor<double, 4> transposed = random_tensor<double, 4>({6, 8, 3, 3}, 115);
    CHECK_THROWS_AS(ta::delta_weight_vjp(a, transposed), argument_error);
  }

  SECTION("adapters of inconsistent shapes") {
    ta::tensor<double, 4> w = w0;
    auto wrong_cols = a;
    wrong_cols.U[2] = random_tensor<double, 2>({3, 3}, 116);  // the core has rank 2 in mode 2
    auto rank_above = a;
    rank_above.U[3] = random_tensor<double, 2>({3, 1}, 117);
    rank_above.G = random_tensor<double, 4>({2, 3, 2, 1}, 118);
    rank_above.U[1] = random_tensor<double, 2>({2, 3}, 119);  // rank 3 of an extent 2
    auto empty = a;
    empty.G = ta::tensor<double, 4>(2, 0, 2, 1);
    empty.U[1] = ta::tensor<double, 2>(6, 0);
    for (const auto* bad : {&wrong_cols, &rank_above, &empty}) {
      CHECK_THROWS_AS(ta::merge(*bad, w), argument_error);
      CHECK_THROWS_AS(ta::delta_weight(*bad), argument_error);
      CHECK_THROWS_AS(ta::delta_weight_vjp(*bad, w0), argument_error);
    }
    CHECK(bit_identical<double>(w, w0));
  }

  SECTION("linear path") {
    auto l = random_flora<double, 2>({5, 4}, {2, 3}, 1.0, 120);
    const auto x = random_tensor<double, 2>({3, 4}, 121);
    const auto w = random_tensor<double, 2>({5, 4}, 122);
    const auto b = random_tensor<double, 1>({5}, 123);
    const auto dy = random_tensor<double, 2>({3, 5}, 124);
    ta::flora_workspace<double> ws;
    ta::tensor<double, 2> y(3, 5), dx(3, 4);
    y.setConstant(9.0);
    dx.setConstant(9.0);
    const ta::tensor<double, 2> y_before = y, dx_before = dx;
    ta::flora<double, 2> grad;

    const auto x_wrong = random_tensor<double, 2>({3, 5}, 125);
    const auto w_wrong = random_tensor<double, 2>({4, 5}, 126);
    const auto b_wrong = random_tensor<double, 1>({4}, 127);
    const auto dy_wrong = random_tensor<double, 2>({3, 4}, 128);
    ta::tensor<double, 2> y_wrong(3, 4), dx_wrong(2, 4);
    CHECK_THROWS_AS(ta::forward(l, x_wrong, w, b, y, ws), argument_error);
    CHECK_THROWS_AS(ta::forward(l, x, w_wrong, b, y, ws), argument_error);
    CHECK_THROWS_AS(ta::forward(l, x, w, b_wrong, y, ws), argument_error);
    CHECK_THROWS_AS(ta::forward(l, x, w, b, y_wrong, ws), argument_error);
    CHECK_THROWS_AS(ta::forward(l, x, w, y_wrong, ws), argument_error);
    CHECK_THROWS_AS(ta::backward(l, x, w, dy_wrong, dx, grad, ws), argument_error);
    CHECK_THROWS_AS(ta::backward(l, x, w, dy, dx_wrong, grad, ws), argument_error);
    CHECK_THROWS_AS(ta::backward(l, x_wrong, w, dy, dx, grad, ws), argument_error);
    CHECK(bit_identical<double>(y, y_before));
    CHECK(bit_identical<double>(dx, dx_before));
    CHECK(grad.G.size() == 0);
    CHECK(ws.h1.empty());
  }
}

// ---------------------------------------------------------------------------------------------------
// Numerical edge cases

namespace {

// N = 3, ranks (1, 1, 1): every factor all ones, core g, so ΔW = scale · g in every element.
template <class T>
ta::flora<T, 3> constant_flora(const ta::shape<3>& s, T g, T scale) {
  ta::flora<T, 3> a;
  a.G.resize(1, 1, 1);
  a.G.setConstant(g);
  for (std::size_t n = 0; n < 3; ++n) {
    a.U[n].resize(s[n], 1);
    a.U[n].setConstant(T(1));
  }
  a.scale = scale;
  return a;
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA rejects zero-rank and empty adapters and weights everywhere", "[flora][edge]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(131);
  CHECK_THROWS_AS((ta::make_flora<T, 2>({0, 6}, {1, 1}, 1.0, gen)), ta::argument_error);
  CHECK_THROWS_AS((ta::make_flora<T, 5>({2, 3, 3, 3, 0}, {1, 1, 1, 1, 1}, 1.0, gen)), ta::argument_error);
  CHECK_THROWS_AS((ta::make_flora<T, 5>({2, 3, 3, 3, 2}, {1, 1, 1, 1, 0}, 1.0, gen)), ta::argument_error);
  // A weight of 2^64 elements, whose count would wrap to 0.
  CHECK_THROWS_WITH((ta::make_flora<T, 4>({1 << 16, 1 << 16, 1 << 16, 1 << 16}, {1, 1, 1, 1}, 1.0, gen)),
                    Catch::Contains("more elements than an index can count"));

  // A linear adapter whose rank in one mode is 0, and one fitting a weight with an empty mode.
  const auto good = random_flora<T, 2>({5, 4}, {2, 3}, 1.0, 132);
  auto rank0 = good;
  rank0.G = ta::tensor<T, 2>(2, 0);
  rank0.U[1] = ta::tensor<T, 2>(4, 0);
  auto rows0 = good;
  rows0.U[0] = ta::tensor<T, 2>(0, 2);
  const auto x = random_tensor<T, 2>({3, 4}, 133);
  const auto w0 = random_tensor<T, 2>({5, 4}, 134);
  const auto b0 = random_tensor<T, 1>({5}, 135);
  const auto dy = random_tensor<T, 2>({3, 5}, 136);
  ta::tensor<T, 2> w = w0, y(3, 5), dx(3, 4);
  y.setConstant(T(9));
  dx.setConstant(T(9));
  const ta::tensor<T, 2> y_before = y, dx_before = dx;
  ta::flora_workspace<T> ws;
  ta::flora_weight_workspace<T, 2> wws;
  for (const auto* bad : {&rank0, &rows0}) {
    ta::flora<T, 2> grad;
    CHECK_THROWS_WITH(ta::merge(*bad, w), Catch::Contains("flora merge"));
    CHECK_THROWS_AS(ta::merge(*bad, ta::writable_view(w), wws), ta::argument_error);
    CHECK_THROWS_AS(ta::unmerge(*bad, w), ta::argument_error);
    CHECK_THROWS_AS(ta::safe_merge(*bad, w), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight(*bad), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight(*bad, ta::writable_view(w)), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight_vjp(*bad, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, x, w0, b0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, x, w0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(*bad, x, w0, dy, dx, grad, ws), ta::argument_error);
    CHECK(grad.G.size() == 0);
    ta::tensor<T, 2> g;
    std::array<ta::tensor<T, 2>, 2> p;
    CHECK_THROWS_AS(ta::flora_to_official(*bad, g, p), ta::argument_error);
    CHECK_THROWS_AS(ta::flora_from_official(bad->G, bad->U, T(1)), ta::argument_error);
    CHECK(g.size() == 0);
  }
  CHECK(bit_identical<T>(w, w0));
  CHECK(bit_identical<T>(y, y_before));
  CHECK(bit_identical<T>(dx, dx_before));
  ta::tensor<T, 2> empty_rows(0, 4);
  CHECK_THROWS_WITH(ta::merge(good, empty_rows), Catch::Contains("(0, 4)"));

  // An empty batch gives an empty output and exactly zero gradients.
  ta::tensor<T, 2> x0(0, 4), y0(0, 5), dy0(0, 5), dx0(0, 4);
  ta::forward(good, x0, w0, b0, y0, ws);
  ta::flora<T, 2> g0;
  ta::backward(good, x0, w0, dy0, dx0, g0, ws);
  CHECK(max_abs(g0.G) == 0.0);
  CHECK(max_abs(g0.U[0]) + max_abs(g0.U[1]) == 0.0);
}

TEMPLATE_TEST_CASE("FLoRA: NaN or Inf in any factor, the core, the scale or the weight is caught by safe_merge",
                   "[flora][edge]", float, double) {
  using T = TestType;
  const ta::shape<3> s{6, 5, 3};
  const auto a = random_flora<T, 3>(s, {2, 3, 2}, 4.0, 141);
  const auto w = random_tensor<T, 3>(s, 142);
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (T bad : {nan, inf, -inf}) {
    std::vector<ta::flora<T, 3>> broken(5, a);
    broken[0].G(1, 2, 0) = bad;
    broken[1].U[0](4, 1) = bad;
    broken[2].U[1](0, 0) = bad;
    broken[3].U[2](2, 1) = bad;
    broken[4].scale = bad;
    for (const auto& b : broken) {
      ta::tensor<T, 3> target = w;
      CHECK_THROWS_WITH(ta::safe_merge(b, target), Catch::Contains("flora safe_merge") && Catch::Contains("non-finite"));
      CHECK(bit_identical<T>(target, w));
    }
    ta::tensor<T, 3> bad_w = w;
    bad_w(5, 4, 2) = bad;
    const ta::tensor<T, 3> before = bad_w;
    CHECK_THROWS_AS(ta::safe_merge(a, bad_w), ta::argument_error);
    CHECK(bit_identical<T>(bad_w, before));
  }
}

namespace {

// With a NaN in the core, scale 0: ΔW, the merge and every gradient are 0 · (their value at scale 1),
// on both plans; safe_merge throws.
template <class T, int N>
void check_zero_scale(const ta::shape<N>& weight, const ta::shape<N>& ranks, std::uint64_t seed) {
  using ta::detail::flora_plan;
  using zero_scale::plus_zero_times;
  using zero_scale::same_or_both_nan;
  INFO("weight " << ta::detail::dims_string(weight, N) << " ranks " << ta::detail::dims_string(ranks, N));
  auto one = random_flora<T, N>(weight, ranks, 1.0, seed);
  one.G.data()[1] = std::numeric_limits<T>::quiet_NaN();
  auto off = one;
  off.scale = T(0);
  const auto w = random_tensor<T, N>(weight, seed + 1), gw = random_tensor<T, N>(weight, seed + 2);
  ta::tensor<T, N> none(weight);
  none.setZero();
  ta::flora_weight_workspace<T, N> ws;
  for (auto plan : {flora_plan::chain, flora_plan::channel}) {
    ta::tensor<T, N> dw_one(weight), dw_off(weight), merged = w;
    ta::detail::expand<T, N>(one, one.scale, T(0), ta::writable_view(dw_one), ws, plan);
    ta::detail::expand<T, N>(off, off.scale, T(0), ta::writable_view(dw_off), ws, plan);
    ta::detail::expand<T, N>(off, off.scale, T(1), ta::writable_view(merged), ws, plan);
    CHECK(zero_scale::has_nan(dw_off));
    CHECK(same_or_both_nan(dw_off, plus_zero_times(none, dw_one)));
    CHECK(same_or_both_nan(merged, plus_zero_times(w, dw_one)));
    ta::flora<T, N> g_one, g_off;
    ta::detail::vjp<T, N>(one, ta::view(gw), g_one, ws, plan);
    ta::detail::vjp<T, N>(off, ta::view(gw), g_off, ws, plan);
    ta::for_each_parameter(g_off, g_one, [&](const char* name, auto& got, const auto& at_one) {
      INFO(name);
      auto zero = at_one;
      zero.setZero();
      CHECK(same_or_both_nan(got, plus_zero_times(zero, at_one)));
    });
  }
  ta::tensor<T, N> target = w;
  CHECK_THROWS_WITH(ta::safe_merge(off, target), Catch::Contains("non-finite"));
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA: a scale of 0 still multiplies, so NaN in the core gives NaN, on both plans",
                   "[flora][edge]", float, double) {
  check_zero_scale<TestType, 2>({11, 14}, {4, 6}, 171);
  check_zero_scale<TestType, 4>({12, 8, 3, 3}, {4, 2, 2, 3}, 172);
}

TEMPLATE_TEST_CASE("FLoRA merges near the largest and the subnormal values of T", "[flora][edge]", float, double) {
  using T = TestType;
  using limits = std::numeric_limits<T>;
  const T max = limits::max();
  const ta::shape<3> s{4, 3, 2};
  SECTION("results near max are exact and finite") {
    const auto a = constant_flora<T>(s, max / 8, T(2));  // ΔW = max/4
    ta::tensor<T, 3> w(s);
    w.setConstant(max / 2);
    w(3, 2, 1) = -max;
    const ta::tensor<T, 3> w0 = w;
    ta::safe_merge(a, w);
    for (ta::index i = 0; i < w.size(); ++i) CHECK(w.data()[i] == w0.data()[i] + max / 4);
  }
  SECTION("a sum beyond max: merge gives Inf, safe_merge throws and writes nothing") {
    const auto a = constant_flora<T>(s, max / 8, T(4));  // ΔW = max/2
    ta::tensor<T, 3> w(s);
    w.setConstant(T(1));
    w(1, 1, 1) = max * T(0.75);
    const ta::tensor<T, 3> w0 = w;
    CHECK_THROWS_WITH(ta::safe_merge(a, w), Catch::Contains("non-finite"));
    CHECK(bit_identical<T>(w, w0));
    ta::merge(a, w);
    CHECK(std::isinf(w(1, 1, 1)));
    CHECK(w(0, 0, 0) == T(1) + max / 2);
  }
  SECTION("ΔW itself beyond max gives Inf") {
    const auto a = constant_flora<T>(s, max, T(4));
    ta::tensor<T, 3> w(s);
    w.setZero();
    CHECK_THROWS_AS(ta::safe_merge(a, w), ta::argument_error);
    CHECK(max_abs(w) == 0.0);
    ta::merge(a, w);
    CHECK(std::isinf(w(2, 0, 1)));
  }
  SECTION("subnormal values: exact results, no flush to zero") {
    const T tiny = limits::denorm_min();
    const auto a = constant_flora<T>(s, std::ldexp(T(1), limits::min_exponent - 1), std::ldexp(T(1), 5 - limits::digits));
    // ΔW = 2^(5 − digits) · 2^(min_exponent − 1) = 16 · tiny; the core alone is the smallest normal.
    ta::tensor<T, 3> w(s);
    w.setConstant(3 * tiny);
    w(0, 1, 1) = -20 * tiny;
    w(3, 2, 0) = limits::min();
    const ta::tensor<T, 3> w0 = w;
    ta::safe_merge(a, w);
    CHECK(w(1, 0, 0) == 19 * tiny);
    CHECK(w(0, 1, 1) == -4 * tiny);
    CHECK(w(3, 2, 0) == limits::min() + 16 * tiny);
    CHECK(ta::delta_weight(a)(2, 2, 1) == 16 * tiny);
    ta::unmerge(a, w);
    CHECK(bit_identical<T>(w, w0));
  }
}
