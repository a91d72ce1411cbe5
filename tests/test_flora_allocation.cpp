// FLoRA's hot paths make no allocation once their workspace is warm: the weight-space operations on
// both plans (conv and linear weights) and the linear layer's forward and backward, whichever call
// warmed the workspace. (A program of its own, since allocation_counter.hpp replaces the global
// operator new.)
#include "allocation_counter.hpp"

#include <tensor_adapters/flora.hpp>

#include "flora_test_support.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <new>
#include <random>

namespace ta = tensor_adapters;

using namespace flora_test;

namespace {

template <class T, class Tensor>
bool bit_identical(const Tensor& a, const Tensor& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

// The allocations of a second round of the weight-space calls (delta_weight, delta_weight_vjp, merge,
// unmerge) for a weight of shape s, on a workspace the first round warmed; the second round must give the
// first one's bits.
template <class T, int N>
long warm_weight_space_allocations(const ta::flora<T, N>& a, const ta::nondeduced<ta::shape<N>>& s,
                                   std::uint64_t seed) {
  const auto gw = random_tensor<T, N>(s, seed);
  ta::tensor<T, N> dw(s), w = random_tensor<T, N>(s, seed + 1);
  ta::flora<T, N> grad;
  ta::flora_weight_workspace<T, N> ws;
  ta::delta_weight(a, dw, ws);
  ta::delta_weight_vjp(a, gw, grad, ws);
  const ta::tensor<T, N> dw_first = dw;
  const ta::flora<T, N> grad_first = grad;
  long allocations = 0;
  {
    allocation_counter::scope counting;
    ta::delta_weight(a, dw, ws);
    ta::delta_weight_vjp(a, gw, grad, ws);
    ta::merge(a, w, ws);
    ta::unmerge(a, w, ws);
    allocations = counting.allocations();
  }
  CHECK(bit_identical<T>(dw, dw_first));
  ta::for_each_parameter(grad, grad_first, [](const char*, auto& g, const auto& e) { CHECK(bit_identical<T>(g, e)); });
  return allocations;
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA weight space makes no allocation with a warm workspace", "[flora]", float, double) {
  using T = TestType;
  // The channel plan: a conv weight and a linear one.
  const ta::shape<4> s4{12, 8, 3, 3};
  const auto a = random_flora<T, 4>(s4, {4, 3, 2, 2}, 2.0, 49);
  REQUIRE(ta::detail::use_channel_plan(a));
  CHECK(warm_weight_space_allocations(a, s4, 50) == 0);
  const ta::shape<2> s2{20, 14};
  const auto l = random_flora<T, 2>(s2, {3, 5}, 2.0, 53);
  REQUIRE(ta::detail::use_channel_plan(l));
  CHECK(warm_weight_space_allocations(l, s2, 54) == 0);

  // The chain plan (tucker.hpp's chains and its shared compressions), N = 3 and N = 5.
  const ta::shape<3> s3{24, 4, 4};
  const auto c = random_flora<T, 3>(s3, {24, 1, 1}, 2.0, 55);
  REQUIRE_FALSE(ta::detail::use_channel_plan(c));
  CHECK(warm_weight_space_allocations(c, s3, 56) == 0);
  const ta::shape<5> s5{20, 5, 3, 2, 3};
  const auto f = random_flora<T, 5>(s5, {20, 2, 2, 1, 3}, 2.0, 58);
  REQUIRE_FALSE(ta::detail::use_channel_plan(f));
  CHECK(warm_weight_space_allocations(f, s5, 59) == 0);
}

TEMPLATE_TEST_CASE("FLoRA linear path makes no allocation once its workspace is warm", "[flora]", float, double) {
  using T = TestType;
  const ta::index n = 16, in = 24, out = 20;
  auto a = random_flora<T, 2>({out, in}, {4, 3}, 2.0, 101);
  const auto x = random_tensor<T, 2>({n, in}, 102);
  const auto w0 = random_tensor<T, 2>({out, in}, 103);
  const auto b0 = random_tensor<T, 1>({out}, 104);
  const auto dy = random_tensor<T, 2>({n, out}, 105);
  ta::tensor<T, 2> y(n, out), dx(n, in);
  ta::flora<T, 2> grad;
  ta::flora_workspace<T> ws;
  ta::forward(a, x, w0, b0, y, ws);
  ta::backward(a, x, w0, dy, dx, grad, ws);
  const ta::tensor<T, 2> y_first = y, dx_first = dx;

  const ta::const_tensor_view<T, 2> x_half(x.data(), n / 2, in);
  const ta::tensor_view<T, 2> y_half(y.data(), n / 2, out);
  long allocations = 0;
  {
    allocation_counter::scope counting;
    ta::forward(a, x, w0, b0, y, ws);
    ta::forward(a, x_half, w0, b0, y_half, ws);  // a smaller batch fits the same workspace
    ta::forward(a, x, w0, b0, y, ws);
    ta::backward(a, x, w0, dy, dx, grad, ws);
    allocations = counting.allocations();
  }
  CHECK(allocations == 0);
  CHECK(bit_identical<T>(y, y_first));
  CHECK(bit_identical<T>(dx, dx_first));
}

namespace {

enum class linear_call { forward, forward_with_bias, backward };

const char* call_name(linear_call c) {
  return c == linear_call::forward ? "forward" : c == linear_call::forward_with_bias ? "forward with bias" : "backward";
}

}  // namespace

TEMPLATE_TEST_CASE("FLoRA linear path: one call of n rows sizes the workspace for every call of up to n rows",
                   "[flora]", float, double) {
  using T = TestType;
  const ta::index n = 16, in = 48, out = 64, r0 = 8, r1 = 6;
  const auto a = random_flora<T, 2>({out, in}, {r0, r1}, 2.0, 111);
  const auto x = random_tensor<T, 2>({n, in}, 112);
  const auto w0 = random_tensor<T, 2>({out, in}, 113);
  const auto b0 = random_tensor<T, 1>({out}, 114);
  const auto dy = random_tensor<T, 2>({n, out}, 115);
  ta::tensor<T, 2> y(n, out), dx(n, in);
  ta::flora<T, 2> grad;
  const auto run = [&](linear_call c, ta::index rows, ta::flora_workspace<T>& ws) {
    const ta::const_tensor_view<T, 2> xs(x.data(), rows, in), dys(dy.data(), rows, out);
    if (c == linear_call::backward)
      ta::backward(a, xs, w0, dys, ta::tensor_view<T, 2>(dx.data(), rows, in), grad, ws);
    else if (c == linear_call::forward_with_bias)
      ta::forward(a, xs, w0, b0, ta::tensor_view<T, 2>(y.data(), rows, out), ws);
    else
      ta::forward(a, xs, w0, ta::tensor_view<T, 2>(y.data(), rows, out), ws);
  };
  // What each call gives on a fresh workspace. These also warm the product kernel's buffers of this
  // thread for every call, so that the counts below see the workspace alone.
  const auto results = [&](linear_call c) {
    ta::flora_workspace<T> fresh;
    run(c, n, fresh);
    return c == linear_call::backward ? dx : y;
  };
  const ta::tensor<T, 2> y_plain = results(linear_call::forward), y_bias = results(linear_call::forward_with_bias);
  const ta::tensor<T, 2> dx_fresh = results(linear_call::backward);
  const ta::flora<T, 2> grad_fresh = grad;

  const linear_call calls[] = {linear_call::forward, linear_call::forward_with_bias, linear_call::backward};
  for (linear_call first : calls)
    for (linear_call second : calls) {
      INFO(call_name(first) << " of " << n << " rows, then " << call_name(second));
      ta::flora_workspace<T> ws;
      run(first, n, ws);
      long allocations = 0;
      {
        allocation_counter::scope counting;
        run(second, n, ws);
        run(second, n / 2, ws);  // fewer rows fit as well
        run(second, n, ws);
        allocations = counting.allocations();
      }
      CHECK(allocations == 0);
      if (second == linear_call::backward) {
        CHECK(bit_identical<T>(dx, dx_fresh));
        ta::for_each_parameter(grad, grad_fresh, [](const char*, auto& g, const auto& e) {
          CHECK(bit_identical<T>(g, e));
        });
      } else {
        CHECK(bit_identical<T>(y, second == linear_call::forward ? y_plain : y_bias));
      }
    }
}
