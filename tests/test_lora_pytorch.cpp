// LoRA against PyTorch: the values PEFT's LoRA layers compute (float64, autograd), written by
// tests/reference/generate_lora.py into tests/reference/lora_*.txt.
//
// Linear cases: forward (with and without bias), backward (dA, dB, dx), delta_weight, merge / unmerge /
// safe_merge, and delta_weight_vjp of the merged layer's weight gradient, which must give the same dA, dB
// as backpropagation through the unmerged layer.
// Conv2d cases: PEFT's lora_A.weight (r, in, kh, kw) and lora_B.weight (O, r, 1, 1) taken byte for byte
// as A (r, F), B (O, r); delta_weight and merge of the 4-d weight; delta_weight_vjp of the merged conv's
// weight gradient against autograd's dA, dB of the unmerged conv LoRA; and a direct convolution with our
// merged weight against the unmerged layer's output.
// Every case: make_lora's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) against PEFT's scaling.
#include "reference.hpp"

#include <tensor_adapters/lora.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

namespace ta = tensor_adapters;

namespace {

const char* const linear_cases[] = {"bias", "nobias", "rslora", "rslora_nobias", "r1_batch1", "full_rank", "wide"};
const char* const conv2d_cases[] = {"r2", "r1", "stride2", "1x1"};

template <class T, int N>
T max_abs(const ta::tensor<T, N>& a) {
  T m = 0;
  for (ta::index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i]));
  return m;
}

// ours ≈ reference within 8·ε·depth·max|reference|, where depth is the length of the longest chain of products
// and sums that forms one element (the reference itself is exact to float64 rounding). The largest error seen
// is about 1.6·ε·depth·max|reference|.
template <class T, int N>
void check_close(const std::string& what, const ta::tensor<T, N>& ours, const ta::tensor<T, N>& ref, double depth) {
  REQUIRE(ours.dimensions() == ref.dimensions());
  T err = 0;
  for (ta::index i = 0; i < ours.size(); ++i) err = std::max(err, std::abs(ours.data()[i] - ref.data()[i]));
  const T magnitude = max_abs(ref);
  REQUIRE(magnitude > 0);
  const T tol = static_cast<T>(8 * double(std::numeric_limits<T>::epsilon()) * depth * double(magnitude));
  INFO(what << ": max |ours - PyTorch| = " << err << ", tolerance " << tol << " (max |PyTorch| " << magnitude
            << ", depth " << depth << ")");
  CHECK(err <= tol);
}

// A PEFT conv factor (d0, d1, …) as the matrix (d0, d1·…) that holds the same bytes.
template <class T>
ta::tensor<T, 2> as_matrix(const ta::tensor<T, 4>& t) {
  ta::tensor<T, 2> m(t.dimension(0), t.dimension(1) * t.dimension(2) * t.dimension(3));
  std::copy(t.data(), t.data() + t.size(), m.data());
  return m;
}

// make_lora for this case's shape, alpha, rank and rsLoRA flag must carry PEFT's scaling.
template <class T>
void check_scale(const reference::file& f, const std::string& name, ta::index out, ta::index fan_in) {
  const double scaling = f.scalar("scaling");
  const ta::index r = static_cast<ta::index>(f.scalar("rank"));
  const bool rslora = f.scalar("use_rslora") != 0;
  std::mt19937_64 gen(7);
  const ta::lora<T> made = ta::make_lora<T>(out, fan_in, {r, f.scalar("alpha"), rslora}, gen);
  INFO(name << ": make_lora scale " << made.scale << ", PEFT scaling " << scaling);
  CHECK(std::abs(double(made.scale) - scaling) <= double(std::numeric_limits<T>::epsilon()) * scaling);
  CHECK(std::abs(ta::lora_scale(f.scalar("alpha"), r, rslora) - scaling) <=
        std::numeric_limits<double>::epsilon() * scaling);
}

