#!/usr/bin/python3
"""Run the benchmarks and render docs/BENCHMARKS.md with its plots.

    /usr/bin/python3 benchmarks/report.py [BENCH_DIR]          full run (15 repetitions), writes docs/
    /usr/bin/python3 benchmarks/report.py --quick              a short try-out, writes build/benchmark-report/
    /usr/bin/python3 benchmarks/report.py --from-json docs/data    re-render from saved results, no run

BENCH_DIR holds the Google Benchmark programs (default build/release/benchmarks). Each program runs with
--benchmark_format=json output, --benchmark_repetitions and --benchmark_report_aggregates_only, and the
report reads the medians. bench_lora and bench_glora run once per --threads value (OMP_NUM_THREADS);
bench_mode_product and bench_gemm time 1 and 2 threads inside the program, and bench_flora always runs on
one thread, so those three run once. benchmarks/compare_pytorch.py times PyTorch's equivalents with the
same thread counts right after the adapters' programs (bench_lora, bench_glora, bench_flora; the kernels'
programs come last), once per PyTorch set-up (the system's, and any --torch-blas NAME=DIR, which runs
PyTorch with that directory first on LD_LIBRARY_PATH so that it loads another libblas.so.3). With --blas
LIB, bench_gemm and bench_mode_product also time LIB's CBLAS GEMM (one thread) on the same products.

Output: OUT/BENCHMARKS.md from the template benchmarks/BENCHMARKS.md.in (narrative by hand; every
@@name@@ marker is replaced by a generated table), OUT/*.png, and the medians in OUT/data/*.json (small,
committed with the report; --from-json re-renders from them). OUT is docs/ for a full run and
build/benchmark-report/ for --quick or --filter runs unless --out-dir is given. The complete Google
Benchmark JSON of a run is kept in build/benchmark-json/.

Times are medians in microseconds: CPU time for whatever ran on one thread (the cores are shared, and
wall-clock time there includes the time another process held the core; --clock real changes that) and
wall-clock time for anything on two threads. Every ratio divides two medians of the same run. Goals (issues 2 to 5 and 7) are evaluated here from the medians; the narrative never states them.
"""

import argparse
import datetime
import glob
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BINARIES = ["bench_lora", "bench_glora", "bench_flora", "bench_gemm", "bench_mode_product"]
PER_THREAD = {"bench_lora", "bench_glora"}  # the others fix their thread counts themselves
ADAPTER_BINARIES = {"bench_lora", "bench_glora", "bench_flora"}  # what compare_pytorch.py times the equivalents of


# ------------------------------------------------------------------------------------------------
# Running

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench_dir", nargs="?", default=os.path.join("build", "release", "benchmarks"),
                   help="directory of the bench_* programs (default build/release/benchmarks)")
    p.add_argument("--quick", action="store_true", help="3 repetitions of at least 0.02 s: for trying it out")
    p.add_argument("--repetitions", type=int, default=None, help="repetitions per benchmark (default 15; quick 3)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per repetition at least (default 0.03; quick 0.02)")
    p.add_argument("--filter", default=None, help="regular expression passed to every program's --benchmark_filter "
                   "and to compare_pytorch.py")
    p.add_argument("--only", default=None, help="comma-separated programs to run (default all), e.g. bench_lora")
    p.add_argument("--threads", default="1", help="comma-separated thread counts for bench_lora, bench_glora and "
                   "PyTorch (default 1)")
    p.add_argument("--torch-blas", action="append", default=[], metavar="NAME=DIR",
                   help="also time PyTorch with DIR first on LD_LIBRARY_PATH (a directory holding another "
                        "libblas.so.3), labelled NAME")
    p.add_argument("--blas", default=None, metavar="LIB",
                   help="a shared library with CBLAS (e.g. OpenBLAS's libopenblas.so.0) whose GEMM bench_gemm "
                        "and bench_mode_product also time (TENSOR_ADAPTERS_BENCH_BLAS)")
    p.add_argument("--no-pytorch", action="store_true", help="skip compare_pytorch.py")
    p.add_argument("--from-json", default=None, metavar="DIR", help="render from the medians saved in DIR, run nothing")
    p.add_argument("--out-dir", default=None, help="where BENCHMARKS.md, the PNGs and data/ go")
    p.add_argument("--template", default=os.path.join(HERE, "BENCHMARKS.md.in"))
    p.add_argument("--commit", default=None, help="the commit the programs were built from, for the report (default: "
                   "this checkout's HEAD, noting uncommitted changes)")
    p.add_argument("--clock", choices=["cpu", "real"], default="cpu",
                   help="time of one-thread entries: CPU time (default; the cores are shared) or wall-clock; "
                        "anything on two threads is always wall-clock")
    return p.parse_args()


def sh(cmd, env=None):
    return " ".join(shlex.quote(c) for c in cmd) if env is None else \
        " ".join("%s=%s" % kv for kv in env.items()) + " " + " ".join(shlex.quote(c) for c in cmd)


def machine_state():
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        up = ""
    return {"load_avg": [round(v, 2) for v in os.getloadavg()], "uptime": up}


