// detail::gemm (the product every adapter uses) against Eigen's matrix product, in the same binary.
//
// Shapes: the two linear layers of bench_lora, 512×768·768×768 and 64×4096·4096×4096, both as
// C = A·B and as C = A·Bᵀ (a linear layer's x·Wᵀ), float and double, one thread and two. Counter:
// GFLOP/s (2·m·n·k per product).
//
//   build/<dir>/benchmarks/bench_gemm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <tensor_adapters/detail/gemm.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace td = tensor_adapters::detail;
using index_t = tensor_adapters::index;

namespace {

void set_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
}

template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
void ours(benchmark::State& state, index_t m, index_t n, index_t k, bool trans_b, int threads) {
  set_threads(threads);
  const matrix<T> a = matrix<T>::Random(m, k), b = trans_b ? matrix<T>::Random(n, k) : matrix<T>::Random(k, n);
  matrix<T> c(m, n);
  for (auto _ : state) {
    td::gemm<T>(false, trans_b, m, n, k, T(1), a.data(), k, b.data(), trans_b ? k : n, T(0), c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(m) * double(n) * double(k) * double(state.iterations()) * 1e-9,
                         benchmark::Counter::kIsRate);
  set_threads(1);
}

template <class T>
void eigen(benchmark::State& state, index_t m, index_t n, index_t k, bool trans_b, int threads) {
  set_threads(threads);
  const matrix<T> a = matrix<T>::Random(m, k), b = trans_b ? matrix<T>::Random(n, k) : matrix<T>::Random(k, n);
  matrix<T> c(m, n);
  for (auto _ : state) {
    if (trans_b)
      c.noalias() = a * b.transpose();
    else
      c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(m) * double(n) * double(k) * double(state.iterations()) * 1e-9,
                         benchmark::Counter::kIsRate);
  set_threads(1);
}

template <class T>
void register_type(const char* type) {
  struct shape {
    index_t m, n, k;
  };
  for (const shape& s : {shape{512, 768, 768}, shape{64, 4096, 4096}})
    for (bool trans_b : {false, true})
      for (int threads : {1, 2}) {
        const std::string name = std::string("<") + type + ">/" + std::to_string(s.m) + "x" + std::to_string(s.k) +
                                 "x" + std::to_string(s.n) + (trans_b ? "/NT" : "/NN") + "/threads:" +
                                 std::to_string(threads);
        benchmark::RegisterBenchmark(("gemm" + name).c_str(), ours<T>, s.m, s.n, s.k, trans_b, threads)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("eigen_product" + name).c_str(), eigen<T>, s.m, s.n, s.k, trans_b, threads)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      }
}

}  // namespace

int main(int argc, char** argv) {
  register_type<float>("float");
  register_type<double>("double");
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
