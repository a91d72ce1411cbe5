// FLoRA: a Tucker core with one factor per mode of the weight (Si et al.).
//
//   ΔW = scale · G ×0 U0 ×1 U1 … ×(N-1) U(N-1),
//   ΔW[i0 … i(N-1)] = scale · Σ G[a0 … a(N-1)] · Π_n U_n[i_n, a_n]
//
// A weight W0 of shape (I0, …, I(N-1)), N = 2 … 5, is adapted in its own layout: a linear weight
// (out, in), a conv weight (out, in/groups, k…). Grouped and depthwise convolutions are adapted as the
// tensor they are. The adapter holds the core G (r0, …, r(N-1)) and the factors U_n (I_n, r_n), with
// 1 ≤ r_n ≤ I_n, and a fixed scale (the official ConvNeXt example uses 4.0). For N = 2,
// ΔW = scale · U0 · G · U1ᵀ. The scale multiplies like any factor: with a scale of 0, a NaN or an
// infinity in G or a factor still gives NaN, in ΔW, the merges and the gradients as in the forward.
//
// Weight space (any N):             delta_weight, delta_weight_vjp, merge, unmerge, safe_merge.
// Activation space (linear, N = 2): forward, backward — ΔW is never materialised.
// Checkpoints of the official code:  flora_from_official, flora_to_official.
//
// Weight space runs one of two plans (see detail::channel_dims): tucker.hpp's chains of mode products in
// the flop-minimal order, or, for conv weights, a plan that folds the kernel modes into one Kronecker
// factor so that ΔW is written by a single GEMM and gW read in one pass; either way the gradient shares its
// partial products between modes. The workspace forms (flora_weight_workspace, flora_workspace) make no
// allocation once warm.
//
// Example:
//   std::mt19937_64 gen(0);
//   auto adapter = tensor_adapters::make_flora<float, 4>({256, 256, 3, 3}, {16, 16, 2, 2}, 4.0, gen);
//   tensor_adapters::tensor<float, 4> dw = tensor_adapters::delta_weight(adapter);   // zero at init
//   auto grad = tensor_adapters::delta_weight_vjp(adapter, gw);                       // gw = ∂L/∂W
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "detail/check.hpp"
#include "detail/gemm.hpp"
#include "detail/thin_pair_product.hpp"
#include "init.hpp"
#include "mode_product.hpp"
#include "parameters.hpp"
#include "tensor.hpp"
#include "tucker.hpp"

