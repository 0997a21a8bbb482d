"""``treeffn bench``: layer speed of the tree FFN paths against a dense MLP (cuBLAS / MKL).

For each preset (OPT-125M and OPT-1.3B widths with parameter-matched trees) and token count it

1. checks every path against a float64 reference on fresh random inputs (outputs, and for
   ``fwdbwd`` the gradients of x, w_in, b_in, w_out); a path that fails is not timed;
2. times it: medians of per-call device-event timings after warm-up, with the L2 cache flushed
   before every call (weights come from memory, as they would between the layers of a model);
   the dense MLP (fc1 -> gelu -> fc2 through F.linear) is timed in the same run;
3. measures the machine's ceilings in the same run (copy bandwidth, a large GEMM) and reports
   each path's achieved bandwidth and FLOP rate against them.

Output: a table on screen, ``bench.json`` and ``bench.md`` in ``--out``. ``--tune`` times tile
choices of the Triton kernels; ``--loss-curve N`` trains a small OPT twice (tree.impl=masked and
=triton, same seed) and compares the loss curves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# name -> (d_model, dense ffn_dim, trees K, depth D); K = floor(ffn / (2^(D+1)-1)) (DESIGN.md §2)
PRESETS = {
    "opt125m-K24-D6": (768, 3072, 24, 6),
    "opt125m-K12-D7": (768, 3072, 12, 7),
    "opt1.3b-K64-D6": (2048, 8192, 64, 6),
    "opt1.3b-K32-D7": (2048, 8192, 32, 7),
}
TOKENS_GPU = (1, 16, 128, 2048, 16384)
TOKENS_CPU = (1, 16, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error (norm of difference / norm of reference) a path may have against float64.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# Path name -> tree_ffn_triton mode. "triton" is what tree.impl=triton runs (mode auto).
# triton_gather_sparse: the path-only kernels with the CSR weight-gradient kernel (fwd+bwd only).
TRITON_MODES = {"triton": ("auto", "auto"), "triton_gather": ("gather", "auto"), "triton_dense": ("dense", "auto"),
                "triton_gather_sparse": ("gather", "sparse")}
# The gather path's backward is very slow at large batches; it is an inference path.
GATHER_FWDBWD_MAX_TOKENS = 2048


# --------------------------------------------------------------------------- timing
class Timer:
    """Median of per-call device times; the cache is flushed before each call, outside the timing.

    On a GPU a spin kernel runs before each timed call, long enough for the host to enqueue the
    whole call, so the events time the GPU's work and not Python's launch overhead (the host's
    enqueue time is reported separately: in a model's decode loop CUDA graphs remove it).
    """

    def __init__(self, device: torch.device, rep_ms: float = 100.0, warmup_ms: float = 25.0):
        self.device, self.rep_ms, self.warmup_ms = device, rep_ms, warmup_ms
        self.cuda = device.type == "cuda"
        # Larger than the GPU's L2 (60 MB on H200) / the CPU's L3 (32 MB here).
        size = (512 if self.cuda else 96) << 20
        self.flush_buf = torch.empty(size, dtype=torch.int8, device=device)
        self.spin_cycles = 0

    def flush(self):
        self.flush_buf.zero_() if self.cuda else self.flush_buf.add_(1)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _one(self, fn) -> float:
        self.flush()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.spin_cycles:
                torch.cuda._sleep(self.spin_cycles)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def __call__(self, fn) -> dict:
        fn()
        self.sync()
        host = []
        for _ in range(5):  # host time to enqueue one call (the GPU is idle, so nothing waits)
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            self.sync()
        host_us = statistics.median(host)
        # ~2 cycles per ns at the H200's clocks; twice the enqueue time, plus a margin.
        self.spin_cycles = int(2000 * (2 * host_us + 50)) if self.cuda else 0
        first = [self._one(fn) for _ in range(3)]
        est_us = max(min(first), 1.0)
        for _ in range(max(1, min(200, int(self.warmup_ms * 1e3 / est_us)))):
            fn()
        self.sync()
        cap = 200 if self.cuda else 60  # each call also pays a flush (and on a GPU a spin)
        reps = max(5 if est_us > 2e5 else 10, min(cap, int(self.rep_ms * 1e3 / est_us)))
        times = sorted(self._one(fn) for _ in range(reps))
        self.spin_cycles = 0
        q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
        return {"median_us": statistics.median(times), "p10_us": q(0.1), "p90_us": q(0.9), "reps": reps,
                "host_enqueue_us": host_us}


def measure_ceilings(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict:
    """Copy bandwidth (bytes read + written) and a large GEMM's rate, on random data."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)  # several times the L2 / L3
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src))["median_us"]
    m = 8192 if device.type == "cuda" else 1024
    gdt = dtype if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=gdt), torch.randn(m, m, device=device, dtype=gdt)
    t_mm = timer(lambda: a @ b)["median_us"]
    del src, dst, a, b
    return {"copy_GBps": 2 * n / t_copy / 1e3, "gemm_TFLOPs": 2 * m**3 / t_mm / 1e6,
            "gemm": f"{m}x{m}x{m} {str(gdt).replace('torch.', '')}", "copy_bytes": n}


