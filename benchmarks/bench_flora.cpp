// FLoRA against its baselines, in the same binary:
//
//   weight space   delta_weight and delta_weight_vjp of conv weights (256, 256, 3, 3) with ranks
//                  (16, 16, 2, 2) and (512, 512, 3, 3) with ranks (32, 32, 3, 3), beside LoRA's at the
//                  rank of closest parameter count, a plain copy loop of the weight's size (the
//                  bandwidth the memory-bound cases are measured against), an FMA loop (the compute
//                  peak) and the single GEMM that dominates the compute-bound chain; the copy and
//                  both operations also call by call (weight_space_paired).
//   linear layer   forward and forward+backward at (batch 512, 768 → 768, ranks 8, 8) beside the frozen
//                  base layer x · W0ᵀ (+ dx = dy · W0 for the backward) and LoRA at the closest rank;
//                  the three forwards also call by call in one benchmark (linear_forward_paired).
//
// Counters: GFLOP/s of the flops each benchmark executes (for FLoRA, those of the plan that runs: the
// channel plan's, or the Tucker chain's in the flop-minimal order); GB/s of the weight-sized bytes it produces or consumes (ΔW written by
// delta_weight, gW read by delta_weight_vjp, the copied weight for the copy: each counted once), so
// that a GB/s ratio is a time ratio against copying the weight. Everything runs on one thread and is
// timed in CPU time (the machine's cores are shared with other work), so the FMA peak and the copy
// bandwidth are one core's too; the paired benchmarks time each call on the wall clock.
// Goals: delta_weight + delta_weight_vjp ≥ 70% of the copy's GB/s where memory-bound, ≥ 60% of the
// FMA peak where compute-bound (benchmarks/report.py classifies each operation by the roofline: the
// copy's time against its flops' time at the peak); the linear forward ≤ 1.05× the base layer's time.
#include <tensor_adapters/flora.hpp>
#include <tensor_adapters/lora.hpp>

#include <benchmark/benchmark.h>

#include "fma_peak.hpp"
#include "paired_calls.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace ta = tensor_adapters;

