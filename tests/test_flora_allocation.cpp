// FLoRA's hot paths make no allocation once their workspace is warm: the weight-space operations on
// the channel plan (conv and linear weights) and the linear layer's forward and backward. (A program
// of its own, since allocation_counter.hpp replaces the global operator new.)
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

}  // namespace

TEMPLATE_TEST_CASE("FLoRA weight space makes no allocation with a warm workspace", "[flora]", float, double) {
  using T = TestType;
  const ta::shape<4> s{12, 8, 3, 3};
  const auto a = random_flora<T, 4>(s, {4, 3, 2, 2}, 2.0, 49);
  REQUIRE(ta::detail::use_channel_plan(a));
  const auto gw = random_tensor<T, 4>(s, 50);
  ta::tensor<T, 4> dw(s), w = random_tensor<T, 4>(s, 51);
  ta::flora<T, 4> grad;
  ta::flora_weight_workspace<T, 4> ws;
  ta::delta_weight(a, dw, ws);
  ta::delta_weight_vjp(a, gw, grad, ws);
  const ta::tensor<T, 4> dw_first = dw;
  const ta::flora<T, 4> grad_first = grad;
  long allocations = 0;
  {
    allocation_counter::scope counting;
    ta::delta_weight(a, dw, ws);
    ta::delta_weight_vjp(a, gw, grad, ws);
    ta::merge(a, w, ws);
    ta::unmerge(a, w, ws);
    allocations = counting.allocations();
  }
  CHECK(allocations == 0);
  CHECK(bit_identical<T>(dw, dw_first));
  ta::for_each_parameter(grad, grad_first, [](const char*, auto& g, const auto& e) { CHECK(bit_identical<T>(g, e)); });

  // A linear weight.
  const auto l = random_flora<T, 2>({20, 14}, {3, 5}, 2.0, 53);
  REQUIRE(ta::detail::use_channel_plan(l));
  const auto lgw = random_tensor<T, 2>({20, 14}, 54);
  ta::tensor<T, 2> ldw(20, 14);
  ta::flora<T, 2> lgrad;
  ta::flora_weight_workspace<T, 2> lws;
  ta::delta_weight(l, ldw, lws);
  ta::delta_weight_vjp(l, lgw, lgrad, lws);
  {
    allocation_counter::scope counting;
    ta::delta_weight(l, ldw, lws);
    ta::delta_weight_vjp(l, lgw, lgrad, lws);
    allocations = counting.allocations();
  }
  CHECK(allocations == 0);
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
