// The examples of docs/guide.md, compiled and run by the test suite. Each region from a
// "[guide: <name>]" comment line to a "[guide end]" one appears word for word as a ```cpp block of the guide
// (tests/guide_examples.cmake checks it), so the guide's code always builds and always does what
// the guide says. Each example returns the largest error it checks; main fails if one is too big.
// [guide: setup]
#include <tensor_adapters/tensor_adapters.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace ta = tensor_adapters;

// The largest |value| of a tensor expression, which the examples return as their error.
template <class Expression>
double max_abs(const Expression& e) {
  return ta::tensor<double, 0>(e.abs().maximum())();
}
// [guide end]

// [guide: lora]
// A LoRA adapter on a linear layer: forward, backward, merge.
double lora_linear() {
  std::mt19937_64 gen(1);
  ta::tensor<double, 2> w0(32, 64), x(8, 64);  // W0 (out, in), a batch x (n, in)
  ta::tensor<double, 1> b0(32);
  ta::fill_normal(w0, 0.0, 0.1, gen);
  ta::fill_normal(x, 0.0, 1.0, gen);
  b0.setZero();

  ta::lora<double> a = ta::make_lora<double>(32, 64, {/*rank=*/4, /*alpha=*/8.0}, gen);
  ta::fill_normal(a.B, 0.0, 0.1, gen);  // B starts at zero; pretend it was trained

  ta::tensor<double, 2> y = ta::forward(a, x, w0, b0);            // (8, 32)
  ta::tensor<double, 2> dy = y.constant(1.0);                      // ∂L/∂y of L = Σ y
  ta::lora_gradients<double> g = ta::backward(a, x, w0, dy);       // g.dx (8, 64), g.grad: A (4, 64), B (32, 4)
  std::printf("LoRA: %ld trainable parameters\n", static_cast<long>(ta::parameter_count(a)));  // 4·64 + 32·4

  ta::tensor<double, 2> merged = w0;
  ta::merge(a, merged);                                            // merged = W0 + ΔW
  ta::tensor<double, 2> y_plain = ta::forward(ta::zeros_like(a), x, merged, b0);
  return max_abs(y - y_plain);                                     // ≈ 1e-15
}
// [guide end]

// [guide: trainer]
// Plugging into a trainer that already computes ∂L/∂W of its own layer (here a conv weight):
// the adapter needs only delta_weight (θ ↦ ΔW) and delta_weight_vjp (∂L/∂W ↦ ∂L/∂θ).
double trainer_step() {
  std::mt19937_64 gen(2);
  ta::tensor<double, 4> w0(16, 8, 3, 3);  // a conv2d weight (out, in, kh, kw), frozen
  ta::fill_normal(w0, 0.0, 0.1, gen);
  ta::lora<double> a = ta::make_lora<double>(16, 8 * 3 * 3, {/*rank=*/4, /*alpha=*/4.0}, gen);
  ta::adamw<ta::lora<double>> optimizer(a, {/*lr=*/1e-2});

  // Pretend loss: L = ½‖W − W*‖², so ∂L/∂W = W − W*, for a target W* = W0 + 0.01.
  const ta::tensor<double, 4> target = w0 + 0.01;
  double loss = 0.0;
  for (int step = 0; step < 200; ++step) {
    ta::tensor<double, 4> w = w0 + ta::delta_weight(a, ta::shape_of(w0));  // the trainer's effective weight
    ta::tensor<double, 4> gw = w - target;                                // the trainer's own ∂L/∂W
    loss = 0.5 * ta::tensor<double, 0>(gw.square().sum())();
    ta::lora<double> grad = ta::delta_weight_vjp(a, gw);                  // ∂L/∂A, ∂L/∂B
    optimizer.step(a, grad);                                              // AdamW on exactly A and B
  }
  return loss;  // 0.058 at step 0 (ΔW = 0), about 1e-10 after 200 steps
}
// [guide end]