namespace {

void set_rates(benchmark::State& state, double flops, double bytes) {
  const double n = static_cast<double>(state.iterations());
  if (flops > 0) state.counters["GFLOP/s"] = benchmark::Counter(flops * n * 1e-9, benchmark::Counter::kIsRate);
  if (bytes > 0) state.counters["GB/s"] = benchmark::Counter(bytes * n * 1e-9, benchmark::Counter::kIsRate);
}

// The conv weights of the benchmark: (O, I, k, k) with FLoRA ranks (r, r, rk, rk).
ta::shape<4> conv_shape(const benchmark::State& state) {
  return {state.range(0), state.range(1), state.range(2), state.range(2)};
}
ta::shape<4> conv_ranks(const benchmark::State& state) {
  return {state.range(3), state.range(3), state.range(4), state.range(4)};
}

// The LoRA rank whose parameter count r·(O + F) is closest to FLoRA's.
ta::index closest_lora_rank(ta::index out, ta::index fan_in, ta::index flora_count) {
  const ta::index per_rank = out + fan_in;
  ta::index r = std::max<ta::index>(1, (flora_count + per_rank / 2) / per_rank);
  return std::min(r, std::min(out, fan_in));
}

// Flops of tucker_compress_all_but_one: the same recursive halving of the modes, each half's common
// compression in its cheapest order.
template <int N>
double all_but_one_flops(const ta::shape<N>& dims, const ta::shape<N>& r, const std::vector<int>& modes) {
  if (modes.size() <= 1) return 0;
  const std::size_t half = modes.size() / 2;
  double flops = 0;
  for (int side = 0; side < 2; ++side) {
    std::vector<int> keep, other;
    for (std::size_t k = 0; k < modes.size(); ++k) ((k < half) == (side == 0) ? keep : other).push_back(modes[k]);
    ta::detail::cheapest_order<N>(dims, r, other.data(), static_cast<int>(other.size()));
    flops += ta::detail::chain_flops<N>(dims, r, other.data(), static_cast<int>(other.size()));
    ta::shape<N> reduced = dims;
    for (int m : other) reduced[static_cast<std::size_t>(m)] = r[static_cast<std::size_t>(m)];
    flops += all_but_one_flops<N>(reduced, r, keep);
  }
  return flops;
}

template <int N>
double expand_flops(const ta::shape<N>& w, const ta::shape<N>& r) {
  const auto order = ta::expansion_order<N>(r, w);
  return ta::detail::chain_flops<N>(r, w, order.data(), N);
}

template <int N>
double vjp_flops(const ta::shape<N>& w, const ta::shape<N>& r) {
  std::vector<int> modes(N);
  for (int n = 0; n < N; ++n) modes[static_cast<std::size_t>(n)] = n;
  double flops = all_but_one_flops<N>(w, r, modes);
  const double core = static_cast<double>(ta::detail::product(r));
  ta::index smallest = w[0];
  for (int n = 0; n < N; ++n) {
    const double zn = core / static_cast<double>(r[static_cast<std::size_t>(n)]) * static_cast<double>(w[static_cast<std::size_t>(n)]);
    flops += 2.0 * zn * static_cast<double>(r[static_cast<std::size_t>(n)]);  // grad.U_n
    smallest = std::min(smallest, w[static_cast<std::size_t>(n)]);
  }
  return flops + 2.0 * core * static_cast<double>(smallest);  // grad.G from the z of least extent
}

// The flops the channel plan executes (flora.hpp, detail::channel_dims): H, M and the final GEMM for
// delta_weight; for the VJP also grad.U0, Y, grad.U1, Zs, grad.G and C.
double channel_expand_flops(const ta::detail::channel_dims& d) {
  return 2.0 * (double(d.r0 * d.r1) * double(d.rk * d.s) + double(d.r0 * d.r1) * double(d.s * d.i1) +
                double(d.o * d.i1) * double(d.s * d.r0));
}
double channel_vjp_flops(const ta::detail::channel_dims& d) {
  const double cols = double(d.i1 * d.s), p = double(d.r0 * d.r1);
  return channel_expand_flops(d) - 2.0 * double(d.o) * cols * double(d.r0) + 2.0 * 2.0 * double(d.o) * cols * double(d.r0) +
         2.0 * 2.0 * double(d.i1) * double(d.r1) * double(d.r0 * d.s) + 2.0 * 2.0 * p * double(d.rk * d.s);
}

struct conv_problem {
  ta::shape<4> w_shape, r;
  ta::flora<float, 4> adapter, grad;
  ta::flora_weight_workspace<float, 4> ws;
  ta::tensor<float, 4> dw, gw;
  ta::lora<float> lora, lora_grad;
  double size;

