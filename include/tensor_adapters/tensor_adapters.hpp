// Everything tensor_adapters offers, in one include.
#pragma once

#include "error.hpp"
#include "flora.hpp"
#include "glora.hpp"
#include "glora_search.hpp"
#include "half_merge.hpp"
#include "init.hpp"
#include "lora.hpp"
#include "mode_product.hpp"
#include "optim.hpp"
#include "parameters.hpp"
#include "tensor.hpp"
#include "tucker.hpp"