// [guide: flora]
// A FLoRA adapter on a conv weight: the Tucker structure follows the weight's four modes.
double flora_conv() {
  std::mt19937_64 gen(3);
  ta::tensor<double, 4> w0(64, 32, 3, 3);  // (out, in, kh, kw)
  ta::fill_normal(w0, 0.0, 0.05, gen);
  // Ranks (8, 8, 2, 2) and scale 4: G (8, 8, 2, 2), U0 (64, 8), U1 (32, 8), U2 (3, 2), U3 (3, 2).
  ta::flora<double, 4> a = ta::make_flora<double, 4>({64, 32, 3, 3}, {8, 8, 2, 2}, 4.0, gen);
  ta::fill_normal(a.G, 0.0, 0.1, gen);  // G starts at zero; pretend it was trained

  ta::tensor<double, 4> dw = ta::delta_weight(a);                 // scale · G ×0 U0 ×1 U1 ×2 U2 ×3 U3
  ta::tensor<double, 4> gw = dw.constant(1.0);                     // some ∂L/∂W
  ta::flora<double, 4> grad = ta::delta_weight_vjp(a, gw);         // dG, dU0 … dU3, shaped like a
  std::printf("FLoRA: %ld trainable parameters, |dG| = %.3f\n", static_cast<long>(ta::parameter_count(a)),
              ta::tensor<double, 0>(grad.G.abs().sum())());        // 256 + 64·8 + 32·8 + 3·2 + 3·2

  ta::tensor<double, 4> w = w0;
  ta::safe_merge(a, w);                                            // W0 + ΔW, or throws if not finite
  ta::unmerge(a, w);                                               // back to W0 up to rounding
  return max_abs(w - w0);
}
// [guide end]

// [guide: glora]
// A GLoRA layer: one store, a configuration that picks how each support tensor reads it.
double glora_linear() {
  std::mt19937_64 gen(4);
  ta::tensor<double, 2> w0(32, 64), x(8, 64);
  ta::tensor<double, 1> b0(32);
  ta::fill_normal(w0, 0.0, 0.1, gen);
  ta::fill_normal(x, 0.0, 1.0, gen);
  ta::fill_normal(b0, 0.0, 0.1, gen);

  ta::glora<double> store = ta::make_glora<double>(32, 64, {/*max_rank=*/4}, gen);  // every config a no-op
  ta::fill_normal(store.Ad, 0.0, 0.1, gen);  // pretend it was trained
  ta::fill_normal(store.D, 0.0, 0.1, gen);
  ta::glora_config config = ta::parse_glora_config("A=lora_4,B=vector,C=none,D=scalar,E=vector");

  ta::tensor<double, 2> y = ta::forward(store, config, x, w0, b0);
  ta::tensor<double, 2> dy = y.constant(1.0);
  ta::glora_gradients<double> g = ta::backward(store, config, x, w0, b0, dy);
  // g.grad has the store's shapes; entries the configuration does not read are exactly zero.
  std::printf("GLoRA %s: %ld parameters in this configuration\n", ta::to_string(config).c_str(),
              static_cast<long>(ta::parameter_count(config, 32, 64)));

  ta::glora_merged<double, 2> m = ta::merge(store, config, w0, b0);  // (W_eff, b_eff) for inference
  ta::tensor<double, 2> y_plain = x.contract(m.weight, Eigen::array<Eigen::IndexPair<int>, 1>{{{1, 1}}});
  for (ta::index i = 0; i < 8; ++i)
    for (ta::index o = 0; o < 32; ++o) y_plain(i, o) += m.bias(o);
  return max_abs(y - y_plain);
}
// [guide end]

// [guide: search]
// Evolutionary search over per-layer GLoRA configurations, under a parameter budget.
double glora_search() {
  std::vector<ta::glora_layer_shape> layers(4, {/*out=*/32, /*in=*/64, /*max_rank=*/4});
  ta::glora_space space = ta::make_glora_space(std::vector<ta::index>{4, 2});  // lora ranks 4 and 2
  ta::glora_search_options options;
  options.parameter_budget = 1000;
  options.seed = 7;
  // The fitness would be a validation score of the supernet under these configurations; here a
  // stand-in that likes vector B and scalar D in every layer.
  auto fitness = [](const std::vector<ta::glora_config>& configs) {
    double score = 0.0;
    for (const ta::glora_config& c : configs)
      score += (c.B == ta::glora_choice::vector()) + (c.D == ta::glora_choice::scalar());
    return score;
  };
  ta::glora_search_result best = ta::evolutionary_search(layers, space, fitness, options);
  std::printf("search: fitness %.0f of 8 with %ld parameters: %s\n", best.fitness,
              static_cast<long>(best.parameters), ta::to_string(best.configs).c_str());
  return 8.0 - best.fitness;
}
// [guide end]

int main() {
  const double lora_gap = lora_linear();
  const double trainer_loss = trainer_step();
  const double flora_gap = flora_conv();
  const double glora_gap = glora_linear();
  const double search_gap = glora_search();
  std::printf("merged vs unmerged: LoRA %.1e, FLoRA round trip %.1e, GLoRA %.1e; trainer loss %.1e\n", lora_gap,
              flora_gap, glora_gap, trainer_loss);
  const bool ok = lora_gap < 1e-12 && flora_gap < 1e-12 && glora_gap < 1e-12 && trainer_loss < 1e-6 &&
                  search_gap <= 0.0;
  return ok ? 0 : 1;
}
