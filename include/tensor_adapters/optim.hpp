// AdamW over an adapter's parameters, built on for_each_parameter.
//
//   m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p − lr·(m̂ / (sqrt(v̂) + ε) + wd·p)
// with m̂ = m / (1−β1^t), v̂ = v / (1−β2^t) — PyTorch's torch.optim.AdamW.
//
// Example:
//   tensor_adapters::adamw<tensor_adapters::lora<float>> opt(adapter, {/*lr=*/1e-3});
//   opt.step(adapter, grads);
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "detail/check.hpp"
#include "parameters.hpp"

namespace tensor_adapters {

struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

template <class Adapter>
class adamw {
 public:
  // The moments take the shapes of `params`, and start at zero.
  // Throws argument_error, as torch.optim.AdamW raises, for lr, eps or weight_decay below 0 or a beta
  // outside [0, 1).
  adamw(const Adapter& params, const adamw_options& options) : options_(options) {
    check_lr(options.lr);
    TA_CHECK(options.eps >= 0, "adamw", "eps " + std::to_string(options.eps) + " must be at least 0");
    TA_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1, "adamw",
             "betas (" + std::to_string(options.beta1) + ", " + std::to_string(options.beta2) + ") must be in [0, 1)");
    TA_CHECK(options.weight_decay >= 0, "adamw",
             "weight_decay " + std::to_string(options.weight_decay) + " must be at least 0");
    for_each_parameter(params, [this](const char*, const auto& p) {
      shapes_.emplace_back(p.dimensions().begin(), p.dimensions().end());
      m_.emplace_back(static_cast<std::size_t>(p.size()), 0.0);
      v_.emplace_back(static_cast<std::size_t>(p.size()), 0.0);
    });
  }

  // One update of params from grads (the adapter's own type). Throws argument_error, before writing, if
  // the parameters or their gradients do not have the shapes (and number) the optimizer was made for.
  void step(Adapter& params, const Adapter& grads) {
    std::size_t k = 0;
    for_each_parameter(params, grads, [&](const char* name, auto& p, const auto& g) {
      const bool same = k < shapes_.size() && shapes_[k].size() == static_cast<std::size_t>(p.dimensions().size()) &&
                        std::equal(shapes_[k].begin(), shapes_[k].end(), p.dimensions().begin()) &&
                        g.dimensions() == p.dimensions();
      TA_CHECK(same, "adamw step",
               std::string("parameter ") + name + " " + detail::shape_string(p) + " or its gradient " +
                   detail::shape_string(g) + " is not the shape the optimizer was made for" +
                   (k < shapes_.size() ? " " + detail::dims_string(shapes_[k], int(shapes_[k].size())) : ""));
      ++k;
    });
    TA_CHECK(k == shapes_.size(), "adamw step",
             std::to_string(k) + " parameters, but the optimizer was made for " + std::to_string(shapes_.size()));
    ++t_;
    const double c1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t_));
    const double c2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t_));
    k = 0;
    for_each_parameter(params, grads, [&](const char*, auto& p, const auto& g) {
      std::vector<double>& m = m_[k];
      std::vector<double>& v = v_[k];
      ++k;
      for (index i = 0; i < p.size(); ++i) {
        const double gi = static_cast<double>(g.data()[i]);
        const std::size_t j = static_cast<std::size_t>(i);
        m[j] = options_.beta1 * m[j] + (1.0 - options_.beta1) * gi;
        v[j] = options_.beta2 * v[j] + (1.0 - options_.beta2) * gi * gi;
        const double pi = static_cast<double>(p.data()[i]);
        const double update = (m[j] / c1) / (std::sqrt(v[j] / c2) + options_.eps) + options_.weight_decay * pi;
        p.data()[i] = static_cast<typename std::decay_t<decltype(p)>::Scalar>(pi - options_.lr * update);
      }
    });
  }

  long steps() const { return t_; }

  // The options in use; set_lr changes the learning rate from the next step on (a schedule), keeping
  // the moments, as assigning param_group["lr"] does in PyTorch. Throws argument_error for lr < 0.
  const adamw_options& options() const { return options_; }
  void set_lr(double lr) {
    check_lr(lr);
    options_.lr = lr;
  }

 private:
  static void check_lr(double lr) { TA_CHECK(lr >= 0, "adamw", "lr " + std::to_string(lr) + " must be at least 0"); }

  adamw_options options_;
  std::vector<std::vector<index>> shapes_;  // each parameter's extents, in visiting order
  std::vector<std::vector<double>> m_, v_;
  long t_ = 0;
};

}  // namespace tensor_adapters