# --------------------------------------------------------------------------- problems
def make_dense(d, ffn, device, dtype):
    g = lambda *s: (torch.randn(*s, device=device) * 0.02).to(dtype)  # noqa: E731
    return [g(ffn, d), g(ffn), g(d, ffn), g(d)]


def dense_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def make_tree(d, trees, depth, device, dtype, placement):
    from treeffn import TreeFFN

    layer = TreeFFN(d, depth, trees, placement=placement, activation="gelu", bias=True).to(device)
    with torch.no_grad():  # routing depends on the signs of w_in.x + b: give the bias a spread too
        layer.b_in.normal_(0, 0.02)
    layer.track_stats = False
    return layer.to(dtype)


def tree_fn(path: str, layer):
    """(x) -> (y, path) for one tree implementation, on the layer's own parameters."""
    if path == "masked":
        return layer.forward_masked
    if path == "gather":
        return layer.forward_gather
    if path in TRITON_MODES:
        from treeffn.kernels.triton_tree import tree_ffn_triton

        mode, wgrad = TRITON_MODES[path]
        return lambda x: tree_ffn_triton(x, layer.w_in, layer.b_in, layer.w_out, layer.trees, layer.depth,
                                         layer.placement, layer.activation, wgrad=wgrad, mode=mode)
    raise ValueError(f"unknown path {path!r}; choose from dense, masked, gather, {', '.join(TRITON_MODES)}")


def reference64(x, w_in, b_in, w_out, trees, depth, placement, path):
    """Float64 tree FFN with the routing forced to ``path`` (checked separately), and all z."""
    n_nodes = 2 ** (depth + 1) - 1
    z = x @ w_in.T + b_in
    T = x.shape[0]
    rows = (path + torch.arange(trees, device=x.device).view(1, -1, 1) * n_nodes).view(T, -1)
    mask = torch.zeros_like(z).scatter_(1, rows, 1.0)
    y = (F.gelu(z) * mask) @ w_out if placement == "node" else F.gelu((z * mask) @ w_out)
    return y, z