def cpu_info():
    """The CPU's model name and its flags, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_model():
    model, flags = cpu_info()
    isa = "AVX-512" if "avx512f" in flags else ("AVX2+FMA" if {"avx2", "fma"} <= flags else "no AVX2")
    return "%s, %d cores, %s" % (model, os.cpu_count() or 0, isa)


def openblas_coretype():
    """The OpenBLAS kernel family for this CPU, named from its flags. OpenBLAS picks its kernels from the
    CPU's model and falls back to its generic (Prescott) ones on a model it does not know: on the
    reference machine (an AVX-512 Xeon that OpenBLAS 0.3.21 reports as Prescott) PyTorch's 512×768 ·
    768×768 product then took 42 ms, and 4.1–4.4 ms with OPENBLAS_CORETYPE=SkylakeX."""
    flags = cpu_info()[1]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def blas_env(lib, threads):
    """The environment of a program that loads OpenBLAS: its threads, and its kernels named (see
    openblas_coretype); with lib, also the library bench_gemm and bench_mode_product load."""
    env = {"OPENBLAS_NUM_THREADS": str(threads)}
    core = openblas_coretype()
    if core and "OPENBLAS_CORETYPE" not in os.environ:
        env["OPENBLAS_CORETYPE"] = core
    if lib:
        env["TENSOR_ADAPTERS_BENCH_BLAS"] = os.path.abspath(lib)
    return env


def git_commit():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "include",
                                "benchmarks"], capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes in include/ or benchmarks/)" if dirty else "")
    except OSError:
        return "unknown"


def medians(raw):
    """Google Benchmark JSON -> {run name without /real_time: entry of its median}."""
    out, singles = {}, {}
    for b in raw.get("benchmarks", []):
        name = re.sub(r"/(real|manual)_time$", "", b.get("run_name", b["name"]))
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") != "median":
                continue
        elif b.get("error_occurred"):
            continue
        scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
        entry = {"real_time": b["real_time"] * scale, "cpu_time": b["cpu_time"] * scale,
                 "rate_clock": "real" if b.get("run_name", b["name"]).endswith("/real_time") else "cpu",
                 "iterations": b.get("iterations"), "repetitions": b.get("repetitions", 1)}
        for k, v in b.items():
            if k not in ("name", "run_name", "run_type", "family_index", "per_family_instance_index", "repetitions",
                         "repetition_index", "threads", "aggregate_name", "aggregate_unit", "iterations",
                         "real_time", "cpu_time", "time_unit") and isinstance(v, (int, float)):
                entry[k] = v
        if b.get("run_type") == "aggregate":
            out[name] = entry
        else:
            singles.setdefault(name, []).append(entry)
    for name, runs in singles.items():  # --benchmark_repetitions=1 gives no aggregates
        if name not in out:
            runs.sort(key=lambda e: e["real_time"])
            out[name] = runs[len(runs) // 2]
    return out


def run_all(args, out_data, raw_dir):
    reps = args.repetitions or (3 if args.quick else 15)
    min_time = args.min_time or (0.02 if args.quick else 0.03)
    threads = [int(t) for t in args.threads.split(",")]
    only = set(args.only.split(",")) if args.only else set(BINARIES)
    os.makedirs(out_data, exist_ok=True)
    os.makedirs(raw_dir, exist_ok=True)
    missing = [b for b in BINARIES if b in only and not os.access(os.path.join(args.bench_dir, b), os.X_OK)]
    if missing and len(missing) == len([b for b in BINARIES if b in only]):
        raise SystemExit("report.py: no benchmark program in %s (configure with -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=ON "
                         "and build them first); nothing was run or written" % args.bench_dir)
    # The adapters' programs, then PyTorch's equivalents, then the kernels' programs: the PyTorch ratios
    # divide times taken minutes apart rather than half an hour apart, while the machine's speed drifts.
    for binary in [b for b in BINARIES if b in ADAPTER_BINARIES] + ["pytorch"] + \
            [b for b in BINARIES if b not in ADAPTER_BINARIES]:
        if binary == "pytorch":
            run_pytorch(args, out_data, reps, min_time, threads, only)
            continue
        if binary not in only:
            continue
        path = os.path.join(args.bench_dir, binary)
        if not os.access(path, os.X_OK):
            print("report.py: %s not found, skipped (build it with -DTENSOR_ADAPTERS_BUILD_BENCHMARKS=ON)" % path)
            continue
        for t in (threads if binary in PER_THREAD else [0]):
            raw = os.path.join(raw_dir, "%s.t%d.json" % (binary, t))
            # Repetitions in random order across the program's benchmarks: a slow drift of the machine's
            # speed (another process, the clock) then reaches a benchmark and its baseline alike.
            cmd = [path, "--benchmark_repetitions=%d" % reps, "--benchmark_report_aggregates_only=true",
                   "--benchmark_enable_random_interleaving=true", "--benchmark_min_time=%g" % min_time]
            if args.filter:
                cmd.append("--benchmark_filter=%s" % args.filter)
            env = {"OMP_NUM_THREADS": str(t if t else 1)}
            if binary in ("bench_mode_product", "bench_gemm") and args.blas:
                env.update(blas_env(args.blas, 1))
            shown = sh(cmd, env)
            print("report.py: " + shown, flush=True)
            before = machine_state()
            started = datetime.datetime.now(datetime.timezone.utc)
            subprocess.run(cmd + ["--benchmark_out=%s" % raw, "--benchmark_out_format=json"],
                           env=dict(os.environ, **env), check=True)
            with open(raw) as f:
                data = json.load(f)
            save(os.path.join(out_data, "%s.t%d.json" % (binary, t)), {
                "binary": binary, "threads": t, "command": shown, "date": started.isoformat(timespec="minutes"),
                "repetitions": reps, "min_time": min_time, "load_before": before, "load_after": machine_state(),
                "context": {k: data["context"].get(k) for k in ("num_cpus", "mhz_per_cpu", "library_build_type",
                                                                  "blas") if k in data["context"]},
                "medians": medians(data)})


def run_pytorch(args, out_data, reps, min_time, threads, only):
    if args.no_pytorch or (args.only and "pytorch" not in only and not (only & ADAPTER_BINARIES)):
        return
    setups = [("system", None)] + [tuple(s.split("=", 1)) for s in args.torch_blas]
    for label, libdir in setups:
        for t in threads:
            out = os.path.join(out_data, "pytorch-%s.t%d.json" % (label, t))
            cmd = ["/usr/bin/python3", os.path.join(HERE, "compare_pytorch.py"), "--threads", str(t),
                   "--repetitions", str(reps), "--min-time", str(max(min_time, 0.02)), "--label", label,
                   "--out", out]
            filt = args.filter
            if t != 1:  # bench_flora runs on one thread only: nothing to compare at other counts
                filt = "^(?!bench_flora)" + (".*(" + filt + ")" if filt else "")
            if filt:
                cmd += ["--filter", filt]
            env = {"OMP_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(t)}
            if libdir:
                env.update(blas_env(None, t))
                env["LD_LIBRARY_PATH"] = os.path.abspath(libdir)
            print("report.py: " + sh(cmd, env), flush=True)
            if os.path.exists(out):
                os.remove(out)
            subprocess.run(cmd, env=dict(os.environ, **env), check=True)
            if os.path.exists(out):
                with open(out) as f:
                    data = json.load(f)
                data["command"] = sh(cmd, env).replace(os.path.abspath(out_data), "DATA")
                save(out, data)


def save(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=0, sort_keys=True)
        f.write("\n")


def load(data_dir):
    runs, torch = {}, {}
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        base = os.path.basename(path)
        if base.startswith("pytorch-"):
            m = re.match(r"pytorch-(.+)\.t(\d+)\.json$", base)
            d["by_name"] = {(b["binary"], b["name"]): b for b in d["benchmarks"]}
            torch[(m.group(1), int(m.group(2)))] = d
        elif "medians" in d:
            runs[(d["binary"], d["threads"])] = d
    return runs, torch


# ------------------------------------------------------------------------------------------------
# Formatting helpers

def us(v):
    if v is None:
        return "—"
    return "%.0f µs" % v if v >= 100 else "%.1f µs" % v


def num(v, fmt="%.2f"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt % v


def pct(v):
    if v is None:
        return "—"
    p = 100 * v
    # Within half a point of a goal's line (60, 70, 75 %), one decimal rounded down, so that a share just
    # under a line does not read as the line itself.
    if any(abs(p - line) < 0.5 for line in (60, 70, 75)):
        return "%.1f %%" % (math.floor(10 * p) / 10)
    return "%.0f %%" % p


def verdict(ok):
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def clock_words(threads, binary=None):
    if CLOCK["clock"] != "cpu":
        return "wall-clock time"
    if threads == 1 or binary == "bench_flora":
        return "CPU time"
    if threads == 0:
        return "CPU time on one thread, wall-clock time on two"
    return "wall-clock time"


def caption(run, extra=""):
    t = run["threads"]
    if t:
        threads = "%d thread%s (OMP_NUM_THREADS=%d)" % (t, "" if t == 1 else "s", t)
    elif run["binary"] == "bench_flora":
        threads = "one thread (the program sets it)"
    else:
        threads = "threads as the columns say (the program sets them)"
    load = run["load_before"]["load_avg"]
    return ("`%s`  \n%s UTC · %s · medians of %d repetitions (≥ %g s each), %s · load average before the run %s%s"
            % (run["command"].replace(ROOT + "/", ""), run["date"].replace("T", " ")[:16], threads,
               run["repetitions"], run["min_time"], clock_words(t, run["binary"]), " / ".join("%.2f" % v for v in load), extra))


class Goals:
    def __init__(self):
        self.rows = []

    def add(self, issue, goal, measured, ok, where=""):
        if ok is not None:  # a goal whose benchmarks did not run (a filtered run) is left out
            self.rows.append((issue, goal, measured, ok, where))
        return ok


CLOCK = {"clock": "real"}  # set by render(): "real", or "cpu" for the entries measured on one thread


def one_thread(run, name):
    return run["threads"] == 1 or (run["threads"] == 0 and "threads:2" not in name)


def time_of(run, name, entry, clock=None):
    clock = clock or CLOCK["clock"]
    if clock == "cpu" and one_thread(run, name) and entry.get("cpu_time", 0) > 0:
        return entry["cpu_time"]
    return entry["real_time"]


def get(run, name, field=None, clock=None):
    """A median: the time on the report's clock (µs), a rate counter rescaled to that clock, or a counter."""
    e = run["medians"].get(name) if run else None
    if e is None:
        return None
    t = time_of(run, name, e, clock)
    if field is None:
        return t
    if field not in e:
        return None
    if field in ("GFLOP/s", "GB/s"):  # rates: Google Benchmark divides by real time only under UseRealTime
        return e[field] * (e["real_time"] if e.get("rate_clock") == "real" else e["cpu_time"]) / t
    return e[field]


