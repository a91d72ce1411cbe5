#include <tensor_adapters/init.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

namespace ta = tensor_adapters;

TEMPLATE_TEST_CASE("same seed, same bytes", "[init]", float, double) {
  std::mt19937_64 g1(7), g2(7), g3(8);
  ta::tensor<TestType, 2> a(13, 17), b(13, 17), c(13, 17);
  ta::fill_normal(a, 0.0, 1.0, g1);
  ta::fill_normal(b, 0.0, 1.0, g2);
  ta::fill_normal(c, 0.0, 1.0, g3);
  CHECK(std::memcmp(a.data(), b.data(), sizeof(TestType) * 13 * 17) == 0);
  CHECK(std::memcmp(a.data(), c.data(), sizeof(TestType) * 13 * 17) != 0);
}

TEST_CASE("32-bit and 64-bit generators both work", "[init]") {
  std::mt19937 g32(3);
  std::mt19937_64 g64(3);
  double sum32 = 0, sum64 = 0, max32 = 0, max64 = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    const double a = ta::detail::uniform01(g32), b = ta::detail::uniform01(g64);
    REQUIRE(a >= 0.0);
    REQUIRE(a < 1.0);
    REQUIRE(b >= 0.0);
    REQUIRE(b < 1.0);
    sum32 += a;
    sum64 += b;
    max32 = std::max(max32, a);
    max64 = std::max(max64, b);
  }
  // Both cover [0, 1): the mean is 1/2 within 5 standard errors (σ = 1/√12), the largest draw near 1.
  const double tolerance = 5.0 / std::sqrt(12.0 * n);
  CHECK(std::fabs(sum32 / n - 0.5) < tolerance);
  CHECK(std::fabs(sum64 / n - 0.5) < tolerance);
  CHECK(max32 > 0.999);
  CHECK(max64 > 0.999);
}

TEST_CASE("the draws are the values of the header's formulas", "[init]") {
  // Expected values from an independent implementation of MT19937 and MT19937-64 (the reference
  // algorithms, checked against the standard's 10000th outputs) and the formulas: uniform01 = (64 bits
  // >> 11) · 2^-53, a 32-bit generator's 64 bits being (first << 32) | second; fill_uniform = (2u − 1) ·
  // bound; fill_normal = √(−2 ln(1 − u1)) · cos(2π u2).
  std::mt19937 g32(0);
  CHECK(ta::detail::uniform01(g32) == 0.5488135024422883);
  CHECK(ta::detail::uniform01(g32) == 0.7151893651681639);
  CHECK(ta::detail::uniform01(g32) == 0.6027633705776989);
  std::mt19937_64 g64(0);
  CHECK(ta::detail::uniform01(g64) == 0.1597933633704608);
  CHECK(ta::detail::uniform01(g64) == 0.9921452096298288);
  CHECK(ta::detail::uniform01(g64) == 0.03956902584486566);

  ta::tensor<double, 1> u(3), z(3);
  std::mt19937_64 gu(0), gz(0);
  ta::fill_uniform(u, 1.0, gu);
  CHECK(u(0) == -0.6804132732590784);
  CHECK(u(1) == 0.9842904192596575);
  CHECK(u(2) == -0.9208619483102687);
  ta::fill_normal(z, 0.0, 1.0, gz);
  // (log and cos may differ in the last bit between math libraries)
  CHECK(z(0) == Approx(0.5893788037363092).epsilon(1e-15));
  CHECK(z(1) == Approx(-0.23249007105176506).epsilon(1e-15));
  CHECK(z(2) == Approx(1.1704404331107556).epsilon(1e-15));
  std::mt19937 gz32(0);
  ta::fill_normal(z, 0.0, 1.0, gz32);
  CHECK(z(0) == Approx(-0.2737542390493669).epsilon(1e-15));
  CHECK(z(1) == Approx(-1.305163431072571).epsilon(1e-15));
  CHECK(z(2) == Approx(-0.638764535801038).epsilon(1e-15));
}

TEMPLATE_TEST_CASE("distributions have the moments they promise", "[init]", float, double) {
  std::mt19937_64 gen(11);
  const ta::index n = 200000;
  ta::tensor<TestType, 1> t(n);

  ta::fill_normal(t, 0.5, 2.0, gen);
  double sum = 0, sq = 0;
  for (ta::index i = 0; i < n; ++i) sum += t(i), sq += double(t(i)) * t(i);
  const double mean = sum / n, var = sq / n - mean * mean;
  CHECK(mean == Approx(0.5).margin(0.03));
  CHECK(std::sqrt(var) == Approx(2.0).epsilon(0.01));

  // kaiming-uniform with a = sqrt(5) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance bound^2 / 3.
  const ta::index fan_in = 64;
  ta::fill_kaiming_uniform(t, fan_in, std::sqrt(5.0), gen);
  const double bound = 1.0 / std::sqrt(double(fan_in));
  sum = sq = 0;
  for (ta::index i = 0; i < n; ++i) {
    REQUIRE(std::abs(double(t(i))) <= bound);
    sum += t(i), sq += double(t(i)) * t(i);
  }
  CHECK(sum / n == Approx(0.0).margin(0.002));
  CHECK(sq / n == Approx(bound * bound / 3).epsilon(0.02));

  // xavier-uniform: bound sqrt(6 / (fan_in + fan_out)).
  ta::fill_xavier_uniform(t, 10, 30, gen);
  TestType biggest = 0;
  for (ta::index i = 0; i < n; ++i) biggest = std::max(biggest, std::abs(t(i)));
  CHECK(double(biggest) <= std::sqrt(6.0 / 40.0));
  CHECK(double(biggest) > 0.99 * std::sqrt(6.0 / 40.0));
}

TEST_CASE("the bounds of kaiming and xavier initialisation need a fan", "[init]") {
  CHECK(ta::kaiming_uniform_bound(4, std::sqrt(5.0)) == Approx(0.5));
  CHECK(ta::xavier_uniform_bound(0, 6) == Approx(1.0));
  CHECK_THROWS_AS(ta::kaiming_uniform_bound(0, std::sqrt(5.0)), ta::argument_error);
  CHECK_THROWS_AS(ta::kaiming_uniform_bound(-3, 0.0), ta::argument_error);
  CHECK_THROWS_AS(ta::xavier_uniform_bound(0, 0), ta::argument_error);
  CHECK_THROWS_AS(ta::xavier_uniform_bound(-2, 5), ta::argument_error);
  std::mt19937_64 gen(3);
  ta::tensor<float, 2> t(2, 2);
  t.setConstant(7.0f);
  CHECK_THROWS_AS(ta::fill_kaiming_uniform(t, 0, std::sqrt(5.0), gen), ta::argument_error);
  CHECK(t(0, 0) == 7.0f);  // nothing written
}