// y (n, O, Ho, Wo) = b0 + Σ_{c,p,q} w[o, c, p, q] · x[n, c, i·stride − padding + p, j·stride − padding + q],
// in long double with zero padding.
template <class T>
ta::tensor<T, 4> conv2d(const ta::tensor<T, 4>& x, const ta::tensor<T, 4>& w, const ta::tensor<T, 1>& b0,
                        ta::index stride, ta::index padding) {
  const ta::index n = x.dimension(0), c = x.dimension(1), h = x.dimension(2), wd = x.dimension(3);
  const ta::index out = w.dimension(0), kh = w.dimension(2), kw = w.dimension(3);
  const ta::index ho = (h + 2 * padding - kh) / stride + 1, wo = (wd + 2 * padding - kw) / stride + 1;
  ta::tensor<T, 4> y(n, out, ho, wo);
  for (ta::index b = 0; b < n; ++b)
    for (ta::index o = 0; o < out; ++o)
      for (ta::index i = 0; i < ho; ++i)
        for (ta::index j = 0; j < wo; ++j) {
          long double s = b0(o);
          for (ta::index ci = 0; ci < c; ++ci)
            for (ta::index p = 0; p < kh; ++p)
              for (ta::index q = 0; q < kw; ++q) {
                const ta::index row = i * stride - padding + p, col = j * stride - padding + q;
                if (row < 0 || row >= h || col < 0 || col >= wd) continue;
                s += static_cast<long double>(w(o, ci, p, q)) * x(b, ci, row, col);
              }
          y(b, o, i, j) = static_cast<T>(s);
        }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("LoRA linear layers match PEFT in PyTorch", "[lora][pytorch]", float, double) {
  using T = TestType;
  for (const char* name : linear_cases) {
    const std::string c = std::string("linear ") + name;
    const reference::file f(std::string("lora_linear_") + name + ".txt");
    const auto x = f.get<T, 2>("x");
    const auto w0 = f.get<T, 2>("W0");
    const ta::lora<T> a{f.get<T, 2>("A"), f.get<T, 2>("B"), static_cast<T>(f.scalar("scaling"))};
    const ta::index n = x.dimension(0), in = x.dimension(1), out = w0.dimension(0), r = ta::rank(a);
    REQUIRE(r == static_cast<ta::index>(f.scalar("rank")));
    check_scale<T>(f, c, out, in);

    const auto y = f.has("b0") ? ta::forward(a, x, w0, f.get<T, 1>("b0")) : ta::forward(a, x, w0);
    check_close(c + " forward y", y, f.get<T, 2>("y"), double(in + r + 1));

    const ta::lora_gradients<T> g = ta::backward(a, x, w0, f.get<T, 2>("dy"));
    const double depth = double(n + in + out + r);
    check_close(c + " backward dA", g.grad.A, f.get<T, 2>("dA"), depth);
    check_close(c + " backward dB", g.grad.B, f.get<T, 2>("dB"), depth);
    check_close(c + " backward dx", g.dx, f.get<T, 2>("dx"), depth);

    check_close(c + " delta_weight", ta::delta_weight(a), f.get<T, 2>("delta_weight"), double(r));

    ta::tensor<T, 2> w = w0;
    ta::merge(a, w);
    check_close(c + " merge", w, f.get<T, 2>("merged_weight"), double(r + 1));
    ta::unmerge(a, w);
    check_close(c + " unmerge", w, w0, double(2 * r + 2));
    ta::tensor<T, 2> safe = w0;
    ta::safe_merge(a, safe);
    check_close(c + " safe_merge", safe, f.get<T, 2>("merged_weight"), double(r + 1));

    // The merged layer's weight gradient, pulled back to the factors, is backprop through the unmerged layer.
    const ta::lora<T> v = ta::delta_weight_vjp(a, f.get<T, 2>("gW"));
    check_close(c + " delta_weight_vjp dA", v.A, f.get<T, 2>("dA"), double(n + out));
    check_close(c + " delta_weight_vjp dB", v.B, f.get<T, 2>("dB"), double(n + in));
  }
}

TEMPLATE_TEST_CASE("LoRA conv2d layers match PEFT in PyTorch", "[lora][pytorch]", float, double) {
  using T = TestType;
  for (const char* name : conv2d_cases) {
    const std::string c = std::string("conv2d ") + name;
    const reference::file f(std::string("lora_conv2d_") + name + ".txt");
    const auto w0 = f.get<T, 4>("W0");
    const auto peft_a = f.get<T, 4>("A");  // (r, in, kh, kw)
    const auto peft_b = f.get<T, 4>("B");  // (O, r, 1, 1)
    REQUIRE(peft_b.dimension(2) == 1);
    REQUIRE(peft_b.dimension(3) == 1);
    const ta::lora<T> a{as_matrix(peft_a), as_matrix(peft_b), static_cast<T>(f.scalar("scaling"))};
    const ta::index out = w0.dimension(0), fan_in = a.A.dimension(1), r = ta::rank(a);
    REQUIRE(r == static_cast<ta::index>(f.scalar("rank")));
    REQUIRE(fan_in == w0.dimension(1) * w0.dimension(2) * w0.dimension(3));
    check_scale<T>(f, c, out, fan_in);

    const ta::shape<4> weight_shape = w0.dimensions();
    check_close(c + " delta_weight", ta::delta_weight<T, 4>(a, weight_shape), f.get<T, 4>("delta_weight"), double(r));

    ta::tensor<T, 4> w = w0;
    ta::merge(a, w);
    const auto merged = f.get<T, 4>("merged_weight");
    check_close(c + " merge", w, merged, double(r + 1));

    // Our merged weight in a plain convolution reproduces the unmerged PEFT layer.
    const auto x = f.get<T, 4>("x");
    const auto stride = static_cast<ta::index>(f.scalar("stride")), padding = static_cast<ta::index>(f.scalar("padding"));
    check_close(c + " conv with the merged weight", conv2d(x, w, f.get<T, 1>("b0"), stride, padding), f.get<T, 4>("y"),
                double(fan_in + r + 1));

    ta::unmerge(a, w);
    check_close(c + " unmerge", w, w0, double(2 * r + 2));

    // gW of the merged conv, pulled back to the factors, is autograd's dA, dB of the unmerged conv LoRA.
    const auto gw = f.get<T, 4>("gW");
    const ta::lora<T> v = ta::delta_weight_vjp(a, gw);
    const double positions = double(x.dimension(0) * f.get<T, 4>("y").dimension(2) * f.get<T, 4>("y").dimension(3));
    check_close(c + " delta_weight_vjp dA", v.A, as_matrix(f.get<T, 4>("dA")), positions + double(out));
    check_close(c + " delta_weight_vjp dB", v.B, as_matrix(f.get<T, 4>("dB")), positions + double(fan_in));
  }
}