rate = get


# ------------------------------------------------------------------------------------------------
# Sections

def lora_section(runs, goals):
    out = []
    for (binary, t), run in sorted(runs.items()):
        if binary != "bench_lora":
            continue
        out.append(caption(run) + "\n")
        out.append("| shape (batch, in → out, r) | base forward `x·W0ᵀ` | LoRA forward | ratio | goal ≤ 1.05 | "
                   "LoRA forward + backward | fwd+bwd / base |")
        out.append("|---|---:|---:|---:|---|---:|---:|")
        paired_rows = []
        for n, i, o, r in [(512, 768, 768, 8), (64, 4096, 4096, 16)]:
            args = "n:%d/in:%d/out:%d/r:%d" % (n, i, o, r)
            base, fwd = get(run, "base_forward/" + args), get(run, "lora_forward/" + args)
            fb = get(run, "lora_forward_backward/" + args)
            rq = ratio(fwd, base)
            # The goal is read from the paired benchmark (the two forwards call by call, wall clock) when
            # it ran; the separately timed benchmarks' ratio is shown beside it.
            paired = "lora_forward_paired/%s/iterations:25" % args
            pr = get(run, paired, "ratio")
            measured = rq if pr is None else pr
            ok = None if measured is None else measured <= 1.05
            gf = get(run, "base_forward/" + args, "GFLOP/s")
            goals.add("2 LoRA", "forward ≤ 1.05× base layer (%d, %d→%d, r %d; %d thread%s%s)"
                      % (n, i, o, r, t, "" if t == 1 else "s", "" if pr is None else "; paired calls"),
                      num(measured, "%.3f×"), ok)
            out.append("| %d, %d → %d, %d | %s (%s GFLOP/s) | %s | %s | %s | %s | %s |"
                       % (n, i, o, r, us(base), num(gf, "%.0f"), us(fwd), num(rq, "**%.3f**"),
                          verdict(ok) if pr is None else "paired, below", us(fb), num(ratio(fb, base))))
            if pr is not None:
                paired_rows.append("| %d, %d → %d, %d | %s | %s | **%.3f** | %s |"
                                   % (n, i, o, r, us(get(run, paired, "base_us")), us(get(run, paired, "lora_us")),
                                      pr, verdict(ok)))
        if paired_rows:
            out += ["", "The same forwards timed call by call, alternating (`lora_forward_paired`, wall clock, medians "
                    "of 25 calls each per repetition):", "",
                    "| shape (batch, in → out, r) | base forward | LoRA forward | ratio | goal ≤ 1.05 |",
                    "|---|---:|---:|---:|---|"] + paired_rows
        out.append("")
    return "\n".join(out) or "_No bench_lora results in this run._"


def parse_mode_case(name):
    m = re.match(r"mode_product<(\w+)>/([\dx]+)/mode:(\d+)/J:(\d+)/threads:(\d+)$", name)
    if not m:
        return None
    dims = [int(v) for v in m.group(2).split("x")]
    return m.group(1), m.group(2), dims, int(m.group(3)), int(m.group(4)), int(m.group(5))


def mode_product_cases(run, typ):
    cases = []
    for name in run["medians"]:
        c = parse_mode_case(name)
        if c and c[0] == typ and c[5] == 1:
            cases.append(c)
    order = {"256x256x256": 0, "512x512x3x3": 1, "256x256x3x3": 2}
    cases.sort(key=lambda c: (order.get(c[1], 9), c[3] >= 2 and len(c[2]) == 4, c[4], c[3]))
    return cases


def blas_name(run):
    """The BLAS a program timed (its path under build/, and OpenBLAS's configuration), from its context."""
    return re.sub(r"^.*/build/", "build/", run.get("context", {}).get("blas") or "a BLAS")


def blas_words(run):
    return (" BLAS: the same product as loops over the CBLAS GEMM of `%s` (one call for the first or last mode, one "
            "per slice for a middle one, as a user with only a GEMM computes it; one thread, OPENBLAS_CORETYPE as in "
            "the command)." % blas_name(run))


