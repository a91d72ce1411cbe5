// LoRA on a linear layer: forward, backward, merge.
#include <tensor_adapters/tensor_adapters.hpp>

#include <cstdio>
#include <random>

int main() {
  namespace ta = tensor_adapters;
  std::mt19937_64 gen(42);

  // A frozen linear layer (out 16, in 32) and a batch of 4 inputs.
  ta::tensor<float, 2> w0(16, 32), x(4, 32);
  ta::tensor<float, 1> b0(16);
  ta::fill_normal(w0, 0.0, 0.1, gen);
  ta::fill_normal(x, 0.0, 1.0, gen);
  b0.setConstant(0.01f);

  // Rank 4, alpha 8: scale = 2. B starts at zero, so the adapter starts as a no-op.
  ta::lora<float> adapter = ta::make_lora<float>(16, 32, {/*rank=*/4, /*alpha=*/8.0}, gen);
  ta::fill_normal(adapter.B, 0.0, 0.1, gen);  // as if trained a little

  ta::tensor<float, 2> y = ta::forward(adapter, x, w0, b0);       // (4, 16)
  ta::tensor<float, 2> dy = y.constant(1.0f);                      // dL/dy for L = sum(y)
  ta::lora_gradients<float> g = ta::backward(adapter, x, w0, dy);  // dx (4, 32), dA (4, 32), dB (16, 4)

  // Merging folds the adapter into the weight: the plain layer now gives the same outputs.
  ta::tensor<float, 2> merged = w0;
  ta::merge(adapter, merged);
  ta::lora<float> off = ta::zeros_like(adapter);  // an adapter that adds nothing
  ta::tensor<float, 2> y_merged = ta::forward(off, x, merged, b0);
  ta::tensor<float, 0> gap = (y - y_merged).abs().maximum();

  std::printf("trainable parameters: %ld\n", static_cast<long>(ta::parameter_count(adapter)));
  std::printf("dA(0, 0) = %.5f, dB(0, 0) = %.5f, dx(0, 0) = %.5f\n", g.grad.A(0, 0), g.grad.B(0, 0), g.dx(0, 0));
  std::printf("max |merged - unmerged| = %.2e\n", static_cast<double>(gap()));
  return gap() < 1e-4f ? 0 : 1;
}