  explicit conv_problem(const benchmark::State& state) : w_shape(conv_shape(state)), r(conv_ranks(state)) {
    std::mt19937_64 gen(0);
    adapter = ta::make_flora<float, 4>(w_shape, r, 4.0, gen);
    ta::fill_normal(adapter.G, 0.0, 1.0, gen);
    dw.resize(w_shape);
    gw.resize(w_shape);
    ta::fill_normal(gw, 0.0, 1.0, gen);
    const ta::index fan_in = w_shape[1] * w_shape[2] * w_shape[3];
    const ta::index lr = closest_lora_rank(w_shape[0], fan_in, ta::parameter_count(adapter));
    lora = ta::make_lora<float>(w_shape[0], fan_in, {lr, 2.0 * double(lr)}, gen);
    ta::fill_normal(lora.B, 0.0, 0.05, gen);
    size = static_cast<double>(dw.size());
  }
  double lora_flops() const { return 2.0 * size * static_cast<double>(lora.A.dimension(0)); }
};

void report_counts(benchmark::State& state, const conv_problem& p, bool is_lora) {
  state.counters["params"] = static_cast<double>(is_lora ? ta::parameter_count(p.lora) : ta::parameter_count(p.adapter));
  if (is_lora) state.counters["lora_r"] = static_cast<double>(p.lora.A.dimension(0));
}

// A plain copy of a weight-sized buffer: the bandwidth the memory-bound goals are measured against.
struct weight_copy {
  std::vector<float> src, dst;
  explicit weight_copy(const ta::shape<4>& s)
      : src(static_cast<std::size_t>(ta::detail::product(s)), 1.0f), dst(src.size(), 0.0f) {}
  void run() {
    const float* a = src.data();
    float* b = dst.data();
    for (std::size_t i = 0; i < src.size(); ++i) b[i] = a[i];
    benchmark::DoNotOptimize(dst.data());
  }
};

void copy_weight(benchmark::State& state) {
  weight_copy copy(conv_shape(state));
  for (auto _ : state) {
    copy.run();
    benchmark::ClobberMemory();
  }
  set_rates(state, 0, sizeof(float) * double(copy.src.size()));
}

void flora_delta_weight(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::delta_weight(p.adapter, p.dw, p.ws);
    benchmark::DoNotOptimize(p.dw.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, ta::detail::use_channel_plan(p.adapter) ? channel_expand_flops(ta::detail::channel_plan_dims(p.adapter))
                                                          : expand_flops<4>(p.w_shape, p.r),
            sizeof(float) * p.size);
  report_counts(state, p, false);
}

void flora_delta_weight_vjp(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::delta_weight_vjp(p.adapter, p.gw, p.grad, p.ws);
    benchmark::DoNotOptimize(p.grad.G.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, ta::detail::use_channel_plan(p.adapter) ? channel_vjp_flops(ta::detail::channel_plan_dims(p.adapter))
                                                          : vjp_flops<4>(p.w_shape, p.r),
            sizeof(float) * p.size);
  report_counts(state, p, false);
}

// The copy, delta_weight and delta_weight_vjp call by call (paired_calls.hpp), the order rotating:
// counters are the medians (copy_us, dw_us, vjp_us) and the shares dw_of_copy = copy / delta_weight,
// vjp_of_copy = copy / VJP and together_of_copy = 2·copy / (delta_weight + VJP). Timed apart, the copy
// and the VJP drifted by more than the goal's margin between reports (the VJP's share read 70 % and
// 73 % on the same code).
void weight_space_paired(benchmark::State& state) {
  conv_problem p(state);
  weight_copy copy(p.w_shape);
  const auto [copy_t, dw_t, vjp_t] = paired_call_medians<3>(state, [&](std::size_t which) {
    if (which == 0) {
      copy.run();
    } else if (which == 1) {
      ta::delta_weight(p.adapter, p.dw, p.ws);
      benchmark::DoNotOptimize(p.dw.data());
    } else {
      ta::delta_weight_vjp(p.adapter, p.gw, p.grad, p.ws);
      benchmark::DoNotOptimize(p.grad.G.data());
    }
  });
  state.counters["copy_us"] = copy_t * 1e6;
  state.counters["dw_us"] = dw_t * 1e6;
  state.counters["vjp_us"] = vjp_t * 1e6;
  state.counters["dw_of_copy"] = copy_t / dw_t;
  state.counters["vjp_of_copy"] = copy_t / vjp_t;
  state.counters["together_of_copy"] = 2 * copy_t / (dw_t + vjp_t);
}

// The same through the Tucker chain in the flop-minimal order (tucker_expand), for comparison.
void flora_delta_weight_chain(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::detail::expand<float, 4>(p.adapter, p.adapter.scale, 0.0f, p.dw, p.ws, ta::detail::flora_plan::chain);
    benchmark::DoNotOptimize(p.dw.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, expand_flops<4>(p.w_shape, p.r), sizeof(float) * p.size);
}

void flora_delta_weight_vjp_chain(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::detail::vjp<float, 4>(p.adapter, ta::view(p.gw), p.grad, p.ws, ta::detail::flora_plan::chain);
    benchmark::DoNotOptimize(p.grad.G.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, vjp_flops<4>(p.w_shape, p.r), sizeof(float) * p.size);
}

void lora_delta_weight(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::delta_weight(p.lora, ta::writable_view(p.dw));
    benchmark::DoNotOptimize(p.dw.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, p.lora_flops(), sizeof(float) * p.size);
  report_counts(state, p, true);
}

void lora_delta_weight_vjp(benchmark::State& state) {
  conv_problem p(state);
  for (auto _ : state) {
    ta::delta_weight_vjp(p.lora, ta::view(p.gw), p.lora_grad);
    benchmark::DoNotOptimize(p.lora_grad.A.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 2.0 * p.lora_flops(), sizeof(float) * p.size);
  report_counts(state, p, true);
}

// The last step of the (512, 512, 3, 3) expansion, mode 0 of (32, 512·3·3) by U0 (512, 32): one GEMM
// (O, F) = U0 · X of the same shape, the best a single-call GEMM reaches here.
void gemm_of_last_step(benchmark::State& state) {
  const ta::shape<4> s = conv_shape(state);
  const ta::index r = state.range(3), out = s[0], rest = s[1] * s[2] * s[3];
  std::mt19937_64 gen(1);
  ta::tensor<float, 2> u(out, r), x(r, rest), y(out, rest);
  ta::fill_normal(u, 0.0, 1.0, gen);
  ta::fill_normal(x, 0.0, 1.0, gen);
  for (auto _ : state) {
    ta::detail::gemm<float>(false, false, out, rest, r, 1.0f, u.data(), r, x.data(), rest, 0.0f, y.data(), rest);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 2.0 * double(out) * double(rest) * double(r), sizeof(float) * double(out * rest));
}

// One core's FMA peak (fma_peak.hpp).
void fma_peak(benchmark::State& state) {
  double flops = 0;
  for (auto _ : state) flops = run_fma_chains<float>();
  set_rates(state, flops, 0);
}

void conv_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"O", "I", "k", "r", "rk"});
  b->Args({256, 256, 3, 16, 2});
  b->Args({512, 512, 3, 32, 3});
  b->Unit(benchmark::kMicrosecond);
}

