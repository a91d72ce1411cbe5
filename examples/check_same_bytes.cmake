cmake_minimum_required(VERSION 3.16)
# Fails unless FILE holds the bytes of ORIGINAL and no FILE.partial is left beside it: a tool that refused
# its inputs must leave an existing output as it was, and a merge into its base's own path must equal the
# same merge into a new file.
file(SHA256 "${FILE}" now)
file(SHA256 "${ORIGINAL}" before)
if(NOT now STREQUAL before)
  message(FATAL_ERROR "${FILE} does not hold the bytes of ${ORIGINAL}")
endif()
if(EXISTS "${FILE}.partial")
  message(FATAL_ERROR "${FILE}.partial was left behind")
endif()
