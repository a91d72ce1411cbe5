// LoRA on a linear layer against the frozen base layer alone (x · W0ᵀ), in the same binary.
//
// Shapes: (batch 512, 768 → 768, r 8) and (batch 64, 4096 → 4096, r 16). Counters: GFLOP/s of the
// work each benchmark does. Goal: LoRA forward ≤ 1.05× the base layer's time, also timed call by call
// against it (lora_forward_paired). lora_merge folds the adapter into the weight in place
// (W ← W + scale · B · A), what switching to inference costs once.
#include <tensor_adapters/lora.hpp>

#include <benchmark/benchmark.h>

#include "paired_calls.hpp"

#include <random>

namespace ta = tensor_adapters;

namespace {

struct problem {
  ta::index n, in, out, r;
  ta::tensor<float, 2> x, w0, y, dy, dx;
  ta::tensor<float, 1> b0;
  ta::lora<float> adapter, grad;
  ta::lora_workspace<float> ws;

  explicit problem(const benchmark::State& state)
      : n(state.range(0)), in(state.range(1)), out(state.range(2)), r(state.range(3)) {
    std::mt19937_64 gen(0);
    x.resize(n, in), w0.resize(out, in), y.resize(n, out), dy.resize(n, out), dx.resize(n, in), b0.resize(out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 0.05, gen);
    ta::fill_normal(dy, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    adapter = ta::make_lora<float>(out, in, {r, 2.0 * r}, gen);
    ta::fill_normal(adapter.B, 0, 0.05, gen);
  }
  double base_flops() const { return 2.0 * n * in * out; }
  double lora_flops() const { return 2.0 * n * r * (in + out); }
};

void set_gflops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iteration * double(state.iterations()) * 1e-9,
                                                 benchmark::Counter::kIsRate);
}

// The frozen layer: y = x · W0ᵀ.
void base_layer(problem& p) {
  ta::detail::gemm<float>(false, true, p.n, p.out, p.in, 1.0f, p.x.data(), p.in, p.w0.data(), p.in, 0.0f, p.y.data(),
                          p.out);
}

void base_forward(benchmark::State& state) {
  problem p(state);
  for (auto _ : state) {
    base_layer(p);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, p.base_flops());
}

void lora_forward(benchmark::State& state) {
  problem p(state);
  for (auto _ : state) {
    ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, p.base_flops() + p.lora_flops());
}

// The two forwards above call by call (paired_calls.hpp), the order alternating; ratio is the LoRA
// forward's median time over the base layer's.
void lora_forward_paired(benchmark::State& state) {
  problem p(state);
  const auto [base, lora] = paired_call_medians<2>(state, [&p](std::size_t which) {
    if (which == 0)
      base_layer(p);
    else
      ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    benchmark::DoNotOptimize(p.y.data());
  });
  state.counters["base_us"] = base * 1e6;
  state.counters["lora_us"] = lora * 1e6;
  state.counters["ratio"] = lora / base;
}

void lora_forward_backward(benchmark::State& state) {
  problem p(state);
  for (auto _ : state) {
    ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    ta::backward(p.adapter, p.x, p.w0, p.dy, p.dx, p.grad, p.ws);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  // forward: base + lora; backward: dx = dy·W0 (base) + h, dB, dh, dA, dh·A (5 rank-r products).
  set_gflops(state, 2 * p.base_flops() + p.lora_flops() + 2.5 * p.lora_flops());
}

void lora_merge(benchmark::State& state) {
  problem p(state);
  ta::tensor<float, 2> w = p.w0;
  for (auto _ : state) {
    ta::merge(p.adapter, w);  // ΔW accumulates over the iterations; its size does not matter to the time
    benchmark::DoNotOptimize(w.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, 2.0 * double(p.out) * double(p.in) * double(p.r));
}

void shape_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "in", "out", "r"});
  b->Args({512, 768, 768, 8});
  b->Args({64, 4096, 4096, 16});
  b->Unit(benchmark::kMicrosecond);
}

void shapes(benchmark::internal::Benchmark* b) {
  shape_args(b);
  b->UseRealTime();
}

}  // namespace

BENCHMARK(base_forward)->Apply(shapes);
BENCHMARK(lora_forward)->Apply(shapes);
BENCHMARK(lora_forward_paired)->Apply(shape_args)->UseManualTime()->Iterations(25);
BENCHMARK(lora_forward_backward)->Apply(shapes);
BENCHMARK(lora_merge)->Apply(shapes);

BENCHMARK_MAIN();
