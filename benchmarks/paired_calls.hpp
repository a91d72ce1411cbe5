// Timing two or more calls call by call, for a ratio of a few per cent.
//
// The machine's speed drifts within minutes; timing the calls in turn inside one benchmark measures
// their ratio more tightly than separately timed benchmarks, whose ratio also holds the drift between
// their repetitions. Each iteration runs every call once on the wall clock, the order rotating from one
// iteration to the next; the iteration time (for UseManualTime) is the calls' sum. Every call first
// runs once untimed (the workspaces allocate on first use). A benchmark using it takes a fixed
// iteration count (->Iterations(25)): at several milliseconds a call, the usual minimum time would
// give one or two.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <vector>

// Runs call(0) … call(K - 1) in rotation for the benchmark's iterations; returns each call's median
// time in seconds.
template <std::size_t K, class Call>
std::array<double, K> paired_call_medians(benchmark::State& state, Call&& call) {
  const auto timed = [&call](std::size_t which) {
    const auto start = std::chrono::steady_clock::now();
    call(which);
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  for (std::size_t which = 0; which < K; ++which) timed(which);
  std::array<std::vector<double>, K> times;
  std::size_t first = 0;
  for (auto _ : state) {
    double total = 0;
    for (std::size_t k = 0; k < K; ++k) {
      const std::size_t which = (first + k) % K;
      const double t = timed(which);
      times[which].push_back(t);
      total += t;
    }
    first = (first + 1) % K;
    state.SetIterationTime(total);
  }
  std::array<double, K> medians{};
  for (std::size_t which = 0; which < K; ++which) {
    std::vector<double>& v = times[which];
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    medians[which] = v[v.size() / 2];
  }
  return medians;
}
