// Compiling the kernels once per program instead of once per translation unit.
//
// Every translation unit that includes these headers instantiates the matrix-product and mode-product
// kernels it reaches, for float and double; in a program of many translation units that is most of
// the build time. To compile them once: define TENSOR_ADAPTERS_SEPARATE_KERNELS in every translation
// unit of the program (the headers then only declare the kernels' entry points) and include this
// header in exactly one of them, compiled with the same instruction-set flags (e.g. -march=native) and
// the same OpenMP setting as the rest. The code and its speed are the same either way; a translation
// unit built for another instruction set fails to link rather than mixing kernels.
#pragma once

#include "detail/gemm_kernel.hpp"

namespace tensor_adapters::detail {

TA_KERNEL_INSTANCES(, float)
TA_KERNEL_INSTANCES(, double)

}  // namespace tensor_adapters::detail
