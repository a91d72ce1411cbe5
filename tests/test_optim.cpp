// adamw (optim.hpp) against torch.optim.AdamW: the same parameters after every step of a run whose
// learning rate changes half-way (tests/reference/generate_adamw.py), and its errors.
#include <tensor_adapters/lora.hpp>
#include <tensor_adapters/optim.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>

#include "reference.hpp"

namespace ta = tensor_adapters;

namespace {

template <class T>
double max_rel_diff(const ta::tensor<T, 2>& got, const ta::tensor<T, 2>& want) {
  double worst = 0.0;
  for (ta::index i = 0; i < got.size(); ++i) {
    const double w = static_cast<double>(want.data()[i]);
    worst = std::max(worst, std::abs(static_cast<double>(got.data()[i]) - w) / std::max(1.0, std::abs(w)));
  }
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("adamw matches torch.optim.AdamW step by step, through a learning-rate change", "[optim]", float,
                   double) {
  using T = TestType;
  const reference::file f("adamw.txt");
  // A lora adapter is just the carrier of two named parameters here (A, B); scale is not a parameter.
  ta::lora<T> params{f.get<T, 2>("A0"), f.get<T, 2>("B0"), T(1)};
  ta::adamw<ta::lora<T>> opt(params, {/*lr=*/1e-2, 0.9, 0.999, 1e-8, /*weight_decay=*/0.05});
  CHECK(opt.options().lr == 1e-2);
  // float parameters are rounded after every step; the moments are kept in double either way.
  const double tol = 50 * std::numeric_limits<T>::epsilon();
  for (int t = 1; t <= 6; ++t) {
    if (t == 4) opt.set_lr(3e-3);
    const std::string s = std::to_string(t);
    ta::lora<T> grads{f.get<T, 2>("gA" + s), f.get<T, 2>("gB" + s), T(1)};
    opt.step(params, grads);
    INFO("step " << t);
    CHECK(opt.steps() == t);
    CHECK(max_rel_diff(params.A, f.get<T, 2>("A" + s)) < tol);
    CHECK(max_rel_diff(params.B, f.get<T, 2>("B" + s)) < tol);
  }
  CHECK(opt.options().lr == 3e-3);
}

TEST_CASE("adamw rejects gradients or parameters whose shapes changed, before updating anything", "[optim]") {
  ta::lora<double> params{ta::tensor<double, 2>(2, 3), ta::tensor<double, 2>(4, 2), 1.0};
  params.A.setConstant(1.0);
  params.B.setConstant(1.0);
  ta::adamw<ta::lora<double>> opt(params, {/*lr=*/0.1});
  ta::lora<double> grads = params;
  grads.B.resize(4, 3);  // the second parameter's gradient has the wrong shape
  grads.B.setConstant(1.0);
  CHECK_THROWS_AS(opt.step(params, grads), ta::argument_error);
  CHECK(opt.steps() == 0);
  CHECK(params.A(0, 0) == 1.0);  // the first parameter was not updated either
  ta::lora<double> bigger{ta::tensor<double, 2>(3, 3), ta::tensor<double, 2>(4, 3), 1.0};
  bigger.A.setZero();
  bigger.B.setZero();
  CHECK_THROWS_AS(opt.step(bigger, bigger), ta::argument_error);
  // The same number of elements in other shapes (another layer, another rank) is refused as well: the
  // moments belong to the elements of the shapes the optimizer was made for.
  ta::lora<double> reshaped{ta::tensor<double, 2>(3, 2), ta::tensor<double, 2>(2, 4), 1.0};
  reshaped.A.setZero();
  reshaped.B.setZero();
  CHECK_THROWS_WITH(opt.step(reshaped, reshaped),
                    Catch::Contains("lora_A.weight (3, 2)") && Catch::Contains("made for (2, 3)"));
  CHECK(opt.steps() == 0);
}

TEST_CASE("adamw rejects the options torch.optim.AdamW rejects", "[optim]") {
  ta::lora<double> params{ta::tensor<double, 2>(2, 3), ta::tensor<double, 2>(4, 2), 1.0};
  params.A.setConstant(1.0);
  params.B.setConstant(1.0);
  for (int k = 0; k < 7; ++k) {
    ta::adamw_options o;
    if (k == 0) o.lr = -1e-3;
    if (k == 1) o.eps = -1e-8;
    if (k == 2) o.beta1 = 1.0;  // the bias correction 1 − β1^t would be 0
    if (k == 3) o.beta2 = -0.1;
    if (k == 4) o.weight_decay = -0.01;
    if (k == 5) o.beta1 = 1.5;
    if (k == 6) o.beta2 = 1.0;  // 1 − β2^t would be 0 too
    INFO("case " << k);
    CHECK_THROWS_AS(ta::adamw<ta::lora<double>>(params, o), ta::argument_error);
  }
  ta::adamw_options edge;  // the ends of the ranges PyTorch allows
  edge.lr = 0;
  edge.eps = 0;
  edge.beta1 = 0;
  edge.weight_decay = 0;
  ta::adamw<ta::lora<double>> opt(params, edge);
  CHECK_THROWS_WITH(opt.set_lr(-1), Catch::Contains("lr"));
  CHECK(opt.options().lr == 0);
}
