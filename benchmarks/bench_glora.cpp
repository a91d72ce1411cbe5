// GLoRA on a linear layer against the frozen base layer alone (x · W0ᵀ through detail::gemm), in the
// same binary.
//
// Shape: (batch 512, 768 → 768, R 8). Configurations: all-lora (A=lora_8,B=lora_8,C=lora_8,D=vector,
// E=vector) and a cheap one (A=vector,B=scalar,C=vector,D=scalar,E=vector). Counters: GFLOP/s of the
// work each benchmark does. Goals: forward ≤ 1.10× the base layer's time; forward + backward ≤ 3.3× the
// base layer's forward. glora_merge forms (W_eff, b_eff) for inference.
#include <tensor_adapters/glora.hpp>

#include <benchmark/benchmark.h>

#include <random>

namespace ta = tensor_adapters;

namespace {

const char* const configs[] = {
    "A=lora_8,B=lora_8,C=lora_8,D=vector,E=vector",  // 0: all-lora
    "A=vector,B=scalar,C=vector,D=scalar,E=vector",  // 1: cheap
};

struct problem {
  ta::index n, in, out, R;
  ta::glora_config config;
  ta::tensor<float, 2> x, w0, y, dy, dx;
  ta::tensor<float, 1> b0;
  ta::glora<float> store, grad;
  ta::glora_workspace<float> ws;

  explicit problem(const benchmark::State& state)
      : n(state.range(0)), in(state.range(1)), out(state.range(2)), R(state.range(3)),
        config(ta::parse_glora_config(configs[state.range(4)])) {
    std::mt19937_64 gen(0);
    x.resize(n, in), w0.resize(out, in), y.resize(n, out), dy.resize(n, out), dx.resize(n, in), b0.resize(out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 0.05, gen);
    ta::fill_normal(dy, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    store = ta::make_glora<float>(out, in, {R}, gen);
    ta::for_each_parameter(store, [&](const char*, auto& p) { ta::fill_normal(p, 0, 0.05, gen); });
    grad = ta::zeros_like(store);
  }
  double base_flops() const { return 2.0 * double(n) * double(in) * double(out); }
};

void set_gflops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iteration * double(state.iterations()) * 1e-9,
                                                 benchmark::Counter::kIsRate);
}

void base_forward(benchmark::State& state) {
  problem p(state);
  for (auto _ : state) {
    ta::detail::gemm<float>(false, true, p.n, p.out, p.in, 1.0f, p.x.data(), p.in, p.w0.data(), p.in, 0.0f,
                            p.y.data(), p.out);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, p.base_flops());
}

void glora_forward(benchmark::State& state) {
  problem p(state);
  ta::forward(p.store, p.config, p.x, p.w0, p.b0, p.y, p.ws);  // the workspace's buffers, before timing
  for (auto _ : state) {
    ta::forward(p.store, p.config, p.x, p.w0, p.b0, p.y, p.ws);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  // The batch product (the low-rank factors and O·I elementwise work are not counted).
  set_gflops(state, p.base_flops());
}

void glora_forward_backward(benchmark::State& state) {
  problem p(state);
  // One step before timing: a training loop's workspace has served a backward (with A vector or scalar
  // the forward then keeps x · W0ᵀ for it) and holds every buffer it needs.
  ta::forward(p.store, p.config, p.x, p.w0, p.b0, p.y, p.ws);
  ta::backward(p.store, p.config, p.x, p.w0, p.b0, p.dy, p.dx, p.grad, p.ws);
  for (auto _ : state) {
    ta::forward(p.store, p.config, p.x, p.w0, p.b0, p.y, p.ws);
    ta::backward(p.store, p.config, p.x, p.w0, p.b0, p.dy, p.dx, p.grad, p.ws);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  // forward: x·W_effᵀ; backward: dx = dy·W_eff and, with A lora, gW = dyᵀ·x (a vector or scalar A reads
  // z = x·W0ᵀ, kept by the forward).
  const bool gw = p.config.A.kind == ta::glora_kind::lora;
  set_gflops(state, p.base_flops() * (gw ? 3.0 : 2.0));
}

void glora_merge(benchmark::State& state) {
  problem p(state);
  ta::tensor<float, 2> w_eff(p.out, p.in);
  ta::tensor<float, 1> b_eff(p.out);
  for (auto _ : state) {
    ta::merge<float, 2>(p.store, p.config, ta::view(p.w0), ta::view(p.b0), ta::writable_view(w_eff),
                        ta::writable_view(b_eff), p.ws);
    benchmark::DoNotOptimize(w_eff.data());
    benchmark::ClobberMemory();
  }
  // GB/s: W0 read and W_eff written once.
  const double bytes = 2.0 * double(p.out) * double(p.in) * sizeof(float);
  state.counters["GB/s"] = benchmark::Counter(bytes * double(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "in", "out", "R", "config"});
  b->Args({512, 768, 768, 8, 0});
  b->Args({512, 768, 768, 8, 1});
  b->Unit(benchmark::kMicrosecond);
  b->UseRealTime();
}

void base_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "in", "out", "R", "config"});
  b->Args({512, 768, 768, 8, 0});
  b->Unit(benchmark::kMicrosecond);
  b->UseRealTime();
}

}  // namespace

BENCHMARK(base_forward)->Apply(base_shapes);
BENCHMARK(glora_forward)->Apply(shapes);
BENCHMARK(glora_forward_backward)->Apply(shapes);
BENCHMARK(glora_merge)->Apply(shapes);

BENCHMARK_MAIN();