def mode_product_section(runs, goals):
    run = runs.get(("bench_mode_product", 0))
    if run is None:
        return "_No bench_mode_product results in this run._", ""
    peak = get(run, "fma_peak<float>/threads:1", "GFLOP/s")
    peak2 = get(run, "fma_peak<float>/threads:2", "GFLOP/s")
    copy = get(run, "copy_bandwidth/threads:1", "GB/s")
    blas = any(name.startswith("blas_gemm<") for name in run["medians"])
    out = [caption(run), "",
           "Same run: register-only FMA peak **%s GFLOP/s** (one thread; %s on two), copy bandwidth **%s GB/s** "
           "(one thread, bytes read + written). Float, one thread unless the column says otherwise. Columns: this "
           "library (`mode_product`), its share of the FMA peak and of the copy bandwidth, Eigen's `contract` + "
           "`shuffle`, an Eigen matrix product of the same m, n, k, the scalar reference kernel (all GFLOP/s), and "
           "two threads against one, timed apart and (paired, for the compute-bound cases) call by call, "
           "alternating (`mode_product_threads_paired`, wall clock, medians of 15 calls each per repetition), "
           "from which the goal is read when it ran.%s" % (num(peak, "%.0f"), num(peak2, "%.0f"), num(copy, "%.1f"),
                                                            blas_words(run) if blas else ""),
           "",
           "| x | mode | J | GFLOP/s | GB/s | %% peak | %% copy | Eigen contract | ours / contract | Eigen GEMM | "
           "ours / GEMM | %sscalar | 2 threads | 2 thr / 1 thr | paired |" % ("BLAS | ours / BLAS | " if blas else ""),
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|%s" % ("---:|---:|" if blas else "")]
    compute, middle, slower, memory, scaling = [], [], [], [], []
    vs_blas, blas_compute = [], []
    scaling_paired = False
    huge = []  # the huge-pages paragraph's items
    for typ, shape, dims, mode, j, _ in mode_product_cases(run, "float"):
        key = "%s/mode:%d/J:%d" % (shape, mode, j)
        paired_huge = "mode_product_huge_pages_paired<float>/%s/iterations:15" % key
        if get(run, paired_huge, "huge_over_small") is not None:
            huge.append("%s mode %d J %d: %.3f× (%s of the peak; %.0f MB of the copies on huge pages, %.0f MB of "
                        "the ordinary memory)"
                        % (shape.replace("x", "×"), mode, j, get(run, paired_huge, "huge_over_small"),
                           pct(ratio(get(run, paired_huge, "huge_pages_GFLOPs"), peak)),
                           get(run, paired_huge, "huge_pages_MB"), get(run, paired_huge, "ordinary_huge_MB") or 0))
        t1 = get(run, "mode_product<float>/%s/threads:1" % key)
        t2 = get(run, "mode_product<float>/%s/threads:2" % key)
        gf, gb = get(run, "mode_product<float>/%s/threads:1" % key, "GFLOP/s"), \
            get(run, "mode_product<float>/%s/threads:1" % key, "GB/s")
        gf2 = get(run, "mode_product<float>/%s/threads:2" % key, "GFLOP/s")
        con, gem = get(run, "eigen_contract<float>/" + key), get(run, "eigen_gemm<float>/" + key)
        sca = get(run, "scalar_kernel<float>/" + key, "GFLOP/s")
        vs_con, vs_gem = ratio(con, t1), ratio(gem, t1)
        speed2 = ratio(get(run, "mode_product<float>/%s/threads:1" % key, clock="real"), t2)
        speed2_paired = get(run, "mode_product_threads_paired<float>/%s/iterations:15" % key, "two_over_one")
        i = dims[mode]
        label = "%s/mode %d/J %d" % (shape.replace("x", "×"), mode, j)
        blas_vs, blas_gf = ratio(get(run, "blas_gemm<float>/" + key), t1), get(run, "blas_gemm<float>/" + key, "GFLOP/s")
        blas_cols = "%s | %s | " % (num(blas_gf, "%.1f"), num(blas_vs)) if blas else ""
        vs_blas.append(blas_vs)
        if j >= 64 and i >= 64:
            compute.append((label, ratio(gf, peak)))
            blas_compute.append(ratio(blas_gf, peak))
            if 0 < mode < len(dims) - 1:
                middle.append((label, vs_con))
        slower.append((label, vs_con))
        if j <= 8:
            memory.append((label, ratio(gb, copy)))
        if shape == "256x256x256" and j >= 64:
            scaling.append((label, speed2 if speed2_paired is None else speed2_paired))
            scaling_paired = scaling_paired or speed2_paired is not None
        out.append("| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s%s | %s | %s | %s |"
                   % (shape.replace("x", "×"), mode, j, num(gf, "%.1f"), num(gb, "%.2f"), pct(ratio(gf, peak)),
                      pct(ratio(gb, copy)), num(get(run, "eigen_contract<float>/" + key, "GFLOP/s"), "%.1f"),
                      num(vs_con, "**%.2f**"), num(get(run, "eigen_gemm<float>/" + key, "GFLOP/s"), "%.1f"),
                      num(vs_gem), blas_cols, num(sca, "%.1f"), num(gf2, "%.1f"), num(speed2),
                      "" if speed2_paired is None else num(speed2_paired, "**%.2f**")))
    if huge:
        out += ["", "The compute-bound cases with x and y on transparent huge pages (2 MB), against the same product "
                "in ordinary memory, call by call, one thread (`mode_product_huge_pages_paired`, medians of 15 calls "
                "each; the time on huge pages over the time in ordinary memory, and the share of the FMA peak on huge "
                "pages): " + "; ".join(huge) + "."]
    dbl = []
    for typ, shape, dims, mode, j, _ in mode_product_cases(run, "double"):
        key = "%s/mode:%d/J:%d" % (shape, mode, j)
        t1 = get(run, "mode_product<double>/%s/threads:1" % key)
        dbl.append((ratio(get(run, "eigen_contract<double>/" + key), t1), ratio(get(run, "eigen_gemm<double>/" + key), t1),
                    ratio(get(run, "blas_gemm<double>/" + key), t1)))
    dbl_c = [a for a, _, _ in dbl if a is not None]
    dbl_g = [b for _, b, _ in dbl if b is not None]
    dbl_b = [c for _, _, c in dbl if c is not None]
    vs_blas = [v for v in vs_blas if v is not None]
    blas_compute = [v for v in blas_compute if v is not None]

    def spread(values):
        return "%.2f–%.2f (median %.2f)" % (min(values), max(values), statistics.median(values))
    if vs_blas:
        out += ["", "Loops over the BLAS's GEMM, float, one thread, over the same %d cases: ours / BLAS %s, ours faster "
                "on %d of them; on the compute-bound cases the BLAS reaches %s–%s of the FMA peak."
                % (len(vs_blas), spread(vs_blas), sum(1 for v in vs_blas if v > 1), pct(min(blas_compute)),
                   pct(max(blas_compute)))]
    if dbl_c:
        out += ["", "double, same run, one thread, over the same %d cases: ours / Eigen `contract` %s; ours / Eigen "
                "GEMM %s%s." % (len(dbl_c), spread(dbl_c), spread(dbl_g),
                                "; ours / BLAS %s" % spread(dbl_b) if dbl_b else "")]

    def summary(issue, goal, items, test, fmt):
        items = [(l, v) for l, v in items if v is not None]
        if not items:
            return
        bad = [(l, v) for l, v in items if not test(v)]
        lo, hi = min(v for _, v in items), max(v for _, v in items)
        measured = "%s–%s over %d cases" % (fmt(lo), fmt(hi), len(items))
        if bad:
            measured += "; short: " + ", ".join("%s (%s)" % (l, fmt(v)) for l, v in bad)
        goals.add(issue, goal, measured, not bad)

    summary("3 mode product", "compute-bound shapes (J and contracted extent ≥ 64): every mode ≥ 75 % of the FMA "
            "peak", compute, lambda v: v >= 0.75, pct)
    summary("3 mode product", "compute-bound middle modes ≥ 1.5× Eigen `contract`", middle, lambda v: v >= 1.5,
            lambda v: "%.2f×" % v)
    summary("3 mode product", "no shape slower than Eigen `contract` (float)", slower, lambda v: v >= 1.0,
            lambda v: "%.2f×" % v)
    summary("3 mode product", "memory-bound shapes (J ≤ 8) ≥ 70 % of copy bandwidth", memory, lambda v: v >= 0.7, pct)
    summary("3 mode product", "2 threads ≥ 1.7× one thread on the large shapes (256³, J 64 and 256)%s"
            % ("; paired calls" if scaling_paired else ""), scaling, lambda v: v >= 1.7, lambda v: "%.2f×" % v)
    return "\n".join(out), run


def gemm_section(runs, goals):
    run = runs.get(("bench_gemm", 0))
    if run is None:
        return "_No bench_gemm results in this run._"
    blas = any(name.startswith("blas_product<") for name in run["medians"])
    out = [caption(run), "", "GFLOP/s; ratio = Eigen's time / ours (above 1: ours faster); paired: the same ratio "
           "with the two products timed call by call, alternating (`gemm_paired`, wall clock, medians of 25 calls "
           "each per repetition), which the goal reads when it ran.%s" % (
               " BLAS: the CBLAS GEMM of `%s`, one thread, and its time / ours." % blas_name(run) if blas else ""), "",
           "| type | product | ours, 1 thread | Eigen | ratio | paired | %sours, 2 threads | Eigen | ratio |"
           % ("BLAS | BLAS / ours | " if blas else ""),
           "|---|---|---:|---:|---:|---:|---:|---:|---:|%s" % ("---:|---:|" if blas else "")]
    items, paired = [], False
    for typ in ["float", "double"]:
        for shape in ["512x768x768", "64x4096x4096"]:
            m, k, n = shape.split("x")
            for tr in ["NN", "NT"]:
                cells = []
                for t in [1, 2]:
                    key = "<%s>/%s/%s/threads:%d" % (typ, shape, tr, t)
                    ours, eig = get(run, "gemm" + key), get(run, "eigen_product" + key)
                    r = ratio(eig, ours)
                    cells += [num(get(run, "gemm" + key, "GFLOP/s"), "%.1f"),
                              num(get(run, "eigen_product" + key, "GFLOP/s"), "%.1f"), num(r)]
                    if t == 1:
                        pr = get(run, "gemm_paired%s/iterations:25" % key, "ratio")
                        cells.append(num(pr, "**%.3f**"))
                        if blas:
                            cells += [num(get(run, "blas_product" + key, "GFLOP/s"), "%.1f"),
                                      num(ratio(get(run, "blas_product" + key), ours))]
                        if pr is not None:
                            r, paired = pr, True
                    if typ == "float" and t == 1 and r is not None:
                        items.append(("%s·%s" % (shape, tr), r))
                prod = "%s×%s · %s" % (m, k, ("%s×%s" % (k, n)) if tr == "NN" else "(%s×%s)ᵀ" % (n, k))
                out.append("| %s | %s | %s |" % (typ, prod, " | ".join(cells)))
    if items:
        bad = [(l, v) for l, v in items if v < 1.0]
        goals.add("3 mode product", "2-D products at least as fast as Eigen's matrix product (float, 1 thread%s)"
                  % ("; paired calls" if paired else ""),
                  "%.3f–%.3f×%s" % (min(v for _, v in items), max(v for _, v in items),
                                    "; short: " + ", ".join("%s (%.3f)" % b for b in bad) if bad else ""), not bad)
    return "\n".join(out)


FLORA_CONV = [(256, 256, 3, 16, 2), (512, 512, 3, 32, 3)]


def binding_bound(copy_t, flops, peak):
    """Issue 4 measures an operation against the copy bandwidth where it is memory-bound and against the
    FMA peak where it is compute-bound. The roofline decides which: of two lower bounds on its time, a
    copy of the weight (copy_t, µs) and its flops at the peak, the larger binds. Returns the kind, that
    bound (µs) and the share of it that the goal asks for."""
    if copy_t is None or flops is None or not peak:
        return None, None, None
    at_peak = flops / (peak * 1e3)  # µs: flops / (GFLOP/s · 1e9) s
    return ("memory", copy_t, 0.70) if copy_t >= at_peak else ("compute", at_peak, 0.60)


def bound_goal(kind, goal):
    if kind is None:  # the copy or the flops were not measured in this run
        return "≥ 70 % of copy or ≥ 60 % of FMA peak"
    return "≥ %.0f %% of %s (%s-bound)" % (100 * goal, "copy" if kind == "memory" else "FMA peak", kind)


def flora_section(runs, goals):
    run = runs.get(("bench_flora", 0))
    if run is None:
        return "_No bench_flora results in this run._", "_No bench_flora results in this run._"
    peak = rate(run, "fma_peak", "GFLOP/s")
    out = [caption(run), "",
           "Same run, one core: FMA peak **%s GFLOP/s**; copy of the weight: %s. `%% copy` is a time ratio (the "
           "copy's time over the operation's); `%% peak` uses the flops the running plan executes. An operation is "
           "memory-bound where the copy's time exceeds its flops' time at the peak, compute-bound otherwise "
           "(`bound by`), and its goal follows. `Tucker chain` is the flop-minimal mode-by-mode chain, for "
           "comparison; LoRA is at the rank of closest parameter count." % (num(peak, "%.0f"), ", ".join(
               "%s GB/s (%d×%d×%d×%d)" % (num(rate(run, "copy_weight/O:%d/I:%d/k:%d/r:%d/rk:%d" % s, "GB/s"), "%.2f"),
                                          s[0], s[1], s[2], s[2]) for s in FLORA_CONV)), "",
           "| weight, ranks | operation | FLoRA | GB/s | GFLOP/s | % copy | % peak | bound by | Tucker chain | "
           "LoRA (rank) | goal | reached |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    paired_rows = []
    for s in FLORA_CONV:
        args = "O:%d/I:%d/k:%d/r:%d/rk:%d" % s
        names = "%d×%d×%d×%d" % (s[0], s[1], s[2], s[2])
        copy_t = get(run, "copy_weight/" + args)
        # The goals are read from the paired benchmark (the copy and both operations call by call, wall
        # clock) when it ran; the separately timed shares stay in the table.
        paired = "weight_space_paired/%s/iterations:101" % args
        paired_t = {"copy": get(run, paired, "copy_us"), "delta_weight": get(run, paired, "dw_us"),
                    "delta_weight_vjp": get(run, paired, "vjp_us")}
        # Shares of the copy as the benchmark computes them, call by call (medians of the ratios).
        of_copy = {"delta_weight": get(run, paired, "dw_of_copy"), "delta_weight_vjp": get(run, paired, "vjp_of_copy"),
                   "together": get(run, paired, "together_of_copy")}
        is_paired = None not in paired_t.values()
        times, flops = {}, {}
        for op in ["delta_weight", "delta_weight_vjp"]:
            name = "flora_%s/%s" % (op, args)
            times[op] = get(run, name)
            gf = rate(run, name, "GFLOP/s")
            flops[op] = None if gf is None or times[op] is None else gf * times[op] * 1e3
        rows = [(op, times[op], flops[op]) for op in times]
        if None not in times.values() and None not in flops.values():
            rows.append(("together", sum(times.values()), sum(flops.values())))
        reached = {}
        for op, t, fl in rows:
            n = 2 if op == "together" else 1  # the pair is measured against two copies
            gf = ratio(fl, 1e3 * t) if fl and t else None
            kind, bound, goal = binding_bound(None if copy_t is None else n * copy_t, fl, peak)
            what = "`delta_weight` + `delta_weight_vjp`" if op == "together" else "`%s`" % op
            if is_paired:
                # One class per operation, from the paired run (its copy timed call by call beside the
                # operation), in both tables; the separately timed share is read against the same bound.
                pt = sum(paired_t[o] for o in times) if op == "together" else paired_t[op]
                kind, pbound, goal = binding_bound(n * paired_t["copy"], fl, peak)
                at_peak = fl / (peak * 1e3)
                bound = n * copy_t if kind == "memory" and copy_t is not None else at_peak
                copy_share, peak_share = of_copy[op], ratio(at_peak, pt)
                share = copy_share if kind == "memory" else peak_share
                ok = None if share is None else share >= goal
                # Where the two bounds lie within 10 % of each other the class is within the noise of the
                # copy's timing: both readings are shown.
                close = abs(n * paired_t["copy"] - at_peak) < 0.10 * max(n * paired_t["copy"], at_peak)
                both = " (the two bounds within %.0f %%: %s of the copy, %s of the peak)" % (
                    100 * abs(n * paired_t["copy"] - at_peak) / max(n * paired_t["copy"], at_peak),
                    pct(copy_share), pct(peak_share)) if close else ""
                goals.add("4 FLoRA", "%s %s: %s; paired calls" % (what, names, bound_goal(kind, goal)),
                          pct(share) + both, ok)
                reached[op] = (pt, "%s — %s%s" % (pct(share), verdict(ok), both))
                cell = "%s; paired, below" % pct(ratio(bound, t))
            else:
                share = ratio(bound, t)
                ok = None if share is None else share >= goal
                goals.add("4 FLoRA", "%s %s: %s" % (what, names, bound_goal(kind, goal)), pct(share), ok)
                cell = "%s — %s" % (pct(share), verdict(ok))
            if op == "together":
                label, gb, chain, lora = "together", "", "", ""
            else:
                label = "`%s`" % op
                gb = num(rate(run, "flora_%s/%s" % (op, args), "GB/s"), "%.2f")
                chain = us(get(run, "flora_%s_chain/%s" % (op, args)))
                lora = "%s (r %s)" % (us(get(run, "lora_%s/%s" % (op, args))),
                                      num(get(run, "lora_%s/%s" % (op, args), "lora_r"), "%.0f"))
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                "%s, %d,%d,%d,%d" % (names, s[3], s[3], s[4], s[4]) if op == "delta_weight" else "", label, us(t),
                gb, num(gf, "%.0f"), pct(ratio(None if copy_t is None else n * copy_t, t)), pct(ratio(gf, peak)),
                kind or "—", chain, lora, bound_goal(kind, goal), cell))
        if is_paired:
            paired_rows.append("| %s, %d,%d,%d,%d | %s | %s | %s | %s | %s | %s |" % (
                names, s[3], s[3], s[4], s[4], us(paired_t["copy"]),
                *[c for op in ["delta_weight", "delta_weight_vjp"] for c in (us(reached[op][0]), reached[op][1])],
                reached.get("together", (None, "—"))[1]))
    gl = get(run, "gemm_of_last_step/O:512/I:512/k:3/r:32/rk:3")
    if gl:
        gfl = rate(run, "gemm_of_last_step/O:512/I:512/k:3/r:32/rk:3", "GFLOP/s")
        out.append("| | GEMM `U0 · M` alone (512 × 4608 × 32) | %s | | %s | | %s | | | | | |"
                   % (us(gl), num(gfl, "%.0f"), pct(ratio(gfl, peak))))
    if paired_rows:
        out += ["", "The goals, from the copy and both operations timed call by call, alternating "
                "(`weight_space_paired`, wall clock, medians of 101 calls each per repetition); each share is of "
                "the bound that binds, as above:", "",
                "| weight, ranks | copy | `delta_weight` | share | `delta_weight_vjp` | share | together |",
                "|---|---:|---:|---|---:|---|---|"] + paired_rows
    weight = "\n".join(out)

    args = "n:512/in:768/out:768/r:8"
    lin = [caption(run), "",
           "| | base layer | FLoRA | ratio | goal | LoRA (r %s) | ratio |" %
           num(get(run, "linear_lora_forward/" + args, "lora_r"), "%.0f"),
           "|---|---:|---:|---:|---|---:|---:|"]
    # The goal is read from the paired benchmark (the three forwards call by call, wall clock) when it
    # ran; the separately timed benchmarks' ratio is shown beside it.
    paired = "linear_forward_paired/%s/iterations:25" % args
    pr = get(run, paired, "ratio")
    for what, suffix in [("forward", "forward"), ("forward + backward (base: + `dx = dy·W0`)", "forward_backward")]:
        b = get(run, "linear_base_%s/%s" % (suffix, args))
        f = get(run, "linear_flora_%s/%s" % (suffix, args))
        lo = get(run, "linear_lora_%s/%s" % (suffix, args))
        rq = ratio(f, b)
        ok, g = None, ""
        if suffix == "forward" and pr is None:
            ok = None if rq is None else rq <= 1.05
            g = "≤ 1.05: " + verdict(ok)
            goals.add("4 FLoRA", "linear forward ≤ 1.05× base layer (512, 768→768, ranks 8,8)", num(rq, "%.3f×"), ok)
        lin.append("| %s | %s | %s | %s | %s | %s | %s |" % (what, us(b), us(f), num(rq, "**%.3f**"), g, us(lo),
                                                             num(ratio(lo, b), "%.3f")))
        if suffix == "forward" and pr is not None:
            ok = pr <= 1.05
            goals.add("4 FLoRA", "linear forward ≤ 1.05× base layer (512, 768→768, ranks 8,8; paired calls)",
                      num(pr, "%.3f×"), ok)
            lin.append("| forward, paired calls (wall clock) | %s | %s | %s | %s | %s | %s |"
                       % (us(get(run, paired, "base_us")), us(get(run, paired, "flora_us")), num(pr, "**%.3f**"),
                          "≤ 1.05: " + verdict(ok), us(get(run, paired, "lora_us")),
                          num(get(run, paired, "lora_ratio"), "%.3f")))
    return weight, "\n".join(lin)


