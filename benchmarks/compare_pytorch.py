#!/usr/bin/python3
"""PyTorch's equivalent of every adapter benchmark, timed on the same shapes and thread count.

Run with /usr/bin/python3 (python3-torch). Without a working `import torch` it prints why and exits 0,
so that benchmarks/report.py renders the report without the comparison.

    /usr/bin/python3 benchmarks/compare_pytorch.py --threads 1 --out build/report/pytorch_t1.json
    /usr/bin/python3 benchmarks/compare_pytorch.py --quick --filter 'lora_forward'

Each entry is named as the Google Benchmark entry it mirrors (binary and run name, e.g.
`bench_lora` / `lora_forward/n:512/in:768/out:768/r:8`), so report.py puts the two side by side. The
shapes, ranks, scales and LoRA ranks of closest parameter count are those of benchmarks/bench_lora.cpp,
bench_flora.cpp and bench_glora.cpp. Float32 throughout.

How PyTorch computes each adapter (the reference implementations' formulations):

  LoRA (PEFT)   forward  y = F.linear(x, W0, b0) + scale · F.linear(F.linear(x, A), B)
                backward autograd of the same with W0 and b0 frozen: dx, dA, dB
                ΔW of a conv weight as PEFT forms it: conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)
                · scale, and its VJP by autograd
                merge    W += (B @ A) · scale in place, as PEFT's merge adds get_delta_weight()
  FLoRA         ΔW as the official code forms it: the core contracted with param_0 (in), param_1 (out),
                param_2, ... in turn by torch.tensordot, the first two modes transposed, times the scale;
                the VJP by autograd of that expansion. The linear layer is the official one:
                y = F.linear(x, W0, b0) + F.linear(x, ΔW) with ΔW formed on every call
  GLoRA         the official layer: each support tensor read from the store by prepare_path, then
                W_eff = W0 + W0 ⊙ A + B, b_eff = b0 + b0 ⊙ D + E + (W0 · C).squeeze(),
                y = F.linear(x, W_eff, b_eff); backward by autograd (dx and every store gradient);
                merge: W_eff and b_eff alone
  base layers   F.linear(x, W0) (bench_lora, bench_glora), F.linear(x, W0, b0) (bench_flora) and, for
                forward + backward, dx by autograd with W0 frozen

Forward-only entries run under torch.no_grad() (inference, PyTorch's fastest path); forward + backward
entries build the graph and call torch.autograd.grad (fresh gradients each call, no accumulation); a
VJP entry builds the expansion's graph once and times torch.autograd.grad(ΔW, params, gW,
retain_graph=True), which is the backward pass alone, as the C++ VJP is.

Timing: one warm-up call, an iteration count calibrated so that one repetition lasts at least
--min-time seconds, then --repetitions repetitions; the entry records every repetition's wall time per
iteration, their median (real_time) and the median of the process CPU time per iteration (cpu_time, all
threads of the process). Times in microseconds.

The matrix library PyTorch calls for F.linear and matmul is whatever libblas.so.3 the dynamic loader
finds (Debian's PyTorch is built against the generic BLAS interface); the JSON context records its path
so that the report can say which one was measured.
"""

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repetitions", type=int, default=5, help="repetitions per entry (default 5)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per repetition at least (default 0.5)")
    p.add_argument("--quick", action="store_true", help="3 repetitions of at least 0.05 s each")
    p.add_argument("--filter", default=".", help="regular expression on 'binary:name' (default all)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print a table only)")
    p.add_argument("--label", default=None, help="a name for this PyTorch set-up, stored in the JSON")
    return p.parse_args()