namespace tensor_adapters {

template <class T, int N>
struct flora {
  static_assert(N >= 2 && N <= 5, "FLoRA adapts weights of rank 2 (linear) to 5 (conv3d)");
  tensor<T, N> G;                 // (r0, …, r(N-1))  the core
  std::array<tensor<T, 2>, N> U;  // U[n]: (I_n, r_n) the factor of mode n
  T scale = T(1);
};

// Scratch for the weight-space operations (delta_weight, merge, unmerge, delta_weight_vjp). Its
// buffers grow when needed and never shrink, so reusing one for adapters of the same shapes makes no
// further allocation, in either plan (see detail::use_channel_plan).
template <class T, int N>
struct flora_weight_workspace {
  tucker_workspace<T> chain;              // intermediates of the Tucker chains
  std::array<tensor<T, N>, N> z;          // chain plan: z[n] = gW ×_{m≠n} U_mᵀ
  std::vector<T> kron, h, ys, ht, zt, c;  // channel plan: K, H, Ys, Ht, Zt, C
  detail::scratch<T> m, y;                // channel plan: Mᵀ, Y or Yᵀ, rows on 64-byte boundaries
};

// The ranks (r0, …, r(N-1)): the extents of the core.
template <class T, int N>
shape<N> ranks(const flora<T, N>& a) {
  return shape_of(a.G);
}

// The shape (I0, …, I(N-1)) of the weight the adapter fits: the rows of the factors.
template <class T, int N>
shape<N> weight_shape(const flora<T, N>& a) {
  shape<N> s{};
  for (int n = 0; n < N; ++n) s[static_cast<std::size_t>(n)] = a.U[static_cast<std::size_t>(n)].dimension(0);
  return s;
}

namespace detail {

template <int N>
void check_flora_shapes(const shape<N>& weight_extents, const shape<N>& rank_extents, const char* function) {
  for (std::size_t n = 0; n < static_cast<std::size_t>(N); ++n) {
    TA_CHECK(weight_extents[n] >= 1, function,
          "weight shape " + dims_string(weight_extents, N) + " has an empty mode " + std::to_string(n));
    TA_CHECK(rank_extents[n] >= 1 && rank_extents[n] <= weight_extents[n], function,
          "rank " + std::to_string(rank_extents[n]) + " of mode " + std::to_string(n) + " must be in [1, " +
              std::to_string(weight_extents[n]) + "] for a weight " + dims_string(weight_extents, N) +
              " (ranks " + dims_string(rank_extents, N) + ")");
  }
  // (the ranks' product is then within an index too)
  TA_CHECK(bounded_product([&](int n) { return weight_extents[std::size_t(n)]; }, 0, N,
                           std::numeric_limits<index>::max()) > 0,
           function, "weight shape " + dims_string(weight_extents, N) + " has more elements than an index can count");
}

// "G (2, 3), U0 (8, 2), U1 (5, 3)"
template <class T, int N>
std::string flora_shapes_string(const flora<T, N>& a) {
  std::string s = "G " + shape_string(a.G);
  for (int n = 0; n < N; ++n)
    s += ", U" + std::to_string(n) + " " + shape_string(a.U[static_cast<std::size_t>(n)]);
  return s;
}

// The factors agree with the core and every rank is in [1, I_n].
template <class T, int N>
void check_flora(const flora<T, N>& a, const char* function) {
  for (int n = 0; n < N; ++n) {
    const tensor<T, 2>& u = a.U[static_cast<std::size_t>(n)];
    TA_CHECK(u.dimension(1) == a.G.dimension(n), function,
          "factor U" + std::to_string(n) + " " + shape_string(u) + " must have as many columns as mode " +
              std::to_string(n) + " of the core (" + flora_shapes_string(a) + ")");
  }
  check_flora_shapes<N>(weight_shape(a), ranks(a), function);
}

template <class T, class Weight>
void check_flora_weight(const flora<T, Weight::NumIndices>& a, const Weight& w, const char* function,
                        const char* name) {
  constexpr int N = Weight::NumIndices;
  check_flora(a, function);
  const shape<N> expected = weight_shape(a);
  TA_CHECK(shape_of(w) == expected, function,
        std::string(name) + " has shape " + shape_string(w) + " but the adapter (" + flora_shapes_string(a) +
            ") fits a weight " + dims_string(expected, N));
}

template <class T, int N>
std::array<const_tensor_view<T, 2>, N> factor_views(const flora<T, N>& a) {
  return factor_views<T, N>(a.U);
}

// Two plans evaluate ΔW = scale · G ×0 U0 … ×(N-1) U(N-1) and its VJP:
//
//   chain    tucker.hpp's chains: every mode a mode product, in the flop-minimal order, the VJP's
//            partial compressions shared between modes (tucker_compress_all_but_one).
//   channel  the kernel modes 2 … N-1 fold into one Kronecker factor K = U2 ⊗ … ⊗ U(N-1) (S, Rk),
//            S = Π_{m≥2} I_m, Rk = Π_{m≥2} r_m (S = Rk = 1 for N = 2). With G seen as (r0, r1, Rk):
//              H (r0, r1, S)  = G ×2 K                       one GEMM
//              M (r0, I1, S)  = H ×1 U1                      one GEMM, formed as Mᵀ (I1·S, r0)
//              ΔW (I0, I1·S)  = scale · U0 · M               one GEMM: the weight is written once
//            and the VJP, given gW seen as (I0, I1·S):
//              grad.U0 = scale · gW · Mᵀ,   Y (r0, I1·S) = U0ᵀ · gW      (one pass over gW; thin_pair_product
//                                                                    where r0 is one or two registers)
//              grad.U1 = scale · Σ_a Y[a] (I1, S) · H[a] (r1, S)ᵀ
//              Zs (r0, r1, S) = Y ×1 U1ᵀ;   grad.G = scale · Zs · K      (G, grad.G seen as (r0·r1, Rk))
//              C (S, Rk) = scale · Zsᵀ · G;  grad.U_k[i, b] = Σ_{s_k = i, ρ_k = b} C[s, ρ] · Π_{m≥2, m≠k} U_m[s_m, ρ_m]
//
// The chain needs the fewest flops among chains of mode products, but it passes several times over
// intermediates as large as the weight, and its products on the small kernel modes (2 → 3, 3 → 3) are
// GEMMs with two or three rows or columns, slow on a register-tiled kernel; the channel plan touches
// the weight in single well-shaped GEMMs only. The channel plan is taken when its flops are at most
// twice the chain's (for conv weights with kernel ranks ≤ 3 they are about equal or less than 1.6×).

struct channel_dims {
  index o, i1, s, r0, r1, rk;
};

template <class T, int N>
channel_dims channel_plan_dims(const flora<T, N>& a) {
  channel_dims d{a.U[0].dimension(0), a.U[1].dimension(0), 1, a.G.dimension(0), a.G.dimension(1), 1};
  for (std::size_t m = 2; m < static_cast<std::size_t>(N); ++m) d.s *= a.U[m].dimension(0), d.rk *= a.U[m].dimension(1);
  return d;
}

enum class flora_plan { automatic, chain, channel };

template <class T, int N>
bool use_channel_plan(const flora<T, N>& a, flora_plan plan = flora_plan::automatic) {
  if (plan != flora_plan::automatic) return plan == flora_plan::channel;
  const shape<N> w = weight_shape(a), r = ranks(a);
  const std::array<int, N> order = expansion_order(r, w);
  const double chain = chain_flops<N>(r, w, order.data(), N);
  const channel_dims d = channel_plan_dims(a);
  const double channel = 2.0 * (double(d.r0 * d.r1) * double(d.rk * d.s) + double(d.r0 * d.r1) * double(d.s * d.i1) +
                                double(d.o * d.i1) * double(d.s * d.r0));
  return channel <= 2.0 * chain;
}

template <class T>
void grow_buffer(std::vector<T>& buffer, index size) {
  if (static_cast<index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
}

// out (cols, rows) = in (rows, cols)ᵀ, in register blocks where whole ones fit; rows of in are ld_in
// apart, rows of out ld_out (by default, both matrices dense).
template <class T>
void transpose_into(const T* in, index rows, index cols, T* out, index ld_in = -1, index ld_out = -1) {
  using block = transpose_block<T, native_isa>;
  if (ld_in < 0) ld_in = cols;
  if (ld_out < 0) ld_out = rows;
  index i = 0;
  for (; i + block::size <= rows; i += block::size) {
    index j = 0;
    for (; j + block::size <= cols; j += block::size)
      block::run(in + i * ld_in + j, ld_in, out + j * ld_out + i, ld_out);
    for (; j < cols; ++j)
      for (index t = 0; t < block::size; ++t) out[j * ld_out + i + t] = in[(i + t) * ld_in + j];
  }
  for (; i < rows; ++i)
    for (index j = 0; j < cols; ++j) out[j * ld_out + i] = in[i * ld_in + j];
}

// K (S, Rk): K[(i2 … i(N-1)), (a2 … a(N-1))] = Π_{m≥2} U_m[i_m, a_m], and H = G ×2 K.
template <class T, int N>
void channel_prepare(const flora<T, N>& a, const channel_dims& d, flora_weight_workspace<T, N>& ws) {
  grow_buffer(ws.kron, d.s * d.rk);
  grow_buffer(ws.h, d.r0 * d.r1 * d.s);
  T* k = ws.kron.data();
  for (index row = 0; row < d.s; ++row)
    for (index col = 0; col < d.rk; ++col) {
      index ri = row, ci = col;
      T v = T(1);
      for (int m = N - 1; m >= 2; --m) {
        const tensor<T, 2>& u = a.U[static_cast<std::size_t>(m)];
        const index im = u.dimension(0), rm = u.dimension(1);
        v *= u.data()[(ri % im) * rm + ci % rm];
        ri /= im;
        ci /= rm;
      }
      k[row * d.rk + col] = v;
    }
  gemm<T>(false, true, d.r0 * d.r1, d.s, d.rk, T(1), a.G.data(), d.rk, k, d.rk, T(0), ws.h.data(), d.s);
}

// Mᵀ (I1·S, r0), Mᵀ[(i, s), a] = M[a, i, s] with M (r0, I1, S) = H ×1 U1, as one GEMM into ws.m:
// seen as (I1, S·r0) it is U1 · Htᵀ, where Ht (S·r0, r1), Ht[(s, a), b] = H[a, b, s], is left in
// ws.ht (the VJP reads it again). As a mode product of H (a middle mode with a trailing extent of 9)
// M took 1.5× as long for the 512×512×3×3 weight, and the products read Mᵀ as fast as M.
template <class T, int N>
const T* channel_mt(const flora<T, N>& a, const channel_dims& d, flora_weight_workspace<T, N>& ws) {
  const index rs = d.r0 * d.s;
  grow_buffer(ws.ht, rs * d.r1);
  T* ht = ws.ht.data();
  const T* h = ws.h.data();
  for (index e = 0; e < d.s; ++e)
    for (index r = 0; r < d.r0; ++r)
      for (index b = 0; b < d.r1; ++b) ht[(e * d.r0 + r) * d.r1 + b] = h[(r * d.r1 + b) * d.s + e];
  T* mt = ws.m.get(d.i1 * rs);
  gemm<T>(false, true, d.i1, rs, d.r1, T(1), a.U[1].data(), d.r1, ht, d.r1, T(0), mt, rs);
  return mt;
}

// w ← alpha · G ×0 U0 … ×(N-1) U(N-1) + beta · w, by the cheaper plan.
template <class T, int N>
void expand(const flora<T, N>& a, T alpha, T beta, tensor_view<T, N> w, flora_weight_workspace<T, N>& ws,
            flora_plan plan = flora_plan::automatic) {
  if (!use_channel_plan(a, plan)) {
    tucker_expand<T, N>(view(a.G), factor_views(a), w, ws.chain, alpha, beta);
    return;
  }
  const channel_dims d = channel_plan_dims(a);
  channel_prepare(a, d, ws);
  const T* mt = channel_mt(a, d, ws);
  const index cols = d.i1 * d.s;
  gemm<T>(false, true, d.o, cols, d.r0, alpha, a.U[0].data(), d.r0, mt, d.r0, beta, w.data(), cols);
}

// The channel plan of delta_weight_vjp (grad already has the adapter's shapes). Y is kept as
// Ys (I1, S·r0), Ys[i, (s, a)] = Y[a, i, s]: that is Yᵀ (I1·S, r0) as thin_pair_product writes it, and
// with its columns (s, a) and those of Ht (S·r0, r1), Ht[(s, a), b] = H[a, b, s], grad.U1 and Zs are
// the two thin products of Ys:
//   grad.U1 (I1, r1) = scale · Ys · Ht,   Zt (S·r0, r1) = Ysᵀ · U1,   Zt[(s, a), b] = Zs[a, b, s]
// and Zt, seen as (S, r0·r1), is Zsᵀ: grad.G = scale · Ztᵀ · K and C = scale · Zt · G read it in place.
template <class T, int N>
void channel_vjp(const flora<T, N>& a, const T* gw, flora<T, N>& grad, flora_weight_workspace<T, N>& ws) {
  const channel_dims d = channel_plan_dims(a);
  channel_prepare(a, d, ws);
  const T* mt = channel_mt(a, d, ws);
  const index cols = d.i1 * d.s, p = d.r0 * d.r1, rs = d.r0 * d.s;
  grow_buffer(ws.zt, p * d.s);
  grow_buffer(ws.c, std::max({d.s * d.rk, d.r0 * d.o, p * d.s}));
  const T* u0 = a.U[0].data();
  const T* u1 = a.U[1].data();
  T* y = ws.y.get(d.r0 * cols);
  const T* ht = ws.ht.data();
  T* zt = ws.zt.data();
  T* c = ws.c.data();
  // grad.U0 (O, r0) = scale · gW · Mᵀ and Y = U0ᵀ · gW, the two products that read all of gW.
  const T* ys = y;
  if (thin_pair_fits<T>(d.r0)) {
    // r0 of one or two registers: both in one pass over gW (thin_pair_product), into Yᵀ = Ys. The
    // GEMMs below took 1.4–1.6× the time for the 256×256×3×3 weight (ranks 16,16,2,2) and 1.3× for
    // 512×512×3×3 (32,32,3,3; float, one thread).
    thin_pair_product<T>(d.o, cols, d.r0, a.scale, gw, cols, u0, mt, T(0), grad.U[0].data(), y);
  } else {
    // In one pass over gW as well: a block of 256 columns at a time, which the second product then
    // reads from L2 (0.86× the time of the two whole products for the 256×256×3×3 weight, 0.92× for
    // 512×512×3×3; float, one thread). A product large enough for several threads runs whole, split
    // over them. grad.U0 is gW · Mᵀ while r0 ≤ gemm_in_place_columns, where the kernel reads gW
    // in place (1.5× faster than the transposed form at r0 = 32, float, AVX-512; the whole VJP
    // 0.87–0.94× the time at r0 = 64, 0.95–0.99× at 48); beyond, its transpose (r0, O) = scale · M · gWᵀ,
    // since the direct form would copy gW into panels.
    grow_buffer(ws.ys, d.r0 * cols);
    const index block = gemm_threads(d.o, cols, d.r0) > 1 ? cols : 256;
    for (index c0 = 0; c0 < cols; c0 += block) {
      const index n = std::min(block, cols - c0);
      const T beta = c0 == 0 ? T(0) : T(1);
      if (d.r0 <= gemm_in_place_columns<T>)
        gemm<T>(false, false, d.o, d.r0, n, a.scale, gw + c0, cols, mt + c0 * d.r0, d.r0, beta,
                grad.U[0].data(), d.r0);
      else
        gemm<T>(true, true, d.r0, d.o, n, a.scale, mt + c0 * d.r0, d.r0, gw + c0, cols, beta, c, d.o);
      gemm<T>(true, false, d.r0, n, d.o, T(1), u0, d.r0, gw + c0, cols, T(0), y + c0, cols);
      transpose_into(y + c0, d.r0, n, ws.ys.data() + c0 * d.r0, cols, d.r0);  // Ys, while in cache
    }
    if (d.r0 > gemm_in_place_columns<T>) transpose_into(c, d.r0, d.o, grad.U[0].data());
    ys = ws.ys.data();
  }
  // grad.U1 = scale · Ys · Ht and Zt = Ysᵀ · U1: one pass over Ys where r1 is one or two registers.
  if (thin_pair_fits<T>(d.r1)) {
    thin_pair_product<T>(d.i1, rs, d.r1, a.scale, ys, rs, u1, ht, T(0), grad.U[1].data(), zt);
  } else {
    gemm<T>(false, false, d.i1, d.r1, rs, a.scale, ys, rs, ht, d.r1, T(0), grad.U[1].data(), d.r1);
    gemm<T>(true, false, d.r1, rs, d.i1, T(1), u1, d.r1, ys, rs, T(0), c, rs);
    transpose_into(c, d.r1, rs, zt);
  }
  // grad.G (r0·r1, Rk) = scale · Zs · K = scale · Ztᵀ · K;  C (S, Rk) = scale · Zsᵀ · G = scale · Zt · G
  gemm<T>(true, false, p, d.rk, d.s, a.scale, zt, p, ws.kron.data(), d.rk, T(0), grad.G.data(), d.rk);
  gemm<T>(false, false, d.s, d.rk, p, a.scale, zt, p, a.G.data(), d.rk, T(0), c, d.rk);
  for (int k = 2; k < N; ++k) {
    tensor<T, 2>& gk = grad.U[static_cast<std::size_t>(k)];
    gk.setZero();
    for (index row = 0; row < d.s; ++row)
      for (index col = 0; col < d.rk; ++col) {
        index ri = row, ci = col, ik = 0, bk = 0;
        T v = c[row * d.rk + col];
        for (int m = N - 1; m >= 2; --m) {
          const tensor<T, 2>& u = a.U[static_cast<std::size_t>(m)];
          const index im = u.dimension(0), rm = u.dimension(1);
          if (m == k) {
            ik = ri % im;
            bk = ci % rm;
          } else {
            v *= u.data()[(ri % im) * rm + ci % rm];
          }
          ri /= im;
          ci /= rm;
        }
        gk.data()[ik * gk.dimension(1) + bk] += v;
      }
  }
}

// Resizes each tensor of `grad` to the adapter's shapes where it differs.
template <class T, int N>
void shape_like(const flora<T, N>& a, flora<T, N>& grad) {
  if (grad.G.dimensions() != a.G.dimensions()) grad.G.resize(a.G.dimensions());
  for (std::size_t n = 0; n < static_cast<std::size_t>(N); ++n)
    if (grad.U[n].dimensions() != a.U[n].dimensions()) grad.U[n].resize(a.U[n].dimensions());
  grad.scale = a.scale;
}

// The core with its first two modes exchanged: out[b, a, …] = in[a, b, …].
template <class T, int N>
tensor<T, N> swap_first_two_modes(const tensor<T, N>& in) {
  auto dims = in.dimensions();
  const index d0 = dims[0], d1 = dims[1];
  const index rest = in.size() / std::max<index>(d0 * d1, 1);
  std::swap(dims[0], dims[1]);
  tensor<T, N> out(dims);
  for (index i = 0; i < d0; ++i)
    for (index j = 0; j < d1; ++j)
      std::copy(in.data() + (i * d1 + j) * rest, in.data() + (i * d1 + j + 1) * rest, out.data() + (j * d0 + i) * rest);
  return out;
}

}  // namespace detail

// Π r_n + Σ I_n · r_n: the number of trainable scalars of an adapter with these extents and ranks
// (parameter_count(adapter) gives the same for an existing adapter). Throws argument_error where
// make_flora would, or if the count is more than an index can count.
// (N is a std::size_t so that it is deduced from a shape<N> argument: flora_parameter_count(shape_of(w0), r).)
template <std::size_t N>
index flora_parameter_count(const std::array<index, N>& weight_extents, const std::array<index, N>& rank_extents) {
  const char* fn = "flora_parameter_count";
  constexpr int rank = static_cast<int>(N);
  detail::check_flora_shapes<rank>(weight_extents, rank_extents, fn);
  index n = detail::product(rank_extents);  // at most Π I_n, which check_flora_shapes bounds
  for (std::size_t d = 0; d < N; ++d) {
    index term = 0;
    TA_CHECK(!__builtin_mul_overflow(weight_extents[d], rank_extents[d], &term) && !__builtin_add_overflow(n, term, &n),
             fn, "the parameter count for a weight " + detail::dims_string(weight_extents, rank) + " and ranks " +
                     detail::dims_string(rank_extents, rank) + " is more than an index can count");
  }
  return n;
}

// A new adapter for a weight of shape (I0, …, I(N-1)) with ranks (r0, …, r(N-1)), initialised as the
// official code does: G = 0 and every U_n ~ N(0, 1/(2·r_n)) (kaiming-normal with a = √3 and fan-in
// r_n), drawn from `gen` in the order U0, U1, …; ΔW = 0. Same generator state, same bytes.
// Throws argument_error if an extent is < 1, a rank is outside [1, I_n], or the weight has more
// elements than an index can count. (N is a std::size_t so that it is deduced from a shape<N> argument:
// make_flora<float>(shape_of(w0), ranks, 4.0, gen); make_flora<float, 4>(…) names it.)
template <class T, std::size_t N, class Generator>
flora<T, static_cast<int>(N)> make_flora(const std::array<index, N>& weight_extents,
                                         const std::array<index, N>& rank_extents, double scale, Generator& gen) {
  detail::check_flora_shapes<static_cast<int>(N)>(weight_extents, rank_extents, "make_flora");
  flora<T, static_cast<int>(N)> a;
  a.G.resize(rank_extents);
  a.G.setZero();
  for (std::size_t n = 0; n < N; ++n) {
    a.U[n].resize(weight_extents[n], rank_extents[n]);
    fill_normal(a.U[n], 0.0, 1.0 / std::sqrt(2.0 * static_cast<double>(rank_extents[n])), gen);
  }
  a.scale = static_cast<T>(scale);
  return a;
}

// Visits flora_G, then flora_U0, …, flora_U(N-1).
namespace detail {
inline const char* flora_factor_name(int n) {
  static const char* const names[] = {"flora_U0", "flora_U1", "flora_U2", "flora_U3", "flora_U4"};
  return names[n];
}
}  // namespace detail

template <class T, int N, class F>
void for_each_parameter(flora<T, N>& a, F&& fn) {
  fn("flora_G", a.G);
  for (int n = 0; n < N; ++n) fn(detail::flora_factor_name(n), a.U[static_cast<std::size_t>(n)]);
}
template <class T, int N, class F>
void for_each_parameter(const flora<T, N>& a, F&& fn) {
  fn("flora_G", a.G);
  for (int n = 0; n < N; ++n) fn(detail::flora_factor_name(n), a.U[static_cast<std::size_t>(n)]);
}
template <class T, int N, class F>
void for_each_parameter(flora<T, N>& params, const flora<T, N>& grads, F&& fn) {
  fn("flora_G", params.G, grads.G);
  for (int n = 0; n < N; ++n) {
    const std::size_t k = static_cast<std::size_t>(n);
    fn(detail::flora_factor_name(n), params.U[k], grads.U[k]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints of the official code
//
// The official code orders a weight's modes (in, out, k…): param_0 (in, r_in), param_1 (out, r_out),
// param_2 … the kernel modes, param_G (r_in, r_out, r_k…); it expands the core in that order and
// transposes the first two modes of the result. Ours is ordered as the weight is (out, in, k…), so the
// conversion exchanges the first two factors and the first two modes of the core; nothing else changes.

// Our adapter from the official tensors.  param_G: (r_in, r_out, r_k…), params[n]: (dims[n], r_n) with
// dims = (in, out, k…).  Throws argument_error if a factor does not match the core or a rank is outside
// [1, extent].
template <class T, int N>
flora<T, N> flora_from_official(const tensor<T, N>& param_G, const nondeduced<std::array<tensor<T, 2>, N>>& params,
                                nondeduced<T> scale) {
  flora<T, N> official{param_G, params, scale};
  detail::check_flora(official, "flora_from_official");
  flora<T, N> a;
  a.G = detail::swap_first_two_modes(param_G);
  a.U = params;
  std::swap(a.U[0], a.U[1]);
  a.scale = scale;
  return a;
}

// The official tensors of our adapter (the inverse of flora_from_official): param_G (r_in, r_out, r_k…),
// params[n] (dims[n], r_n) with dims = (in, out, k…). Also converts a gradient to the official names.
// Throws argument_error if the adapter's shapes are inconsistent.
template <class T, int N>
void flora_to_official(const flora<T, N>& a, tensor<T, N>& param_G, nondeduced<std::array<tensor<T, 2>, N>>& params) {
  detail::check_flora(a, "flora_to_official");
  param_G = detail::swap_first_two_modes(a.G);
  params = a.U;
  std::swap(params[0], params[1]);
}

// ---------------------------------------------------------------------------------------------------
// Weight space

// dw = scale · G ×0 U0 … ×(N-1) U(N-1).  dw: (I0, …, I(N-1)).
// Throws argument_error, before writing, if the adapter is inconsistent or dw does not fit it. With a
// workspace that has served an adapter of the same shapes, makes no allocation.
template <class T, int N>
void delta_weight(const flora<T, N>& a, nondeduced<tensor_view<T, N>> dw, flora_weight_workspace<T, N>& ws) {
  detail::check_flora_weight(a, dw, "flora delta_weight", "dw");
  detail::expand<T, N>(a, a.scale, T(0), dw, ws);
}
template <class T, int N>
void delta_weight(const flora<T, N>& a, nondeduced<tensor_view<T, N>> dw) {
  flora_weight_workspace<T, N> ws;
  delta_weight<T, N>(a, dw, ws);
}

template <class T, int N>
tensor<T, N> delta_weight(const flora<T, N>& a) {
  detail::check_flora(a, "flora delta_weight");
  tensor<T, N> dw(weight_shape(a));
  delta_weight<T, N>(a, writable_view(dw));
  return dw;
}

namespace detail {

template <class T, int N>
void vjp(const flora<T, N>& a, const const_tensor_view<T, N>& gw, flora<T, N>& grad, flora_weight_workspace<T, N>& ws,
         flora_plan plan = flora_plan::automatic) {
  shape_like(a, grad);
  if (use_channel_plan(a, plan)) {
    channel_vjp<T, N>(a, gw.data(), grad, ws);
    return;
  }
  const auto factors = factor_views(a);
  tucker_compress_all_but_one<T, N>(gw, factors, ws.z, ws.chain);
  int k = 0;
  for (int n = 1; n < N; ++n)
    if (a.U[static_cast<std::size_t>(n)].dimension(0) < a.U[static_cast<std::size_t>(k)].dimension(0)) k = n;
  mode_product_transposed<T, N>(view(ws.z[static_cast<std::size_t>(k)]), factors[static_cast<std::size_t>(k)], k,
                                writable_view(grad.G), a.scale, T(0));
  for (int n = 0; n < N; ++n) {
    const std::size_t s = static_cast<std::size_t>(n);
    mode_inner_product<T, N>(view(ws.z[s]), view(a.G), n, writable_view(grad.U[s]), a.scale, T(0));
  }
}

}  // namespace detail

// Given gW = ∂L/∂W (I0, …, I(N-1)), the gradient of L(ΔW(θ)) with respect to the adapter:
//   z_n      = gW ×_{m≠n} U_mᵀ                         (r0, …, I_n, …, r(N-1))
//   grad.U_n = scale · unfold_n(z_n) · unfold_n(G)ᵀ      (I_n, r_n)
//   grad.G   = scale · gW ×0 U0ᵀ … ×(N-1) U(N-1)ᵀ        (r0, …, r(N-1))
// Partial products are shared between modes: by tucker_compress_all_but_one in the chain plan (then
// grad.G = scale · z_k ×k U_kᵀ for the mode k of least extent), and in the channel plan by the
// factorisation written above detail::channel_dims. grad is resized to the adapter's shapes if needed
// and overwritten; it must not be the adapter itself. Throws argument_error, before writing, if gW
// does not have the weight's shape. With a workspace that has served an adapter of the same shapes,
// and grad of the adapter's shapes, makes no allocation.
template <class T, int N>
void delta_weight_vjp(const flora<T, N>& a, nondeduced<const_tensor_view<T, N>> gw, flora<T, N>& grad,
                      flora_weight_workspace<T, N>& ws) {
  detail::check_flora_weight(a, gw, "flora delta_weight_vjp", "gW");
  detail::vjp<T, N>(a, gw, grad, ws);
}

template <class T, int N>
void delta_weight_vjp(const flora<T, N>& a, nondeduced<const_tensor_view<T, N>> gw, flora<T, N>& grad) {
  flora_weight_workspace<T, N> ws;
  delta_weight_vjp<T, N>(a, gw, grad, ws);
}

template <class T, int N>
flora<T, N> delta_weight_vjp(const flora<T, N>& a, const tensor<T, N>& gw) {
  flora<T, N> grad;
  delta_weight_vjp<T, N>(a, view(gw), grad);
  return grad;
}

// w ← w + ΔW.  w: (I0, …, I(N-1)).  Throws (and leaves w untouched) if w does not fit the adapter.
// The scale multiplies the expanded core, as in the official code: where the chain of mode products or
// w + ΔW exceeds T's range the result is ±Inf (NaN where infinities of both signs meet). safe_merge
// rejects such a merge instead. Subnormal values take part with no flush to zero.
template <class T, int N>
void merge(const flora<T, N>& a, nondeduced<tensor_view<T, N>> w, flora_weight_workspace<T, N>& ws) {
  detail::check_flora_weight(a, w, "flora merge", "w");
  detail::expand<T, N>(a, a.scale, T(1), w, ws);
}
template <class T, int N>
void merge(const flora<T, N>& a, nondeduced<tensor_view<T, N>> w) {
  flora_weight_workspace<T, N> ws;
  merge<T, N>(a, w, ws);
}
template <class T, int N>
void merge(const flora<T, N>& a, tensor<T, N>& w) {
  merge<T, N>(a, writable_view(w));
}

// w ← w − ΔW.  Restores a merged weight up to rounding.
template <class T, int N>
void unmerge(const flora<T, N>& a, nondeduced<tensor_view<T, N>> w, flora_weight_workspace<T, N>& ws) {
  detail::check_flora_weight(a, w, "flora unmerge", "w");
  detail::expand<T, N>(a, static_cast<T>(-a.scale), T(1), w, ws);
}
template <class T, int N>
void unmerge(const flora<T, N>& a, nondeduced<tensor_view<T, N>> w) {
  flora_weight_workspace<T, N> ws;
  unmerge<T, N>(a, w, ws);
}
template <class T, int N>
void unmerge(const flora<T, N>& a, tensor<T, N>& w) {
  unmerge<T, N>(a, writable_view(w));
}

// w ← w + ΔW, computed into a copy first; only if every merged value is finite is it committed.
// Throws argument_error otherwise, and then w is bit-identical to before.
template <class T, int N>
void safe_merge(const flora<T, N>& a, nondeduced<tensor_view<T, N>> w) {
  detail::check_flora_weight(a, w, "flora safe_merge", "w");
  tensor<T, N> merged(w.dimensions());
  std::copy(w.data(), w.data() + w.size(), merged.data());
  flora_weight_workspace<T, N> ws;
  detail::expand<T, N>(a, a.scale, T(1), writable_view(merged), ws);
  TA_CHECK(detail::all_finite(merged.data(), merged.size()), "flora safe_merge",
           "the merged weight " + detail::shape_string(w) +
               " would hold a non-finite value; the weight was left unchanged");
  std::copy(merged.data(), merged.data() + merged.size(), w.data());
}
template <class T, int N>
void safe_merge(const flora<T, N>& a, tensor<T, N>& w) {
  safe_merge<T, N>(a, writable_view(w));
}

// ---------------------------------------------------------------------------------------------------
// Linear layers in activation space (N = 2: W0 (O, I), U0 (O, r0), U1 (I, r1), G (r0, r1))

// Scratch for forward and backward. Whichever call comes first (a forward with or without a bias, or a
// backward) sizes every buffer for all three, so that after one call of n rows no later call of up to n
// rows grows the workspace. The product kernel keeps buffers of its own per thread: once a forward with
// a bias and a backward of n rows have also run on a thread, no call of up to n rows there allocates.
template <class T>
struct flora_workspace {
  // Backward keeps the rank-sized activations transposed, (r, n): the products that make and use them
  // then have the short rank as their row count, which the GEMM kernel's register tiles cover better.
  // Forward keeps them (n, r): x · U1 is then a narrow product that reads x once, in place.
  std::vector<T> h1;   // backward (r1, n): (x · U1)ᵀ; forward (n, r1): x · U1
  std::vector<T> h0;   // (r0, n): (h1 · Gᵀ)ᵀ; in forward (n, r0 [+ 1]): h1 · Gᵀ [and a column of ones]
  std::vector<T> dh0;  // (r0, n): (scale · dy · U0)ᵀ
  std::vector<T> dh1;  // (r1, n): (dh0 · G)ᵀ
  std::vector<T> t;    // forward: [scale · U0, b0]ᵀ (r0 [+ 1], O); backward: a factor gradient (r, O or I)
                       // before it is transposed into place
};

namespace detail {

template <class T>
void check_flora_linear(const flora<T, 2>& a, const const_tensor_view<T, 2>& x, const const_tensor_view<T, 2>& w0,
                        const char* function) {
  check_flora_weight(a, w0, function, "w0");
  TA_CHECK(x.dimension(1) == w0.dimension(1), function,
        "x has shape " + shape_string(x) + " but w0 " + shape_string(w0) + " needs (n, " +
            std::to_string(w0.dimension(1)) + ")");
}

// Every buffer at the size any call of n rows needs: h1 n·r1, h0 n·(r0 + 1) (a forward with a bias),
// dh0 n·r0, dh1 n·r1, t max((r0 + 1)·O (a forward with a bias), r1·I (backward)). So no call grows the
// workspace after another of at least as many rows.
template <class T>
void reserve(flora_workspace<T>& ws, index n, index r0, index r1, index in, index out) {
  grow_buffer(ws.h1, n * r1);
  grow_buffer(ws.h0, n * (r0 + 1));
  grow_buffer(ws.dh0, n * r0);
  grow_buffer(ws.dh1, n * r1);
  grow_buffer(ws.t, std::max((r0 + 1) * out, r1 * in));
}

template <class T>
void check_flora_matrix(const char* function, const char* name, const Eigen::DSizes<index, 2>& dims, index rows,
                        index cols) {
  TA_CHECK(dims[0] == rows && dims[1] == cols, function,
        std::string(name) + " has shape " + dims_string(dims, 2) + " but must be (" + std::to_string(rows) + ", " +
            std::to_string(cols) + ")");
}

template <class T>
void flora_linear_forward(const flora<T, 2>& a, const const_tensor_view<T, 2>& x, const const_tensor_view<T, 2>& w0,
                          const T* b0, tensor_view<T, 2> y, flora_workspace<T>& ws) {
  const index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0);
  const index r0 = a.G.dimension(0), r1 = a.G.dimension(1);
  // h1 = x · U1 (n, r1); h0 = h1 · Gᵀ (n, r0), with a column of ones beside it when there is a bias;
  // u = [scale · U0, b0]ᵀ (r0 + 1, O), or scale · U0ᵀ (r0, O) without a bias.
  const index k = b0 != nullptr ? r0 + 1 : r0;
  reserve(ws, n, r0, r1, in, out);
  T* h1 = ws.h1.data();
  T* h0 = ws.h0.data();
  T* u = ws.t.data();
  gemm<T>(false, false, n, r1, in, T(1), x.data(), in, a.U[1].data(), r1, T(0), h1, r1);
  gemm<T>(false, true, n, r0, r1, T(1), h1, r1, a.G.data(), r1, T(0), h0, k);
  const T* u0 = a.U[0].data();
  for (index c = 0; c < r0; ++c)
    for (index o = 0; o < out; ++o) u[c * out + o] = a.scale * u0[o * r0 + c];
  if (b0 != nullptr) {
    for (index i = 0; i < n; ++i) h0[i * k + r0] = T(1);
    std::copy(b0, b0 + out, u + r0 * out);
  }
  // y = x · W0ᵀ, then y += h0 · u = scale · ((x · U1) · Gᵀ) · U0ᵀ + b0 in one accumulating pass: y is
  // written twice in all, as by the frozen layer alone (its product, then its bias).
  gemm<T>(false, true, n, out, in, T(1), x.data(), in, w0.data(), in, T(0), y.data(), out);
  gemm<T>(false, false, n, out, k, T(1), h0, k, u, out, T(1), y.data(), out);
}

}  // namespace detail

// y (n, O) = x · W0ᵀ + b0 + scale · ((x · U1) · Gᵀ) · U0ᵀ
//   x: (n, I), w0: (O, I), b0: (O), y: (n, O).  y must not overlap x, w0 or b0.
// Throws argument_error, before writing anything, if a shape does not fit. Makes no allocation when
// the workspace has already served a call (forward with or without a bias, or backward) of at least n
// rows and a forward with a bias of at least n rows has run on this thread (see flora_workspace).
template <class T>
void forward(const flora<T, 2>& a, nondeduced<const_tensor_view<T, 2>> x, nondeduced<const_tensor_view<T, 2>> w0,
             nondeduced<const_tensor_view<T, 1>> b0, nondeduced<tensor_view<T, 2>> y, flora_workspace<T>& ws) {
  const char* fn = "flora forward";
  detail::check_flora_linear(a, x, w0, fn);
  TA_CHECK(b0.dimension(0) == w0.dimension(0), fn,
                "b0 has shape " + detail::shape_string(b0) + " but w0 " + detail::shape_string(w0) + " needs (" +
                    std::to_string(w0.dimension(0)) + ")");
  detail::check_flora_matrix<T>(fn, "y", y.dimensions(), x.dimension(0), w0.dimension(0));
  detail::flora_linear_forward(a, x, w0, b0.data(), y, ws);
}

// The same without a bias: y = x · W0ᵀ + scale · ((x · U1) · Gᵀ) · U0ᵀ.
template <class T>
void forward(const flora<T, 2>& a, nondeduced<const_tensor_view<T, 2>> x, nondeduced<const_tensor_view<T, 2>> w0,
             nondeduced<tensor_view<T, 2>> y, flora_workspace<T>& ws) {
  const char* fn = "flora forward";
  detail::check_flora_linear(a, x, w0, fn);
  detail::check_flora_matrix<T>(fn, "y", y.dimensions(), x.dimension(0), w0.dimension(0));
  detail::flora_linear_forward(a, x, w0, static_cast<const T*>(nullptr), y, ws);
}

// Value-returning forms.
template <class T>
tensor<T, 2> forward(const flora<T, 2>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0, const tensor<T, 1>& b0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  flora_workspace<T> ws;
  forward(a, x, w0, b0, y, ws);
  return y;
}
template <class T>
tensor<T, 2> forward(const flora<T, 2>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  flora_workspace<T> ws;
  forward(a, x, w0, y, ws);
  return y;
}

// Backward of the linear forward with W0 and b0 frozen, given dy = ∂L/∂y (n, O):
//   h1 = x · U1;  h0 = h1 · Gᵀ;  dh0 = scale · dy · U0;  dh1 = dh0 · G   (kept transposed, (r, n));
//   grad.U0 = scale · dyᵀ · h0;  grad.G = dh0ᵀ · h1;  grad.U1 = xᵀ · dh1;  dx = dy · W0 + dh1 · U1ᵀ.
//   x: (n, I), w0: (O, I), dy: (n, O), dx: (n, I).  grad is resized if needed and overwritten; it
//   must not be the adapter itself, and dx must not overlap dy or w0 (it may be x).
// (The bias does not enter: ∂L/∂b0 would be Σ_rows dy, and b0 is frozen.)
// Throws argument_error, before writing anything, if a shape does not fit. Makes no allocation when
// the workspace has already served a call (forward with or without a bias, or backward) of at least n
// rows, a backward of at least n rows has run on this thread (see flora_workspace), and grad has the
// adapter's shapes.
template <class T>
void backward(const flora<T, 2>& a, nondeduced<const_tensor_view<T, 2>> x, nondeduced<const_tensor_view<T, 2>> w0,
              nondeduced<const_tensor_view<T, 2>> dy, nondeduced<tensor_view<T, 2>> dx, flora<T, 2>& grad,
              flora_workspace<T>& ws) {
  const char* fn = "flora backward";
  detail::check_flora_linear(a, x, w0, fn);
  const index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0);
  const index r0 = a.G.dimension(0), r1 = a.G.dimension(1);
  detail::check_flora_matrix<T>(fn, "dy", dy.dimensions(), n, out);
  detail::check_flora_matrix<T>(fn, "dx", dx.dimensions(), n, in);
  detail::shape_like(a, grad);
  detail::reserve(ws, n, r0, r1, in, out);
  T* h1 = ws.h1.data();
  T* h0 = ws.h0.data();
  T* dh0 = ws.dh0.data();
  T* dh1 = ws.dh1.data();
  T* t = ws.t.data();
  const T* u0 = a.U[0].data();
  const T* u1 = a.U[1].data();
  // Transposed activations (r, n), as in forward.
  detail::gemm<T>(true, true, r1, n, in, T(1), u1, r1, x.data(), in, T(0), h1, n);
  detail::gemm<T>(false, false, r0, n, r1, T(1), a.G.data(), r1, h1, n, T(0), h0, n);
  detail::gemm<T>(true, true, r0, n, out, a.scale, u0, r0, dy.data(), out, T(0), dh0, n);
  detail::gemm<T>(true, false, r1, n, r0, T(1), a.G.data(), r1, dh0, n, T(0), dh1, n);
  // grad.U0 = scale · dyᵀ · h0, formed as its transpose (r0, O) = scale · h0ᵀ · dy.
  detail::gemm<T>(false, false, r0, out, n, a.scale, h0, n, dy.data(), out, T(0), t, out);
  detail::transpose_into(t, r0, out, grad.U[0].data());
  detail::gemm<T>(false, true, r0, r1, n, T(1), dh0, n, h1, n, T(0), grad.G.data(), r1);
  // grad.U1 = xᵀ · dh1, formed as its transpose (r1, I) = dh1ᵀ · x.
  detail::gemm<T>(false, false, r1, in, n, T(1), dh1, n, x.data(), in, T(0), t, in);
  detail::transpose_into(t, r1, in, grad.U[1].data());
  detail::gemm<T>(false, false, n, in, out, T(1), dy.data(), out, w0.data(), in, T(0), dx.data(), in);
  detail::gemm<T>(true, true, n, in, r1, T(1), dh1, n, u1, r1, T(1), dx.data(), in);
}

template <class T>
struct flora_gradients {
  tensor<T, 2> dx;    // (n, I)
  flora<T, 2> grad;   // the adapter's shapes
};

// Value-returning form.
template <class T>
flora_gradients<T> backward(const flora<T, 2>& a, const tensor<T, 2>& x, const tensor<T, 2>& w0,
                            const tensor<T, 2>& dy) {
  flora_gradients<T> g;
  g.dx.resize(x.dimension(0), x.dimension(1));
  flora_workspace<T> ws;
  backward(a, x, w0, dy, g.dx, g.grad, ws);
  return g;
}

}  // namespace tensor_adapters
