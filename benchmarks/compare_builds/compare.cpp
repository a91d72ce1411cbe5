// compare_builds' program: the mode products of bench_mode_product's float cases, one thread, on two
// builds of the library's kernels (old and new, build_side.cpp), called alternately, the order of the
// two swapped from one repetition to the next. Prints each build's median GFLOP/s and the median of
// the new build's speed over the old one's, repetition by repetition. Results must agree bit for bit.
//
//   compare <repetitions> [substring of the case names]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

double time_old(const float*, long, long, long, const float*, long, float*, int) asm("time_side_old");
double time_new(const float*, long, long, long, const float*, long, float*, int) asm("time_side_new");

namespace {

struct product {
  const char* name;
  long p, i, q, j;  // x (P, I, Q) ×1 u (J, I)
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int repetitions = argc > 1 ? std::atoi(argv[1]) : 9;
  const char* only = argc > 2 ? argv[2] : "";
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
  const product all[] = {
      {"256x256x256/mode:0/J:64", 1, 256, 65536, 64},     {"256x256x256/mode:1/J:64", 256, 256, 256, 64},
      {"256x256x256/mode:2/J:64", 65536, 256, 1, 64},     {"256x256x256/mode:0/J:256", 1, 256, 65536, 256},
      {"256x256x256/mode:1/J:256", 256, 256, 256, 256},   {"256x256x256/mode:2/J:256", 65536, 256, 1, 256},
      {"512x512x3x3/mode:0/J:64", 1, 512, 4608, 64},      {"512x512x3x3/mode:1/J:64", 512, 512, 9, 64},
      {"256x256x3x3/mode:0/J:64", 1, 256, 2304, 64},      {"256x256x3x3/mode:1/J:64", 256, 256, 9, 64},
      {"256x256x256/mode:0/J:8", 1, 256, 65536, 8},       {"256x256x256/mode:1/J:8", 256, 256, 256, 8},
      {"256x256x256/mode:1/J:4", 256, 256, 256, 4},       {"256x256x256/mode:2/J:8", 65536, 256, 1, 8},
      {"256x256x256/mode:2/J:4", 65536, 256, 1, 4},       {"512x512x3x3/mode:0/J:8", 1, 512, 4608, 8},
      {"512x512x3x3/mode:1/J:8", 512, 512, 9, 8},         {"256x256x3x3/mode:1/J:8", 256, 256, 9, 8}};
  std::vector<product> cases;
  for (const product& c : all)
    if (std::strstr(c.name, only) != nullptr) cases.push_back(c);
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> value(-1, 1);
  std::vector<float> x(256 * 256 * 256), u(256 * 512), y_old(256 * 256 * 256), y_new(256 * 256 * 256);
  for (float& v : x) v = value(gen);
  for (float& v : u) v = value(gen);
  std::printf("%-26s %10s %10s %10s\n", "case", "old GF/s", "new GF/s", "new/old");
  for (const product& c : cases) {
    const double flops = 2.0 * double(c.p) * double(c.i) * double(c.q) * double(c.j);
    const int calls = std::max(1, int(1e9 / flops));
    std::vector<double> old_rate, new_rate, ratio;
    for (int r = 0; r < repetitions; ++r) {
      double t_old = 0, t_new = 0;
      for (int side = 0; side < 2; ++side)
        if ((side == 0) == (r % 2 == 0)) {
          time_old(x.data(), c.p, c.i, c.q, u.data(), c.j, y_old.data(), 1);
          t_old = time_old(x.data(), c.p, c.i, c.q, u.data(), c.j, y_old.data(), calls);
        } else {
          time_new(x.data(), c.p, c.i, c.q, u.data(), c.j, y_new.data(), 1);
          t_new = time_new(x.data(), c.p, c.i, c.q, u.data(), c.j, y_new.data(), calls);
        }
      old_rate.push_back(flops * calls / t_old * 1e-9);
      new_rate.push_back(flops * calls / t_new * 1e-9);
      ratio.push_back(t_old / t_new);
    }
    const bool same = std::memcmp(y_old.data(), y_new.data(), sizeof(float) * std::size_t(c.p * c.j * c.q)) == 0;
    std::printf("%-26s %10.1f %10.1f %10.3f%s\n", c.name, median(old_rate), median(new_rate), median(ratio),
                same ? "" : "  (results differ)");
  }
}
