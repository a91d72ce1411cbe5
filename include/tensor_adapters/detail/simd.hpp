// Every SIMD instruction of the library, behind one tiny interface.
//
//   simd<T, Isa>::reg            a register of `width` elements of T
//   zero(), broadcast(x)         all lanes 0 / all lanes x
//   load(p), store(p, v)         `width` elements at p (any alignment)
//   hold(v)                      v unchanged, but the compiler may no longer fold the load it came
//                                from into each instruction that uses it: it stays in a register
//   load_first(p, n), store_first(p, n, v)
//                                the first min(n, width) lanes only (the others read as 0, left
//                                unwritten; memory past p[n − 1] is not touched); n ≥ width: all
//   fma(a, b, c)                 a·b + c, rounded once where `fused` is true: on every vector set, and
//                                on the scalar one where the target has FMA instructions (-mfma, or
//                                -march= a machine with them); otherwise rounded twice
//   mul(a, b), add(a, b)         a·b, a + b
//   sum(v)                       the sum of v's lanes
//   load_lanes(p)                a lane mask from `width` elements at p, each all ones (kept) or all
//                                zeros (bits): a register, or on AVX-512 a mask register
//   fma_kept(a, b, c, m)         a·b + c in the kept lanes, c in the others, whatever a holds there
//                                (0 · Inf would be NaN)
//
//   vector_sum(p, n)             Σ p[0 .. n) on native_isa
//
//   transpose_block<T, Isa>::size, ::run(src, lds, dst, ldd)
//                                a size×size block: dst[p·ldd + t] = src[t·lds + p]
//
// Instruction sets (tags): scalar_isa (width 1, plain C++: the reference every vectorized path is
// tested against), avx2_isa (AVX2 + FMA, 256-bit) and avx512_isa (AVX-512F, 512-bit). A tag exists
// only when the compiler targets it (-mavx2 -mfma, -mavx512f, or -march=native on such a machine);
// native_isa is the widest one compiled in, or scalar_isa when TA_FORCE_SCALAR is defined.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(TA_FORCE_SCALAR) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

