// The one exception type for bad input.
//
// Every public function checks its arguments before it writes anything. A shape that does not fit, a
// rank of 0 or above the dimension it factors, a mode out of range, or a non-finite value where a safe
// operation promised to check raises tensor_adapters::argument_error, whose message names the function,
// the argument and the shapes involved.
#pragma once

#include <stdexcept>
#include <string>

namespace tensor_adapters {

class argument_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace tensor_adapters