def glora_section(runs, goals):
    out = []
    names = {0: "all-lora", 1: "cheap"}
    for (binary, t), run in sorted(runs.items()):
        if binary != "bench_glora":
            continue
        base = get(run, "base_forward/n:512/in:768/out:768/R:8/config:0")
        out += [caption(run), "", "| benchmark | configuration | median | ratio to base forward | goal |",
                "|---|---|---:|---:|---|", "| base forward `x·W0ᵀ` | | %s | 1.00 | |" % us(base)]
        for bench, label, limit, lim in [("glora_forward", "GLoRA forward", 1.10, "1.10"),
                                         ("glora_forward_backward", "GLoRA forward + backward", 3.3, "3.3")]:
            for c in [0, 1]:
                v = get(run, "%s/n:512/in:768/out:768/R:8/config:%d" % (bench, c))
                rq = ratio(v, base)
                ok = None if rq is None else rq <= limit
                goals.add("5 GLoRA", "%s ≤ %s× base forward, %s (%d thread%s)"
                          % (label.replace("GLoRA ", ""), lim, names[c], t, "" if t == 1 else "s"),
                          num(rq, "%.2f×"), ok)
                out.append("| %s | %s | %s | %s | ≤ %s: %s |" % (label, names[c], us(v), num(rq, "**%.2f**"), lim,
                                                                  verdict(ok)))
        out.append("")
    return "\n".join(out) or "_No bench_glora results in this run._"


