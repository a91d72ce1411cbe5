// An optional BLAS baseline for the benchmarks, loaded at run time (no link-time dependency): where
// TENSOR_ADAPTERS_BENCH_BLAS names a shared library with cblas_sgemm and cblas_dgemm (`./run.sh report`
// gives OpenBLAS's), the programs time its GEMM beside ours; otherwise they register nothing for it.
// The library's path (and OpenBLAS's configuration) goes into the benchmark context as "blas".
#pragma once

#include <benchmark/benchmark.h>

#include <dlfcn.h>

#include <cstdlib>
#include <string>

// Row-major CBLAS products C = A·op(B) (alpha 1, beta 0); the transposes are CBLAS's enum values.
struct blas_baseline {
  using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                            int);
  using dgemm_fn = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int, double,
                            double*, int);
  static constexpr int row_major = 101, no_trans = 111, trans = 112;
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;

  // TENSOR_ADAPTERS_BENCH_BLAS, loaded once; empty (no products) where unset or unusable.
  static const blas_baseline& get() {
    static const blas_baseline lib = [] {
      blas_baseline l;
      const char* path = std::getenv("TENSOR_ADAPTERS_BENCH_BLAS");
      void* handle = path != nullptr && *path != 0 ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;
      if (handle == nullptr) return l;
      l.sgemm = reinterpret_cast<sgemm_fn>(dlsym(handle, "cblas_sgemm"));
      l.dgemm = reinterpret_cast<dgemm_fn>(dlsym(handle, "cblas_dgemm"));
      if (l.sgemm == nullptr || l.dgemm == nullptr) {
        l.sgemm = nullptr, l.dgemm = nullptr;
        return l;
      }
      // One thread, as the other baselines (OpenBLAS and BLIS name their setters so).
      for (const char* setter : {"openblas_set_num_threads", "bli_thread_set_num_threads"})
        if (auto set = reinterpret_cast<void (*)(int)>(dlsym(handle, setter))) set(1);
      std::string name = path;
      if (auto config = reinterpret_cast<const char* (*)()>(dlsym(handle, "openblas_get_config")))
        name += " (" + std::string(config()) + ")";
      benchmark::AddCustomContext("blas", name);
      return l;
    }();
    return lib;
  }
  bool loaded() const { return sgemm != nullptr; }
  void gemm(bool trans_b, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
            int ldc) const {
    sgemm(row_major, no_trans, trans_b ? trans : no_trans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
  }
  void gemm(bool trans_b, int m, int n, int k, const double* a, int lda, const double* b, int ldb, double* c,
            int ldc) const {
    dgemm(row_major, no_trans, trans_b ? trans : no_trans, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc);
  }
};
