#include <tensor_adapters/lora.hpp>

#include <catch2/catch.hpp>

#include <random>

namespace ta = tensor_adapters;

TEMPLATE_TEST_CASE("a new LoRA adapter is a no-op", "[lora]", float, double) {
  std::mt19937_64 gen(1);
  auto a = ta::make_lora<TestType>(8, 12, {2, 4.0}, gen);
  ta::tensor<TestType, 2> dw = ta::delta_weight(a);
  for (ta::index i = 0; i < dw.size(); ++i) REQUIRE(dw.data()[i] == TestType(0));
}
