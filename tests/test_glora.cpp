// GLoRA: every configuration of one rank against PyTorch autograd (forward, backward, merge, with and
// without a bias), backward ≡ central finite differences (double) on a sample of configurations,
// merged forward ≡ unmerged forward for every configuration, weight space on conv weights of rank 3..5,
// the configuration space (enumeration, uniform draws, the official parameter count, the text form),
// initialisation, parameter names, no allocation with a warm workspace, backward with dx = x, and every
// bad-input path.
// g++ 12 sees the counting operator new/delete (malloc/free) inlined into std::string and std::set code
// and reports a false -Wmismatched-new-delete; the pair is matched by construction.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
#include "allocation_counter.hpp"

#include <new>


#include <tensor_adapters/glora.hpp>

#include <catch2/catch.hpp>

#include "reference.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace ta = tensor_adapters;
namespace td = tensor_adapters::detail;

namespace {

template <class T>
T tolerance(double size) {
  return static_cast<T>(64 * std::numeric_limits<T>::epsilon() * size);
}

template <class T>
T max_abs_diff(const T* a, const T* b, ta::index n) {
  T m = 0;
  for (ta::index i = 0; i < n; ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

template <class T, int N>
T max_abs_diff(const ta::tensor<T, N>& a, const ta::tensor<T, N>& b) {
  REQUIRE(a.dimensions() == b.dimensions());
  return max_abs_diff(a.data(), b.data(), a.size());
}

template <class T, int N>
T max_abs(const ta::tensor<T, N>& a) {
  T m = 0;
  for (ta::index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i]));
  return m;
}

// A store with every entry random, as if trained.
template <class T>
ta::glora<T> trained_glora(ta::index out, ta::index in, ta::index rank, std::mt19937_64& gen) {
  ta::glora<T> a = ta::make_glora<T>(out, in, {rank}, gen);
  ta::for_each_parameter(a, [&](const char*, auto& p) { ta::fill_normal(p, 0.0, 0.5, gen); });
  return a;
}

// Plain loops in long double, straight from the formulas: y = x · W_effᵀ + b_eff.
template <class T>
struct loop_layer {
  std::vector<long double> w, b;  // (O, I), (O)
};

template <class T>
long double read_ab(const ta::glora_choice& k, const ta::tensor<T, 2>& xd, const ta::tensor<T, 2>& xu, ta::index o,
                    ta::index i) {
  switch (k.kind) {
    case ta::glora_kind::lora: {
      long double s = 0;
      for (ta::index j = 0; j < k.rank; ++j) s += static_cast<long double>(xd(o, j)) * xu(j, i);
      return s;
    }
    case ta::glora_kind::vector:
      return xd(o, 0);
    case ta::glora_kind::scalar:
      return xd(0, 0);
    default:
      return 0;
  }
}

template <class T>
loop_layer<T> loop_merge(const ta::glora<T>& a, const ta::glora_config& c, const ta::tensor<T, 2>& w0,
                         const ta::tensor<T, 1>* b0) {
  const ta::index O = w0.dimension(0), I = w0.dimension(1);
  loop_layer<T> l;
  l.w.resize(std::size_t(O * I));
  l.b.resize(std::size_t(O));
  for (ta::index o = 0; o < O; ++o) {
    long double b = 0;
    if (b0) {
      const long double d = c.D.kind == ta::glora_kind::vector   ? a.D(o)
                            : c.D.kind == ta::glora_kind::scalar ? a.D(0)
                                                                 : 0;
      b = (*b0)(o) + (*b0)(o) * d;
    }
    b += c.E.kind == ta::glora_kind::vector ? a.E(o) : c.E.kind == ta::glora_kind::scalar ? a.E(0) : 0;
    for (ta::index i = 0; i < I; ++i) {
      const long double w = w0(o, i);
      l.w[std::size_t(o * I + i)] = w + w * read_ab(c.A, a.Ad, a.Au, o, i) + read_ab(c.B, a.Bd, a.Bu, o, i);
      b += w * read_ab(c.C, a.Cd, a.Cu, i, 0);
    }
    l.b[std::size_t(o)] = b;
  }
  return l;
}

template <class T>
ta::tensor<T, 2> loop_forward(const ta::glora<T>& a, const ta::glora_config& c, const ta::tensor<T, 2>& x,
                              const ta::tensor<T, 2>& w0, const ta::tensor<T, 1>* b0) {
  const ta::index n = x.dimension(0), O = w0.dimension(0), I = w0.dimension(1);
  const loop_layer<T> l = loop_merge(a, c, w0, b0);
  ta::tensor<T, 2> y(n, O);
  for (ta::index r = 0; r < n; ++r)
    for (ta::index o = 0; o < O; ++o) {
      long double s = l.b[std::size_t(o)];
      for (ta::index i = 0; i < I; ++i) s += l.w[std::size_t(o * I + i)] * x(r, i);
      y(r, o) = static_cast<T>(s);
    }
  return y;
}

// The glora_kind code the reference generator writes: r for lora_r, -1 vector, -2 scalar, 0 none.
int kind_code(const ta::glora_choice& c) {
  switch (c.kind) {
    case ta::glora_kind::lora:
      return int(c.rank);
    case ta::glora_kind::vector:
      return -1;
    case ta::glora_kind::scalar:
      return -2;
    default:
      return 0;
  }
}

// Item k of a reference tensor stacked over configurations, as a flat pointer.
template <class T, int N>
const T* item(const ta::tensor<T, N>& stacked, ta::index k) {
  return stacked.data() + k * (stacked.size() / stacked.dimension(0));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// PyTorch references

TEMPLATE_TEST_CASE("all 432 configurations match PyTorch autograd: forward, backward, merge, with and without bias",
                   "[glora]", float, double) {
  using T = TestType;
  const std::vector<ta::glora_config> configs = ta::enumerate_glora_configs(ta::make_glora_space(2));
  REQUIRE(configs.size() == 432);
  for (bool with_bias : {true, false}) {
    INFO((with_bias ? "with bias" : "without bias"));
    reference::file f(with_bias ? "glora_bias.txt" : "glora_nobias.txt");
    const auto x = f.get<T, 2>("x"), w0 = f.get<T, 2>("w0"), dy = f.get<T, 2>("dy");
    const ta::tensor<T, 1> b0 = with_bias ? f.get<T, 1>("b0") : ta::tensor<T, 1>(5);
    ta::glora<T> store;
    store.Ad = f.get<T, 2>("Ad"), store.Au = f.get<T, 2>("Au"), store.Bd = f.get<T, 2>("Bd");
    store.Bu = f.get<T, 2>("Bu"), store.Cd = f.get<T, 2>("Cd"), store.Cu = f.get<T, 2>("Cu");
    store.D = f.get<T, 1>("D"), store.E = f.get<T, 1>("E");
    REQUIRE(ta::max_rank(store) == 3);
    const auto kinds = f.get<T, 2>("kinds");
    const auto y_ref = f.get<T, 3>("y"), dx_ref = f.get<T, 3>("dx"), w_ref = f.get<T, 3>("w_eff");
    const auto b_ref = f.get<T, 2>("b_eff");
    std::map<std::string, ta::tensor<T, 3>> g_ref;
    for (const char* name : {"Ad", "Au", "Bd", "Bu", "Cd", "Cu"}) g_ref[name] = f.get<T, 3>(std::string("g") + name);
    const auto gD_ref = f.get<T, 2>("gD"), gE_ref = f.get<T, 2>("gE");
    REQUIRE(kinds.dimension(0) == 432);

    // The values are small multiples of 1/2: every result is exact in float and double, up to the
    // order of additions.
    const T tol = tolerance<T>(64);
    ta::glora_workspace<T> ws;
    ta::glora<T> grad;
    ta::tensor<T, 2> y(3, 5), dx(3, 4), w_eff(5, 4);
    ta::tensor<T, 1> b_eff(5);
    for (ta::index k = 0; k < 432; ++k) {
      const ta::glora_config& c = configs[std::size_t(k)];
      INFO("configuration " << k << ": " << ta::to_string(c));
      const ta::glora_choice* choice[5] = {&c.A, &c.B, &c.C, &c.D, &c.E};
      for (int t = 0; t < 5; ++t) REQUIRE(kind_code(*choice[t]) == int(kinds(k, t)));
      if (with_bias) {
        ta::forward(store, c, x, w0, b0, y, ws);
        ta::backward(store, c, x, w0, b0, dy, dx, grad, ws);
        ta::merge<T, 2>(store, c, ta::view(w0), ta::view(b0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws);
      } else {
        ta::forward(store, c, x, w0, y, ws);
        ta::backward(store, c, x, w0, dy, dx, grad, ws);
        ta::merge<T, 2>(store, c, ta::view(w0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws);
      }
      CHECK(max_abs_diff(y.data(), item(y_ref, k), y.size()) <= tol);
      CHECK(max_abs_diff(dx.data(), item(dx_ref, k), dx.size()) <= tol);
      CHECK(max_abs_diff(w_eff.data(), item(w_ref, k), w_eff.size()) <= tol);
      CHECK(max_abs_diff(b_eff.data(), item(b_ref, k), b_eff.size()) <= tol);
      ta::for_each_parameter(grad, [&](const char* name, const auto& g) {
        const std::string short_name = std::string(name).substr(6);  // "glora_Ad" → "Ad"
        const T* expected = short_name == "D"   ? item(gD_ref, k)
                            : short_name == "E" ? item(gE_ref, k)
                                                : item(g_ref.at(short_name), k);
        INFO("gradient " << name);
        CHECK(max_abs_diff(g.data(), expected, g.size()) <= tol);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Invariants over random stores

TEST_CASE("backward matches central finite differences on a sample of configurations", "[glora]") {
  std::mt19937_64 gen(4);
  const ta::index n = 3, O = 5, I = 4, R = 3;
  const auto configs = ta::enumerate_glora_configs(ta::make_glora_space(2));
  const double h = 1e-6;
  ta::glora<double> a = trained_glora<double>(O, I, R, gen);
  ta::tensor<double, 2> x(n, I), w0(O, I), dy(n, O);
  ta::tensor<double, 1> b0(O);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::fill_normal(dy, 0, 1, gen);
  for (std::size_t k = 0; k < configs.size(); k += 13) {
    const ta::glora_config& c = configs[k];
    for (bool with_bias : {true, false}) {
      INFO("configuration " << k << ": " << ta::to_string(c) << (with_bias ? " with bias" : " without bias"));
      auto loss = [&](const ta::glora<double>& p, const ta::tensor<double, 2>& xx) {
        ta::tensor<double, 0> l =
            ((with_bias ? ta::forward(p, c, xx, w0, b0) : ta::forward(p, c, xx, w0)) * dy).sum();
        return l();
      };
      ta::glora_gradients<double> g = with_bias ? ta::backward(a, c, x, w0, b0, dy) : ta::backward(a, c, x, w0, dy);
      ta::for_each_parameter(a, g.grad, [&](const char* name, auto& p, const auto& grad) {
        for (ta::index i = 0; i < p.size(); ++i) {
          const double keep = p.data()[i];
          p.data()[i] = keep + h;
          const double up = loss(a, x);
          p.data()[i] = keep - h;
          const double down = loss(a, x);
          p.data()[i] = keep;
          const double fd = (up - down) / (2 * h);
          INFO(name << "[" << i << "]");
          CHECK(grad.data()[i] == Approx(fd).margin(1e-6).epsilon(1e-6));
          // An entry the configuration does not read has exactly zero gradient.
          if (fd == 0.0) CHECK(grad.data()[i] == 0.0);
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
}

TEMPLATE_TEST_CASE("forward matches nested loops and the merged layer, for every configuration", "[glora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(5);
  struct layer_shape {
    ta::index n, out, in, R;
  };
  // The second shape has several ranks in its space, and rank R itself.
  for (const layer_shape s : {layer_shape{4, 6, 5, 3}, layer_shape{2, 7, 9, 4}}) {
    const auto space = s.R == 3 ? ta::make_glora_space(2) : ta::make_glora_space(std::vector<ta::index>{1, 4});
    const auto configs = ta::enumerate_glora_configs(space);
    auto a = trained_glora<T>(s.out, s.in, s.R, gen);
    ta::tensor<T, 2> x(s.n, s.in), w0(s.out, s.in);
    ta::tensor<T, 1> b0(s.out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    const T tol = tolerance<T>(double(s.in * s.R) * 4);
    for (const auto& c : configs) {
      INFO(ta::to_string(c));
      const ta::tensor<T, 2> y = ta::forward(a, c, x, w0, b0);
      const ta::tensor<T, 2> y_nobias = ta::forward(a, c, x, w0);
      CHECK(max_abs_diff(y, loop_forward(a, c, x, w0, &b0)) <= tol);
      CHECK(max_abs_diff(y_nobias, loop_forward<T>(a, c, x, w0, nullptr)) <= tol);
      // Merged forward: the plain layer x · W_effᵀ + b_eff through the all-none configuration.
      const ta::glora_config plain{};
      const auto m = ta::merge(a, c, w0, b0);
      CHECK(max_abs_diff(ta::forward(a, plain, x, m.weight, m.bias), y) <= tol);
      const auto m0 = ta::merge(a, c, w0);
      CHECK(max_abs_diff(ta::forward(a, plain, x, m0.weight, m0.bias), y_nobias) <= tol);
      // W_eff = W0 + delta_weight, b_eff = b0 + delta_bias.
      const ta::tensor<T, 2> w_sum = w0 + ta::delta_weight(a, c, w0);
      CHECK(max_abs_diff(w_sum, m.weight) <= tol);
      const ta::tensor<T, 1> b_sum = b0 + ta::delta_bias(a, c, w0, b0);
      CHECK(max_abs_diff(b_sum, m.bias) <= tol);
      CHECK(max_abs_diff(ta::delta_bias(a, c, w0), m0.bias) <= tol);
    }
  }
}

TEMPLATE_TEST_CASE("the merge uses the original W0 and b0 and leaves them untouched", "[glora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(6);
  auto a = trained_glora<T>(6, 5, 2, gen);
  ta::tensor<T, 2> w0(6, 5);
  ta::tensor<T, 1> b0(6);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::tensor<T, 2> w_before = w0;
  const ta::tensor<T, 1> b_before = b0;
  const ta::glora_config c = ta::parse_glora_config("A=lora_2,B=lora_2,C=lora_2,D=vector,E=vector");
  const auto m = ta::merge(a, c, w0, b0);
  CHECK(max_abs_diff(w0, w_before) == T(0));
  CHECK(max_abs_diff(b0, b_before) == T(0));
  // The prompt term from the updated weight (W_eff · C) would differ; W0 · C is the spec.
  const loop_layer<T> l = loop_merge(a, c, w0, &b0);
  for (ta::index o = 0; o < 6; ++o) CHECK(double(m.bias(o)) == Approx(double(l.b[std::size_t(o)])).margin(1e-4));
  ta::tensor<T, 1> from_updated = m.bias;
  for (ta::index o = 0; o < 6; ++o) {
    long double extra = 0;
    for (ta::index i = 0; i < 5; ++i)
      extra += (static_cast<long double>(m.weight(o, i)) - w0(o, i)) * read_ab(c.C, a.Cd, a.Cu, i, 0);
    from_updated(o) += static_cast<T>(extra);
  }
  CHECK(max_abs_diff(from_updated, m.bias) > T(1e-3));
}

TEMPLATE_TEST_CASE("merge in place (w_eff, b_eff = w0, b0) equals the merge into new tensors, bit for bit", "[glora]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(16);
  // 40 × 33: several row blocks and a remainder in the lora rows' vector loop.
  const auto a = trained_glora<T>(40, 33, 2, gen);
  ta::tensor<T, 2> w0(40, 33);
  ta::tensor<T, 1> b0(40);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::glora_workspace<T> ws;
  for (const auto& c : ta::enumerate_glora_configs(ta::make_glora_space(2))) {
    INFO(ta::to_string(c));
    const auto m = ta::merge(a, c, w0, b0);
    ta::tensor<T, 2> w = w0;
    ta::tensor<T, 1> b = b0;
    ta::merge<T, 2>(a, c, ta::view(w), ta::view(b), ta::writable_view(w), ta::writable_view(b), ws);
    CHECK(max_abs_diff(w, m.weight) == T(0));
    CHECK(max_abs_diff(b, m.bias) == T(0));
    // Without a bias: W_eff in place, b_eff = E + W0 · C into a new vector.
    const auto m0 = ta::merge(a, c, w0);
    ta::tensor<T, 2> w_nobias = w0;
    ta::tensor<T, 1> b_nobias(40);
    ta::merge<T, 2>(a, c, ta::view(w_nobias), ta::writable_view(w_nobias), ta::writable_view(b_nobias), ws);
    CHECK(max_abs_diff(w_nobias, m0.weight) == T(0));
    CHECK(max_abs_diff(b_nobias, m0.bias) == T(0));
  }
}

namespace {

// Weight space on a weight of shape `dims` (rank N): delta_weight equals the linear layer's on the (O, F)
// view; delta_weight_vjp and delta_bias_vjp match finite differences of L = Σ gW ⊙ ΔW + Σ gb ⊙ Δb.
template <int N>
void check_weight_space(const ta::shape<N>& dims, std::mt19937_64& gen) {
  ta::index F = 1;
  for (int d = 1; d < N; ++d) F *= dims[std::size_t(d)];
  const ta::index O = dims[0], R = std::min<ta::index>(3, std::min(O, F));
  auto a = trained_glora<double>(O, F, R, gen);
  ta::tensor<double, N> w0(dims), gw(dims);
  ta::tensor<double, 1> b0(O), gb(O);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(gw, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::fill_normal(gb, 0, 1, gen);
  const ta::tensor<double, 2> w0_flat = w0.reshape(Eigen::DSizes<ta::index, 2>(O, F));
  const auto configs = ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{1, R}));
  ta::glora_workspace<double> ws;
  for (std::size_t k = 0; k < configs.size(); k += 29) {
    const auto& c = configs[k];
    INFO("weight rank " << N << ", configuration " << ta::to_string(c));
    const ta::tensor<double, N> dw = ta::delta_weight(a, c, w0);
    const ta::tensor<double, 2> dw_flat = ta::delta_weight(a, c, w0_flat);
    CHECK(max_abs_diff(dw.data(), dw_flat.data(), dw.size()) == 0.0);
    CHECK(max_abs_diff(ta::delta_bias(a, c, w0, b0), ta::delta_bias(a, c, w0_flat, b0)) == 0.0);

    ta::glora<double> g_w, g_b;
    ta::delta_weight_vjp<double, N>(a, c, ta::view(w0), ta::view(gw), g_w, ws);
    ta::delta_bias_vjp<double, N>(a, c, ta::view(w0), ta::view(b0), ta::view(gb), g_b, ws);
    auto loss = [&](const ta::glora<double>& p) {
      ta::tensor<double, 0> l1 = (ta::delta_weight(p, c, w0) * gw).sum();
      ta::tensor<double, 0> l2 = (ta::delta_bias(p, c, w0, b0) * gb).sum();
      return l1() + l2();
    };
    const double h = 1e-6;
    std::vector<double> total;
    ta::for_each_parameter(g_w, [&](const char*, const auto& g) { total.insert(total.end(), g.data(), g.data() + g.size()); });
    std::size_t j = 0;
    ta::for_each_parameter(g_b, [&](const char*, const auto& g) {
      for (ta::index i = 0; i < g.size(); ++i) total[j++] += g.data()[i];
    });
    j = 0;
    ta::for_each_parameter(a, [&](const char* name, auto& p) {
      for (ta::index i = 0; i < p.size(); ++i, ++j) {
        const double keep = p.data()[i];
        p.data()[i] = keep + h;
        const double up = loss(a);
        p.data()[i] = keep - h;
        const double down = loss(a);
        p.data()[i] = keep;
        INFO(name << "[" << i << "]");
        CHECK(total[j] == Approx((up - down) / (2 * h)).margin(1e-6).epsilon(1e-6));
      }
    });
    // delta_weight_vjp leaves C, D, E at zero; delta_bias_vjp leaves A, B at zero.
    CHECK(max_abs(g_w.Cd) + max_abs(g_w.Cu) + max_abs(g_w.D) + max_abs(g_w.E) == 0.0);
    CHECK(max_abs(g_b.Ad) + max_abs(g_b.Au) + max_abs(g_b.Bd) + max_abs(g_b.Bu) == 0.0);
  }
}

}  // namespace

TEST_CASE("weight space on linear and conv weights of rank 2..5 matches finite differences", "[glora]") {
  std::mt19937_64 gen(7);
  check_weight_space<2>({5, 4}, gen);
  check_weight_space<3>({4, 3, 3}, gen);        // conv1d
  check_weight_space<4>({5, 2, 3, 3}, gen);     // conv2d
  check_weight_space<4>({3, 4, 1, 1}, gen);     // 1x1 conv
  check_weight_space<5>({3, 2, 2, 2, 2}, gen);  // conv3d
}

TEMPLATE_TEST_CASE("backward equals the weight-space VJPs of gW = dyᵀ·x and gb = Σ dy", "[glora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(8);
  const ta::index n = 6, O = 7, I = 5, R = 3;
  auto a = trained_glora<T>(O, I, R, gen);
  ta::tensor<T, 2> x(n, I), w0(O, I), dy(n, O);
  ta::tensor<T, 1> b0(O);
  for (auto* t : {&x, &w0, &dy}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::tensor<T, 2> gw(O, I);
  ta::tensor<T, 1> gb(O);
  for (ta::index o = 0; o < O; ++o) {
    T s = 0;
    for (ta::index r = 0; r < n; ++r) s += dy(r, o);
    gb(o) = s;
    for (ta::index i = 0; i < I; ++i) {
      T t = 0;
      for (ta::index r = 0; r < n; ++r) t += dy(r, o) * x(r, i);
      gw(o, i) = t;
    }
  }
  ta::glora_workspace<T> ws;
  ta::glora<T> g_w, g_b;
  for (const auto& c : ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{3, 2}))) {
    INFO(ta::to_string(c));
    const auto g = ta::backward(a, c, x, w0, b0, dy);
    ta::delta_weight_vjp<T, 2>(a, c, ta::view(w0), ta::view(gw), g_w, ws);
    ta::delta_bias_vjp<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::view(gb), g_b, ws);
    // The value-returning forms give the same gradients (with and without a bias).
    const ta::glora<T> g_w_value = ta::delta_weight_vjp(a, c, w0, gw);
    const ta::glora<T> g_b_value = ta::delta_bias_vjp(a, c, w0, b0, gb);
    ta::glora<T> g_b_unbiased;
    ta::delta_bias_vjp<T, 2>(a, c, ta::view(w0), ta::view(gb), g_b_unbiased, ws);
    const ta::glora<T> g_b_unbiased_value = ta::delta_bias_vjp(a, c, w0, gb);
    const auto same = [](const char*, const auto& p, const auto& q) { CHECK(max_abs_diff(p, q) == T(0)); };
    ta::for_each_parameter(g_w, g_w_value, same);
    ta::for_each_parameter(g_b, g_b_value, same);
    ta::for_each_parameter(g_b_unbiased, g_b_unbiased_value, same);
    ta::for_each_parameter(g_w, g_b, [&](const char* name, auto& pw, const auto& pb) {
      ta::tensor<T, 1> sum(pw.size()), got(pw.size());
      for (ta::index i = 0; i < pw.size(); ++i) sum(i) = pw.data()[i] + pb.data()[i];
      std::size_t found = 0;
      ta::for_each_parameter(g.grad, [&](const char* other, const auto& pg) {
        if (std::string(other) == name) std::copy(pg.data(), pg.data() + pg.size(), got.data()), ++found;
      });
      REQUIRE(found == 1);
      INFO(name);
      CHECK(max_abs_diff(sum, got) <= tolerance<T>(double(n * I)));
    });
  }
}

namespace {

// The store gradient and dx straight from the formulas, in long double.
template <class T>
ta::glora_gradients<T> loop_backward(const ta::glora<T>& a, const ta::glora_config& c, const ta::tensor<T, 2>& x,
                                     const ta::tensor<T, 2>& w0, const ta::tensor<T, 1>* b0, const ta::tensor<T, 2>& dy) {
  const ta::index n = x.dimension(0), O = w0.dimension(0), I = w0.dimension(1), R = ta::max_rank(a);
  std::vector<long double> gw(std::size_t(O * I), 0), gb(std::size_t(O), 0), v(std::size_t(I), 0);
  for (ta::index o = 0; o < O; ++o)
    for (ta::index r = 0; r < n; ++r) {
      gb[std::size_t(o)] += dy(r, o);
      for (ta::index i = 0; i < I; ++i) gw[std::size_t(o * I + i)] += static_cast<long double>(dy(r, o)) * x(r, i);
    }
  for (ta::index o = 0; o < O; ++o)
    for (ta::index i = 0; i < I; ++i) v[std::size_t(i)] += static_cast<long double>(w0(o, i)) * gb[std::size_t(o)];
  ta::glora_gradients<T> g;
  g.grad = ta::zeros_like(a);
  // A sees W0 ⊙ gW, B sees gW.
  auto factor = [&](const ta::glora_choice& k, const ta::tensor<T, 2>& xd, const ta::tensor<T, 2>& xu, bool hadamard,
                    ta::tensor<T, 2>& gxd, ta::tensor<T, 2>& gxu) {
    auto G = [&](ta::index o, ta::index i) {
      return gw[std::size_t(o * I + i)] * (hadamard ? static_cast<long double>(w0(o, i)) : 1.0L);
    };
    long double total = 0;
    for (ta::index o = 0; o < O; ++o) {
      long double row = 0;
      for (ta::index i = 0; i < I; ++i) row += G(o, i);
      total += row;
      if (k.kind == ta::glora_kind::vector) gxd(o, 0) = static_cast<T>(row);
      if (k.kind == ta::glora_kind::lora)
        for (ta::index j = 0; j < k.rank; ++j) {
          long double s = 0;
          for (ta::index i = 0; i < I; ++i) s += G(o, i) * xu(j, i);
          gxd(o, j) = static_cast<T>(s);
        }
    }
    if (k.kind == ta::glora_kind::scalar) gxd(0, 0) = static_cast<T>(total);
    if (k.kind == ta::glora_kind::lora) {  // Σ_o over the rows of G in order, a row at a time
      std::vector<long double> s(std::size_t(k.rank * I), 0);
      for (ta::index o = 0; o < O; ++o)
        for (ta::index j = 0; j < k.rank; ++j)
          for (ta::index i = 0; i < I; ++i) s[std::size_t(j * I + i)] += static_cast<long double>(xd(o, j)) * G(o, i);
      for (ta::index j = 0; j < k.rank; ++j)
        for (ta::index i = 0; i < I; ++i) gxu(j, i) = static_cast<T>(s[std::size_t(j * I + i)]);
    }
  };
  factor(c.A, a.Ad, a.Au, true, g.grad.Ad, g.grad.Au);
  factor(c.B, a.Bd, a.Bu, false, g.grad.Bd, g.grad.Bu);
  if (c.C.kind == ta::glora_kind::vector)
    for (ta::index i = 0; i < I; ++i) g.grad.Cd(i, 0) = static_cast<T>(v[std::size_t(i)]);
  if (c.C.kind == ta::glora_kind::lora)
    for (ta::index j = 0; j < c.C.rank; ++j) {
      long double s = 0;
      for (ta::index i = 0; i < I; ++i) {
        g.grad.Cd(i, j) = static_cast<T>(v[std::size_t(i)] * a.Cu(j, 0));
        s += static_cast<long double>(a.Cd(i, j)) * v[std::size_t(i)];
      }
      g.grad.Cu(j, 0) = static_cast<T>(s);
    }
  long double dsum = 0, esum = 0;
  for (ta::index o = 0; o < O; ++o) {
    const long double bd = b0 ? static_cast<long double>((*b0)(o)) * gb[std::size_t(o)] : 0.0L;
    dsum += bd;
    esum += gb[std::size_t(o)];
    if (c.D.kind == ta::glora_kind::vector) g.grad.D(o) = static_cast<T>(bd);
    if (c.E.kind == ta::glora_kind::vector) g.grad.E(o) = static_cast<T>(gb[std::size_t(o)]);
  }
  if (c.D.kind == ta::glora_kind::scalar) g.grad.D(0) = static_cast<T>(dsum);
  if (c.E.kind == ta::glora_kind::scalar) g.grad.E(0) = static_cast<T>(esum);
  const loop_layer<T> l = loop_merge(a, c, w0, b0);
  g.dx.resize(n, I);
  for (ta::index r = 0; r < n; ++r) {  // Σ_o over the rows of W_eff in order, a row at a time
    std::vector<long double> s(std::size_t(I), 0);
    for (ta::index o = 0; o < O; ++o)
      for (ta::index i = 0; i < I; ++i) s[std::size_t(i)] += static_cast<long double>(dy(r, o)) * l.w[std::size_t(o * I + i)];
    for (ta::index i = 0; i < I; ++i) g.dx(r, i) = static_cast<T>(s[std::size_t(i)]);
  }
  (void)R;
  return g;
}

}  // namespace

TEMPLATE_TEST_CASE("the fused pass forming W_eff matches its scalar reference and plain loops", "[glora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(31);
  std::normal_distribution<double> normal;
  const ta::index m = 5, R = 8;
  for (ta::index I : {1, 7, 63, 64, 65, 200, 1031})
    for (ta::index ra : {1, 3, 8})
      for (ta::index rb : {0, 2, 8})
        for (bool add_w0 : {false, true}) {
          std::vector<T> ad(m * R), bd(m * R), au(ra * I), bu(rb * I + 1), w0(m * I);
          for (auto* v : {&ad, &bd, &au, &bu, &w0})
            for (auto& e : *v) e = T(normal(gen));
          std::vector<T> got(m * I), scalar(m * I);
          td::glora_lora_rows<T>(m, I, R, ra, ad.data(), au.data(), rb, bd.data(), bu.data(), w0.data(), add_w0,
                                 got.data());
          td::glora_lora_rows<T, td::scalar_isa>(m, I, R, ra, ad.data(), au.data(), rb, bd.data(), bu.data(),
                                                 w0.data(), add_w0, scalar.data());
          double worst = 0, worst_scalar = 0;  // the largest error over its bound
          for (ta::index o = 0; o < m; ++o)
            for (ta::index i = 0; i < I; ++i) {
              long double sa = 0, sb = 0, mag = 0;
              for (ta::index r = 0; r < ra; ++r) sa += (long double)ad[o * R + r] * au[r * I + i];
              for (ta::index r = 0; r < rb; ++r) sb += (long double)bd[o * R + r] * bu[r * I + i];
              for (ta::index r = 0; r < ra; ++r) mag += std::abs((long double)ad[o * R + r] * au[r * I + i]);
              for (ta::index r = 0; r < rb; ++r) mag += std::abs((long double)bd[o * R + r] * bu[r * I + i]);
              const long double w = w0[o * I + i];
              const long double want = (add_w0 ? w + w * sa : w * sa) + sb;
              const double bound = double(ra + rb + 3) * double(std::numeric_limits<T>::epsilon()) *
                                   double(std::abs(w) * (1 + mag) + mag + std::abs(want));
              worst = std::max(worst, double(std::abs(got[o * I + i] - want)) / bound);
              worst_scalar = std::max(worst_scalar, double(std::abs(scalar[o * I + i] - want)) / bound);
            }
          INFO("I " << I << " ra " << ra << " rb " << rb << " add_w0 " << add_w0);
          CHECK(worst <= 1);
          CHECK(worst_scalar <= 1);
        }
}

TEMPLATE_TEST_CASE("large layers (row blocks over several threads) match the formulas", "[glora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(14);
  // 1500 × 1400 is above the size at which the O·I work is split over threads, and several row blocks
  // (about 2 MiB each) fall to each thread.
  const ta::index n = 3, O = 1500, I = 1400, R = 4;
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
#endif
  auto a = trained_glora<T>(O, I, R, gen);
  ta::tensor<T, 2> x(n, I), w0(O, I), dy(n, O);
  ta::tensor<T, 1> b0(O);
  for (auto* t : {&x, &w0, &dy}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::glora_workspace<T> ws;
  const T tol = tolerance<T>(double(I + O) * 8);
  for (const char* text : {"A=lora_4,B=lora_3,C=lora_2,D=vector,E=vector", "A=vector,B=scalar,C=vector,D=scalar,E=scalar",
                           "A=scalar,B=vector,C=none,D=none,E=vector", "A=none,B=lora_4,C=lora_4,D=vector,E=none",
                           "A=none,B=vector,C=vector,D=scalar,E=scalar", "A=none,B=scalar,C=none,D=none,E=none",
                           "A=lora_1,B=none,C=none,D=none,E=none"}) {
    const ta::glora_config c = ta::parse_glora_config(text);
    INFO(text);
    ta::tensor<T, 2> y(n, O), dx(n, I);
    ta::glora<T> grad;
    ta::forward(a, c, x, w0, b0, y, ws);
    CHECK(max_abs_diff(y, loop_forward(a, c, x, w0, &b0)) <= tol);
    ta::backward(a, c, x, w0, b0, dy, dx, grad, ws);
    const auto expected = loop_backward(a, c, x, w0, &b0, dy);
    CHECK(max_abs_diff(dx, expected.dx) <= tol);
    ta::for_each_parameter(grad, expected.grad, [&](const char* name, auto& got, const auto& want) {
      INFO(name);
      CHECK(max_abs_diff(got, want) <= tol * std::max(T(1), max_abs(want)));
    });
    // Warm now, on every thread: the same calls make no allocation.
    ta::tensor<T, 2> w_eff(O, I);
    ta::tensor<T, 1> b_eff(O);
    ta::merge<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws);
    ta::delta_weight_vjp<T, 2>(a, c, ta::view(w0), ta::view(w_eff), grad, ws);
    // W0 + ΔW (ΔW formed without W0 added) is the merged weight.
    const ta::tensor<T, 2> w_sum = w0 + ta::delta_weight(a, c, w0);
    CHECK(max_abs_diff(w_sum, w_eff) <= tol * std::max(T(1), max_abs(w_eff)));
    allocation_counter::scope counting;
    ta::forward(a, c, x, w0, b0, y, ws);
    ta::backward(a, c, x, w0, b0, dy, dx, grad, ws);
    ta::merge<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws);
    ta::delta_weight_vjp<T, 2>(a, c, ta::view(w0), ta::view(w_eff), grad, ws);
    CHECK(counting.allocations() == 0);
  }
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
}

TEMPLATE_TEST_CASE("backward uses the forward's x · W0ᵀ only while x and w0 are the same", "[glora]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(17);
  const ta::index n = 6, O = 40, I = 33, R = 4;
  auto a = trained_glora<T>(O, I, R, gen);
  ta::tensor<T, 2> x(n, I), w0(O, I), dy(n, O), y(n, O), dx(n, I);
  ta::tensor<T, 1> b0(O);
  for (auto* t : {&x, &w0, &dy}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::glora_config c = ta::parse_glora_config("A=vector,B=lora_3,C=lora_2,D=vector,E=vector");
  // Bit-identical to a backward on a fresh workspace, which computes x · W0ᵀ itself.
  const auto same_as_fresh = [&](const ta::tensor<T, 2>& input, const ta::tensor<T, 2>& w, ta::glora_workspace<T>& ws) {
    ta::glora<T> grad, fresh_grad;
    ta::tensor<T, 2> fresh_dx(n, I);
    ta::glora_workspace<T> fresh;
    ta::backward(a, c, input, w, b0, dy, dx, grad, ws);
    ta::backward(a, c, input, w, b0, dy, fresh_dx, fresh_grad, fresh);
    bool same = std::memcmp(dx.data(), fresh_dx.data(), sizeof(T) * std::size_t(n * I)) == 0;
    ta::for_each_parameter(grad, fresh_grad, [&](const char*, const auto& got, const auto& want) {
      same = same && std::memcmp(got.data(), want.data(), sizeof(T) * std::size_t(got.size())) == 0;
    });
    return same;
  };
  ta::glora_workspace<T> ws;
  {
    ta::glora<T> grad;
    ta::backward(a, c, x, w0, b0, dy, dx, grad, ws);  // a workspace that has served a backward keeps z
    x.data()[0] += T(1);
  }
  SECTION("the same x and w0: the forward's x · W0ᵀ, for any configuration") {
    ta::forward(a, ta::parse_glora_config("A=scalar,B=none,C=none,D=none,E=none"), x, w0, b0, y, ws);
    CHECK(same_as_fresh(x, w0, ws));
    CHECK(same_as_fresh(x, w0, ws));  // the backward's own, kept in turn
  }
  SECTION("a workspace that has served no backward keeps nothing") {
    ta::glora_workspace<T> fresh;
    ta::forward(a, c, x, w0, b0, y, fresh);
    CHECK(fresh.z_w0 == nullptr);
    CHECK(fresh.z_x.empty());
  }
  SECTION("x changed after the forward (one bit of one value), or another w0: computed again") {
    for (const ta::index k : {ta::index(0), n * I - 1}) {
      ta::forward(a, c, x, w0, b0, y, ws);
      x.data()[k] = std::nextafter(x.data()[k], T(1));
      CHECK(same_as_fresh(x, w0, ws));
    }
    ta::forward(a, c, x, w0, b0, y, ws);
    const ta::tensor<T, 2> w1 = w0 * T(2);
    CHECK(same_as_fresh(x, w1, ws));
  }
  SECTION("a forward with A none keeps nothing") {
    ta::forward(a, c, x, w0, b0, y, ws);
    ta::tensor<T, 2> x1 = x * T(3);
    ta::forward(a, ta::parse_glora_config("A=none,B=none,C=none,D=none,E=none"), ta::view(x1), ta::view(w0), ta::view(b0),
                ta::writable_view(y), ws);
    CHECK(same_as_fresh(x, w0, ws));
  }
}

TEMPLATE_TEST_CASE("backward with dx = x (one buffer) equals the backward into another dx, bit for bit", "[glora]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(18);
  // Every configuration with lora ranks 2 and 4 (every kind of each of A–E), with and without a bias. The
  // aliased backward runs on a fresh workspace (it computes x · W0ᵀ itself when A is vector or scalar)
  // and on one whose forward kept x · W0ᵀ for this x; the reference runs on a fresh workspace into a
  // separate dx.
  const auto configs = ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{2, 4}));
  struct layer_shape {
    ta::index n, out, in;
  };
  for (const layer_shape s : {layer_shape{5, 12, 9}, layer_shape{7, 40, 70}}) {
    const ta::index n = s.n, O = s.out, I = s.in, R = 4;
    auto a = trained_glora<T>(O, I, R, gen);
    ta::tensor<T, 2> x(n, I), w0(O, I), dy(n, O), y(n, O), dx(n, I), xa(n, I);
    ta::tensor<T, 1> b0(O);
    for (auto* t : {&x, &w0, &dy}) ta::fill_normal(*t, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    ta::glora<T> grad, grad_alias;
    ta::glora_workspace<T> warm;  // after one backward with A vector, its forwards keep x · W0ᵀ
    ta::backward(a, ta::parse_glora_config("A=vector,B=none,C=none,D=none,E=none"), x, w0, b0, dy, dx, grad, warm);
    std::vector<std::string> differing;
    for (const auto& c : configs)
      for (const bool bias : {true, false}) {
        const auto run = [&](const ta::tensor<T, 2>& input, ta::tensor<T, 2>& out, ta::glora<T>& g,
                             ta::glora_workspace<T>& ws) {
          if (bias)
            ta::backward(a, c, input, w0, b0, dy, out, g, ws);
          else
            ta::backward(a, c, input, w0, dy, out, g, ws);
        };
        ta::glora_workspace<T> fresh;
        run(x, dx, grad, fresh);
        for (const bool warm_workspace : {false, true}) {
          ta::glora_workspace<T> cold;
          ta::glora_workspace<T>& ws = warm_workspace ? warm : cold;
          if (warm_workspace) {
            if (bias)
              ta::forward(a, c, x, w0, b0, y, ws);
            else
              ta::forward(a, c, x, w0, y, ws);
          }
          xa = x;
          run(xa, xa, grad_alias, ws);  // dx is x
          bool same = std::memcmp(xa.data(), dx.data(), sizeof(T) * std::size_t(n * I)) == 0;
          ta::for_each_parameter(grad_alias, grad, [&](const char*, const auto& got, const auto& want) {
            same = same && got.dimensions() == want.dimensions() &&
                   std::memcmp(got.data(), want.data(), sizeof(T) * std::size_t(got.size())) == 0;
          });
          if (!same)
            differing.push_back(ta::to_string(c) + (bias ? " with b0" : " without b0") +
                                (warm_workspace ? ", warm workspace" : ", fresh workspace"));
        }
      }
    INFO("(n, O, I) = (" << n << ", " << O << ", " << I << "): " << differing.size() << " of "
                         << 4 * configs.size() << " aliased calls differ"
                         << (differing.empty() ? std::string() : ", the first " + differing.front()));
    CHECK(differing.empty());
  }
}

// ---------------------------------------------------------------------------------------------------
// Initialisation and parameters

TEMPLATE_TEST_CASE("make_glora: zeros and kaiming- or xavier-uniform up factors, seeded; a new store is a no-op",
                   "[glora]", float, double) {
  using T = TestType;
  const ta::index O = 30, I = 200, R = 8;
  std::mt19937_64 gen(1), same(1);
  auto a = ta::make_glora<T>(O, I, {R}, gen);
  const auto b = ta::make_glora<T>(O, I, {R}, same);
  CHECK(ta::max_rank(a) == R);
  CHECK(ta::shape_of(a.Ad) == ta::shape<2>{O, R});
  CHECK(ta::shape_of(a.Au) == ta::shape<2>{R, I});
  CHECK(ta::shape_of(a.Bd) == ta::shape<2>{O, R});
  CHECK(ta::shape_of(a.Bu) == ta::shape<2>{R, I});
  CHECK(ta::shape_of(a.Cd) == ta::shape<2>{I, R});
  CHECK(ta::shape_of(a.Cu) == ta::shape<2>{R, 1});
  CHECK(ta::shape_of(a.D) == ta::shape<1>{O});
  CHECK(ta::shape_of(a.E) == ta::shape<1>{O});
  ta::for_each_parameter(a, b, [](const char* name, const auto& p, const auto& q) {
    INFO(name);
    CHECK(std::memcmp(p.data(), q.data(), sizeof(T) * std::size_t(p.size())) == 0);
  });
  CHECK(max_abs(a.Ad) + max_abs(a.Bd) + max_abs(a.Cd) + max_abs(a.D) + max_abs(a.E) == T(0));
  const double k = 1.0 / std::sqrt(double(I));  // kaiming_uniform_(a = √5)
  for (const auto* up : {&a.Au, &a.Bu}) {
    CHECK(double(max_abs(*up)) <= k);
    CHECK(double(max_abs(*up)) > 0.95 * k);
  }
  CHECK(double(max_abs(a.Cu)) <= 1.0);  // fan-in 1
  CHECK(double(max_abs(a.Cu)) > 0.2);
  CHECK(max_abs_diff(a.Au, a.Bu) > T(0));  // drawn one after the other

  const auto xv = ta::make_glora<T>(O, I, {R, ta::glora_init::xavier_uniform}, gen);
  const double bx = std::sqrt(6.0 / double(I + R)), bc = std::sqrt(6.0 / double(1 + R));
  CHECK(double(max_abs(xv.Au)) <= bx);
  CHECK(double(max_abs(xv.Au)) > 0.95 * bx);
  CHECK(double(max_abs(xv.Cu)) <= bc);
  // Cu's fan-in is 1: with I's, its bound would be √(6 / (I + R)), below a quarter of bc (8 draws all
  // under bc / 4 by chance: 4^-8).
  CHECK(double(max_abs(xv.Cu)) > 0.25 * bc);
  CHECK(max_abs(xv.Ad) == T(0));

  // Every configuration of a new store is an exact no-op.
  const auto small = ta::make_glora<T>(6, 5, {2}, gen);
  ta::tensor<T, 2> x(3, 5), w0(6, 5);
  ta::tensor<T, 1> b0(6);
  ta::fill_normal(x, 0, 1, gen);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::tensor<T, 2> base = ta::forward(small, ta::glora_config{}, x, w0, b0);
  for (const auto& c : ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{1, 2}))) {
    INFO(ta::to_string(c));
    CHECK(max_abs_diff(ta::forward(small, c, x, w0, b0), base) == T(0));
    const auto m = ta::merge(small, c, w0, b0);
    CHECK(max_abs_diff(m.weight, w0) == T(0));
    CHECK(max_abs_diff(m.bias, b0) == T(0));
  }

  // A conv weight (O, C, kh, kw) has fan-in C·kh·kw; its rank is deduced from the shape.
  const auto conv = ta::make_glora<T>(ta::shape<4>{8, 3, 3, 3}, {4}, gen);
  CHECK(ta::shape_of(conv.Au) == ta::shape<2>{4, 27});
  CHECK(ta::shape_of(conv.Cd) == ta::shape<2>{27, 4});
  const ta::tensor<T, 3> w3(6, 2, 5);
  CHECK(ta::shape_of(ta::make_glora<T>(ta::shape_of(w3), {2}, gen).Bu) == ta::shape<2>{2, 10});
}

TEMPLATE_TEST_CASE("parameters are visited under stable names; the gradient has the store's type", "[glora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(9);
  auto a = ta::make_glora<T>(10, 20, {3}, gen);
  std::vector<std::string> names;
  ta::for_each_parameter(a, [&](const char* name, const auto&) { names.emplace_back(name); });
  const std::vector<std::string> expected{"glora_Ad", "glora_Au", "glora_Bd", "glora_Bu",
                                          "glora_Cd", "glora_Cu", "glora_D",  "glora_E"};
  CHECK(names == expected);
  CHECK(ta::parameter_count(a) == 2 * 10 * 3 + 2 * 3 * 20 + 20 * 3 + 3 + 2 * 10);
  ta::glora<T> z = ta::zeros_like(a);
  std::vector<std::string> pair_names;
  ta::for_each_parameter(a, z, [&](const char* name, auto& p, const auto& g) {
    pair_names.emplace_back(name);
    CHECK(p.dimensions() == g.dimensions());
    CHECK(max_abs(g) == T(0));
    p.setConstant(T(1));  // the first argument is writable
  });
  CHECK(pair_names == expected);
  CHECK(a.Cu(2, 0) == T(1));
}

// ---------------------------------------------------------------------------------------------------
// Configuration space

TEST_CASE("the configuration space: 432 per rank, more with several ranks, uniform draws", "[glora]") {
  const auto one = ta::enumerate_glora_configs(ta::make_glora_space(4));
  CHECK(one.size() == 432);
  CHECK(ta::glora_space_size(ta::make_glora_space(4)) == 432);
  std::set<std::string> distinct;
  for (const auto& c : one) distinct.insert(ta::to_string(c));
  CHECK(distinct.size() == 432);
  // Per support tensor: A, B have 4 kinds, C 3 (never scalar), D and E 3 (never lora).
  for (const auto& c : one) {
    CHECK(c.C.kind != ta::glora_kind::scalar);
    CHECK(c.D.kind != ta::glora_kind::lora);
    CHECK(c.E.kind != ta::glora_kind::lora);
  }
  // Several ranks: (k + 3)² · (k + 2) · 9.
  CHECK(ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{2, 4, 8})).size() == 6 * 6 * 5 * 9);
  CHECK(ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{8, 4})).size() == 5 * 5 * 4 * 9);

  // Uniform draws: every choice of every support tensor appears about equally often; same seed, same draws.
  const auto space = ta::make_glora_space(std::vector<ta::index>{4, 8});
  std::mt19937_64 gen(10), same(10);
  std::map<std::string, int> counts;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const auto c = ta::random_glora_config(space, gen);
    CHECK(c == ta::random_glora_config(space, same));
    counts["A" + ta::to_string(c.A)]++;
    counts["C" + ta::to_string(c.C)]++;
    counts["D" + ta::to_string(c.D)]++;
  }
  CHECK(counts.size() == 5 + 4 + 3);
  for (const auto& [key, count] : counts) {
    const double expected = key[0] == 'A' ? draws / 5.0 : key[0] == 'C' ? draws / 4.0 : draws / 3.0;
    INFO(key);
    CHECK(std::abs(count - expected) < 5 * std::sqrt(expected));
  }
}

TEST_CASE("parameter_count follows the official search's rule", "[glora]") {
  const ta::index O = 768, I = 512;
  CHECK(ta::parameter_count(ta::glora_config{}, O, I) == 0);
  CHECK(ta::parameter_count(ta::parse_glora_config("A=lora_8,B=none,C=none,D=none,E=none"), O, I) == 8 * (O + I));
  CHECK(ta::parameter_count(ta::parse_glora_config("A=none,B=lora_4,C=none,D=none,E=none"), O, I) == 4 * (O + I));
  CHECK(ta::parameter_count(ta::parse_glora_config("A=none,B=none,C=lora_4,D=none,E=none"), O, I) == 4 * (I + 1));
  CHECK(ta::parameter_count(ta::parse_glora_config("A=vector,B=scalar,C=vector,D=vector,E=scalar"), O, I) ==
        O + 1 + I + O + 1);
  CHECK(ta::parameter_count(ta::parse_glora_config("A=lora_8,B=lora_8,C=lora_8,D=vector,E=vector"), O, I) ==
        2 * 8 * (O + I) + 8 * (I + 1) + 2 * O);
  // A rank no store of the layer can hold (the message names the layer, not a store), and a count beyond
  // an index.
  CHECK_THROWS_WITH(ta::parameter_count(ta::parse_glora_config("A=lora_100,B=none,C=none,D=none,E=none"), 4, 6),
                    Catch::Contains("rank 100 outside [1, R] for the layer (4, 6), R = min(out, in) = 4"));
  // A rank of up to 9 digits is read; one of 10 is refused as text (it could overflow the rank's reading).
  CHECK_THROWS_WITH(ta::parse_glora_config("A=lora_1234567890,B=none,C=none,D=none,E=none"),
                    Catch::Contains("\"lora_1234567890\"") && Catch::Contains("is not lora_<rank>"));
  CHECK_THROWS_AS(ta::parameter_count(ta::parse_glora_config("A=lora_999999999,B=none,C=none,D=none,E=none"),
                                      ta::index(1) << 62, ta::index(1) << 62),
                  ta::argument_error);
}

TEMPLATE_TEST_CASE("forward's W_eff is merge's, bit for bit, in every column", "[glora]", float, double) {
  // With x the identity and b0 zero, y = x · W_effᵀ is W_effᵀ exactly. I = 70: the fused pass's vector
  // blocks and its element-by-element tail (columns 64 to 69) both.
  using T = TestType;
  std::mt19937_64 gen(21);
  const ta::index O = 9, I = 70;
  const auto a = trained_glora<T>(O, I, 4, gen);
  ta::tensor<T, 2> w0(O, I), x(I, I), y(I, O);
  ta::fill_normal(w0, 0, 1, gen);
  x.setZero();
  for (ta::index i = 0; i < I; ++i) x(i, i) = T(1);
  ta::tensor<T, 1> b0(O);
  b0.setZero();
  ta::glora_workspace<T> ws;
  for (const char* text : {"A=lora_3,B=lora_4,C=none,D=none,E=none", "A=lora_4,B=vector,C=none,D=none,E=none"}) {
    INFO(text);
    const ta::glora_config c = ta::parse_glora_config(text);
    ta::forward(a, c, x, w0, b0, y, ws);
    const auto m = ta::merge(a, c, w0, b0);
    ta::index differ = 0;
    for (ta::index o = 0; o < O; ++o)
      for (ta::index i = 0; i < I; ++i) differ += y(i, o) == m.weight(o, i) ? 0 : 1;
    CHECK(differ == 0);
  }
}

TEST_CASE("the text form round-trips and rejects bad text", "[glora]") {
  const auto all = ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{3, 16}));
  for (const auto& c : all) CHECK(ta::parse_glora_config(ta::to_string(c)) == c);
  CHECK(ta::to_string(all.front()) == "A=lora_3,B=lora_3,C=lora_3,D=vector,E=vector");
  // Many layers.
  std::mt19937_64 gen(11);
  std::vector<ta::glora_config> layers;
  for (int i = 0; i < 12; ++i) layers.push_back(ta::random_glora_config(ta::make_glora_space(8), gen));
  const std::string text = ta::to_string(layers);
  CHECK(ta::parse_glora_configs(text) == layers);
  CHECK(ta::parse_glora_configs("").empty());
  // Spaces around separators and the official code's spellings are accepted.
  CHECK(ta::parse_glora_config(" A = LoRA_8 , B=constant,C=none, D=vector ,E=none ") ==
        ta::glora_config{ta::glora_choice::lora(8), ta::glora_choice::scalar(), ta::glora_choice::none(),
                         ta::glora_choice::vector(), ta::glora_choice::none()});

  for (const char* bad : {"", "A=lora_4,B=vector,C=none,D=scalar", "A=lora_4,B=vector,C=none,D=scalar,E=none,F=none",
                          "B=lora_4,A=vector,C=none,D=scalar,E=none", "A=lora_,B=vector,C=none,D=scalar,E=none",
                          "A=lora_0,B=vector,C=none,D=scalar,E=none", "A=lora_x,B=vector,C=none,D=scalar,E=none",
                          "A=lora_-2,B=vector,C=none,D=scalar,E=none", "A=matrix,B=vector,C=none,D=scalar,E=none",
                          "A=vector,B=vector,C=scalar,D=scalar,E=none", "A=vector,B=vector,C=none,D=lora_2,E=none",
                          "A=vector,B=vector,C=none,D=none,E=lora_2", "A:vector,B=vector,C=none,D=none,E=none",
                          "A=vector,B=vector,C=none,D=none,E="}) {
    INFO(bad);
    CHECK_THROWS_AS(ta::parse_glora_config(bad), ta::argument_error);
  }
  CHECK_THROWS_WITH(ta::parse_glora_config("A=vector,B=vector,C=scalar,D=scalar,E=none"),
                    Catch::Contains("parse_glora_config") && Catch::Contains("C cannot be scalar"));
  CHECK_THROWS_WITH(ta::parse_glora_config("A=blob,B=vector,C=none,D=scalar,E=none"), Catch::Contains("unknown kind"));
  CHECK_THROWS_AS(ta::parse_glora_configs(text + ";"), ta::argument_error);
}

// ---------------------------------------------------------------------------------------------------
// Allocation and errors

TEMPLATE_TEST_CASE("forward, backward and weight space make no allocation with a warm workspace", "[glora]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(12);
  const ta::index n = 24, O = 20, I = 16, R = 4;
  auto a = trained_glora<T>(O, I, R, gen);
  ta::tensor<T, 2> x(n, I), w0(O, I), y(n, O), dy(n, O), dx(n, I), w_eff(O, I);
  ta::tensor<T, 1> b0(O), b_eff(O);
  for (auto* t : {&x, &w0, &dy}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const auto configs = ta::enumerate_glora_configs(ta::make_glora_space(std::vector<ta::index>{2, 4}));
  ta::glora_workspace<T> ws;
  ta::glora<T> grad = ta::zeros_like(a);
  const auto run = [&](const ta::glora_config& c) {
    ta::forward(a, c, x, w0, b0, y, ws);
    ta::forward(a, c, x, w0, y, ws);
    ta::backward(a, c, x, w0, b0, dy, dx, grad, ws);
    ta::backward(a, c, x, w0, dy, dx, grad, ws);
    ta::merge<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws);
    ta::delta_weight<T, 2>(a, c, ta::view(w0), ta::writable_view(w_eff));
    ta::delta_bias<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::writable_view(b_eff), ws);
    ta::delta_weight_vjp<T, 2>(a, c, ta::view(w0), ta::view(w_eff), grad, ws);
    ta::delta_bias_vjp<T, 2>(a, c, ta::view(w0), ta::view(b0), ta::view(b_eff), grad, ws);
  };
  for (const auto& c : configs) run(c);  // warms the workspace
  allocation_counter::scope counting;
  for (std::size_t k = 0; k < configs.size(); k += 7) run(configs[k]);
  CHECK(counting.allocations() == 0);
}

TEMPLATE_TEST_CASE("bad input throws argument_error naming the function and shapes, and writes nothing", "[glora]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(13);
  static_assert(std::is_base_of<std::invalid_argument, ta::argument_error>::value, "argument_error is invalid_argument");
  CHECK_THROWS_AS(ta::make_glora<T>(4, 6, {0}, gen), ta::argument_error);
  CHECK_THROWS_WITH(ta::make_glora<T>(4, 6, {5}, gen), Catch::Contains("make_glora") && Catch::Contains("5"));
  CHECK_THROWS_AS(ta::make_glora<T>(0, 6, {1}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_glora<T>(4, 6, {2, static_cast<ta::glora_init>(7)}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_glora_space(std::vector<ta::index>{}), ta::argument_error);
  CHECK_THROWS_AS(ta::make_glora_space(0), ta::argument_error);
  CHECK_THROWS_WITH(ta::make_glora_space(std::vector<ta::index>{4, 2, 4}), Catch::Contains("twice"));
  ta::glora_space bad_space = ta::make_glora_space(2);
  bad_space.C.push_back(ta::glora_choice::scalar());
  CHECK_THROWS_AS(ta::enumerate_glora_configs(bad_space), ta::argument_error);
  CHECK_THROWS_AS(ta::random_glora_config(bad_space, gen), ta::argument_error);
  bad_space = ta::make_glora_space(2);
  bad_space.E.clear();
  CHECK_THROWS_WITH(ta::enumerate_glora_configs(bad_space), Catch::Contains("no choice"));
  CHECK_THROWS_AS(ta::parameter_count(ta::glora_config{}, 0, 4), ta::argument_error);
  CHECK_THROWS_AS(ta::parameter_count(ta::glora_config{{}, {}, ta::glora_choice::scalar(), {}, {}}, 4, 4),
                  ta::argument_error);

  auto a = trained_glora<T>(4, 6, 2, gen);
  ta::tensor<T, 2> x(3, 6), w0(4, 6), y(3, 4), dy(3, 4), dx(3, 6), w_eff(4, 6);
  ta::tensor<T, 1> b0(4), b_eff(4);
  for (auto* t : {&x, &w0, &y, &dy, &dx, &w_eff}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::fill_normal(b_eff, 0, 1, gen);
  const ta::tensor<T, 2> y_before = y, dx_before = dx, w_before = w_eff;
  const ta::tensor<T, 1> b_before = b_eff;
  ta::glora_workspace<T> ws;
  ta::glora<T> grad;
  const ta::glora_config good = ta::parse_glora_config("A=lora_2,B=vector,C=lora_1,D=scalar,E=vector");

  // Illegal configurations: rank above R, rank 0, scalar C, lora D/E, an unknown kind.
  std::vector<ta::glora_config> illegal(6, good);
  illegal[0].A = ta::glora_choice::lora(3);
  illegal[1].B = ta::glora_choice::lora(0);
  illegal[2].C = ta::glora_choice::scalar();
  illegal[3].D = ta::glora_choice::lora(1);
  illegal[4].E = ta::glora_choice::lora(1);
  illegal[5].A = ta::glora_choice{static_cast<ta::glora_kind>(9), 0};
  for (const auto& c : illegal) {
    CHECK_THROWS_AS(ta::forward(a, c, x, w0, b0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(a, c, x, w0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(a, c, x, w0, b0, dy, dx, grad, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(a, c, x, w0, dy, dx, grad, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::merge(a, c, w0, b0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight(a, c, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight_vjp(a, c, w0, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_bias(a, c, w0, b0), ta::argument_error);
  }
  CHECK_THROWS_WITH(ta::forward(a, illegal[0], x, w0, b0, y, ws),
                    Catch::Contains("glora forward") && Catch::Contains("rank 3") && Catch::Contains("R = 2"));
  CHECK_THROWS_WITH(ta::forward(a, illegal[2], x, w0, b0, y, ws), Catch::Contains("C cannot be scalar"));
  CHECK_THROWS_WITH(ta::forward(a, illegal[5], x, w0, b0, y, ws), Catch::Contains("unknown kind"));

  // A batch of negative size, through views (a backward with one copied memory of that size).
  {
    const ta::glora_config vector_scalar = ta::parse_glora_config("A=vector,B=scalar,C=none,D=none,E=none");
    const ta::const_tensor_view<T, 2> xn(x.data(), -2, x.dimension(1)), dyn(dy.data(), -2, dy.dimension(1));
    const ta::tensor_view<T, 2> yn(y.data(), -2, y.dimension(1)), dxn(dx.data(), -2, dx.dimension(1));
    CHECK_THROWS_WITH(ta::forward<T>(a, vector_scalar, xn, ta::view(w0), ta::view(b0), yn, ws),
                      Catch::Contains("glora forward") && Catch::Contains("x has shape"));
    CHECK_THROWS_AS(ta::backward<T>(a, vector_scalar, xn, ta::view(w0), ta::view(b0), dyn, dxn, grad, ws),
                    ta::argument_error);
  }

  // A store whose maximum rank is above min(O, I) (which make_glora refuses), with a configuration of
  // rank 1 that it could otherwise serve.
  ta::glora<T> wide;
  wide.Ad.resize(4, 5), wide.Au.resize(5, 6), wide.Bd.resize(4, 5), wide.Bu.resize(5, 6);
  wide.Cd.resize(6, 5), wide.Cu.resize(5, 1), wide.D.resize(4), wide.E.resize(4);
  ta::for_each_parameter(wide, [&](const char*, auto& p) { ta::fill_normal(p, 0.0, 0.5, gen); });
  const ta::glora_config rank1 = ta::parse_glora_config("A=lora_1,B=vector,C=lora_1,D=scalar,E=vector");
  CHECK_THROWS_WITH(ta::forward(wide, rank1, x, w0, b0, y, ws),
                    Catch::Contains("glora forward") && Catch::Contains("rank 5") && Catch::Contains("min(O, I) = 4"));
  CHECK_THROWS_AS(ta::backward(wide, rank1, x, w0, b0, dy, dx, grad, ws), ta::argument_error);
  CHECK_THROWS_AS(ta::merge(wide, rank1, w0, b0), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight(wide, rank1, w0), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight_vjp(wide, rank1, w0, w0), ta::argument_error);

  // Shapes that do not fit.
  ta::tensor<T, 2> x_bad(3, 5), w_bad(5, 6), y_bad(3, 5), dx_bad(2, 6);
  ta::tensor<T, 1> b_bad(5);
  CHECK_THROWS_WITH(ta::forward(a, good, x_bad, w0, b0, y, ws), Catch::Contains("glora forward") && Catch::Contains("(3, 5)"));
  CHECK_THROWS_WITH(ta::forward(a, good, x, w_bad, b0, y, ws), Catch::Contains("w0 has shape (5, 6)"));
  CHECK_THROWS_WITH(ta::forward(a, good, x, w0, b_bad, y, ws), Catch::Contains("b0"));
  CHECK_THROWS_WITH(ta::forward(a, good, x, w0, y_bad, ws), Catch::Contains("y has shape (3, 5)"));
  CHECK_THROWS_AS(ta::backward(a, good, x, w0, b0, y_bad, dx, grad, ws), ta::argument_error);
  CHECK_THROWS_WITH(ta::backward(a, good, x, w0, dy, dx_bad, grad, ws), Catch::Contains("dx"));
  CHECK_THROWS_AS(ta::backward(a, good, x, w0, b_bad, dy, dx, grad, ws), ta::argument_error);
  CHECK(max_abs_diff(y, y_before) == T(0));
  CHECK(max_abs_diff(dx, dx_before) == T(0));

  // Weight space.
  ta::tensor<T, 4> conv_bad(4, 2, 2, 2);  // fan-in 8, the store has 6
  ta::tensor<T, 4> conv(4, 3, 2, 1), conv_out(4, 3, 1, 2);
  CHECK_THROWS_WITH(ta::delta_weight(a, good, conv_bad), Catch::Contains("glora delta_weight") && Catch::Contains("(4, 2, 2, 2)"));
  CHECK_THROWS_WITH((ta::delta_weight<T, 4>(a, good, ta::view(conv), ta::writable_view(conv_out))), Catch::Contains("dw"));
  CHECK_THROWS_AS(ta::delta_weight_vjp(a, good, conv, conv_out), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight_vjp(a, good, conv_bad, conv_bad), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_bias(a, good, conv_bad, b0), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_bias(a, good, w0, b_bad), ta::argument_error);
  CHECK_THROWS_AS((ta::delta_bias_vjp<T, 2>(a, good, ta::view(w0), ta::view(b0), ta::view(b_bad), grad, ws)),
                  ta::argument_error);
  CHECK_THROWS_AS((ta::delta_bias_vjp<T, 2>(a, good, ta::view(w0), ta::view(b_bad), grad, ws)), ta::argument_error);
  CHECK_THROWS_AS(ta::merge(a, good, conv_bad, b0), ta::argument_error);
  CHECK_THROWS_AS(ta::merge(a, good, w0, b_bad), ta::argument_error);
  ta::tensor<T, 2> w_eff_bad(4, 5);
  CHECK_THROWS_WITH((ta::merge<T, 2>(a, good, ta::view(w0), ta::view(b0), ta::writable_view(w_eff_bad),
                                     ta::writable_view(b_eff), ws)),
                    Catch::Contains("w_eff"));
  CHECK_THROWS_WITH((ta::merge<T, 2>(a, good, ta::view(w0), ta::view(b0), ta::writable_view(w_eff), ta::writable_view(b_bad),
                                     ws)),
                    Catch::Contains("b_eff"));
  CHECK(max_abs_diff(w_eff, w_before) == T(0));
  CHECK(max_abs_diff(b_eff, b_before) == T(0));

  // A store whose tensors disagree, and an empty store.
  for (int broken = 0; broken < 8; ++broken) {
    ta::glora<T> s = a;
    int k = 0;
    ta::for_each_parameter(s, [&](const char*, auto& p) {
      if (k++ == broken) {
        auto dims = p.dimensions();
        dims[0] += 1;
        p.resize(dims);
      }
    });
    INFO("broken tensor " << broken);
    CHECK_THROWS_WITH(ta::forward(s, good, x, w0, b0, y, ws), Catch::Contains("disagree"));
    CHECK_THROWS_AS(ta::merge(s, good, w0, b0), ta::argument_error);
  }
  CHECK_THROWS_WITH(ta::forward(ta::glora<T>{}, good, x, w0, b0), Catch::Contains("empty"));
  CHECK(max_abs_diff(y, y_before) == T(0));
}

// ---------------------------------------------------------------------------------------------------
// Numerical edge cases

namespace {

template <class T, int N>
bool same_bits(const ta::tensor<T, N>& a, const ta::tensor<T, N>& b) {
  return a.dimensions() == b.dimensions() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

}  // namespace

TEMPLATE_TEST_CASE("empty and zero-rank stores and empty weights are rejected everywhere", "[glora][edge]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 gen(14);
  CHECK_THROWS_WITH(ta::make_glora<T>(4, 0, {1}, gen), Catch::Contains("make_glora") && Catch::Contains("(4, 0)"));
  CHECK_THROWS_AS(ta::make_glora<T>(-2, 6, {1}, gen), ta::argument_error);
  CHECK_THROWS_AS(ta::make_glora<T>(4, 6, {-1}, gen), ta::argument_error);
  CHECK_THROWS_AS((ta::make_glora<T, 3>(ta::shape<3>{4, 0, 3}, {1}, gen)), ta::argument_error);
  CHECK_THROWS_AS((ta::make_glora<T, 2>(ta::shape<2>{0, 6}, {1}, gen)), ta::argument_error);
  // Extents whose product would be a fan-in but which are not a weight's: negative, overflowing.
  CHECK_THROWS_WITH((ta::make_glora<T, 3>(ta::shape<3>{4, -3, -3}, {2}, gen)),
                    Catch::Contains("make_glora") && Catch::Contains("(4, -3, -3)"));
  CHECK_THROWS_AS((ta::make_glora<T, 3>(ta::shape<3>{4, (ta::index(1) << 62) + 1, 4}, {2}, gen)), ta::argument_error);
  CHECK_THROWS_AS(ta::parameter_count(ta::glora_config{}, 4, 0), ta::argument_error);

  const auto good = trained_glora<T>(4, 6, 2, gen);
  ta::glora<T> rank0;  // R = 0: every factor has an empty mode
  rank0.Ad.resize(4, 0);
  rank0.Au.resize(0, 6);
  rank0.Bd.resize(4, 0);
  rank0.Bu.resize(0, 6);
  rank0.Cd.resize(6, 0);
  rank0.Cu.resize(0, 1);
  rank0.D.resize(4);
  rank0.E.resize(4);
  ta::glora<T> in0 = good;  // no inputs
  in0.Au.resize(2, 0);
  in0.Bu.resize(2, 0);
  in0.Cd.resize(0, 2);
  ta::glora<T> none{};
  const ta::glora_config c = ta::parse_glora_config("A=vector,B=scalar,C=none,D=vector,E=scalar");
  ta::tensor<T, 2> x(3, 6), w0(4, 6), y(3, 4), dy(3, 4), dx(3, 6), w_eff(4, 6);
  ta::tensor<T, 1> b0(4), b_eff(4);
  for (auto* t : {&x, &w0, &y, &dy, &dx, &w_eff}) ta::fill_normal(*t, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  ta::fill_normal(b_eff, 0, 1, gen);
  const ta::tensor<T, 2> y_before = y, dx_before = dx, w_before = w_eff;
  const ta::tensor<T, 1> b_before = b_eff;
  ta::glora_workspace<T> ws;
  for (const ta::glora<T>* bad : {&rank0, &in0, &none}) {
    ta::glora<T> grad;
    CHECK_THROWS_WITH(ta::merge(*bad, c, w0, b0), Catch::Contains("glora merge") && Catch::Contains("empty"));
    CHECK_THROWS_AS(ta::merge(*bad, c, w0), ta::argument_error);
    CHECK_THROWS_AS((ta::merge<T, 2>(*bad, c, ta::view(w0), ta::view(b0), ta::writable_view(w_eff),
                                     ta::writable_view(b_eff), ws)),
                    ta::argument_error);
    CHECK_THROWS_WITH(ta::safe_merge(*bad, c, w0, b0), Catch::Contains("glora safe_merge") && Catch::Contains("empty"));
    CHECK_THROWS_AS((ta::safe_merge<T, 2>(*bad, c, ta::view(w0), ta::writable_view(w_eff), ta::writable_view(b_eff), ws)),
                    ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight(*bad, c, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_bias(*bad, c, w0, b0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_bias(*bad, c, w0), ta::argument_error);
    CHECK_THROWS_AS(ta::delta_weight_vjp(*bad, c, w0, w0), ta::argument_error);
    CHECK_THROWS_AS((ta::delta_bias_vjp<T, 2>(*bad, c, ta::view(w0), ta::view(b0), ta::view(b0), grad, ws)),
                    ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, c, x, w0, b0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::forward(*bad, c, x, w0, y, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(*bad, c, x, w0, b0, dy, dx, grad, ws), ta::argument_error);
    CHECK_THROWS_AS(ta::backward(*bad, c, x, w0, dy, dx, grad, ws), ta::argument_error);
    CHECK(grad.Ad.size() == 0);
  }
  CHECK(same_bits(y, y_before));
  CHECK(same_bits(dx, dx_before));
  CHECK(same_bits(w_eff, w_before));
  CHECK(same_bits(b_eff, b_before));
  // A weight with an empty mode never fits (the store's fan-in is at least 1).
  ta::tensor<T, 3> empty_mode(4, 6, 0);
  CHECK_THROWS_WITH(ta::merge(good, c, empty_mode), Catch::Contains("(4, 6, 0)"));
  CHECK_THROWS_AS(ta::safe_merge(good, c, empty_mode), ta::argument_error);
  CHECK_THROWS_AS(ta::delta_weight(good, c, empty_mode), ta::argument_error);

  // An empty batch gives an empty output and exactly zero gradients.
  ta::tensor<T, 2> x0(0, 6), y0(0, 4), dy0(0, 4), dx0(0, 6);
  for (const char* text : {"A=lora_2,B=lora_1,C=lora_2,D=vector,E=vector", "A=vector,B=vector,C=vector,D=scalar,E=scalar"}) {
    const ta::glora_config k = ta::parse_glora_config(text);
    ta::forward(good, k, x0, w0, b0, y0, ws);
    ta::glora<T> g0;
    ta::backward(good, k, x0, w0, b0, dy0, dx0, g0, ws);
    T m = 0;
    ta::for_each_parameter(g0, [&](const char*, const auto& p) { m = std::max(m, max_abs(p)); });
    CHECK(m == T(0));
  }
}

TEMPLATE_TEST_CASE("safe_merge: the merge's bits when finite; NaN or Inf caught with nothing written", "[glora][edge]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 gen(15);
  const auto a = trained_glora<T>(5, 7, 3, gen);
  ta::tensor<T, 2> w0(5, 7);
  ta::tensor<T, 1> b0(5);
  ta::fill_normal(w0, 0, 1, gen);
  ta::fill_normal(b0, 0, 1, gen);
  const ta::glora_config c = ta::parse_glora_config("A=lora_3,B=lora_2,C=lora_1,D=vector,E=scalar");
  const auto m = ta::merge(a, c, w0, b0);
  const auto s = ta::safe_merge(a, c, w0, b0);
  CHECK(same_bits(s.weight, m.weight));
  CHECK(same_bits(s.bias, m.bias));
  const auto mn = ta::merge(a, c, w0);
  const auto sn = ta::safe_merge(a, c, w0);
  CHECK(same_bits(sn.weight, mn.weight));
  CHECK(same_bits(sn.bias, mn.bias));
  // In place: the layer is formed in the workspace, so w_eff and b_eff may be w0 and b0.
  ta::tensor<T, 2> w = w0;
  ta::tensor<T, 1> b = b0;
  ta::glora_workspace<T> ws;
  ta::safe_merge<T, 2>(a, c, ta::view(w), ta::view(b), ta::writable_view(w), ta::writable_view(b), ws);
  CHECK(same_bits(w, m.weight));
  CHECK(same_bits(b, m.bias));

  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (T bad : {nan, inf, -inf}) {
    // One bad entry in each tensor the configuration reads, then in W0 and b0.
    std::vector<ta::glora<T>> broken(7, a);
    broken[0].Ad(4, 2) = bad;
    broken[1].Au(0, 6) = bad;
    broken[2].Bd(2, 1) = bad;
    broken[3].Bu(1, 3) = bad;
    broken[4].Cd(5, 0) = bad;
    broken[5].D(3) = bad;
    broken[6].E(0) = bad;
    ta::tensor<T, 2> out_w(5, 7);
    ta::tensor<T, 1> out_b(5);
    out_w.setConstant(T(7));
    out_b.setConstant(T(7));
    const ta::tensor<T, 2> out_w0 = out_w;
    const ta::tensor<T, 1> out_b0 = out_b;
    for (std::size_t k = 0; k < broken.size(); ++k) {
      INFO("bad entry in store tensor " << k << ": " << bad);
      CHECK_THROWS_WITH((ta::safe_merge<T, 2>(broken[k], c, ta::view(w0), ta::view(b0), ta::writable_view(out_w),
                                              ta::writable_view(out_b), ws)),
                        Catch::Contains("glora safe_merge") && Catch::Contains("non-finite"));
      CHECK(same_bits(out_w, out_w0));
      CHECK(same_bits(out_b, out_b0));
    }
    ta::tensor<T, 2> bad_w = w0;
    bad_w(1, 1) = bad;
    ta::tensor<T, 1> bad_b = b0;
    bad_b(2) = bad;
    CHECK_THROWS_AS((ta::safe_merge<T, 2>(a, c, ta::view(bad_w), ta::view(b0), ta::writable_view(out_w),
                                          ta::writable_view(out_b), ws)),
                    ta::argument_error);
    CHECK_THROWS_AS((ta::safe_merge<T, 2>(a, c, ta::view(w0), ta::view(bad_b), ta::writable_view(out_w),
                                          ta::writable_view(out_b), ws)),
                    ta::argument_error);
    CHECK(same_bits(out_w, out_w0));
    CHECK(same_bits(out_b, out_b0));
    // An entry the configuration does not read (beyond rank 2 of B, rank 1 of C) does not matter.
    ta::glora<T> unread = a;
    unread.Bu(2, 0) = bad;
    unread.Cu(2, 0) = bad;
    const auto u = ta::safe_merge(unread, c, w0, b0);
    CHECK(same_bits(u.weight, m.weight));
    CHECK(same_bits(u.bias, m.bias));
  }
}

TEMPLATE_TEST_CASE("merges near the largest and the subnormal values of T", "[glora][edge]", float, double) {
  using T = TestType;
  using limits = std::numeric_limits<T>;
  const T max = limits::max(), tiny = limits::denorm_min();
  std::mt19937_64 gen(16);
  ta::glora<T> a = trained_glora<T>(3, 4, 2, gen);
  const ta::glora_config c = ta::parse_glora_config("A=scalar,B=scalar,C=vector,D=scalar,E=scalar");
  ta::tensor<T, 2> w0(3, 4);
  ta::tensor<T, 1> b0(3);
  auto set = [&](T A, T B, T C, T D, T E) {
    a.Ad(0, 0) = A;
    a.Bd(0, 0) = B;
    for (ta::index i = 0; i < 4; ++i) a.Cd(i, 0) = C;
    a.D(0) = D;
    a.E(0) = E;
  };
  SECTION("results near max are exact and finite") {
    set(T(0.5), T(0), T(0), T(0.5), max / 8);
    w0.setConstant(max / 2);
    b0.setConstant(max / 2);
    const auto m = ta::safe_merge(a, c, w0, b0);
    for (ta::index k = 0; k < m.weight.size(); ++k) CHECK(m.weight.data()[k] == max / 2 + max / 4);
    for (ta::index o = 0; o < 3; ++o) CHECK(m.bias(o) == (max / 2 + max / 4) + max / 8);
  }
  SECTION("beyond max: merge gives Inf, safe_merge throws") {
    set(T(2), T(0), T(0), T(0), max);
    w0.setConstant(T(1));
    w0(1, 2) = max / 2;  // W0 + 2 · W0 = 1.5 max
    b0.setConstant(max / 2);
    CHECK_THROWS_AS(ta::safe_merge(a, c, w0, b0), ta::argument_error);
    const auto m = ta::merge(a, c, w0, b0);
    CHECK(std::isinf(m.weight(1, 2)));
    CHECK(m.weight(0, 0) == T(3));
    CHECK(std::isinf(m.bias(0)));
  }
  SECTION("subnormal values: exact results, no flush to zero") {
    // W_eff = W0 + 0.5 · W0 + 3 tiny;  b_eff = b0 + 0.25 · b0 + tiny + Σ_i W0[o, i] · 0.5.
    set(T(0.5), 3 * tiny, T(0.5), T(0.25), tiny);
    w0.setConstant(4 * tiny);
    b0.setConstant(8 * tiny);
    w0(2, 3) = -8 * tiny;
    const auto m = ta::safe_merge(a, c, w0, b0);
    CHECK(m.weight(0, 0) == 9 * tiny);
    CHECK(m.weight(2, 3) == -9 * tiny);
    CHECK(m.bias(0) == 19 * tiny);  // 8 + 2 + 1 + 4 · 2
    CHECK(m.bias(2) == 13 * tiny);  // 8 + 2 + 1 + 3 · 2 − 4
  }
}