def routing_flips(path, z64, trees, depth) -> tuple[int, float]:
    """Decisions on ``path`` that disagree with float64 z, and the largest |z|/rms(z) among them."""
    T = path.shape[0]
    zz = z64.view(T, trees, 2 ** (depth + 1) - 1)
    zp = torch.gather(zz, 2, path[:, :, :-1])
    went_right = (path[:, :, 1:] - 2 * path[:, :, :-1] - 1) == 1
    wrong = went_right != (zp > 0)
    worst = (zp[wrong].abs().max() / zz.pow(2).mean().sqrt()).item() if wrong.any() else 0.0
    return int(wrong.sum()), worst


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_tree(path_name, layer, T, mode, dtype, device) -> dict:
    """Fresh random x (and dL/dy); relative errors of y (and grads) against float64."""
    fn = tree_fn(path_name, layer)
    x = torch.randn(T, layer.d_model, device=device).to(dtype)
    params = [layer.w_in, layer.b_in, layer.w_out]
    if mode == "fwd":
        with torch.no_grad():
            y, path = fn(x)
        grads = []
    else:
        xg = x.clone().requires_grad_(True)
        y, path = fn(xg)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xg, *params], gy)
    p64 = [t.detach().double().requires_grad_(mode != "fwd") for t in params]
    x64 = x.double().requires_grad_(mode != "fwd")
    y64, z64 = reference64(x64, *p64, layer.trees, layer.depth, layer.placement, path)
    out = {"y": rel(y, y64)}
    if mode != "fwd":
        refs = torch.autograd.grad(y64, [x64, *p64], gy.double())
        for name, g, r in zip(("dx", "dw_in", "db_in", "dw_out"), grads, refs):
            out[name] = rel(g, r)
    flips, worst = routing_flips(path, z64.detach(), layer.trees, layer.depth)
    tol = TOLERANCE[dtype]
    ok = all(v < tol and math.isfinite(v) for v in out.values()) and worst < 1e-2
    n_nodes = 2 ** (layer.depth + 1) - 1
    rows = (path + torch.arange(layer.trees, device=device).view(1, -1, 1) * n_nodes).unique().numel()
    return {"ok": ok, "rel_err": out, "routing_flips": flips, "flip_max_z_over_rms": worst, "distinct_rows": rows}


def check_dense(params, T, mode, dtype, device) -> dict:
    d = params[0].shape[1]
    x = torch.randn(T, d, device=device).to(dtype)
    p = [t.detach().clone().requires_grad_(mode != "fwd") for t in params]
    xg = x.clone().requires_grad_(mode != "fwd")
    y = dense_mlp(xg, *p)
    p64 = [t.detach().double().requires_grad_(mode != "fwd") for t in params]
    x64 = x.double().requires_grad_(mode != "fwd")
    y64 = dense_mlp(x64, *p64)
    out = {"y": rel(y, y64)}
    if mode != "fwd":
        gy = torch.randn_like(y)
        for name, g, r in zip(("dx", "dw1", "db1", "dw2", "db2"), torch.autograd.grad(y, [xg, *p], gy),
                              torch.autograd.grad(y64, [x64, *p64], gy.double())):
            out[name] = rel(g, r)
    return {"ok": all(v < TOLERANCE[dtype] for v in out.values()), "rel_err": out}


# --------------------------------------------------------------------------- one measurement
def timed_call(fn, inputs, mode):
    """A closure running one forward (no grad) or forward+backward (grads of every input)."""
    x = inputs[0]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
        return run
    xg = x.detach().clone().requires_grad_(True)
    params = inputs[1:]
    gy = torch.randn_like(x)

    def run():
        y = fn(xg)
        y = y[0] if isinstance(y, tuple) else y
        torch.autograd.grad(y, [xg, *params], gy)
    return run


def cost(kind, d, ffn, trees, depth, T, mode, elt, distinct_rows=None) -> tuple[float, float]:
    """(fewest bytes, useful FLOPs). Forward: weights (or the distinct path rows) read once,
    x read, y written. Forward+backward: those weights read once and their gradients written
    once, x, y, dL/dy, dL/dx once each. FLOPs: 4*T*d*units (two products); backward twice that."""
    if kind == "dense":
        w_bytes = (2 * ffn * d + ffn + d) * elt
        flops = 4.0 * T * d * ffn
    else:
        rows = distinct_rows if distinct_rows is not None else trees * (2 ** (depth + 1) - 1)
        w_bytes = rows * (2 * d + 1) * elt
        flops = 4.0 * T * d * trees * (depth + 1)
    act_bytes = 2 * T * d * elt
    if mode == "fwd":
        return w_bytes + act_bytes, flops
    return 2 * w_bytes + 2 * act_bytes, 3 * flops