def is_adapter(name):
    return re.match(r"(lora_|flora_|glora_|linear_flora_|linear_lora_)", name) is not None


def pytorch_section(runs, torch, goals):
    if not torch:
        return ("_PyTorch was not timed in this run (compare_pytorch.py needs `import torch` to work under "
                "/usr/bin/python3)._"), []
    out, pairs_all = [], []
    for (label, t), d in sorted(torch.items()):
        ctx = d["context"]
        out.append("PyTorch %s (`%s`), %d thread%s, BLAS: `%s` · %s UTC · medians of %d repetitions, %s · load "
                   "average before %s  \n`%s`\n" % (ctx["torch_version"], label, t, "" if t == 1 else "s",
                                                     ctx["blas"].replace(ROOT + "/", ""),
                                                     ctx["date"].replace("T", " ")[:16], ctx["repetitions"],
                                                     clock_words(t), " / ".join("%.2f" % v for v in ctx["load_avg"]),
                                                     d.get("command", "").replace(ROOT + "/", "")))
        out += ["| program | benchmark | ours | PyTorch | PyTorch / ours | ours faster |", "|---|---|---:|---:|---:|---|"]
        pairs = []
        for (binary, name), e in d["by_name"].items():
            run = runs.get((binary, t if binary in PER_THREAD else 0))
            if run is None or (binary not in PER_THREAD and t != 1):
                continue
            ours = get(run, name)
            if ours is None:
                continue
            theirs = time_of({"threads": t}, name, e)
            r = ratio(theirs, ours)
            adapter = is_adapter(name.split("/")[0])
            pairs.append((binary, name, ours, theirs, r, adapter))
            out.append("| %s | %s`%s`%s | %s | %s | %s | %s |"
                       % (binary, "" if adapter else "_", name, " (base layer)_" if not adapter else "", us(ours),
                          us(theirs), num(r, "**%.2f**" if adapter else "%.2f"),
                          ("yes" if r > 1 else "**no**") if adapter else ""))
        ad = [p for p in pairs if p[5]]
        if ad:
            slow = [p for p in ad if p[4] <= 1]
            goals.add("7 report", "ours faster than PyTorch (%s, %d thread%s) on every adapter benchmark"
                      % (label, t, "" if t == 1 else "s"),
                      "%d of %d faster; PyTorch / ours %.2f–%.2f%s" % (len(ad) - len(slow), len(ad),
                                                                       min(p[4] for p in ad), max(p[4] for p in ad),
                                                                       "; slower: " + ", ".join("`%s`" % p[1] for p in slow)
                                                                       if slow else ""), not slow)
        for binary in sorted({b for b, _ in d["by_name"]}):
            run = runs.get((binary, t if binary in PER_THREAD else 0))
            if run is None or (binary not in PER_THREAD and t != 1):
                continue
            alone = [name for name in run["medians"] if is_adapter(name.split("/")[0])
                     and (binary, name) not in d["by_name"]]
            if alone:
                out.append("")
                out.append("`%s` adapter benchmarks with no PyTorch entry: %s." %
                           (binary, ", ".join("`%s`" % name for name in sorted(alone))))
        out.append("")
        pairs_all.append((label, t, ctx["blas"], pairs))
    return "\n".join(out), pairs_all


