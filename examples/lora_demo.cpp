// The main job, for now: adapt a frozen linear layer to a new task with LoRA and show that it learns.
//
// A "pretrained" layer W0 (out 64, in 128) is frozen. The new task's layer is W0 + ΔW* with ΔW* of rank
// 4, plus label noise. A rank-4 LoRA is trained with AdamW on mini-batches; the loss falls towards the
// noise floor, the learned ΔW approaches ΔW*, and the merged layer reproduces the adapted outputs.
#include <tensor_adapters/tensor_adapters.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

namespace ta = tensor_adapters;

namespace {

double mean_square(const ta::tensor<double, 2>& t) {
  return ta::tensor<double, 0>(t.square().mean())();
}

}  // namespace

int main() {
  const ta::index out = 64, in = 128, true_rank = 4, batch = 64, steps_per_epoch = 50, epochs = 12;
  const double noise = 0.01;
  std::mt19937_64 gen(2026);

  ta::tensor<double, 2> w0(out, in), u(out, true_rank), v(true_rank, in);
  ta::fill_normal(w0, 0.0, 1.0 / std::sqrt(double(in)), gen);
  ta::fill_normal(u, 0.0, 0.5, gen);
  ta::fill_normal(v, 0.0, 1.0 / std::sqrt(double(in)), gen);
  ta::lora<double> shift{v, u, 1.0};                                // A = v, B = u, scale 1
  const ta::tensor<double, 2> target_delta = ta::delta_weight(shift);  // ΔW* = u · v, rank 4
  const ta::tensor<double, 2> w_task = w0 + target_delta;
  ta::tensor<double, 1> b0(out);
  b0.setZero();

  ta::lora<double> adapter = ta::make_lora<double>(out, in, {/*rank=*/true_rank, /*alpha=*/8.0}, gen);
  ta::adamw<ta::lora<double>> optimizer(adapter, {/*lr=*/3e-3, 0.9, 0.999, 1e-8, /*weight_decay=*/0.0});
  ta::lora_workspace<double> ws;
  ta::lora<double> grad;
  ta::tensor<double, 2> x(batch, in), y(batch, out), target(batch, out), dy(batch, out), dx(batch, in), label_noise(batch, out);
  ta::lora<double> no_adapter = ta::zeros_like(adapter);

  std::printf("LoRA demo: frozen linear layer %ldx%ld, rank-%ld task shift, LoRA rank %ld (%ld trainable parameters of %ld)\n",
              long(out), long(in), long(true_rank), long(ta::rank(adapter)), long(ta::parameter_count(adapter)),
              long(out * in));
  // The loss of the frozen layer on the new task, before any adaptation.
  ta::fill_normal(x, 0.0, 1.0, gen);
  ta::forward(no_adapter, x, w0, b0, y, ws);
  ta::forward(no_adapter, x, w_task, b0, target, ws);
  std::printf("  frozen layer alone: mse %.5f\n", mean_square(y - target));

  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  for (ta::index epoch = 1; epoch <= epochs; ++epoch) {
    loss = 0;
    for (ta::index s = 0; s < steps_per_epoch; ++s) {
      ta::fill_normal(x, 0.0, 1.0, gen);
      ta::fill_normal(label_noise, 0.0, noise, gen);
      ta::forward(no_adapter, x, w_task, b0, target, ws);
      target += label_noise;
      ta::forward(adapter, x, w0, b0, y, ws);
      dy = (y - target) * (2.0 / double(batch * out));  // L = mean((y - target)^2)
      loss += mean_square(y - target) / double(steps_per_epoch);
      ta::backward(adapter, x, w0, dy, dx, grad, ws);
      optimizer.step(adapter, grad);
    }
    const double delta_error =
        std::sqrt(mean_square(ta::delta_weight(adapter) - target_delta) / mean_square(target_delta));
    std::printf("  epoch %2ld  train mse %.5f  |dW - dW*| / |dW*| = %.4f\n", long(epoch), loss, delta_error);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Fold the adapter into the weight and compare the plain merged layer with the adapted one.
  ta::tensor<double, 2> merged = w0;
  ta::safe_merge(adapter, merged);
  ta::tensor<double, 2> y_merged(batch, out);
  ta::forward(adapter, x, w0, b0, y, ws);
  ta::forward(no_adapter, x, merged, b0, y_merged, ws);
  const double gap = ta::tensor<double, 0>((y - y_merged).abs().maximum())();
  std::printf("trained in %.2f s; final train mse %.5f (noise floor %.5f); max |merged - unmerged| = %.2e\n",
              seconds, loss, noise * noise, gap);
  return loss < 10 * noise * noise && gap < 1e-10 ? 0 : 1;
}
