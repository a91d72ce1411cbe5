// The arithmetic peak the benchmarks compare with: independent FMA chains on registers only, on the
// native instruction set (td::native_isa), no memory.
//
// The chains fill the vector registers but for the two operands: 16 of AVX-512's 32, 12 of AVX2's 16.
// Sixteen chains on AVX2 spilled three accumulators to the stack, each of whose FMAs then waited on a
// store and a load: 50 GFLOP/s on a Zen 3 core whose mode products reached 70.
#pragma once

#include <tensor_adapters/detail/simd.hpp>

#include <benchmark/benchmark.h>

// Runs the chains on the calling thread; returns the flops done.
template <class T>
double run_fma_chains() {
  using S = tensor_adapters::detail::simd<T, tensor_adapters::detail::native_isa>;
  constexpr int chains = sizeof(typename S::reg) == 64 ? 16 : 12;
  constexpr long steps = 1 << 16;
  typename S::reg acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = S::broadcast(T(c) * T(1e-3));
  typename S::reg a = S::broadcast(T(0.999999)), b = S::broadcast(T(1e-7));
  benchmark::DoNotOptimize(a);
  benchmark::DoNotOptimize(b);
  for (long s = 0; s < steps; ++s)
#pragma GCC unroll 16
    for (int c = 0; c < chains; ++c) acc[c] = S::fma(acc[c], a, b);
  for (int c = 0; c < chains; ++c) benchmark::DoNotOptimize(acc[c]);
  return 2.0 * chains * S::width * double(steps);
}
