// Counts heap allocations, to prove that a hot path makes none.
//
// Include this first in one test file of a program (before any Eigen header): it replaces the global operator new
// for the whole test program and turns on Eigen's runtime malloc check, which reports Eigen's own
// aligned allocations (they bypass operator new). Use:
//
//   allocation_counter::scope counting;
//   hot_path();
//   CHECK(counting.allocations() == 0);
#pragma once

#define EIGEN_RUNTIME_NO_MALLOC
#ifndef eigen_assert
#define eigen_assert(x) ((x) ? (void)0 : ::allocation_counter::eigen_assert_failed(#x, __FILE__, __LINE__))
#endif

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>

namespace allocation_counter {

inline std::atomic<long>& count() {
  static std::atomic<long> n{0};
  return n;
}
inline std::atomic<bool>& counting() {
  static std::atomic<bool> on{false};
  return on;
}

// Eigen's checks land here. While a scope is open each counts as an allocation ("malloc is not allowed
// here" is one of them), so a scope that meets any failed check fails its count; outside a scope a failed
// check ends the program, as Eigen's own eigen_assert does.
inline void eigen_assert_failed(const char* condition, const char* file, int line) {
  if (!counting()) {
    std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, condition);
    std::abort();
  }
  ++count();
}

}  // namespace allocation_counter

#include <Eigen/Core>

namespace allocation_counter {

// While a scope lives, operator new calls and Eigen heap allocations are counted.
class scope {
 public:
  scope() {
    count() = 0;
    counting() = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~scope() {
    Eigen::internal::set_is_malloc_allowed(true);
    counting() = false;
  }
  scope(const scope&) = delete;
  scope& operator=(const scope&) = delete;
  long allocations() const { return count(); }
};

}  // namespace allocation_counter

// The replacement pair forwards to malloc/free; g++ 12 then sees free() applied to what it inlined
// as "new" and warns of a mismatch that is not one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t size) {
  if (allocation_counter::counting()) ++allocation_counter::count();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
// Catch registers test cases with the nothrow form; routing it through the replaced one keeps every
// new matched with a free() the sanitizers accept.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  if (allocation_counter::counting()) ++allocation_counter::count();
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept { return ::operator new(size, tag); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
