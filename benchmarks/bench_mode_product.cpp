// Mode-n products (tensor × matrix) against their baselines, in the same binary.
//
// Cases (every mode of each):
//   (a) 256×256×256, J = 64 and 256                      compute-bound
//   (b) 512×512×3×3 and 256×256×3×3, rank 8 / 32 / 64    conv weights (small trailing extents);
//       modes 0 and 1 map to the rank, modes 2 and 3 (kh, kw) to 3, the most a Tucker rank can be there
//   (c) 256×256×256, J = 4 and 8                          memory-bound
// Benchmarks per case:
//   mode_product<T>/…/threads:{1,2}   this library (float and double, 1 and 2 OpenMP threads)
//   scalar_kernel<float>/…            the same product on the scalar reference kernel
//   eigen_contract<T>/…               Eigen's TensorContraction + shuffle back to the row-major layout
//   eigen_gemm<T>/…                   one Eigen matrix product with the same m, n, k (same flops)
//   blas_gemm<T>/…                    the same product as loops over a BLAS's GEMM (one call for the
//                                     first or last mode, one per slice for a middle one), one thread;
//                                     only where TENSOR_ADAPTERS_BENCH_BLAS names a shared library with
//                                     cblas_sgemm and cblas_dgemm (`./run.sh report` gives OpenBLAS's)
// and the machine's limits:
//   fma_peak<T>/threads:{1,2}         independent FMAs on registers only (no memory)
//   copy_bandwidth/threads:{1,2}      a 64 MB → 64 MB copy (bytes read + written)
// and, for the compute-bound float cases (J and the contracted extent ≥ 64):
//   mode_product_threads_paired<float>/…  one thread and two, call by call (two_over_one)
//   mode_product_huge_pages_paired<float>/…  one thread, x and y in ordinary memory (as allocated by
//                                     Eigen) and copies of them on transparent huge pages, call by call
//                                     (huge_over_small; Linux, where the kernel grants huge pages)
// Counters: GFLOP/s (2·|y|·I_mode) and GB/s (|x| + |u| + |y| elements, each moved once).
//
//   build/<dir>/benchmarks/bench_mode_product --benchmark_min_time=0.1
//       --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <tensor_adapters/init.hpp>
#include <tensor_adapters/mode_product.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "blas_baseline.hpp"
#include "fma_peak.hpp"
#include "paired_calls.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace ta = tensor_adapters;
namespace td = tensor_adapters::detail;

namespace {

void set_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

template <class T, int N>
struct problem {
  ta::tensor<T, N> x, y;
  ta::tensor<T, 2> u;
  int mode;
  ta::index p = 1, i, q = 1, j;

