#!/usr/bin/env bash
# Times the mode products of two builds of the library in one program (compare.cpp): the headers of a
# git revision (old) against those of the working tree (new), each compiled as the release build's
# benchmarks are (-O3 -march=native), one thread, float, called alternately.
#
#   benchmarks/compare_builds/compare_builds.sh <old revision> [repetitions] [substring of case names]
#
# e.g. compare_builds.sh HEAD~1 15 mode:1. Needs g++, Eigen and git (./run.sh test installs them).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,8p' "$0"; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" archive "$1" include | tar -x -C "$work"
flags=(-std=c++17 -O3 -DNDEBUG -march=native -fopenmp -isystem /usr/include/eigen3)
g++ "${flags[@]}" -DSIDE=side_old -I"$work/include" -c "$here/build_side.cpp" -o "$work/old.o" &
old=$!
g++ "${flags[@]}" -DSIDE=side_new -I"$root/include" -c "$here/build_side.cpp" -o "$work/new.o" &
new=$!
g++ "${flags[@]}" -c "$here/compare.cpp" -o "$work/compare.o"
wait "$old"
wait "$new"
g++ -fopenmp "$work/compare.o" "$work/old.o" "$work/new.o" -o "$work/compare"
"$work/compare" "${2:-9}" "${3:-}"
