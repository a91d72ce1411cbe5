#!/usr/bin/env bash
# Set up, build and run tensor_adapters on Debian 12.
#
#   ./run.sh demo             build and run the demo (the main job)
#   ./run.sh test             build everything and run the whole test suite
#   ./run.sh test --sanitize  the unit tests under AddressSanitizer + UndefinedBehaviorSanitizer, built
#                             for plain x86-64: the scalar kernels without fused multiply-adds, as a
#                             build of yours without instruction-set flags gets them
#   ./run.sh bench [filter]   build and run the microbenchmarks
#   ./run.sh report [args]    run them all and render docs/BENCHMARKS.md with plots, beside PyTorch when
#                             /usr/bin/python3 has torch (args go to benchmarks/report.py, e.g. --quick)
#   ./run.sh fuzz [seconds]   fuzz the safetensors reader and the PEFT config parser (clang, libFuzzer +
#                             ASan/UBSan; default 60 s in all)
#
# Missing Debian packages are installed with apt-get when run as root; otherwise the exact install
# line is printed and nothing else happens.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,16p' "$0"
  exit 2
}
case "${1:-} ${2:-}" in
  "demo "|"test "|"test --sanitize"|"bench "*|"report "*|"fuzz "*) ;;
  *) usage ;;
esac
case "${1}" in
  demo | test | bench) [ $# -le 2 ] || usage ;;
  fuzz)
    [ $# -le 2 ] || usage
    # Decimal, without a leading zero (which the shell's arithmetic would read as octal), at most a day.
    [[ "${2:-60}" =~ ^[1-9][0-9]{0,4}$ ]] && [ "${2:-60}" -le 86400 ] ||
      { echo "run.sh: fuzz takes a number of seconds from 1 to 86400, not '${2}'"; exit 2; }
    ;;
esac

packages=(g++ cmake make libeigen3-dev catch2 libbenchmark-dev libomp-dev nlohmann-json3-dev clang libclang-rt-14-dev)
[ "${1:-}" = report ] && packages+=(python3-matplotlib)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "run.sh: missing Debian packages. Install them with:"
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
  fi
fi

jobs=$(nproc 2>/dev/null || echo 2)
native=ON  # -march=native for this project's own targets, but in the sanitizer pass
configure() {  # configure <build dir> [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DTENSOR_ADAPTERS_NATIVE=$native "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
}

case "${1:-}" in
  demo)
    configure build/release -DTENSOR_ADAPTERS_BUILD_TESTS=OFF -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=OFF
    ./build/release/examples/finetune_demo
    ;;
  test)
    if [ "${2:-}" = "--sanitize" ]; then
      dir=build/sanitize
      # The unit tests only: the examples and the packaging checks run in the plain pass. Built for
      # plain x86-64, so that the suite also runs where every kernel is the scalar one and its fma a
      # multiply and an add (the plain pass runs the vector kernels and, where the target has FMA
      # instructions, the fused scalar ones): one build instead of a third pass.
      native=OFF
      configure "$dir" -DTENSOR_ADAPTERS_SANITIZE=ON -DTENSOR_ADAPTERS_BUILD_TESTS=ON \
        -DTENSOR_ADAPTERS_BUILD_EXAMPLES=OFF -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=OFF
    else
      dir=build/release
      configure "$dir" -DTENSOR_ADAPTERS_BUILD_TESTS=ON -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=ON
    fi
    ctest --test-dir "$dir" --output-on-failure -j "$jobs"
    ;;
  bench)
    configure build/release -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=ON
    for b in build/release/benchmarks/bench_*; do
      [ -x "$b" ] || continue
      "$b" --benchmark_filter="${2:-.}" --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
        --benchmark_enable_random_interleaving=true
    done
    ;;
  report)
    configure build/release -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=ON
    # OpenBLAS, unpacked into build/ (nothing is installed or switched): the matrix and mode products are
    # timed against its GEMM, and PyTorch, which as Debian ships it calls whichever libblas.so.3 is
    # installed (often the slow reference one), is timed with it as well.
    blas=build/openblas/usr/lib/x86_64-linux-gnu/openblas-pthread
    if [ ! -d "$blas" ]; then
      mkdir -p build/openblas
      (cd build/openblas && apt-get download libopenblas0-pthread >/dev/null && dpkg-deb -x libopenblas0-pthread_*.deb .) ||
        echo "run.sh: could not fetch libopenblas0-pthread; the report goes without OpenBLAS"
    fi
    extra=()
    [ -d "$blas" ] && extra+=(--blas "$blas/libopenblas.so.0" --torch-blas "openblas=$blas")
    /usr/bin/python3 benchmarks/report.py build/release/benchmarks "${extra[@]}" "${@:2}"
    ;;
  fuzz)
    configure build/fuzz -DCMAKE_CXX_COMPILER=clang++ -DTENSOR_ADAPTERS_BUILD_FUZZERS=ON \
      -DTENSOR_ADAPTERS_BUILD_TESTS=OFF -DTENSOR_ADAPTERS_BUILD_EXAMPLES=OFF -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=OFF
    # The time (default 60 s) is split between the two targets. New inputs go to build/fuzz/corpus*;
    # fuzz/corpus* hold the committed seeds. Any crash fails.
    seconds=$(( ${2:-60} / 2 > 0 ? ${2:-60} / 2 : 1 ))
    mkdir -p build/fuzz/corpus build/fuzz/corpus_peft_config
    ./build/fuzz/fuzz/fuzz_safetensors -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -dict=fuzz/safetensors.dict -artifact_prefix=build/fuzz/ -print_final_stats=1 build/fuzz/corpus fuzz/corpus
    ./build/fuzz/fuzz/fuzz_peft_config -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -dict=fuzz/peft_config.dict -artifact_prefix=build/fuzz/peft_config- -print_final_stats=1 \
      build/fuzz/corpus_peft_config fuzz/corpus_peft_config
    ;;
esac
