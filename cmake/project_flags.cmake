# Flags for this project's own tests, examples and benchmarks. Nothing here reaches a parent project
# or an installed consumer: the installed target carries only its include path, C++17 and Eigen.
# tensor_adapters_project_options holds the compiler flags; tensor_adapters_project_flags, which the
# programs link, adds the kernels compiled once (at the end of this file).

add_library(tensor_adapters_project_options INTERFACE)
target_link_libraries(tensor_adapters_project_options INTERFACE tensor_adapters::tensor_adapters)
target_compile_options(tensor_adapters_project_options INTERFACE -Wall -Wextra -Wpedantic -Werror)

if(TENSOR_ADAPTERS_NATIVE)
  target_compile_options(tensor_adapters_project_options INTERFACE -march=native)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # g++ 12 reports false -Wmaybe-uninitialized warnings from avx512fintrin.h inside Eigen's Tensor
    # module when AVX-512 is enabled; under -Werror they would stop the build. Only that warning is
    # silenced, and only for these targets.
    target_compile_options(tensor_adapters_project_options INTERFACE -Wno-maybe-uninitialized)
  endif()
endif()

if(TENSOR_ADAPTERS_SANITIZE)
  # -O0 (it follows, so overrides, the build type's -O3): the checks are the same, and the Eigen-heavy
  # test programs, most of which run in a second or two, compile fastest so (test_peft_io 68 s against
  # 93 s at -Og, test_lora 15 s against 27 s). The few that run longer choose their own level
  # (tests/CMakeLists.txt). -UNDEBUG turns Eigen's own index and size assertions on as well.
  target_compile_options(tensor_adapters_project_options INTERFACE
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O0 -UNDEBUG)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # g++ 12's use-before-set analysis under the sanitizers (-Og, -O1) reports false positives in
    # system headers: avx512fintrin.h's _mm512_undefined_pd() idiom inside Eigen's AVX-512 ptranspose (as
    # -Wuninitialized), and libstdc++'s <regex> compiler (as -Wmaybe-uninitialized, without
    # -march=native). The same sources build with these warnings on, as errors, in the release build.
    target_compile_options(tensor_adapters_project_options INTERFACE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  target_link_options(tensor_adapters_project_options INTERFACE -fsanitize=address,undefined)
endif()

if(TENSOR_ADAPTERS_FORCE_SCALAR)
  target_compile_definitions(tensor_adapters_project_options INTERFACE TA_FORCE_SCALAR=1)
endif()

if(TENSOR_ADAPTERS_OPENMP)
  find_package(OpenMP)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(tensor_adapters_project_options INTERFACE OpenMP::OpenMP_CXX)
  endif()
endif()

# The matrix- and mode-product kernels are compiled once, into this library, rather than in each of
# the project's programs, where they were most of every program's compile time (see
# include/tensor_adapters/kernel_instances.hpp). Same flags, same code.
file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/kernel_instances.cpp
     CONTENT "#include <tensor_adapters/kernel_instances.hpp>\n")
add_library(tensor_adapters_kernels STATIC ${CMAKE_CURRENT_BINARY_DIR}/kernel_instances.cpp)
target_link_libraries(tensor_adapters_kernels PUBLIC tensor_adapters_project_options)
target_compile_definitions(tensor_adapters_kernels PUBLIC TENSOR_ADAPTERS_SEPARATE_KERNELS)
if(TENSOR_ADAPTERS_SANITIZE)
  # Under the sanitizers the kernels, which every test program calls, stay at -O1 (a source's own options
  # follow the target's, so this overrides the -O0 above): the sanitizer tests took 100 s against 112 s.
  set_source_files_properties(${CMAKE_CURRENT_BINARY_DIR}/kernel_instances.cpp PROPERTIES COMPILE_OPTIONS -O1)
endif()

add_library(tensor_adapters_project_flags INTERFACE)
target_link_libraries(tensor_adapters_project_flags INTERFACE tensor_adapters_kernels)
