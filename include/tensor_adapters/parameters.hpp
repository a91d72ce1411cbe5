// The named-parameter visitor and what is built on it.
//
// Every adapter provides
//   for_each_parameter(adapter, fn)          fn(const char* name, tensor<T, N>& p)   (const and non-const)
//   for_each_parameter(params, grads, fn)    fn(const char* name, tensor<T, N>& p, const tensor<T, N>& g)
// visiting its trainable tensors in a fixed order under PEFT's names. Gradients have the adapter's own
// type, so one visitor serves optimizers, parameter counting and serialization alike. `fn` must accept
// tensors of every rank the adapter holds (a generic lambda does).
#pragma once

#include <string>

#include "tensor.hpp"

namespace tensor_adapters {

// The number of trainable scalars of an adapter.
template <class Adapter>
index parameter_count(const Adapter& adapter) {
  index n = 0;
  for_each_parameter(adapter, [&n](const char*, const auto& p) { n += p.size(); });
  return n;
}

// An adapter of the same shapes as `like` with every parameter zero: the natural gradient accumulator.
template <class Adapter>
Adapter zeros_like(const Adapter& like) {
  Adapter z = like;
  for_each_parameter(z, [](const char*, auto& p) { p.setZero(); });
  return z;
}

}  // namespace tensor_adapters
