cmake_minimum_required(VERSION 3.25)
# Fails if any of the ;-separated FILES exists: a tool that refused its inputs must leave no output and
# no partial file behind.
foreach(file IN LISTS FILES)
  if(EXISTS "${file}")
    message(FATAL_ERROR "${file} exists")
  endif()
endforeach()
