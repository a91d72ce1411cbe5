# Builds and runs a tiny consumer project. MODE is find_package (install this project into a temporary
# prefix first) or add_subdirectory (point the consumer at the source tree).
set(work ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${work})
file(MAKE_DIRECTORY ${work})

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  message("${out}")
endfunction()

set(consumer_flags -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DEigen3_DIR=${EIGEN_DIR} -DCMAKE_BUILD_TYPE=Release)
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${work}/library ${consumer_flags}
      -DTENSOR_ADAPTERS_BUILD_TESTS=OFF -DTENSOR_ADAPTERS_BUILD_EXAMPLES=OFF -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=OFF)
  run(${CMAKE_COMMAND} --install ${work}/library --prefix ${work}/prefix)
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumers/find_package -B ${work}/build ${consumer_flags}
      -DCMAKE_PREFIX_PATH=${work}/prefix)
else()
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumers/add_subdirectory -B ${work}/build ${consumer_flags}
      -DTENSOR_ADAPTERS_SOURCE_DIR=${SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${work}/build)
run(${work}/build/consumer)
if(MODE STREQUAL "add_subdirectory")
  # The parent project's install must not carry this project's headers or package along.
  run(${CMAKE_COMMAND} --install ${work}/build --prefix ${work}/prefix)
  file(GLOB_RECURSE installed ${work}/prefix/*)
  if(installed)
    message(FATAL_ERROR "the parent project's install copied tensor_adapters files: ${installed}")
  endif()
  # A parent that exports its own target linking tensor_adapters generates (CMake needs our target in
  # an export set, which TENSOR_ADAPTERS_INSTALL=ON gives).
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumers/add_subdirectory -B ${work}/build_exports ${consumer_flags}
      -DTENSOR_ADAPTERS_SOURCE_DIR=${SOURCE_DIR} -DCONSUMER_EXPORTS=ON)
endif()