def goals_table(goals):
    out = ["| issue | goal | measured | |", "|---|---|---|---|"]
    for issue, goal, measured, ok, _ in goals.rows:
        out.append("| %s | %s | %s | %s |" % (issue, goal, measured, verdict(ok)))
    met = sum(1 for r in goals.rows if r[3])
    out.append("")
    out.append("%d of %d goals met in this run (each evaluated by benchmarks/report.py from the medians above)."
               % (met, len(goals.rows)))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Plots

def plot_mode_product(run, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = get(run, "fma_peak<float>/threads:1", "GFLOP/s")
    families = ["256x256x256", "512x512x3x3", "256x256x3x3"]
    cases = mode_product_cases(run, "float")
    fig, axes = plt.subplots(len(families), 1, figsize=(13, 11), constrained_layout=True)
    series = [("ours (mode_product)", "mode_product<float>/%s/threads:1", "#1f5fa8"),
              ("Eigen contract + shuffle", "eigen_contract<float>/%s", "#e0892b"),
              ("Eigen matrix product, same m·n·k", "eigen_gemm<float>/%s", "#8c8c8c"),
              ("scalar reference kernel", "scalar_kernel<float>/%s", "#c9c9c9")]
    if any(name.startswith("blas_gemm<float>/") for name in run["medians"]):
        series.insert(3, ("loops over a BLAS GEMM (OpenBLAS)", "blas_gemm<float>/%s", "#5aa05a"))
    for ax, fam in zip(axes, families):
        fc = [c for c in cases if c[1] == fam]
        if not fc:
            ax.set_visible(False)
            continue
        keys = ["%s/mode:%d/J:%d" % (c[1], c[3], c[4]) for c in fc]
        width = 0.8 / len(series)
        for s, (label, pattern, color) in enumerate(series):
            vals = [get(run, pattern % k, "GFLOP/s") or 0 for k in keys]
            xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, vals, width, label=label, color=color)
        top = max([peak or 0] + [get(run, p % k, "GFLOP/s") or 0 for _, p, _ in series for k in keys])
        if peak:
            ax.axhline(peak, color="#b22222", linestyle="--", linewidth=1.2)
            ax.text(len(keys) - 0.5, peak, "FMA peak, 1 thread, same run: %.0f GFLOP/s" % peak, color="#b22222",
                    ha="right", va="bottom", fontsize=9, bbox=dict(facecolor="white", edgecolor="none", pad=1))
        ax.set_ylim(0, top * 1.12)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(["mode %d\nJ = %d" % (c[3], c[4]) for c in fc], fontsize=9)
        ax.set_ylabel("GFLOP/s")
        ax.set_title("x = %s (float, one thread)" % fam.replace("x", "×"), fontsize=11, loc="left")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in series]
    fig.legend(handles, [l for l, _, _ in series], loc="upper center", ncol=len(series), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.975))
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.955))
    fig.suptitle("Mode-n product y = x ×mode u, u of shape (J, I_mode): GFLOP/s by mode and shape (medians)",
                 fontsize=12)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def adapter_groups(runs):
    """[(title, [(label, ours µs, kind)])] for the adapters plot; kind: base / adapter / merge."""
    groups = []
    for t in sorted({k[1] for k in runs if k[0] in PER_THREAD}):
        run = runs.get(("bench_lora", t))
        if run:
            for n, i, o, r in [(512, 768, 768, 8), (64, 4096, 4096, 16)]:
                a = "n:%d/in:%d/out:%d/r:%d" % (n, i, o, r)
                groups.append(("LoRA, linear %d, %d→%d, r %d (%d thr.)" % (n, i, o, r, t), [
                    ("base forward", get(run, "base_forward/" + a), "base"),
                    ("forward", get(run, "lora_forward/" + a), "adapter"),
                    ("forward + backward", get(run, "lora_forward_backward/" + a), "adapter"),
                    ("merge", get(run, "lora_merge/" + a), "merge")]))
        run = runs.get(("bench_glora", t))
        if run:
            a = "n:512/in:768/out:768/R:8/config:%d"
            groups.append(("GLoRA, linear 512, 768→768, R 8 (%d thr.)" % t, [
                ("base forward", get(run, "base_forward/" + a % 0), "base"),
                ("forward, all-lora", get(run, "glora_forward/" + a % 0), "adapter"),
                ("forward, cheap", get(run, "glora_forward/" + a % 1), "adapter"),
                ("fwd + bwd, all-lora", get(run, "glora_forward_backward/" + a % 0), "adapter"),
                ("fwd + bwd, cheap", get(run, "glora_forward_backward/" + a % 1), "adapter"),
                ("merge, all-lora", get(run, "glora_merge/" + a % 0), "merge"),
                ("merge, cheap", get(run, "glora_merge/" + a % 1), "merge")]))
    run = runs.get(("bench_flora", 0))
    if run:
        a = "n:512/in:768/out:768/r:8"
        groups.append(("FLoRA, linear 512, 768→768, ranks 8,8 (1 thr.)", [
            ("base forward (+ bias)", get(run, "linear_base_forward/" + a), "base"),
            ("forward", get(run, "linear_flora_forward/" + a), "adapter"),
            ("base fwd + dx", get(run, "linear_base_forward_backward/" + a), "base"),
            ("forward + backward", get(run, "linear_flora_forward_backward/" + a), "adapter")]))
        for s in FLORA_CONV:
            a = "O:%d/I:%d/k:%d/r:%d/rk:%d" % s
            groups.append(("FLoRA, conv weight %d×%d×%d×%d, ranks %d,%d,%d,%d (1 thr.)"
                           % (s[0], s[1], s[2], s[2], s[3], s[3], s[4], s[4]), [
                               ("copy of the weight", get(run, "copy_weight/" + a), "base"),
                               ("merge: delta_weight", get(run, "flora_delta_weight/" + a), "merge"),
                               ("delta_weight_vjp", get(run, "flora_delta_weight_vjp/" + a), "adapter"),
                               ("LoRA delta_weight", get(run, "lora_delta_weight/" + a), "other"),
                               ("LoRA delta_weight_vjp", get(run, "lora_delta_weight_vjp/" + a), "other")]))
    return [(title, [b for b in bars if b[1] is not None]) for title, bars in groups if any(b[1] for b in bars)]


