// FLoRA against PyTorch: ΔW and autograd gradients of the official formulation (float64), written by
// tests/reference/generate_flora.py into tests/reference/flora_*.txt.
//
// Weight space, for a linear weight (12, 10), a conv2d weight (64, 32, 3, 3) with ranks (8, 8, 2, 2), a
// grouped conv2d (24, 4, 3, 3) with groups 4, a depthwise conv2d (16, 1, 3, 3), a conv3d weight
// (8, 6, 3, 2, 3) and a conv1d weight (10, 4, 5): the official tensors are converted with
// flora_from_official; delta_weight and merge against the reference ΔW and merged weight, and
// delta_weight_vjp (converted back with flora_to_official) against autograd's gradients of
// L = Σ ΔW · gW. Activation space, for the linear case: forward, dx and the parameter gradients
// against the official Linear layer's y = F.linear(x, W0, b0) + F.linear(x, ΔW).
#include "reference.hpp"

#include <tensor_adapters/flora.hpp>

#include "flora_test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace ta = tensor_adapters;

using namespace flora_test;

namespace {

// W0[i] = 0.1 cos(0.23 i + 0.1) and gW[i] = sin(0.37 i + 0.5): the probes of generate_flora.py.
template <class T, int N>
ta::tensor<T, N> probe_w0(const ta::shape<N>& s) {
  ta::tensor<T, N> t(s);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(0.1 * std::cos(0.23 * double(i) + 0.1));
  return t;
}
template <class T, int N>
ta::tensor<T, N> probe_gw(const ta::shape<N>& s) {
  ta::tensor<T, N> t(s);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(std::sin(0.37 * double(i) + 0.5));
  return t;
}

template <class T, int N>
void check_reference_case(const std::string& file_name, const std::string& prefix, bool has_merged) {
  INFO(file_name << " " << prefix);
  const reference::file f(file_name);
  const T scale = static_cast<T>(f.scalar(prefix + ".scale"));
  const auto g = f.get<T, N>(prefix + ".param_G");
  std::array<ta::tensor<T, 2>, N> p;
  for (int n = 0; n < N; ++n) p[static_cast<std::size_t>(n)] = f.get<T, 2>(prefix + ".param_" + std::to_string(n));
  const auto a = ta::flora_from_official(g, p, scale);

  const auto dw_ref = f.get<double, N>(prefix + ".dW");
  const ta::shape<N> s = ta::shape_of(dw_ref);
  REQUIRE(ta::weight_shape(a) == s);
  const double k = double(a.G.size());
  CHECK(relative_error(ta::delta_weight(a), dw_ref) < tolerance<T>(k));

  if (has_merged) {
    ta::tensor<T, N> w = probe_w0<T, N>(s);
    ta::merge(a, w);
    CHECK(relative_error(w, f.get<double, N>(prefix + ".merged")) < tolerance<T>(k));
  }

  // Our gradient, converted to the official names, against autograd.
  const auto grad = ta::delta_weight_vjp(a, probe_gw<T, N>(s));
  ta::tensor<T, N> grad_g;
  std::array<ta::tensor<T, 2>, N> grad_p;
  ta::flora_to_official(grad, grad_g, grad_p);
  const double size = double(dw_ref.size());
  CHECK(relative_error(grad_g, f.get<double, N>(prefix + ".grad_param_G")) < tolerance<T>(size));
  for (int n = 0; n < N; ++n)
    CHECK(relative_error(grad_p[static_cast<std::size_t>(n)],
                         f.get<double, 2>(prefix + ".grad_param_" + std::to_string(n))) < tolerance<T>(size));
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA matches PyTorch's official formulation", "[flora][reference]", float, double) {
  SECTION("linear (12, 10)") { check_reference_case<TestType, 2>("flora_linear.txt", "linear", true); }
  SECTION("conv2d (64, 32, 3, 3), ranks (8, 8, 2, 2)") {
    check_reference_case<TestType, 4>("flora_conv2d.txt", "conv2d", false);
  }
  SECTION("grouped conv2d (24, 4, 3, 3), groups 4") {
    check_reference_case<TestType, 4>("flora_grouped.txt", "grouped", true);
  }
  SECTION("depthwise conv2d (16, 1, 3, 3)") { check_reference_case<TestType, 4>("flora_grouped.txt", "depthwise", true); }
  SECTION("conv3d (8, 6, 3, 2, 3)") { check_reference_case<TestType, 5>("flora_conv3d.txt", "conv3d", true); }
  SECTION("conv1d (10, 4, 5)") { check_reference_case<TestType, 3>("flora_conv3d.txt", "conv1d", true); }
}

TEMPLATE_TEST_CASE("FLoRA's linear path matches PyTorch's official Linear layer", "[flora][reference]", float, double) {
  using T = TestType;
  const reference::file f("flora_linear.txt");
  const auto g = f.get<T, 2>("linear.param_G");
  const std::array<ta::tensor<T, 2>, 2> p{f.get<T, 2>("linear.param_0"), f.get<T, 2>("linear.param_1")};
  const auto a = ta::flora_from_official(g, p, static_cast<T>(f.scalar("linear.scale")));
  const auto x = f.get<T, 2>("linear.x");
  const auto b0 = f.get<T, 1>("linear.b0");
  const auto dy = f.get<T, 2>("linear.dy");
  const auto w0 = probe_w0<T, 2>({12, 10});

  CHECK(relative_error(ta::forward(a, x, w0, b0), f.get<double, 2>("linear.y")) < tolerance<T>(40));
  const auto back = ta::backward(a, x, w0, dy);
  CHECK(relative_error(back.dx, f.get<double, 2>("linear.dx")) < tolerance<T>(40));
  ta::tensor<T, 2> grad_g;
  std::array<ta::tensor<T, 2>, 2> grad_p;
  ta::flora_to_official(back.grad, grad_g, grad_p);
  CHECK(relative_error(grad_g, f.get<double, 2>("linear.act_grad_param_G")) < tolerance<T>(60));
  CHECK(relative_error(grad_p[0], f.get<double, 2>("linear.act_grad_param_0")) < tolerance<T>(60));
  CHECK(relative_error(grad_p[1], f.get<double, 2>("linear.act_grad_param_1")) < tolerance<T>(60));
}

