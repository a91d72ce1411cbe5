// Tucker chains: each chain ≡ plain nested loops (N = 1 to 5), the chosen orders ≡ the cheapest by brute
// force and ≡ std::stable_sort's, N deduced from shape<N> arguments, bad input rejected before writing,
// and no allocation with a warm workspace.
#include "allocation_counter.hpp"

#include <tensor_adapters/init.hpp>
#include <tensor_adapters/tucker.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

namespace ta = tensor_adapters;

namespace {

template <class T, class Tensor>
bool bit_identical(const Tensor& a, const Tensor& b) {
  return a.dimensions() == b.dimensions() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

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
ta::shape<N> random_shape(std::mt19937_64& gen, ta::index lo, ta::index hi) {
  std::uniform_int_distribution<ta::index> extent(lo, hi);
  ta::shape<N> s{};
  for (auto& e : s) e = extent(gen);
  return s;
}

template <class T, int N>
std::array<ta::tensor<T, 2>, N> random_factors(const ta::shape<N>& full, const ta::shape<N>& core, std::mt19937_64& gen) {
  std::array<ta::tensor<T, 2>, N> u;
  for (std::size_t n = 0; n < std::size_t(N); ++n) {
    u[n].resize(full[n], core[n]);
    ta::fill_normal(u[n], 0, 1, gen);
  }
  return u;
}

template <class T, int N>
std::array<ta::const_tensor_view<T, 2>, N> views(const std::array<ta::tensor<T, 2>, N>& u) {
  return ta::detail::factor_views<T, N>(u);
}

// Plain nested loops over every (output, input) pair: out[o] = Σ_i in[i] · Π_{n ∈ modes} U_n[·, ·], where
// the factor of mode n is indexed (full index, core index); `expand` says which side is the core.
// Modes outside `modes` must agree between in and out. abs_sum receives Σ |terms| for the tolerance.
template <class T, int N>
void reference_chain(const ta::tensor<T, N>& in, const std::array<ta::tensor<T, 2>, N>& u, bool expand,
                     const std::array<bool, N>& modes, ta::tensor<T, N>& out, std::vector<double>& abs_sum) {
  const ta::shape<N> din = ta::shape_of(in), dout = ta::shape_of(out);
  abs_sum.assign(std::size_t(out.size()), 0.0);
  for (ta::index o = 0; o < out.size(); ++o) {
    const auto io = unravel<N>(o, dout);
    long double sum = 0;
    for (ta::index k = 0; k < in.size(); ++k) {
      const auto ik = unravel<N>(k, din);
      long double term = in.data()[k];
      bool match = true;
      for (std::size_t n = 0; n < std::size_t(N); ++n) {
        if (!modes[n]) {
          match = match && ik[n] == io[n];
          continue;
        }
        term *= expand ? u[n](io[n], ik[n]) : u[n](ik[n], io[n]);
      }
      if (!match) continue;
      sum += term;
      abs_sum[std::size_t(o)] += double(std::fabs(term));
    }
    out.data()[o] = T(sum);
  }
}

template <class T, int N>
void require_close(const ta::tensor<T, N>& got, const ta::tensor<T, N>& want, const std::vector<double>& abs_sum,
                   int depth) {
  REQUIRE(ta::shape_of(got) == ta::shape_of(want));
  const double eps = std::numeric_limits<T>::epsilon();
  for (ta::index e = 0; e < got.size(); ++e) {
    const double tol = 4 * eps * (depth + 8) * (abs_sum[std::size_t(e)] + 1e-30);
    INFO("element " << e << " got " << got.data()[e] << " want " << want.data()[e]);
    REQUIRE(std::fabs(double(got.data()[e]) - double(want.data()[e])) <= tol);
  }
}

template <class T, int N>
void check_chains(std::mt19937_64& gen) {
  for (int trial = 0; trial < 12; ++trial) {
    const ta::shape<N> full = random_shape<N>(gen, 1, 4);
    ta::shape<N> core = random_shape<N>(gen, 1, 3);
    for (std::size_t n = 0; n < std::size_t(N); ++n) core[n] = std::min(core[n], full[n]);  // ranks 1 to I_n
    INFO("N " << N << " full " << ta::detail::dims_string(full, N) << " core " << ta::detail::dims_string(core, N));
    const auto u = random_factors<T, N>(full, core, gen);
    std::array<bool, N> all{};
    all.fill(true);
    std::vector<double> abs_sum;
    int depth = 0;
    for (int n = 0; n < N; ++n) depth += int(full[std::size_t(n)] + core[std::size_t(n)]);

    // Expansion, value form and output form with alpha / beta.
    ta::tensor<T, N> g(core);
    ta::fill_normal(g, 0, 1, gen);
    ta::tensor<T, N> want(full);
    reference_chain<T, N>(g, u, true, all, want, abs_sum);
    require_close<T, N>(ta::tucker_expand(g, u), want, abs_sum, depth);

    ta::tensor<T, N> y(full);
    ta::fill_normal(y, 0, 1, gen);
    ta::tensor<T, N> y_want = want * T(0.5) + y * T(-2);
    ta::tucker_workspace<T> ws;
    ta::tucker_expand(ta::view(g), views<T, N>(u), ta::writable_view(y), ws, T(0.5), T(-2));
    std::vector<double> abs_y(abs_sum);
    for (std::size_t e = 0; e < abs_y.size(); ++e) abs_y[e] = 0.5 * abs_y[e] + 2 * std::fabs(double(y_want.data()[e]));
    require_close<T, N>(y, y_want, abs_y, depth);

    // Compression.
    ta::tensor<T, N> x(full);
    ta::fill_normal(x, 0, 1, gen);
    ta::tensor<T, N> g_want(core);
    reference_chain<T, N>(x, u, false, all, g_want, abs_sum);
    require_close<T, N>(ta::tucker_compress(x, u), g_want, abs_sum, depth);
    ta::tensor<T, N> g_out(core);
    g_out.setConstant(T(7));
    ta::tucker_compress(ta::view(x), views<T, N>(u), ta::writable_view(g_out), T(1), T(1));
    ta::tensor<T, N> g_plus = g_want + g_want.constant(T(7));
    for (auto& a : abs_sum) a += 7;
    require_close<T, N>(g_out, g_plus, abs_sum, depth);

    // All modes but one.
    std::array<ta::tensor<T, N>, N> z;
    ta::tucker_compress_all_but_one(ta::view(x), views<T, N>(u), z);
    for (int n = 0; n < N; ++n) {
      INFO("all but mode " << n);
      std::array<bool, N> others = all;
      others[std::size_t(n)] = false;
      ta::shape<N> d = core;
      d[std::size_t(n)] = full[std::size_t(n)];
      ta::tensor<T, N> z_want(d);
      reference_chain<T, N>(x, u, false, others, z_want, abs_sum);
      require_close<T, N>(z[std::size_t(n)], z_want, abs_sum, depth);
    }
    // The same with the workspace the expansion used (other shapes, left over from it), twice.
    std::array<ta::tensor<T, N>, N> z_ws;
    for (int pass = 0; pass < 2; ++pass) {
      ta::tucker_compress_all_but_one(ta::view(x), views<T, N>(u), z_ws, ws);
      for (std::size_t n = 0; n < std::size_t(N); ++n) REQUIRE(bit_identical<T>(z_ws[n], z[n]));
    }
  }
}

// The flops of a chain in this order, written out independently of the library: 2·(current size)·b.
template <int N>
double flops_of(ta::shape<N> dims, const ta::shape<N>& to, const std::array<int, N>& order) {
  double flops = 0;
  for (int n : order) {
    double size = 1;
    for (auto e : dims) size *= double(e);
    flops += 2 * size * double(to[std::size_t(n)]);
    dims[std::size_t(n)] = to[std::size_t(n)];
  }
  return flops;
}

template <int N>
double cheapest_by_brute_force(const ta::shape<N>& from, const ta::shape<N>& to) {
  std::array<int, N> order{};
  std::iota(order.begin(), order.end(), 0);
  double best = std::numeric_limits<double>::infinity();
  do best = std::min(best, flops_of<N>(from, to, order));
  while (std::next_permutation(order.begin(), order.end()));
  return best;
}

template <int N>
bool is_permutation_of_modes(std::array<int, N> order) {
  std::sort(order.begin(), order.end());
  for (int n = 0; n < N; ++n)
    if (order[std::size_t(n)] != n) return false;
  return true;
}

// The order std::stable_sort gives `modes` by the library's comparison (ties keep their positions):
// what cheapest_order sorted until it was made allocation-free.
template <int N>
std::vector<int> stable_sorted(const ta::shape<N>& from, const ta::shape<N>& to, std::vector<int> modes) {
  std::stable_sort(modes.begin(), modes.end(), [&](int n, int m) {
    const auto un = std::size_t(n), um = std::size_t(m);
    return ta::detail::mode_goes_first(from[un], to[un], from[um], to[um]);
  });
  return modes;
}

template <int N>
void check_orders(std::mt19937_64& gen) {
  for (int trial = 0; trial < 1000; ++trial) {
    // Small extents make ties and near-ties common; larger ones make the keys differ in late digits.
    const ta::index hi = trial % 2 ? 6 : 300;
    const ta::shape<N> full = random_shape<N>(gen, 1, hi), core = random_shape<N>(gen, 1, hi);
    INFO("full " << ta::detail::dims_string(full, N) << " core " << ta::detail::dims_string(core, N));
    const auto e = ta::expansion_order<N>(core, full);
    REQUIRE(is_permutation_of_modes<N>(e));
    REQUIRE(flops_of<N>(core, full, e) == cheapest_by_brute_force<N>(core, full));
    const auto c = ta::compression_order<N>(full, core);
    REQUIRE(is_permutation_of_modes<N>(c));
    REQUIRE(flops_of<N>(full, core, c) == cheapest_by_brute_force<N>(full, core));
    // Among orders of equal cost, the same one as std::stable_sort: the whole chain, and a subsequence
    // of the modes in a scrambled order (beyond what tucker_compress_all_but_one, which sorts ascending
    // runs, needs).
    std::vector<int> all(static_cast<std::size_t>(N));
    std::iota(all.begin(), all.end(), 0);
    REQUIRE(std::vector<int>(e.begin(), e.end()) == stable_sorted<N>(core, full, all));
    REQUIRE(std::vector<int>(c.begin(), c.end()) == stable_sorted<N>(full, core, all));
    std::vector<int> some = all;
    std::shuffle(some.begin(), some.end(), gen);
    some.resize(std::size_t(1 + trial % N));
    std::vector<int> sorted = some;
    ta::detail::cheapest_order<N>(full, core, sorted.data(), int(sorted.size()));
    REQUIRE(sorted == stable_sorted<N>(full, core, some));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("Tucker chains match plain nested loops, N = 1 to 5", "[tucker]", float, double) {
  std::mt19937_64 gen(3);
  check_chains<TestType, 1>(gen);
  check_chains<TestType, 2>(gen);
  check_chains<TestType, 3>(gen);
  check_chains<TestType, 4>(gen);
  check_chains<TestType, 5>(gen);
}

TEST_CASE("the chosen orders cost the fewest flops of all orders", "[tucker]") {
  std::mt19937_64 gen(4);
  check_orders<1>(gen);
  check_orders<2>(gen);
  check_orders<3>(gen);
  check_orders<4>(gen);
  check_orders<5>(gen);
}

TEST_CASE("a 16x2 core expanding to 256x3 expands the 16 first", "[tucker]") {
  const ta::shape<2> core{16, 2}, full{256, 3};
  const auto order = ta::expansion_order<2>(core, full);
  REQUIRE(order == std::array<int, 2>{0, 1});
  REQUIRE(flops_of<2>(core, full, order) == 19456);
  REQUIRE(flops_of<2>(core, full, {1, 0}) == 24768);
  REQUIRE(ta::detail::chain_flops<2>(core, full, order.data(), 2) == 19456);
  // Compressing back is the mirror image: 3 → 2 first (3,072 + 16,384 flops), not 256 → 16 first
  // (24,576 + 192): the key is 1/r − 1/I, not the size of the reduction.
  const auto back = ta::compression_order<2>(full, core);
  REQUIRE(back == std::array<int, 2>{1, 0});
  REQUIRE(flops_of<2>(full, core, back) == 19456);
  REQUIRE(flops_of<2>(full, core, {0, 1}) == 24768);
}

TEST_CASE("the orders deduce N from shape<N> arguments", "[tucker]") {
  const auto e = ta::expansion_order(ta::shape<2>{16, 2}, ta::shape<2>{256, 3});
  static_assert(std::is_same<decltype(e), const std::array<int, 2>>::value, "expansion_order returns an order of N");
  CHECK(e == std::array<int, 2>{0, 1});
  CHECK(ta::compression_order(ta::shape<2>{256, 3}, ta::shape<2>{16, 2}) == std::array<int, 2>{1, 0});
  // From the extents of tensors, and with a braced list for the second argument (N from the first).
  const ta::tensor<double, 3> g(2, 3, 2), y(5, 7, 4);
  CHECK(ta::expansion_order(ta::shape_of(g), ta::shape_of(y)) == ta::expansion_order<3>({2, 3, 2}, {5, 7, 4}));
  CHECK(ta::compression_order(ta::shape_of(y), ta::shape_of(g)) == ta::compression_order<3>({5, 7, 4}, {2, 3, 2}));
  CHECK(ta::expansion_order(ta::shape_of(g), {5, 7, 4}) == ta::expansion_order<3>({2, 3, 2}, {5, 7, 4}));
  CHECK(ta::compression_order(ta::shape_of(y), {2, 3, 2}) == ta::compression_order<3>({5, 7, 4}, {2, 3, 2}));
  REQUIRE_THROWS_WITH(ta::expansion_order(ta::shape<2>{2, -3}, ta::shape<2>{4, 5}), Catch::Contains("the core"));
  REQUIRE_THROWS_WITH(ta::expansion_order(ta::shape<2>{2, 3}, ta::shape<2>{4, -5}),
                      Catch::Contains("expansion_order: the expanded tensor has extents (4, -5)"));
}

TEST_CASE("with an empty extent every order costs nothing, and the modes keep their order", "[tucker]") {
  CHECK(ta::expansion_order<3>({0, 2, 4}, {5, 8, 4}) == std::array<int, 3>{0, 1, 2});
  CHECK(ta::compression_order<3>({5, 8, 4}, {0, 2, 4}) == std::array<int, 3>{0, 1, 2});
  CHECK(ta::expansion_order<3>({3, 2, 4}, {5, 0, 4}) == std::array<int, 3>{0, 1, 2});
}

TEMPLATE_TEST_CASE("a reused Tucker workspace stops growing", "[tucker]", float, double) {
  std::mt19937_64 gen(5);
  const ta::shape<3> full{9, 7, 5}, core{3, 4, 2};
  const auto u = random_factors<TestType, 3>(full, core, gen);
  ta::tensor<TestType, 3> g(core), y(full);
  ta::fill_normal(g, 0, 1, gen);
  ta::tucker_workspace<TestType> ws;
  ta::tucker_expand<TestType, 3>(ta::view(g), views<TestType, 3>(u), ta::writable_view(y), ws);
  const TestType* b0 = ws.buffer[0].data();
  const TestType* b1 = ws.buffer[1].data();
  const ta::tensor<TestType, 3> first = y;
  ta::tucker_expand<TestType, 3>(ta::view(g), views<TestType, 3>(u), ta::writable_view(y), ws);
  REQUIRE(ws.buffer[0].data() == b0);
  REQUIRE(ws.buffer[1].data() == b1);
  for (ta::index e = 0; e < y.size(); ++e) REQUIRE(y.data()[e] == first.data()[e]);
}

namespace {

// tucker_expand, tucker_compress and tucker_compress_all_but_one, all on one workspace, called once to
// warm it (and the product kernel's buffers of this thread), then again: the second round allocates
// nothing and gives the same bits.
template <class T, int N>
void check_no_allocation_when_warm(const ta::shape<N>& full, const ta::shape<N>& core, std::uint64_t seed) {
  INFO("N " << N << " full " << ta::detail::dims_string(full, N) << " core " << ta::detail::dims_string(core, N));
  std::mt19937_64 gen(seed);
  const auto u = random_factors<T, N>(full, core, gen);
  const auto factors = views<T, N>(u);
  ta::tensor<T, N> g(core), x(full), y(full), h(core);
  ta::fill_normal(g, 0, 1, gen);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(y, 0, 1, gen);
  std::array<ta::tensor<T, N>, N> z;
  ta::tucker_workspace<T> ws;
  const auto round = [&] {
    ta::tucker_expand<T, N>(ta::view(g), factors, ta::writable_view(y), ws);
    ta::tucker_expand<T, N>(ta::view(g), factors, ta::writable_view(y), ws, T(0.5), T(-1));
    ta::tucker_compress<T, N>(ta::view(x), factors, ta::writable_view(h), ws);
    ta::tucker_compress<T, N>(ta::view(x), factors, ta::writable_view(h), ws, T(2), T(1));
    ta::tucker_compress_all_but_one<T, N>(ta::view(x), factors, z, ws);
    return ta::expansion_order<N>(core, full)[0] + ta::compression_order<N>(full, core)[0];
  };
  const ta::tensor<T, N> y0 = y, h0 = h;
  const int orders = round();
  const ta::tensor<T, N> y1 = y, h1 = h;
  const std::array<ta::tensor<T, N>, N> z1 = z;
  y = y0;
  h = h0;
  long allocations = 0;
  int again = 0;
  {
    allocation_counter::scope counting;
    again = round();
    allocations = counting.allocations();
  }
  CHECK(allocations == 0);
  CHECK(again == orders);
  CHECK(bit_identical<T>(y, y1));
  CHECK(bit_identical<T>(h, h1));
  for (std::size_t n = 0; n < std::size_t(N); ++n) CHECK(bit_identical<T>(z[n], z1[n]));
}

}  // namespace

TEMPLATE_TEST_CASE("a warm Tucker workspace makes no allocation", "[tucker]", float, double) {
  // The core (2, 3, 2) of the audit that found two allocations per warm expansion and one per compression.
  check_no_allocation_when_warm<TestType, 3>({5, 7, 4}, {2, 3, 2}, 8);
  check_no_allocation_when_warm<TestType, 1>({9}, {4}, 9);
  check_no_allocation_when_warm<TestType, 2>({16, 256}, {2, 16}, 10);
  // Two and three levels of shared compressions in tucker_compress_all_but_one.
  check_no_allocation_when_warm<TestType, 4>({12, 8, 3, 3}, {4, 3, 2, 2}, 11);
  check_no_allocation_when_warm<TestType, 5>({6, 5, 3, 2, 3}, {2, 5, 1, 2, 2}, 12);
}

TEMPLATE_TEST_CASE("Tucker chains reject factors that do not fit, before writing", "[tucker]", float, double) {
  std::mt19937_64 gen(6);
  const ta::shape<3> full{5, 4, 3}, core{2, 2, 2};
  auto u = random_factors<TestType, 3>(full, core, gen);
  ta::tensor<TestType, 3> g(core), y(full), x(full);
  g.setConstant(1);
  x.setConstant(1);
  y.setConstant(TestType(42));
  u[1].resize(4, 3);  // rank 3 against a core extent of 2
  u[1].setConstant(1);
  REQUIRE_THROWS_AS((ta::tucker_expand<TestType, 3>(ta::view(g), views<TestType, 3>(u), ta::writable_view(y))),
                    ta::argument_error);
  for (ta::index e = 0; e < y.size(); ++e) REQUIRE(y.data()[e] == TestType(42));
  g.setConstant(TestType(42));
  REQUIRE_THROWS_AS((ta::tucker_compress<TestType, 3>(ta::view(x), views<TestType, 3>(u), ta::writable_view(g))),
                    ta::argument_error);
  for (ta::index e = 0; e < g.size(); ++e) REQUIRE(g.data()[e] == TestType(42));
  u[1].resize(5, 2);  // 5 rows against an extent of 4
  u[1].setConstant(1);
  std::array<ta::tensor<TestType, 3>, 3> z;
  REQUIRE_THROWS_AS((ta::tucker_compress_all_but_one<TestType, 3>(ta::view(x), views<TestType, 3>(u), z)),
                    ta::argument_error);
  REQUIRE_THROWS_WITH(ta::tucker_compress(x, u), Catch::Contains("tucker_compress") && Catch::Contains("factors[1]"));
  // The orders refuse extents no tensor has.
  REQUIRE_THROWS_WITH((ta::expansion_order<2>({2, -3}, {4, 5})), Catch::Contains("expansion_order"));
  REQUIRE_THROWS_WITH((ta::compression_order<3>({ta::index(1) << 40, ta::index(1) << 40, 2}, {1, 1, 1})),
                      Catch::Contains("compression_order"));
}

TEMPLATE_TEST_CASE("Tucker chains reject a rank of 0 or above the extent it factors, before writing", "[tucker]",
                   float, double) {
  std::mt19937_64 gen(7);
  const ta::shape<2> full{3, 4};
  for (const ta::shape<2> core : {ta::shape<2>{0, 2}, ta::shape<2>{2, 5}}) {
    INFO("core " << ta::detail::dims_string(core, 2));
    const auto u = random_factors<TestType, 2>(full, core, gen);
    ta::tensor<TestType, 2> g(core), y(full), x(full);
    g.setConstant(1);
    x.setConstant(1);
    y.setConstant(TestType(42));
    REQUIRE_THROWS_WITH((ta::tucker_expand<TestType, 2>(ta::view(g), views<TestType, 2>(u), ta::writable_view(y))),
                        Catch::Contains("tucker_expand") && Catch::Contains("rank"));
    for (ta::index e = 0; e < y.size(); ++e) REQUIRE(y.data()[e] == TestType(42));
    g.setConstant(TestType(42));
    REQUIRE_THROWS_AS((ta::tucker_compress<TestType, 2>(ta::view(x), views<TestType, 2>(u), ta::writable_view(g))),
                      ta::argument_error);
    for (ta::index e = 0; e < g.size(); ++e) REQUIRE(g.data()[e] == TestType(42));
    std::array<ta::tensor<TestType, 2>, 2> z;
    REQUIRE_THROWS_AS((ta::tucker_compress_all_but_one<TestType, 2>(ta::view(x), views<TestType, 2>(u), z)),
                      ta::argument_error);
  }
}