// ---------------------------------------------------------------------------------------------------
// Linear layer

struct linear_problem {
  ta::index n, in, out, r;
  ta::tensor<float, 2> x, w0, y, dy, dx;
  ta::tensor<float, 1> b0;
  ta::flora<float, 2> adapter, grad;
  ta::flora_workspace<float> ws;
  ta::lora<float> lora, lora_grad;
  ta::lora_workspace<float> lora_ws;

  explicit linear_problem(const benchmark::State& state)
      : n(state.range(0)), in(state.range(1)), out(state.range(2)), r(state.range(3)) {
    std::mt19937_64 gen(0);
    x.resize(n, in), w0.resize(out, in), y.resize(n, out), dy.resize(n, out), dx.resize(n, in), b0.resize(out);
    ta::fill_normal(x, 0, 1, gen);
    ta::fill_normal(w0, 0, 0.05, gen);
    ta::fill_normal(dy, 0, 1, gen);
    ta::fill_normal(b0, 0, 1, gen);
    adapter = ta::make_flora<float, 2>({out, in}, {r, r}, 2.0, gen);
    ta::fill_normal(adapter.G, 0.0, 1.0, gen);
    const ta::index lr = closest_lora_rank(out, in, ta::parameter_count(adapter));
    lora = ta::make_lora<float>(out, in, {lr, 2.0 * double(lr)}, gen);
    ta::fill_normal(lora.B, 0, 0.05, gen);
  }
  double base_flops() const { return 2.0 * double(n) * double(in) * double(out); }
  double flora_flops() const { return 2.0 * double(n) * double(r) * double(in + r + out); }
  double lora_flops() const { return 2.0 * double(n) * double(lora.A.dimension(0)) * double(in + out); }
};

// The frozen layer y = x · W0ᵀ + b0: the GEMM, then the bias in one pass over y (measured a little
// faster here than starting y as the bias rows and accumulating the GEMM into it).
void base_forward(linear_problem& p) {
  ta::detail::gemm<float>(false, true, p.n, p.out, p.in, 1.0f, p.x.data(), p.in, p.w0.data(), p.in, 0.0f, p.y.data(),
                          p.out);
  for (ta::index i = 0; i < p.n; ++i) {
    float* row = p.y.data() + i * p.out;
    for (ta::index o = 0; o < p.out; ++o) row[o] += p.b0.data()[o];
  }
}

void linear_base_forward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    base_forward(p);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, p.base_flops(), 0);
}

void linear_flora_forward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, p.base_flops() + p.flora_flops(), 0);
  state.counters["params"] = static_cast<double>(ta::parameter_count(p.adapter));
}