# --------------------------------------------------------------------------- main loop
def run_bench(args, out_dir: Path | None = None) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, rep_ms=args.rep_ms)
    torch.manual_seed(args.seed)
    env = environment(device)
    print(f"# treeffn bench  {env['date']}  {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"dtype {args.dtype}", flush=True)
    ceilings = measure_ceilings(device, dtype, timer)
    print(f"# ceilings: copy {ceilings['copy_GBps']:.0f} GB/s (read+write), GEMM {ceilings['gemm']} "
          f"{ceilings['gemm_TFLOPs']:.1f} TFLOP/s", flush=True)
    elt = torch.tensor([], dtype=dtype).element_size()
    rows, failures = [], 0
    for name in args.configs:
        d, ffn, trees, depth = parse_preset(name)
        dense = make_dense(d, ffn, device, dtype)
        layer = make_tree(d, trees, depth, device, dtype, args.placement)
        for T in args.tokens:
            for mode in args.modes:
                base = {"config": name, "d": d, "ffn": ffn, "trees": trees, "depth": depth, "tokens": T, "mode": mode}
                x = torch.randn(T, d, device=device).to(dtype)
                for p in [*dense, *layer.parameters()]:  # gradients only where they are timed
                    p.requires_grad_(mode != "fwd")
                results = {}
                for path in args.paths:
                    if path in ("gather", "triton_gather_sparse") and mode == "fwdbwd" and T > GATHER_FWDBWD_MAX_TOKENS:
                        results[path] = {"skipped": f"{path} fwd+bwd above {GATHER_FWDBWD_MAX_TOKENS} tokens"}
                        continue
                    if path == "triton_gather_sparse" and mode == "fwd":
                        continue  # its forward is triton_gather's
                    try:
                        if path == "dense":
                            check = check_dense(dense, T, mode, dtype, device)
                            fn, inputs = (lambda inp: dense_mlp(inp, *dense)), [x, *dense]
                        else:
                            check = check_tree(path, layer, T, mode, dtype, device)
                            fn, inputs = tree_fn(path, layer), [x, layer.w_in, layer.b_in, layer.w_out]
                    except Exception as e:  # a path that cannot run here is reported, not fatal
                        results[path] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                        continue
                    entry = {"check": check}
                    if not check["ok"]:
                        failures += 1
                        entry["skipped"] = "failed the float64 check; not timed"
                    else:
                        entry.update(timer(timed_call(fn, inputs, mode)))
                        kind = "dense" if path == "dense" else "tree"
                        nbytes, flops = cost(kind, d, ffn, trees, depth, T, mode, elt, check.get("distinct_rows"))
                        t = entry["median_us"]
                        entry.update({
                            "bytes_min": nbytes, "flops": flops,
                            "GBps": nbytes / t / 1e3, "TFLOPs": flops / t / 1e6,
                            "pct_copy_bw": 100 * nbytes / t / 1e3 / ceilings["copy_GBps"],
                            "pct_gemm": 100 * flops / t / 1e6 / ceilings["gemm_TFLOPs"],
                            "floor_us": max(nbytes / ceilings["copy_GBps"] / 1e3, flops / ceilings["gemm_TFLOPs"] / 1e6),
                        })
                    results[path] = entry
                dense_t = results.get("dense", {}).get("median_us")
                for path, entry in results.items():
                    if dense_t and "median_us" in entry:
                        entry["speedup_vs_dense"] = dense_t / entry["median_us"]
                    rows.append({**base, "path": path, **entry})
                print_line(base, results, flush=True)
                del x
            if out_dir is not None:  # partial results survive a run cut short
                partial = {"environment": env, "ceilings": ceilings, "args": vars(args), "rows": rows,
                           "failures": failures, "partial": True}
                (out_dir / "bench.json").write_text(json.dumps(partial, indent=1))
        del dense, layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"environment": env, "ceilings": ceilings, "args": vars(args), "rows": rows, "failures": failures}