def loaded_blas():
    """Path of the BLAS library mapped into this process (after torch has loaded it)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "blas" in line.lower() and ".so" in line:
                    return os.path.realpath(line.split()[-1])
    except OSError:
        pass
    return "unknown"


def measure(fn, min_time, repetitions):
    fn()  # warm-up (allocator, thread pool, caches)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time or n >= 1 << 20:
            break
        n = max(n + 1, int(math.ceil(n * 1.2 * min_time / max(t, 1e-9))))
        n = min(n, 1 << 20)
    real, cpu = [], []
    for _ in range(repetitions):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        t1, c1 = time.perf_counter(), time.process_time()
        real.append((t1 - t0) / n * 1e6)
        cpu.append((c1 - c0) / n * 1e6)
    return {"iterations": n, "real_time": statistics.median(real), "cpu_time": statistics.median(cpu),
            "times": real}


# ------------------------------------------------------------------------------------------------
# The benchmarks: each returns a zero-argument function doing one iteration.

def build(torch):
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    cases = []  # (binary, name, make) ; make() -> fn

    # ---- LoRA on a linear layer (bench_lora.cpp): scale = alpha / r with alpha = 2r.
    def lora_linear(n, i, o, r):
        x, w0, b0, dy = normal(n, i), normal(o, i, std=0.05), normal(o), normal(n, o)
        a = (torch.rand(r, i, generator=gen) * 2 - 1) / math.sqrt(i)
        b = normal(o, r, std=0.05)
        return x, w0, b0, dy, a, b, 2.0

    def lora_forward(x, w0, b0, a, b, scale):
        return F.linear(x, w0, b0) + F.linear(F.linear(x, a), b) * scale

    def make_base_forward(n, i, o, r):
        x, w0, *_ = lora_linear(n, i, o, r)

        def fn():
            with torch.no_grad():
                return F.linear(x, w0)
        return fn

    def make_lora_forward(n, i, o, r):
        x, w0, b0, _, a, b, scale = lora_linear(n, i, o, r)

        def fn():
            with torch.no_grad():
                return lora_forward(x, w0, b0, a, b, scale)
        return fn

    def make_lora_forward_backward(n, i, o, r):
        x, w0, b0, dy, a, b, scale = lora_linear(n, i, o, r)
        x.requires_grad_(True), a.requires_grad_(True), b.requires_grad_(True)

        def fn():
            y = lora_forward(x, w0, b0, a, b, scale)
            return torch.autograd.grad(y, (x, a, b), dy)
        return fn

    def make_lora_merge(n, i, o, r):
        _, w0, _, _, a, b, scale = lora_linear(n, i, o, r)
        w = w0.clone()

        def fn():  # PEFT's merge: weight.data += get_delta_weight() = (B @ A) * scaling
            with torch.no_grad():
                w.data += (b @ a) * scale
        return fn

    for n, i, o, r in [(512, 768, 768, 8), (64, 4096, 4096, 16)]:
        args = "n:%d/in:%d/out:%d/r:%d" % (n, i, o, r)
        for name, make in [("base_forward", make_base_forward), ("lora_forward", make_lora_forward),
                           ("lora_forward_backward", make_lora_forward_backward), ("lora_merge", make_lora_merge)]:
            cases.append(("bench_lora", name + "/" + args, lambda make=make, s=(n, i, o, r): make(*s)))

    # ---- FLoRA weight space (bench_flora.cpp): conv weights (O, I, k, k), ranks (r, r, rk, rk), scale 4.
    def official_delta(g, ps, scale):
        dt = torch.tensordot(g, ps[0], dims=[[0], [1]])
        for p in ps[1:]:
            dt = torch.tensordot(dt, p, dims=[[0], [1]])
        if dt.dim() > 1:
            dt = dt.transpose(0, 1)
        return scale * dt

    def flora_params(dims, ranks):
        g = normal(*ranks)
        ps = [normal(d, rn, std=1.0 / math.sqrt(2.0 * rn)) for d, rn in zip(dims, ranks)]
        return g, ps

    def closest_lora_rank(out, fan_in, count):
        per_rank = out + fan_in
        return min(max(1, (count + per_rank // 2) // per_rank), min(out, fan_in))

    def conv_setup(o, i, k, r, rk):
        dims = [i, o, k, k]  # the official order: in, out, kh, kw
        ranks = [r, r, rk, rk]
        g, ps = flora_params(dims, ranks)
        gw = normal(o, i, k, k)
        count = math.prod(ranks) + sum(d * rn for d, rn in zip(dims, ranks))
        lr = closest_lora_rank(o, i * k * k, count)
        la = (torch.rand(lr, i, k, k, generator=gen) * 2 - 1) / math.sqrt(i * k * k)
        lb = normal(o, lr, 1, 1, std=0.05)
        return g, ps, gw, la, lb, 2.0 * lr / lr

    def peft_conv_delta(la, lb, scale):
        return F.conv2d(la.permute(1, 0, 2, 3), lb).permute(1, 0, 2, 3) * scale

    def make_flora_dw(o, i, k, r, rk):
        g, ps, *_ = conv_setup(o, i, k, r, rk)

        def fn():
            with torch.no_grad():
                return official_delta(g, ps, 4.0).contiguous()
        return fn

    def make_flora_vjp(o, i, k, r, rk):
        g, ps, gw, *_ = conv_setup(o, i, k, r, rk)
        params = [g.requires_grad_(True)] + [p.requires_grad_(True) for p in ps]
        dw = official_delta(g, ps, 4.0)

        def fn():
            return torch.autograd.grad(dw, params, gw, retain_graph=True)
        return fn

    def make_lora_dw(o, i, k, r, rk):
        _, _, _, la, lb, scale = conv_setup(o, i, k, r, rk)

        def fn():
            with torch.no_grad():
                return peft_conv_delta(la, lb, scale)
        return fn

    def make_lora_vjp(o, i, k, r, rk):
        _, _, gw, la, lb, scale = conv_setup(o, i, k, r, rk)
        params = [la.requires_grad_(True), lb.requires_grad_(True)]
        dw = peft_conv_delta(la, lb, scale)

        def fn():
            return torch.autograd.grad(dw, params, gw, retain_graph=True)
        return fn

    for o, i, k, r, rk in [(256, 256, 3, 16, 2), (512, 512, 3, 32, 3)]:
        args = "O:%d/I:%d/k:%d/r:%d/rk:%d" % (o, i, k, r, rk)
        for name, make in [("flora_delta_weight", make_flora_dw), ("lora_delta_weight", make_lora_dw),
                           ("flora_delta_weight_vjp", make_flora_vjp), ("lora_delta_weight_vjp", make_lora_vjp)]:
            cases.append(("bench_flora", name + "/" + args, lambda make=make, s=(o, i, k, r, rk): make(*s)))

    # ---- FLoRA and LoRA on a linear layer (bench_flora.cpp): batch 512, 768 -> 768, ranks 8, 8, scale 2;
    # LoRA at the rank of closest parameter count, alpha = 2r.
    def linear_setup(n, i, o, r):
        x, w0, b0, dy = normal(n, i), normal(o, i, std=0.05), normal(o), normal(n, o)
        g, ps = flora_params([i, o], [r, r])
        lr = closest_lora_rank(o, i, r * r + r * (i + o))
        la = (torch.rand(lr, i, generator=gen) * 2 - 1) / math.sqrt(i)
        lb = normal(o, lr, std=0.05)
        return x, w0, b0, dy, g, ps, la, lb

    def flora_linear(x, w0, b0, g, ps):
        return F.linear(x, w0, b0) + F.linear(x, official_delta(g, ps, 2.0))

    def make_linear(kind, backward):
        def make(n, i, o, r):
            x, w0, b0, dy, g, ps, la, lb = linear_setup(n, i, o, r)
            if kind == "base":
                params, f = [x], lambda: F.linear(x, w0, b0)
            elif kind == "flora":
                params, f = [x, g] + ps, lambda: flora_linear(x, w0, b0, g, ps)
            else:
                params, f = [x, la, lb], lambda: lora_forward(x, w0, b0, la, lb, 2.0)
            if not backward:
                def fn():
                    with torch.no_grad():
                        return f()
                return fn
            for p in params:
                p.requires_grad_(True)

            def fn():
                return torch.autograd.grad(f(), params, dy)
            return fn
        return make

    args = "n:512/in:768/out:768/r:8"
    for kind in ["base", "flora", "lora"]:
        for backward in [False, True]:
            name = "linear_%s_forward%s/%s" % (kind, "_backward" if backward else "", args)
            cases.append(("bench_flora", name, lambda m=make_linear(kind, backward): m(512, 768, 768, 8)))

    # ---- GLoRA on a linear layer (bench_glora.cpp): batch 512, 768 -> 768, R 8, with a bias.
    configs = [
        {"A": ("lora", 8), "B": ("lora", 8), "C": ("lora", 8), "D": ("vector", 0), "E": ("vector", 0)},
        {"A": ("vector", 0), "B": ("scalar", 0), "C": ("vector", 0), "D": ("scalar", 0), "E": ("vector", 0)},
    ]

    def prepare_path(kind, xd, xu=None):
        name, r = kind
        if xu is not None:
            if name == "lora":
                return xd[:, :r] @ xu[:r, :]
            if name == "vector":
                return xd[:, 0].unsqueeze(1)
            if name == "scalar":
                return xd[0, 0]
            return torch.zeros(xd.shape[0], xu.shape[1])
        if name == "vector":
            return xd
        if name == "scalar":
            return xd[0]
        return torch.zeros(1)

    def glora_setup(n, i, o, big_r):
        x, w0, b0, dy = normal(n, i), normal(o, i, std=0.05), normal(o), normal(n, o)
        store = {"Ad": normal(o, big_r, std=0.05), "Au": normal(big_r, i, std=0.05),
                 "Bd": normal(o, big_r, std=0.05), "Bu": normal(big_r, i, std=0.05),
                 "Cd": normal(i, big_r, std=0.05), "Cu": normal(big_r, 1, std=0.05),
                 "D": normal(o, std=0.05), "E": normal(o, std=0.05)}
        return x, w0, b0, dy, store

    def glora_forward(cfg, x, w0, b0, s):
        a = prepare_path(cfg["A"], s["Ad"], s["Au"])
        b = prepare_path(cfg["B"], s["Bd"], s["Bu"])
        c = prepare_path(cfg["C"], s["Cd"], s["Cu"])
        d = prepare_path(cfg["D"], s["D"])
        e = prepare_path(cfg["E"], s["E"])
        w_eff = w0 + w0 * a + b
        b_eff = b0 + b0 * d + e + torch.matmul(w0, c).squeeze()
        return F.linear(x, w_eff, b_eff)

    def make_glora(config, backward):
        def make():
            x, w0, b0, dy, store = glora_setup(512, 768, 768, 8)
            cfg = configs[config]
            if not backward:
                def fn():
                    with torch.no_grad():
                        return glora_forward(cfg, x, w0, b0, store)
                return fn
            params = [x.requires_grad_(True)] + [t.requires_grad_(True) for t in store.values()]

            def fn():
                return torch.autograd.grad(glora_forward(cfg, x, w0, b0, store), params, dy, allow_unused=True)
            return fn
        return make

    def make_glora_merge(config):
        def make():
            _, w0, b0, _, store = glora_setup(512, 768, 768, 8)
            cfg = configs[config]

            def fn():  # the GLoRA code's merge: the layer's W_eff and b_eff, formed once for inference
                with torch.no_grad():
                    a = prepare_path(cfg["A"], store["Ad"], store["Au"])
                    b = prepare_path(cfg["B"], store["Bd"], store["Bu"])
                    c = prepare_path(cfg["C"], store["Cd"], store["Cu"])
                    d = prepare_path(cfg["D"], store["D"])
                    e = prepare_path(cfg["E"], store["E"])
                    return w0 + w0 * a + b, b0 + b0 * d + e + torch.matmul(w0, c).squeeze()
            return fn
        return make

    def make_glora_base():
        x, w0, *_ = glora_setup(512, 768, 768, 8)

        def fn():
            with torch.no_grad():
                return F.linear(x, w0)
        return fn

    cases.append(("bench_glora", "base_forward/n:512/in:768/out:768/R:8/config:0", make_glora_base))
    for config in [0, 1]:
        for backward in [False, True]:
            name = "glora_forward%s/n:512/in:768/out:768/R:8/config:%d" % ("_backward" if backward else "", config)
            cases.append(("bench_glora", name, make_glora(config, backward)))
        cases.append(("bench_glora", "glora_merge/n:512/in:768/out:768/R:8/config:%d" % config,
                      make_glora_merge(config)))
    return cases


def main():
    args = parse_args()
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure to import means no comparison
        print("compare_pytorch.py: no comparison, `import torch` failed under %s: %s" % (sys.executable, e))
        return 0
    if args.quick:
        args.repetitions, args.min_time = 3, 0.05
    torch.set_num_threads(args.threads)
    pattern = re.compile(args.filter)
    cases = [c for c in build(torch) if pattern.search(c[0] + ":" + c[1])]
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas": loaded_blas(),
        "label": args.label,
        "repetitions": args.repetitions,
        "min_time": args.min_time,
        "load_avg": list(os.getloadavg()),
        "python": sys.executable,
    }
    results = []
    for binary, name, make in cases:
        fn = make()
        r = measure(fn, args.min_time, args.repetitions)
        r.update({"binary": binary, "name": name, "time_unit": "us", "repetitions": args.repetitions})
        results.append(r)
        print("%-12s %-60s %12.1f us (median of %d, %d iterations)"
              % (binary, name, r["real_time"], args.repetitions, r["iterations"]), flush=True)
    context["blas"] = loaded_blas()
    print("PyTorch %s, %d thread(s), BLAS %s" % (context["torch_version"], context["threads"], context["blas"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"context": context, "benchmarks": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