def plot_adapters(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = adapter_groups(runs)
    if not groups:
        return False
    colors = {"base": "#8c8c8c", "adapter": "#1f5fa8", "merge": "#2e8b57", "other": "#e0892b"}
    cols = 2
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows + 0.6), constrained_layout=True, squeeze=False)
    for ax, (title, bars) in zip(axes.flat, groups):
        base = bars[0][1]
        ys = list(range(len(bars)))[::-1]
        vals = [b[1] / 1000 for b in bars]
        ax.barh(ys, vals, color=[colors[b[2]] for b in bars])
        for y, b, v in zip(ys, bars, vals):
            ax.text(v, y, " %.2f ms (%.2f×)" % (v, b[1] / base), va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels([b[0] for b in bars], fontsize=9)
        ax.set_xlim(0, max(vals) * 1.45)
        ax.set_xlabel("ms (median); in brackets: time / first bar", fontsize=8)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in ["base", "adapter", "merge", "other"]]
    fig.legend(handles, ["frozen base layer / copy of the weight", "adapter: forward, backward",
                         "merge (ΔW)", "LoRA at equal parameters"], loc="lower center", ncol=4, fontsize=9,
               bbox_to_anchor=(0.5, -0.005))
    fig.suptitle("Each adapter against its base layer (this library, medians, %s)"
                 % ("CPU time on one thread" if CLOCK["clock"] == "cpu" else "wall-clock"), fontsize=12)
    fig.get_layout_engine().set(h_pad=0.15, rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_label(name):
    """A benchmark's run name, shortened for an axis."""
    parts = name.split("/")
    a = dict(p.split(":", 1) for p in parts[1:] if ":" in p)
    if "O" in a:
        shape = "%s×%s×%s×%s, r %s,%s,%s,%s" % (a["O"], a["I"], a["k"], a["k"], a["r"], a["r"], a["rk"], a["rk"])
    elif "R" in a:
        shape = "%s, %s→%s, R %s, %s" % (a["n"], a["in"], a["out"], a["R"],
                                         {"0": "all-lora", "1": "cheap"}.get(a.get("config"), a.get("config")))
    elif "n" in a:
        shape = "%s, %s→%s, r %s" % (a["n"], a["in"], a["out"], a["r"])
    else:
        shape = "/".join(parts[1:])
    return "%s (%s)" % (parts[0], shape)


def plot_pytorch(pairs_all, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [(label, t, blas, [p for p in pairs if p[5]]) for label, t, blas, pairs in pairs_all]
    sets = [s for s in sets if s[3]]
    if not sets:
        return False
    names = []
    for _, _, _, pairs in sets:
        for p in pairs:
            if (p[0], p[1]) not in names:
                names.append((p[0], p[1]))
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(names) * max(1, len(sets) / 2) + 1.8), constrained_layout=True)
    h = 0.8 / len(sets)
    palette = ["#1f5fa8", "#e0892b", "#2e8b57", "#8b2252", "#6a5acd", "#8c8c8c"]
    for s, (label, t, blas, pairs) in enumerate(sets):
        by = {(p[0], p[1]): p[4] for p in pairs}
        ys = [len(names) - 1 - i + 0.4 - h * (s + 0.5) for i in range(len(names))]
        vals = [by.get(n) for n in names]
        ax.barh([y for y, v in zip(ys, vals) if v], [v for v in vals if v], h, color=palette[s % len(palette)],
                label="PyTorch %s (%s), %d thread%s" % (label, os.path.basename(blas), t, "" if t == 1 else "s"))
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, " %.2f" % v, va="center", fontsize=7)
    ax.axvline(1.0, color="#b22222", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(names))[::-1])
    ax.set_yticklabels([plot_label(n[1]) for n in names], fontsize=8)
    ax.set_xlabel("PyTorch time / our time (median; right of the dashed line: ours faster)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.suptitle("Adapter benchmarks against PyTorch's reference formulations, same shapes and threads", fontsize=11)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------

def render(data_dir, out_dir, template, meta):
    runs, torch = load(data_dir)
    CLOCK["clock"] = meta.get("clock", "cpu")
    goals = Goals()
    fields = {}
    fields["lora_tables"] = lora_section(runs, goals)
    fields["mode_product_table"], mp_run = mode_product_section(runs, goals)
    fields["gemm_table"] = gemm_section(runs, goals)
    fields["flora_weight_table"], fields["flora_linear_table"] = flora_section(runs, goals)
    fields["glora_tables"] = glora_section(runs, goals)
    fields["pytorch_tables"], pairs_all = pytorch_section(runs, torch, goals)
    fields["goals_table"] = goals_table(goals)
    dates = sorted(r["date"] for r in runs.values())
    loads = [r["load_before"]["load_avg"][0] for r in runs.values()] + \
            [r["load_after"]["load_avg"][0] for r in runs.values()]
    fields["run_info"] = "\n".join([
        "- Generated by `%s` on %s UTC from %s." % (meta.get("command", "benchmarks/report.py"),
                                                    (dates[0] if dates else "?").replace("T", " ")[:16],
                                                    meta.get("source", "this run")),
        "- Machine: %s. Programs built from commit %s." % (meta.get("cpu", cpu_model()), meta.get("commit", "?")),
        "- One-minute load average while the programs ran: %s–%s (on 2 cores, anything above ~1 means another "
        "process shared the cores and the times are inflated)." % (num(min(loads) if loads else None),
                                                                   num(max(loads) if loads else None)),
        "- %s" % ("The machine was busy with other work during this run: the one-thread figures are CPU time and "
                  "comparable within a table, while every two-thread figure is wall-clock time that includes waiting "
                  "for the other processes, so two-thread ratios from this run say more about the load than about "
                  "the code." if loads and max(loads) >= 1.5 else "The machine was quiet during this run."),
        "- Every figure is a median over repetitions; every ratio divides two medians measured in the same run "
        "(ours against a baseline in the same program; PyTorch right after the adapters' programs).",
    ])
    figs = []
    if mp_run:
        plot_mode_product(mp_run, os.path.join(out_dir, "mode_product_gflops.png"))
        figs.append("mode_product_gflops.png")
    fields["adapters_figure"] = "![each adapter against its base layer](adapters.png)" \
        if plot_adapters(runs, os.path.join(out_dir, "adapters.png")) else "_No adapter results in this run._"
    fields["mode_product_figure"] = "![mode-n product GFLOP/s](mode_product_gflops.png)" if mp_run else \
        "_No bench_mode_product results in this run._"
    fields["pytorch_figure"] = "![ours against PyTorch](pytorch.png)" \
        if plot_pytorch(pairs_all, os.path.join(out_dir, "pytorch.png")) else ""
    with open(template) as f:
        text = f.read()

    def sub(m):
        key = m.group(1)
        if key not in fields:
            raise SystemExit("report.py: the template names @@%s@@, which the script does not generate" % key)
        return fields[key]
    text = re.sub(r"@@(\w+)@@", sub, text)
    with open(os.path.join(out_dir, "BENCHMARKS.md"), "w") as f:
        f.write(text)
    print("report.py: wrote %s (%d goals: %d met)" % (os.path.join(out_dir, "BENCHMARKS.md"), len(goals.rows),
                                                      sum(1 for r in goals.rows if r[3])))
    for issue, goal, measured, ok, _ in goals.rows:
        print("  [%s] %s: %s — %s" % (issue, goal, measured, "met" if ok else ("not met" if ok is not None else "?")))


def main():
    args = parse_args()
    partial = args.quick or args.filter or args.only
    out_dir = args.out_dir or (os.path.join(ROOT, "build", "benchmark-report") if partial or args.from_json and
                               os.path.abspath(args.from_json).startswith(os.path.join(ROOT, "build"))
                               else os.path.join(ROOT, "docs"))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"cpu": cpu_model(), "commit": args.commit or git_commit(), "clock": args.clock}
    if args.from_json:
        data_dir = args.from_json
        meta_path = os.path.join(data_dir, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        if "--clock" in " ".join(sys.argv):
            meta["clock"] = args.clock
        meta["source"] = "the medians saved in `%s`" % os.path.relpath(os.path.abspath(data_dir), ROOT)
    else:
        data_dir = os.path.join(out_dir, "data")
        if os.path.isdir(data_dir) and not args.only and any(
                os.access(os.path.join(args.bench_dir, b), os.X_OK) for b in BINARIES):
            for old in glob.glob(os.path.join(data_dir, "*.json")):  # --only refreshes its programs, keeps the rest
                os.remove(old)
        cmd = ["benchmarks/report.py"] + [a.replace(ROOT + "/", "") for a in sys.argv[1:]]
        meta["command"] = " ".join(shlex.quote(c) for c in cmd)
        run_all(args, data_dir, os.path.join(ROOT, "build", "benchmark-json"))
        meta["source"] = "this run (medians saved in `%s`)" % os.path.relpath(data_dir, ROOT)
        save(os.path.join(data_dir, "meta.json"), meta)
    render(data_dir, out_dir, args.template, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