def print_line(base, results, flush=False):
    parts = [f"{base['config']:<15} T={base['tokens']:<6} {base['mode']:<6}"]
    for path, e in results.items():
        if "median_us" in e:
            sp = e.get("speedup_vs_dense")
            parts.append(f"{path} {e['median_us']:9.1f} us" + (f" ({sp:5.2f}x)" if path != "dense" and sp else ""))
        else:
            parts.append(f"{path} --")
    print("  ".join(parts), flush=flush)


def parse_preset(name: str):
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("custom:"):  # custom:d,ffn,trees,depth (tests and quick looks)
        d, ffn, trees, depth = (int(v) for v in name.split(":", 1)[1].split(","))
        return d, ffn, trees, depth
    raise SystemExit(f"treeffn bench: unknown config {name!r}; choose from {', '.join(PRESETS)} or custom:d,ffn,K,D")


# --------------------------------------------------------------------------- reporting
def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
        "host_cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(device_name=prop.name, sm_count=prop.multi_processor_count, cuda=torch.version.cuda)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            pass
    else:
        env["device_name"] = f"CPU ({env['host_cpu']}, {torch.get_num_threads()} threads)"
    return env


def markdown(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    lines = [
        f"# treeffn bench — {env['date']}", "",
        f"- device: {env['device_name']}; torch {env['torch']}; triton {env['triton']}; "
        f"dtype {result['args']['dtype']}; placement {result['args']['placement']}",
        f"- command: `{env['command']}`",
        f"- measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), "
        f"GEMM {ceil['gemm']} {ceil['gemm_TFLOPs']:.1f} TFLOP/s",
        "- times: median GPU µs per call (CUDA events; L2 flushed before each call; a spin kernel "
        "lets the host enqueue the whole call first, so Python launch overhead is not counted; "
        "it is in the JSON as host_enqueue_us). On CPU: wall time. (×) = dense time / path time "
        "(>1 is faster than dense)",
        "- triton = tree.impl=triton (mode auto); triton_gather = path-rows-only kernels; "
        "triton_dense = GEMM form with the Triton routing kernel", "",
    ]
    paths = result["args"]["paths"]
    for mode in result["args"]["modes"]:
        lines += [f"## {'forward (inference)' if mode == 'fwd' else 'forward + backward (training)'}", ""]
        head = "| config | tokens | " + " | ".join(paths) + " |"
        lines += [head, "|" + "---|" * (2 + len(paths))]
        keyed = {}
        for r in result["rows"]:
            if r["mode"] == mode:
                keyed.setdefault((r["config"], r["tokens"]), {})[r["path"]] = r
        for (config, T), by_path in keyed.items():
            cells = []
            for p in paths:
                r = by_path.get(p, {})
                if "median_us" not in r:
                    cells.append("—" if "skipped" not in r else "skip")
                elif p == "dense":
                    cells.append(f"{r['median_us']:.1f}")
                else:
                    cells.append(f"{r['median_us']:.1f} ({r.get('speedup_vs_dense', float('nan')):.2f}×)")
            lines.append(f"| {config} | {T} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## achieved rates vs the measured ceilings", "",
              "| config | tokens | mode | path | µs | GB/s (% copy) | TFLOP/s (% GEMM) | floor µs | × floor | "
              "rows touched | max rel err | flips |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "median_us" not in r:
            continue
        err = max(r["check"]["rel_err"].values())
        lines.append(
            f"| {r['config']} | {r['tokens']} | {r['mode']} | {r['path']} | {r['median_us']:.1f} | "
            f"{r['GBps']:.4g} ({r['pct_copy_bw']:.2g}%) | {r['TFLOPs']:.3g} ({r['pct_gemm']:.2g}%) | "
            f"{r['floor_us']:.3g} | {r['median_us'] / r['floor_us']:.3g} | {r['check'].get('distinct_rows', '')} | "
            f"{err:.1e} | {r['check'].get('routing_flips', '')} |")
    skipped = [r for r in result["rows"] if "skipped" in r]
    if skipped:
        lines += ["", "## not timed", ""]
        lines += [f"- {r['config']} T={r['tokens']} {r['mode']} {r['path']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tile sweep
TUNE_SPACE = {
    "route": [dict(SPEC=s, BT=bt, BD=bd) for s, bt, bd in
              [(3, 1, 2048), (3, 1, 1024), (2, 1, 2048), (2, 2, 1024), (1, 1, 2048), (1, 4, 1024),
               (1, 8, 512), (1, 16, 256), (1, 32, 128), (1, 64, 64), (1, 32, 256), (1, 64, 128)]],
    "combine": [dict(BT=bt, BE=be, BD=bd) for bt, be, bd in
                [(1, 512, 16), (1, 256, 32), (1, 128, 64), (2, 128, 32), (4, 64, 32), (8, 16, 64),
                 (16, 8, 64), (32, 4, 64), (64, 2, 64), (32, 8, 32), (64, 4, 32), (32, 2, 128)]],
    "gcoef": [dict(BT=bt, BD=bd) for bt, bd in [(1, 1024), (1, 256), (4, 256), (8, 128), (16, 64), (32, 32), (16, 128)]],
}


def run_tune(args, out_dir: Path) -> dict:
    """Time the route and combine kernels alone for each tile choice (inference, opt1.3b)."""
    from treeffn.kernels import triton_tree as tt

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    timer = Timer(device, rep_ms=min(args.rep_ms, 50))
    out = []
    for name in args.configs:
        d, ffn, trees, depth = parse_preset(name)
        layer = make_tree(d, trees, depth, device, dtype, "node")
        w_in, b_in, w_out = (t.detach() for t in (layer.w_in, layer.b_in, layer.w_out))
        for T in args.tokens:
            x = torch.randn(T, d, device=device).to(dtype)
            tt.CONFIG_OVERRIDES.clear()
            z_ref, node_ref = tt.route(x, w_in, b_in, trees, depth, inference=True)
            y_ref = tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0)
            gz_ref = tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0)
            best = {}
            for kernel, space in TUNE_SPACE.items():
                for cfg in space:
                    bt = cfg.get("BT", 1)
                    if (bt > 1 and bt > 2 * T) or (T >= 2048 and bt < 4):
                        continue  # tiles far larger than the batch, or a million tiny programs
                    tt.CONFIG_OVERRIDES.clear()
                    tt.CONFIG_OVERRIDES[kernel] = cfg
                    try:
                        if kernel == "route":
                            z, node = tt.route(x, w_in, b_in, trees, depth, inference=True)
                            ok = torch.equal(node, node_ref)
                            t = timer(lambda: tt.route(x, w_in, b_in, trees, depth, inference=True))["median_us"]
                        elif kernel == "combine":
                            y = tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0)
                            ok = rel(y, y_ref) < 1e-2
                            t = timer(lambda: tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0))["median_us"]
                        else:  # backward's dL/dz, with dL/dy = x as a stand-in
                            gz = tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0)
                            ok = rel(gz, gz_ref) < 1e-3
                            t = timer(lambda: tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0))["median_us"]
                    except Exception as e:
                        out.append({"config": name, "tokens": T, "kernel": kernel, "tile": cfg, "error": str(e)[:200]})
                        continue
                    out.append({"config": name, "tokens": T, "kernel": kernel, "tile": cfg, "us": t, "ok": ok})
                    if ok and t < best.get(kernel, (1e30,))[0]:
                        best[kernel] = (t, cfg)
            tt.CONFIG_OVERRIDES.clear()
            defaults = {"route": tt.route_config(T, d, True), "combine": tt.combine_config(T, trees * (depth + 1), d),
                        "gcoef": tt.gcoef_config(T, depth + 1, d)}
            (out_dir / "tune.json").write_text(json.dumps({"tune": out}, indent=1))
            print(f"{name:<15} T={T:<6} " + "  ".join(
                f"{k}: best {v[0]:.1f} us {v[1]} (default {defaults[k]})" for k, v in best.items()), flush=True)
    return {"tune": out}


