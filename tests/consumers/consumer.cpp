// A user's program: one include, one target.
#include <tensor_adapters/tensor_adapters.hpp>

#include <cstdio>
#include <random>

int main() {
  namespace ta = tensor_adapters;
  std::mt19937_64 gen(1);
  ta::lora<float> adapter = ta::make_lora<float>(6, 4, {/*rank=*/2, /*alpha=*/4.0}, gen);
  adapter.B.setConstant(0.5f);
  ta::tensor<float, 2> w(6, 4);
  w.setZero();
  ta::merge(adapter, w);
  ta::tensor<float, 2> dw = ta::delta_weight(adapter);
  for (ta::index i = 0; i < w.size(); ++i)
    if (w.data()[i] != dw.data()[i]) return 1;
  std::printf("consumer: %ld parameters, merge == delta_weight\n", static_cast<long>(ta::parameter_count(adapter)));
  return 0;
}