  problem(const ta::shape<N>& dims, int mode_, ta::index j_) : mode(mode_), j(j_) {
    std::mt19937_64 gen(1);
    x.resize(dims);
    ta::fill_normal(x, 0, 1, gen);
    i = dims[std::size_t(mode)];
    u.resize(j, i);
    ta::fill_normal(u, 0, 1, gen);
    ta::shape<N> ydims = dims;
    ydims[std::size_t(mode)] = j;
    y.resize(ydims);
    y.setZero();
    for (int d = 0; d < mode; ++d) p *= dims[std::size_t(d)];
    for (int d = mode + 1; d < N; ++d) q *= dims[std::size_t(d)];
  }
  double flops() const { return 2.0 * double(y.size()) * double(i); }
  double bytes() const { return double(x.size() + u.size() + y.size()) * sizeof(T); }
};

template <class T, int N>
void counters(benchmark::State& state, const problem<T, N>& pr) {
  const double it = double(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(pr.flops() * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(pr.bytes() * it * 1e-9, benchmark::Counter::kIsRate);
}

template <class T, int N>
void mode_product(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j, int threads) {
  set_threads(threads);
  problem<T, N> pr(dims, mode, j);
  for (auto _ : state) {
    ta::mode_product<T, N>(ta::view(pr.x), pr.u, mode, ta::writable_view(pr.y));
    benchmark::DoNotOptimize(pr.y.data());
    benchmark::ClobberMemory();
  }
  counters(state, pr);
  set_threads(1);
}

template <class T, int N>
void scalar_kernel(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  set_threads(1);
  problem<T, N> pr(dims, mode, j);
  for (auto _ : state) {
    td::mode_product_kernel<T, td::scalar_isa>(pr.x.data(), pr.p, pr.i, pr.q, pr.u.data(), false, pr.j, T(1), T(0),
                                               pr.y.data());
    benchmark::DoNotOptimize(pr.y.data());
    benchmark::ClobberMemory();
  }
  counters(state, pr);
}

template <class T, int N>
void eigen_contract(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  set_threads(1);
  problem<T, N> pr(dims, mode, j);
  const Eigen::array<Eigen::IndexPair<int>, 1> pairs{Eigen::IndexPair<int>(mode, 1)};
  // contract leaves x's other modes in order, then J last; the shuffle puts J back at `mode`.
  Eigen::array<int, N> back{};
  for (int d = 0; d < N; ++d) back[std::size_t(d)] = d < mode ? d : (d == mode ? N - 1 : d - 1);
  for (auto _ : state) {
    pr.y = pr.x.contract(pr.u, pairs).shuffle(back);
    benchmark::DoNotOptimize(pr.y.data());
    benchmark::ClobberMemory();
  }
  counters(state, pr);
}

template <class T, int N>
void eigen_gemm(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  set_threads(1);
  problem<T, N> pr(dims, mode, j);
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  // The same m, n, k as the library's product: y (P, J) = x (P, I)·uᵀ for the last mode, else
  // y (J, P·Q) = u (J, I)·x (I, P·Q) (on x's bytes viewed as one matrix: same flops, same sizes).
  const bool last = pr.q == 1;
  Eigen::Map<const matrix> u(pr.u.data(), pr.j, pr.i);
  Eigen::Map<const matrix> x(pr.x.data(), last ? pr.p : pr.i, last ? pr.i : pr.p * pr.q);
  Eigen::Map<matrix> y(pr.y.data(), last ? pr.p : pr.j, last ? pr.j : pr.p * pr.q);
#ifdef _OPENMP
  Eigen::setNbThreads(1);
#endif
  for (auto _ : state) {
    if (last)
      y.noalias() = x * u.transpose();
    else
      y.noalias() = u * x;
    benchmark::DoNotOptimize(pr.y.data());
    benchmark::ClobberMemory();
  }
  counters(state, pr);
}

template <class T, int N>
void blas_gemm(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  set_threads(1);
  problem<T, N> pr(dims, mode, j);
  const blas_baseline& blas = blas_baseline::get();
  const int p = int(pr.p), i = int(pr.i), q = int(pr.q), jj = int(pr.j);
  for (auto _ : state) {
    if (pr.q == 1)  // last mode: y (P, J) = x (P, I) · uᵀ
      blas.gemm(true, p, jj, i, pr.x.data(), i, pr.u.data(), i, pr.y.data(), jj);
    else  // y_s (J, Q) = u (J, I) · x_s (I, Q) for each of the P slices (one for the first mode)
      for (ta::index s = 0; s < pr.p; ++s)
        blas.gemm(false, jj, q, i, pr.u.data(), i, pr.x.data() + s * i * q, q, pr.y.data() + s * jj * q, q);
    benchmark::DoNotOptimize(pr.y.data());
    benchmark::ClobberMemory();
  }
  counters(state, pr);
}

// fma_peak.hpp's chains on each thread: the machine's arithmetic peak on the native instruction set.
template <class T>
void fma_peak(benchmark::State& state, int threads) {
  set_threads(threads);
  double flops = 0;
  for (auto _ : state) {
    flops = 0;
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += run_fma_chains<T>();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * double(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  set_threads(1);
}

// One thread and two, call by call (paired_calls.hpp): timed apart, the two come from different
// minutes, and the machine's clock drifts between them by as much as the goal's margin. Counters
// one_thread_ms, two_threads_ms and two_over_one (one thread's time over two threads').
template <class T, int N>
void mode_product_threads_paired(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  problem<T, N> pr(dims, mode, j);
  const auto [one, two] = paired_call_medians<2>(state, [&](std::size_t which) {
    set_threads(which == 0 ? 1 : 2);
    ta::mode_product<T, N>(ta::view(pr.x), pr.u, mode, ta::writable_view(pr.y));
    benchmark::DoNotOptimize(pr.y.data());
  });
  set_threads(1);
  state.counters["one_thread_ms"] = one * 1e3;
  state.counters["two_threads_ms"] = two * 1e3;
  state.counters["two_over_one"] = one / two;
}

#ifdef __linux__
// Memory on transparent huge pages (2 MB), asked for with madvise before the first touch, its data
// `offset` bytes past the start of a page (that of the memory it is compared with: with 64-byte
// alignment, an AVX-512 build's, Eigen places a large tensor 64 bytes past one, and the offset alone
// moves 256³ mode 0 by a few per cent).
struct huge_page_buffer {
  static constexpr std::size_t page = std::size_t(2) << 20;
  std::size_t bytes, offset;
  std::unique_ptr<void, void (*)(void*)> memory;
  huge_page_buffer(std::size_t size, std::size_t offset_)
      : bytes((size + offset_ + page - 1) / page * page), offset(offset_),
        memory(std::aligned_alloc(page, bytes), std::free) {
    if (!memory) throw std::bad_alloc();
    madvise(memory.get(), bytes, MADV_HUGEPAGE);
    std::memset(memory.get(), 0, bytes);
  }
  template <class T>
  T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(memory.get()) + offset);
  }
};

// The MB of the mapping holding `address` that the kernel has placed on huge pages (its AnonHugePages
// in /proc/self/smaps).
double huge_page_mb(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<std::uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2)  // a mapping's first line
      inside = lo <= at && at < hi;
    else if (inside && line.rfind("AnonHugePages:", 0) == 0)
      return double(std::strtol(line.c_str() + 14, nullptr, 10)) / 1024.0;
  }
  return 0;
}

// The same product on the problem's tensors (ordinary memory) and on copies of x and y on huge pages,
// call by call (paired_calls.hpp), one thread. With 4 KB pages every page of x costs a TLB miss and a
// page walk, under a hypervisor a two-level one. Counters small_pages_ms, huge_pages_ms,
// huge_over_small (the time on huge pages over the time on ordinary memory), huge_pages_GFLOPs,
// huge_pages_MB and ordinary_huge_MB (how much of the copies and of the problem's own x and y the kernel
// placed on huge pages: with transparent huge pages set to "always" the ordinary memory has them too,
// and with "never" the copies have none).
template <class T, int N>
void mode_product_huge_pages_paired(benchmark::State& state, ta::shape<N> dims, int mode, ta::index j) {
  problem<T, N> pr(dims, mode, j);
  const auto page_offset = [](const T* p) { return std::size_t(reinterpret_cast<std::uintptr_t>(p) % 4096); };
  huge_page_buffer hx(std::size_t(pr.x.size()) * sizeof(T), page_offset(pr.x.data()));
  huge_page_buffer hy(std::size_t(pr.y.size()) * sizeof(T), page_offset(pr.y.data()));
  std::copy(pr.x.data(), pr.x.data() + pr.x.size(), hx.data<T>());
  const ta::const_tensor_view<T, N> x_huge(hx.data<T>(), pr.x.dimensions());
  ta::tensor_view<T, N> y_huge(hy.data<T>(), pr.y.dimensions());
  set_threads(1);
  const auto [small, huge] = paired_call_medians<2>(state, [&](std::size_t which) {
    if (which == 0)
      ta::mode_product<T, N>(ta::view(pr.x), pr.u, mode, ta::writable_view(pr.y));
    else
      ta::mode_product<T, N>(x_huge, pr.u, mode, y_huge);
    benchmark::DoNotOptimize(which == 0 ? pr.y.data() : y_huge.data());
  });
  state.counters["small_pages_ms"] = small * 1e3;
  state.counters["huge_pages_ms"] = huge * 1e3;
  state.counters["huge_over_small"] = huge / small;
  state.counters["huge_pages_GFLOPs"] = pr.flops() / huge * 1e-9;
  state.counters["huge_pages_MB"] = huge_page_mb(hx.data<T>()) + huge_page_mb(hy.data<T>());
  state.counters["ordinary_huge_MB"] = huge_page_mb(pr.x.data()) + huge_page_mb(pr.y.data());
}
#endif

// A large copy: the bandwidth a memory-bound product can hope for (bytes read + bytes written).
void copy_bandwidth(benchmark::State& state, int threads) {
  const std::size_t n = std::size_t(16) << 20;  // 16 Mi floats = 64 MB each way
  std::vector<float> src(n, 1.0f), dst(n, 0.0f);
  for (auto _ : state) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < threads; ++t) {
      const std::size_t begin = n * std::size_t(t) / std::size_t(threads), end = n * std::size_t(t + 1) / std::size_t(threads);
      std::copy(src.data() + begin, src.data() + end, dst.data() + begin);
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] =
      benchmark::Counter(2.0 * double(n) * sizeof(float) * double(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

template <int N>
std::string case_name(const ta::shape<N>& dims, int mode, ta::index j) {
  std::string s;
  for (int d = 0; d < N; ++d) s += (d ? "x" : "") + std::to_string(dims[std::size_t(d)]);
  return s + "/mode:" + std::to_string(mode) + "/J:" + std::to_string(j);
}

template <class T>
const char* type_name() {
  return sizeof(T) == 4 ? "float" : "double";
}

template <class T, int N>
void register_case(const ta::shape<N>& dims, int mode, ta::index j) {
  const std::string c = case_name<N>(dims, mode, j);
  const std::string t = std::string("<") + type_name<T>() + ">/";
  auto style = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int threads : {1, 2})
    style(benchmark::RegisterBenchmark(("mode_product" + t + c + "/threads:" + std::to_string(threads)).c_str(),
                                       mode_product<T, N>, dims, mode, j, threads));
  style(benchmark::RegisterBenchmark(("eigen_contract" + t + c).c_str(), eigen_contract<T, N>, dims, mode, j));
  style(benchmark::RegisterBenchmark(("eigen_gemm" + t + c).c_str(), eigen_gemm<T, N>, dims, mode, j));
  if (blas_baseline::get().loaded())
    style(benchmark::RegisterBenchmark(("blas_gemm" + t + c).c_str(), blas_gemm<T, N>, dims, mode, j));
  if (sizeof(T) == 4)
    style(benchmark::RegisterBenchmark(("scalar_kernel" + t + c).c_str(), scalar_kernel<T, N>, dims, mode, j));
  if (sizeof(T) == 4 && j >= 64 && dims[std::size_t(mode)] >= 64) {
    auto paired = [](benchmark::internal::Benchmark* b) {
      b->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);
    };
    paired(benchmark::RegisterBenchmark(("mode_product_threads_paired" + t + c).c_str(),
                                        mode_product_threads_paired<T, N>, dims, mode, j));
#ifdef __linux__
    paired(benchmark::RegisterBenchmark(("mode_product_huge_pages_paired" + t + c).c_str(),
                                        mode_product_huge_pages_paired<T, N>, dims, mode, j));
#endif
  }
}

template <class T>
void register_all() {
  const ta::shape<3> cube{256, 256, 256};
  for (ta::index j : {64, 256, 4, 8})
    for (int mode = 0; mode < 3; ++mode) register_case<T, 3>(cube, mode, j);
  for (const ta::shape<4>& conv : {ta::shape<4>{512, 512, 3, 3}, ta::shape<4>{256, 256, 3, 3}})
  {
    for (ta::index r : {8, 32, 64})
      for (int mode = 0; mode < 2; ++mode) register_case<T, 4>(conv, mode, r);
    for (int mode = 2; mode < 4; ++mode) register_case<T, 4>(conv, mode, 3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int threads : {1, 2}) {
    const std::string t = "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(("fma_peak<float>" + t).c_str(), fma_peak<float>, threads)->UseRealTime();
    benchmark::RegisterBenchmark(("fma_peak<double>" + t).c_str(), fma_peak<double>, threads)->UseRealTime();
    benchmark::RegisterBenchmark(("copy_bandwidth" + t).c_str(), copy_bandwidth, threads)->UseRealTime();
  }
  register_all<float>();
  register_all<double>();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
