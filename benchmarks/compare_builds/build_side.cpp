// One side of compare_builds: the library's headers from one tree, compiled with their namespace
// renamed (-DSIDE=name), so that two trees' kernels link into one program. Exposes a timed loop of
// mode_product_kernel as time_<SIDE>.
#define tensor_adapters SIDE
#include <tensor_adapters/mode_product.hpp>

#include <chrono>

#define COMPARE_STRING(x) #x
#define COMPARE_NAME(x) COMPARE_STRING(x)

double time_side(const float* x, long p, long i, long q, const float* u, long j, float* y, int calls) asm(
    "time_" COMPARE_NAME(SIDE));

// Seconds for `calls` calls of y (P, J, Q) = x (P, I, Q) ×1 u (J, I) on the native instruction set.
double time_side(const float* x, long p, long i, long q, const float* u, long j, float* y, int calls) {
  const auto start = std::chrono::steady_clock::now();
  for (int c = 0; c < calls; ++c) SIDE::detail::mode_product_kernel<float>(x, p, i, q, u, false, j, 1.f, 0.f, y);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