namespace tensor_adapters::detail {

struct scalar_isa {};
template <class T, class Isa>
struct simd;

template <class T, class Isa>
struct transpose_block {
  static constexpr int size = 1;
  static void run(const T* src, Eigen::Index, T* dst, Eigen::Index) { *dst = *src; }
};

template <class T>
struct simd<T, scalar_isa> {
  using reg = T;
  static constexpr int width = 1;
  static reg zero() { return T(0); }
  static void hold(reg&) {}
  static reg broadcast(T x) { return x; }
  static reg load(const T* p) { return *p; }
  static void store(T* p, reg v) { *p = v; }
  static reg load_first(const T* p, Eigen::Index n) { return n > 0 ? *p : T(0); }
  static void store_first(T* p, Eigen::Index n, reg v) {
    if (n > 0) *p = v;
  }
#ifdef __FMA__
  static constexpr bool fused = true;  // std::fma is one instruction
  static reg fma(reg a, reg b, reg c) { return std::fma(a, b, c); }
#else
  // Without FMA instructions std::fma is a library call, too slow for the kernels' inner loops.
  static constexpr bool fused = false;
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
#endif
  static reg mul(reg a, reg b) { return a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static T sum(reg v) { return v; }
  using lanes = reg;
  static lanes load_lanes(const T* p) { return *p; }
  static reg fma_kept(reg a, reg b, reg c, lanes mask) {
    using bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    bits m;
    std::memcpy(&m, &mask, sizeof m);
    return m != 0 ? fma(a, b, c) : c;
  }
};

#if !defined(TA_FORCE_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define TA_HAVE_AVX2 1
struct avx2_isa {};
template <>
struct simd<float, avx2_isa> {
  using reg = __m256;
  static constexpr int width = 8;
  static constexpr bool fused = true;
  static reg zero() { return _mm256_setzero_ps(); }
  static void hold(reg& v) { asm("" : "+v"(v)); }
  static reg broadcast(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static __m256i first(Eigen::Index n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg load_first(const float* p, Eigen::Index n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, Eigen::Index n, reg v) { _mm256_maskstore_ps(p, first(n), v); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  using lanes = reg;
  static lanes load_lanes(const float* p) { return load(p); }
  static reg fma_kept(reg a, reg b, reg c, lanes mask) { return fma(_mm256_and_ps(a, mask), b, c); }
  static float sum(reg v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
};
template <>
struct simd<double, avx2_isa> {
  using reg = __m256d;
  static constexpr int width = 4;
  static constexpr bool fused = true;
  static reg zero() { return _mm256_setzero_pd(); }
  static void hold(reg& v) { asm("" : "+v"(v)); }
  static reg broadcast(double x) { return _mm256_set1_pd(x); }
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static __m256i first(Eigen::Index n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static reg load_first(const double* p, Eigen::Index n) { return _mm256_maskload_pd(p, first(n)); }
  static void store_first(double* p, Eigen::Index n, reg v) { _mm256_maskstore_pd(p, first(n), v); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  using lanes = reg;
  static lanes load_lanes(const double* p) { return load(p); }
  static reg fma_kept(reg a, reg b, reg c, lanes mask) { return fma(_mm256_and_pd(a, mask), b, c); }
  static double sum(reg v) {
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

// 8×8 floats and 4×4 doubles in 256-bit registers (shared by the AVX-512 path).
struct avx_transpose {
  static void run8(const float* src, Eigen::Index lds, float* dst, Eigen::Index ldd) {
    __m256 r[8], t[8], s[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
      s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
      _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
    }
  }
  static void run4(const double* src, Eigen::Index lds, double* dst, Eigen::Index ldd) {
    const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + lds), r2 = _mm256_loadu_pd(src + 2 * lds),
                  r3 = _mm256_loadu_pd(src + 3 * lds);
    const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
                  t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
  }
};
template <>
struct transpose_block<float, avx2_isa> {
  static constexpr int size = 8;
  static void run(const float* s, Eigen::Index lds, float* d, Eigen::Index ldd) { avx_transpose::run8(s, lds, d, ldd); }
};
template <>
struct transpose_block<double, avx2_isa> {
  static constexpr int size = 4;
  static void run(const double* s, Eigen::Index lds, double* d, Eigen::Index ldd) { avx_transpose::run4(s, lds, d, ldd); }
};
#endif

#if !defined(TA_FORCE_SCALAR) && defined(__AVX512F__) && defined(TA_HAVE_AVX2)  // (AVX-512F machines have both)
#define TA_HAVE_AVX512 1
struct avx512_isa {};
template <>
struct simd<float, avx512_isa> {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr bool fused = true;
  static reg zero() { return _mm512_setzero_ps(); }
  static void hold(reg& v) { asm("" : "+v"(v)); }
  static reg broadcast(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static __mmask16 first(Eigen::Index n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
  static reg load_first(const float* p, Eigen::Index n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, Eigen::Index n, reg v) { _mm512_mask_storeu_ps(p, first(n), v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  using lanes = __mmask16;  // a mask register
  static lanes load_lanes(const float* p) {
    const __m512i bits = _mm512_castps_si512(load(p));
    return _mm512_test_epi32_mask(bits, bits);
  }
  static reg fma_kept(reg a, reg b, reg c, lanes mask) { return _mm512_mask3_fmadd_ps(a, b, c, mask); }
  static float sum(reg v) {  // (the maskz form: g++ 12 warns about the undefined lanes of the others)
    const __m512d d = _mm512_castps_pd(v);
    const __m256 low = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 0));
    const __m256 high = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 1));
    return simd<float, avx2_isa>::sum(_mm256_add_ps(low, high));
  }
};
template <>
struct simd<double, avx512_isa> {
  using reg = __m512d;
  static constexpr int width = 8;
  static constexpr bool fused = true;
  static reg zero() { return _mm512_setzero_pd(); }
  static void hold(reg& v) { asm("" : "+v"(v)); }
  static reg broadcast(double x) { return _mm512_set1_pd(x); }
  static reg load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static __mmask8 first(Eigen::Index n) { return n >= 8 ? __mmask8(0xFF) : __mmask8((1u << n) - 1u); }
  static reg load_first(const double* p, Eigen::Index n) { return _mm512_maskz_loadu_pd(first(n), p); }
  static void store_first(double* p, Eigen::Index n, reg v) { _mm512_mask_storeu_pd(p, first(n), v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  using lanes = __mmask8;
  static lanes load_lanes(const double* p) {
    const __m512i bits = _mm512_castpd_si512(load(p));
    return _mm512_test_epi64_mask(bits, bits);
  }
  static reg fma_kept(reg a, reg b, reg c, lanes mask) { return _mm512_mask3_fmadd_pd(a, b, c, mask); }
  static double sum(reg v) {
    const __m256d low = _mm512_maskz_extractf64x4_pd(0xF, v, 0), high = _mm512_maskz_extractf64x4_pd(0xF, v, 1);
    return simd<double, avx2_isa>::sum(_mm256_add_pd(low, high));
  }
};
#endif

#if defined(TA_HAVE_AVX512) && defined(TA_HAVE_AVX2)
template <>
struct transpose_block<float, avx512_isa> : transpose_block<float, avx2_isa> {};
template <>
struct transpose_block<double, avx512_isa> : transpose_block<double, avx2_isa> {};
#endif

#if defined(TA_HAVE_AVX512)
using native_isa = avx512_isa;
#elif defined(TA_HAVE_AVX2)
using native_isa = avx2_isa;
#else
using native_isa = scalar_isa;
#endif

// Σ p[0 .. n) in four independent vector accumulators: a sum of n values at the load rate instead of
// one add's latency per value (the order of the additions, and so the rounding, differs from a plain
// left-to-right loop).
template <class T>
T vector_sum(const T* p, Eigen::Index n) {
  using S = simd<T, native_isa>;
  constexpr int W = S::width;
  typename S::reg acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
  Eigen::Index i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (int v = 0; v < 4; ++v) acc[v] = S::add(acc[v], S::load(p + i + v * W));
  for (; i + W <= n; i += W) acc[0] = S::add(acc[0], S::load(p + i));
  T s = S::sum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace tensor_adapters::detail