# --------------------------------------------------------------------------- loss curves
class TinyTreeLM(torch.nn.Module):
    """A small pre-LN decoder whose MLPs are TreeFFN layers: self-contained (torch only), so the
    comparison runs wherever the kernels run, without the training stack's dependencies."""

    def __init__(self, vocab, d, layers, heads, depth, trees, placement, impl):
        from treeffn import TreeFFN

        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(1024, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict({
                "ln1": torch.nn.LayerNorm(d), "qkv": torch.nn.Linear(d, 3 * d), "proj": torch.nn.Linear(d, d),
                "ln2": torch.nn.LayerNorm(d), "ffn": TreeFFN(d, depth, trees, placement=placement, impl=impl),
            }))
        self.ln = torch.nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if hasattr(m, "track_stats"):
                m.track_stats = False

    def forward(self, ids):
        B, S = ids.shape
        h = self.embed(ids) + self.pos(torch.arange(S, device=ids.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1)
            h = h + blk["proj"](a)
            h = h + blk["ffn"](blk["ln2"](h))
        return F.linear(self.ln(h), self.embed.weight)


def run_loss_curve(args) -> dict:
    """Train one small tree LM three ways from one seed: masked bf16, triton bf16, masked fp32.

    Same initial weights and batches. The bf16-vs-fp32 gap shows the size of bf16 noise; the
    triton run should stay about as close to masked as that.
    """
    import tokenizers

    from treeffn.data.corpus import EMBEDDED_TOKENIZER, read_documents

    device = torch.device(args.device)
    tok = tokenizers.Tokenizer.from_file(str(EMBEDDED_TOKENIZER))
    text = "\n".join(doc["text"] for doc in read_documents("shakespeare")[:8])
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    block, batch = args.loss_block, args.loss_batch
    n_blocks = ids.numel() // (block + 1)
    blocks = ids[: n_blocks * (block + 1)].view(n_blocks, block + 1)
    shape = dict(d=256, layers=4, heads=4, depth=5, trees=16)  # 16 x 63 = 1008 nodes ~ ffn 1024
    curves = {}
    from treeffn.kernels import triton_tree as tt

    auto_max = tt.GATHER_MAX_TOKENS
    for label, impl, bf16 in (("masked-bf16", "masked", True), ("triton-bf16", "triton", True),
                              ("triton-gather-bf16", "triton", True), ("masked-fp32", "masked", False)):
        # triton-bf16 runs mode auto (the GEMM form at this batch); triton-gather forces the
        # path-only kernels in forward and backward.
        tt.GATHER_MAX_TOKENS = 1 << 40 if label == "triton-gather-bf16" else auto_max
        torch.manual_seed(args.seed)
        model = TinyTreeLM(tok.get_vocab_size(), placement=args.placement, impl=impl, **shape).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(args.seed)
        losses = []
        t0 = time.perf_counter()
        for _ in range(args.loss_curve):
            b = blocks[torch.randint(0, n_blocks, (batch,), generator=gen)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(b[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        curves[label] = {"losses": losses, "wall_s": time.perf_counter() - t0}
        print(f"{label}: first {losses[0]:.4f}  last {losses[-1]:.4f}  ({curves[label]['wall_s']:.1f} s)", flush=True)
        del model, opt
    tt.GATHER_MAX_TOKENS = auto_max
    a, b, c = (curves[k]["losses"] for k in ("masked-bf16", "triton-bf16", "masked-fp32"))
    g = curves["triton-gather-bf16"]["losses"]
    tail = max(1, len(a) // 5)
    summary = {
        "max_abs_diff_triton_vs_masked": max(abs(p - q) for p, q in zip(a, b)),
        "max_abs_diff_triton_gather_vs_masked": max(abs(p - q) for p, q in zip(a, g)),
        "mean_last_triton_gather_bf16": statistics.mean(g[-tail:]),
        "max_abs_diff_bf16_vs_fp32": max(abs(p - q) for p, q in zip(a, c)),
        "mean_last_masked_bf16": statistics.mean(a[-tail:]), "mean_last_triton_bf16": statistics.mean(b[-tail:]),
        "mean_last_masked_fp32": statistics.mean(c[-tail:]), "steps": len(a), "tail_steps": tail,
        "loss_at (masked, triton, triton-gather, masked-fp32)": {
            str(i): [round(a[i], 4), round(b[i], 4), round(g[i], 4), round(c[i], 4)]
                    for i in sorted({0, len(a) // 4, len(a) // 2, 3 * len(a) // 4, len(a) - 1})},
    }
    print(json.dumps(summary, indent=1), flush=True)
    return {"loss_curve": {"curves": curves, "summary": summary, "model": shape, "placement": args.placement,
                           "batch": batch, "block": block}}


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench",
        description="Tree-FFN layer speed vs a dense MLP: every path checked against float64, then timed.")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (auto: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--configs", default=",".join(PRESETS),
                   help=f"comma list of {', '.join(PRESETS)} or custom:d,ffn,K,D")
    p.add_argument("--tokens", default=None, help="comma list (default 1,16,128,2048,16384 on GPU; 1,16,128 on CPU)")
    p.add_argument("--paths", default=None, help="comma list of dense, masked, gather, triton (mode auto), "
                   "triton_gather, triton_dense (default: all that run here)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd or both")
    p.add_argument("--placement", default="node", choices=["node", "post_sum"])
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed milliseconds per measurement (about)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output dir (default outputs/bench/<date-time>)")
    p.add_argument("--tune", action="store_true", help="time the Triton kernels' tile choices instead")
    p.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                   help="train a small OPT with tree.impl=masked and =triton for STEPS steps each and compare")
    p.add_argument("--loss-batch", type=int, default=32, help="sequences per step for --loss-curve")
    p.add_argument("--loss-block", type=int, default=128, help="tokens per sequence for --loss-curve")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("treeffn bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.configs = [c for c in args.configs.split(",") if c] if "custom:" not in args.configs else [args.configs]
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(TOKENS_GPU if on_gpu else TOKENS_CPU)
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            print(f"treeffn bench: --modes {m!r} is not allowed; choose fwd, fwdbwd", file=sys.stderr)
            return 2
    from treeffn.kernels import triton_available

    can_triton = triton_available() and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1")
    default_paths = ["dense", "masked", "gather"] + (list(TRITON_MODES) if can_triton else [])
    args.paths = [p for p in args.paths.split(",") if p] if args.paths else default_paths
    out_dir = Path(args.out or Path("outputs") / "bench" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tune:
        result = run_tune(args, out_dir)
        return 0
    if args.loss_curve:
        result = run_loss_curve(args)
        (out_dir / "loss_curve.json").write_text(json.dumps(result, indent=1))
        return 0
    if not can_triton:
        print("# triton path not run: " + ("Triton is not installed" if not triton_available()
                                          else "no CUDA device (TRITON_INTERPRET=1 runs it slowly)"), flush=True)
    result = run_bench(args, out_dir)
    md = markdown(result)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    if result["failures"]:
        print(f"treeffn bench: {result['failures']} path(s) failed the float64 check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
