// detail::gemm (the product every adapter uses) against Eigen's matrix product, in the same binary.
//
// Shapes: the two linear layers of bench_lora, 512×768·768×768 and 64×4096·4096×4096, both as
// C = A·B and as C = A·Bᵀ (a linear layer's x·Wᵀ), float and double, one thread and two. Counter:
// GFLOP/s (2·m·n·k per product). On one thread also both products call by call (gemm_paired), whose
// ratio the report's 2-D goal reads. Where TENSOR_ADAPTERS_BENCH_BLAS names a BLAS (blas_baseline.hpp),
// its GEMM on one thread as well (blas_product). And the native micro-kernel alone (micro_kernel): one
// packed MR×256 panel of A against 1, 16, 64 and 256 packed panels of B (from L1 to beyond L2), beside
// the FMA loop (fma_peak) it is measured against; also its first 4 and 3 rows only, the kernels of a
// product's last rows (m % MR) and of a short trailing extent's strips (short_columns_product).
//
//   build/<dir>/benchmarks/bench_gemm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <tensor_adapters/detail/gemm.hpp>

#include <benchmark/benchmark.h>

#include "blas_baseline.hpp"
#include "fma_peak.hpp"
#include "paired_calls.hpp"

#include <Eigen/Core>
#include <string>
#include <vector>

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
struct operands {
  matrix<T> a, b, c;
  bool trans_b;
  operands(index_t m, index_t n, index_t k, bool tb)
      : a(matrix<T>::Random(m, k)), b(tb ? matrix<T>::Random(n, k) : matrix<T>::Random(k, n)), c(m, n), trans_b(tb) {}
  void ours() {
    const index_t m = a.rows(), k = a.cols(), n = c.cols();
    td::gemm<T>(false, trans_b, m, n, k, T(1), a.data(), k, b.data(), trans_b ? k : n, T(0), c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  void blas() {
    const index_t m = a.rows(), k = a.cols(), n = c.cols();
    blas_baseline::get().gemm(trans_b, int(m), int(n), int(k), a.data(), int(k), b.data(), int(trans_b ? k : n),
                              c.data(), int(n));
    benchmark::DoNotOptimize(c.data());
  }
  void eigen() {
    if (trans_b)
      c.noalias() = a * b.transpose();
    else
      c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
};

enum class implementation { ours, eigen, blas };

// One product (ours: detail::gemm; Eigen's; the BLAS's), timed alone.
template <class T>
void product(benchmark::State& state, index_t m, index_t n, index_t k, bool trans_b, int threads,
             implementation which) {
  set_threads(threads);
  operands<T> x(m, n, k, trans_b);
  for (auto _ : state) {
    if (which == implementation::ours)
      x.ours();
    else if (which == implementation::eigen)
      x.eigen();
    else
      x.blas();
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(m) * double(n) * double(k) * double(state.iterations()) * 1e-9,
                         benchmark::Counter::kIsRate);
  set_threads(1);
}

// Both call by call, the order rotating (paired_calls.hpp), one thread: counters ours_us, eigen_us and
// ratio = Eigen's time / ours (above 1: ours faster). Timed apart, the two drift by a few per cent
// between repetitions, as much as they differ here.
template <class T>
void paired(benchmark::State& state, index_t m, index_t n, index_t k, bool trans_b) {
  set_threads(1);
  operands<T> x(m, n, k, trans_b);
  const auto [ours_t, eigen_t] = paired_call_medians<2>(state, [&x](std::size_t which) {
    if (which == 0)
      x.ours();
    else
      x.eigen();
  });
  state.counters["ours_us"] = ours_t * 1e6;
  state.counters["eigen_us"] = eigen_t * 1e6;
  state.counters["ratio"] = eigen_t / ours_t;
}

// The micro-kernel's C tile += A panel · B panel over `panels` panels of B, kc = 256 (gemm_shape's).
template <class T>
void micro_kernel(benchmark::State& state, int rows, index_t panels) {
  using shape = td::gemm_shape<T, td::native_isa>;
  constexpr int MR = shape::mr, NR = shape::nv * td::simd<T, td::native_isa>::width;
  const index_t kc = shape::kc;
  td::scratch<T> a_store, b_store, c_store;
  T* a = a_store.get(MR * kc);
  T* b = b_store.get(kc * NR * panels);
  T* c = c_store.get(MR * NR * panels);
  std::fill(a, a + MR * kc, T(0.5));
  std::fill(b, b + kc * NR * panels, T(0.25));
  for (auto _ : state) {
    for (index_t p = 0; p < panels; ++p)
      td::micro_kernel_rows<T, td::native_isa, shape::nv, MR>(rows, kc, a, b + p * kc * NR, c + p * NR, NR * panels,
                                                              T(1), T(0));
    benchmark::DoNotOptimize(c);
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * rows * NR * double(kc * panels) * double(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

template <class T>
void fma_peak(benchmark::State& state) {
  double flops = 0;
  for (auto _ : state) flops += run_fma_chains<T>();
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

template <class T>
void register_type(const char* type) {
  benchmark::RegisterBenchmark((std::string("fma_peak<") + type + ">").c_str(), fma_peak<T>);
  for (const int rows : {td::gemm_shape<T, td::native_isa>::mr, 4, 3})
    for (const index_t panels : {1, 16, 64, 256})
      benchmark::RegisterBenchmark((std::string("micro_kernel<") + type + ">/rows:" + std::to_string(rows) +
                                    "/panels:" + std::to_string(panels))
                                       .c_str(),
                                   micro_kernel<T>, rows, panels);
  struct shape {
    index_t m, n, k;
  };
  for (const shape& s : {shape{512, 768, 768}, shape{64, 4096, 4096}})
    for (bool trans_b : {false, true})
      for (int threads : {1, 2}) {
        const std::string name = std::string("<") + type + ">/" + std::to_string(s.m) + "x" + std::to_string(s.k) +
                                 "x" + std::to_string(s.n) + (trans_b ? "/NT" : "/NN") + "/threads:" +
                                 std::to_string(threads);
        benchmark::RegisterBenchmark(("gemm" + name).c_str(), product<T>, s.m, s.n, s.k, trans_b, threads,
                                     implementation::ours)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("eigen_product" + name).c_str(), product<T>, s.m, s.n, s.k, trans_b, threads,
                                     implementation::eigen)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        if (threads == 1 && blas_baseline::get().loaded())  // the BLAS is set to one thread
          benchmark::RegisterBenchmark(("blas_product" + name).c_str(), product<T>, s.m, s.n, s.k, trans_b, threads,
                                       implementation::blas)
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond);
        if (threads == 1)
          benchmark::RegisterBenchmark(("gemm_paired" + name).c_str(), paired<T>, s.m, s.n, s.k, trans_b)
              ->UseManualTime()
              ->Iterations(25)
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