void linear_lora_forward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    ta::forward(p.lora, p.x, p.w0, p.b0, p.y, p.lora_ws);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, p.base_flops() + p.lora_flops(), 0);
  state.counters["params"] = static_cast<double>(ta::parameter_count(p.lora));
  state.counters["lora_r"] = static_cast<double>(p.lora.A.dimension(0));
}

// The three forwards above call by call (paired_calls.hpp), the order rotating; the ratios of their
// median times are counters (ratio: FLoRA / base, lora_ratio: LoRA / base).
void linear_forward_paired(benchmark::State& state) {
  linear_problem p(state);
  const auto [base, flora, lora] = paired_call_medians<3>(state, [&p](std::size_t which) {
    if (which == 0)
      base_forward(p);
    else if (which == 1)
      ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    else
      ta::forward(p.lora, p.x, p.w0, p.b0, p.y, p.lora_ws);
    benchmark::DoNotOptimize(p.y.data());
  });
  state.counters["base_us"] = base * 1e6;
  state.counters["flora_us"] = flora * 1e6;
  state.counters["lora_us"] = lora * 1e6;
  state.counters["ratio"] = flora / base;
  state.counters["lora_ratio"] = lora / base;
  state.counters["lora_r"] = static_cast<double>(p.lora.A.dimension(0));
}

// The frozen layer's own backward: dx = dy · W0 after the forward.
void linear_base_forward_backward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    base_forward(p);
    ta::detail::gemm<float>(false, false, p.n, p.in, p.out, 1.0f, p.dy.data(), p.out, p.w0.data(), p.in, 0.0f,
                            p.dx.data(), p.in);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 2 * p.base_flops(), 0);
}

void linear_flora_forward_backward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    ta::forward(p.adapter, p.x, p.w0, p.b0, p.y, p.ws);
    ta::backward(p.adapter, p.x, p.w0, p.dy, p.dx, p.grad, p.ws);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  // forward: base + 3 rank-r products; backward: base (dy · W0) + 8 rank-r products.
  const double backward_small = 2.0 * double(p.n) * double(p.r) * double(3 * p.in + 2 * p.out + 3 * p.r);
  set_rates(state, 2 * p.base_flops() + p.flora_flops() + backward_small, 0);
}

void linear_lora_forward_backward(benchmark::State& state) {
  linear_problem p(state);
  for (auto _ : state) {
    ta::forward(p.lora, p.x, p.w0, p.b0, p.y, p.lora_ws);
    ta::backward(p.lora, p.x, p.w0, p.dy, p.dx, p.lora_grad, p.lora_ws);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 2 * p.base_flops() + p.lora_flops() + 2.5 * p.lora_flops(), 0);
}

void linear_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "in", "out", "r"});
  b->Args({512, 768, 768, 8});
  b->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(fma_peak)->Unit(benchmark::kMicrosecond);
BENCHMARK(copy_weight)->Apply(conv_shapes);
BENCHMARK(flora_delta_weight)->Apply(conv_shapes);
BENCHMARK(flora_delta_weight_chain)->Apply(conv_shapes);
BENCHMARK(lora_delta_weight)->Apply(conv_shapes);
BENCHMARK(flora_delta_weight_vjp)->Apply(conv_shapes);
BENCHMARK(flora_delta_weight_vjp_chain)->Apply(conv_shapes);
BENCHMARK(lora_delta_weight_vjp)->Apply(conv_shapes);
BENCHMARK(gemm_of_last_step)->Apply(conv_shapes);
BENCHMARK(weight_space_paired)->Apply(conv_shapes)->UseManualTime()->Iterations(101);
BENCHMARK(linear_base_forward)->Apply(linear_shapes);
BENCHMARK(linear_flora_forward)->Apply(linear_shapes);
BENCHMARK(linear_lora_forward)->Apply(linear_shapes);
BENCHMARK(linear_forward_paired)->Apply(linear_shapes)->UseManualTime()->Iterations(25);
BENCHMARK(linear_base_forward_backward)->Apply(linear_shapes);
BENCHMARK(linear_flora_forward_backward)->Apply(linear_shapes);
BENCHMARK(linear_lora_forward_backward)->Apply(linear_shapes);

int main(int argc, char** argv) {
#ifdef _OPENMP
  omp_set_num_threads(1);  // one core: the peak, the bandwidth and every kernel on the same footing
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
