"""The layer benchmark: every tree path against the dense MLP, per preset, token count and mode.

For each (config, tokens, mode): check every path against float64 (problems.py), then time the
ones that passed twice (timing.py): the host-inclusive loop (rounds in alternating path order,
medians; the headline and the speed-up vs dense) and the GPU-only per-call time (diagnostic).
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from treeffn.bench.problems import (
    DTYPES,
    GATHER_FWDBWD_MAX_TOKENS,
    call_closure,
    check_dense,
    check_tree,
    cost,
    dense_mlp,
    make_dense,
    make_tree,
    parse_preset,
    tree_fn,
)
from treeffn.bench.timing import Timer, environment, measure_ceilings, rotation_copies, sync

LOOP_ROUNDS = 5


def _skip_reason(path: str, mode: str, T: int) -> str | None:
    if path in ("gather", "triton_gather_sparse") and mode == "fwdbwd" and T > GATHER_FWDBWD_MAX_TOKENS:
        return f"{path} fwd+bwd above {GATHER_FWDBWD_MAX_TOKENS} tokens"
    if path == "triton_gather_sparse" and mode == "fwd":
        return "its forward is triton_gather's"
    if path == "triton_decode" and mode == "fwdbwd":
        return "the decode kernel is inference only"
    if path == "triton_decode":
        from treeffn.kernels.triton_decode import DECODE_MAX_TOKENS

        if T > DECODE_MAX_TOKENS:
            return f"the decode kernel is for up to {DECODE_MAX_TOKENS} tokens"
    return None


def run_layer_bench(args, out_dir: Path | None = None) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, rep_ms=args.rep_ms)
    torch.manual_seed(args.seed)
    env = environment(device)
    print(f"# treeffn bench  {env['date']}  {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"dtype {args.dtype}  load average {env['load_average_1_5_15']}", flush=True)
    ceilings = measure_ceilings(device, dtype, timer)
    print(f"# ceilings: copy {ceilings['copy_GBps']:.0f} GB/s (read+write), GEMM {ceilings['gemm']} "
          f"{ceilings['gemm_TFLOPs']:.1f} TFLOP/s", flush=True)
    elt = torch.tensor([], dtype=dtype).element_size()
    rows, failures = [], 0
    for name in args.configs:
        d, ffn, trees, depth = parse_preset(name)
        copies = rotation_copies(device, (2 * ffn * d) * elt)
        dense = [make_dense(d, ffn, device, dtype) for _ in range(copies)]
        first = make_tree(d, trees, depth, device, dtype, args.placement)
        layers = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]
        for T in args.tokens:
            for mode in args.modes:
                base = {"config": name, "d": d, "ffn": ffn, "trees": trees, "depth": depth, "tokens": T, "mode": mode}
                xs = [torch.randn(T, d, device=device).to(dtype) for _ in range(copies)]
                for p in [*(t for ps in dense for t in ps), *(q for lay in layers for q in lay.parameters())]:
                    p.requires_grad_(mode != "fwd")  # gradients only where they are timed
                results, loops = {}, {}
                for path in args.paths:
                    reason = _skip_reason(path, mode, T)
                    if reason:
                        if path != "triton_gather_sparse" or mode != "fwd":
                            results[path] = {"skipped": reason}
                        continue
                    try:
                        if path == "dense":
                            check = check_dense(dense[0], T, mode, dtype, device)
                            fns = [call_closure(lambda inp, ps=ps: dense_mlp(inp, *ps), x, ps, mode)
                                   for x, ps in zip(xs, dense)]
                        else:
                            check = check_tree(path, first, T, mode, dtype, device)
                            fns = [call_closure(tree_fn(path, lay), x, [lay.w_in, lay.b_in, lay.w_out], mode)
                                   for x, lay in zip(xs, layers)]
                    except Exception as e:  # a path that cannot run here is reported, not fatal
                        results[path] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                        continue
                    entry = {"check": check}
                    if not check["ok"]:
                        failures += 1
                        entry["skipped"] = "failed the float64 check; not timed"
                    else:
                        entry.update(timer.gpu(fns[0]))
                        loops[path] = fns
                    results[path] = entry
                _loop_rounds(timer, loops, results)
                _rates(results, d, ffn, trees, depth, T, mode, elt, ceilings)
                for path, entry in results.items():
                    rows.append({**base, "path": path, **entry})
                print_line(base, results)
                del xs
            if out_dir is not None:  # partial results survive a run cut short
                partial = {"environment": env, "ceilings": ceilings, "args": vars(args), "rows": rows,
                           "failures": failures, "partial": True}
                (out_dir / "bench.json").write_text(json.dumps(partial, indent=1))
        del dense, layers, first
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"environment": env, "ceilings": ceilings, "args": vars(args), "rows": rows, "failures": failures}


def _loop_rounds(timer: Timer, loops: dict, results: dict) -> None:
    """Host-inclusive loop time of every timed path: LOOP_ROUNDS rounds, the path order reversed
    every other round, median per path."""
    if not loops:
        return
    names = list(loops)
    calls = {p: timer.loop_calls(loops[p], results[p]["gpu_us"] + results[p]["host_enqueue_us"]) for p in names}
    for p in names:  # warm every copy once
        for fn in loops[p]:
            fn()
    sync(timer.device)
    per = {p: [] for p in names}
    for r in range(LOOP_ROUNDS):
        for p in (names if r % 2 == 0 else names[::-1]):
            per[p].append(timer.loop_round(loops[p], calls[p]))
    for p in names:
        results[p].update({"loop_us": statistics.median(per[p]), "loop_us_rounds": per[p], "loop_calls": calls[p],
                           "loop_weight_copies": len(loops[p])})


def _rates(results, d, ffn, trees, depth, T, mode, elt, ceilings) -> None:
    dense = results.get("dense", {})
    for path, e in results.items():
        if "gpu_us" not in e:
            continue
        kind = "dense" if path == "dense" else "tree"
        nbytes, flops = cost(kind, d, ffn, trees, depth, T, mode, elt, e["check"].get("distinct_rows"))
        t = e["gpu_us"]
        e.update({"bytes_min": nbytes, "flops": flops, "GBps": nbytes / t / 1e3, "TFLOPs": flops / t / 1e6,
                  "pct_copy_bw": 100 * nbytes / t / 1e3 / ceilings["copy_GBps"],
                  "pct_gemm": 100 * flops / t / 1e6 / ceilings["gemm_TFLOPs"],
                  "floor_us": max(nbytes / ceilings["copy_GBps"] / 1e3, flops / ceilings["gemm_TFLOPs"] / 1e6)})
        if "loop_us" in dense and "loop_us" in e:
            e["speedup_vs_dense"] = dense["loop_us"] / e["loop_us"]
        if "gpu_us" in dense:
            e["gpu_only_speedup_vs_dense"] = dense["gpu_us"] / e["gpu_us"]


def print_line(base, results):
    parts = [f"{base['config']:<15} T={base['tokens']:<6} {base['mode']:<6}"]
    for path, e in results.items():
        if "loop_us" in e:
            sp = e.get("speedup_vs_dense")
            parts.append(f"{path} {e['loop_us']:9.1f} us" + (f" ({sp:5.2f}x)" if path != "dense" and sp else "")
                         + f" [gpu-only {e['gpu_us']:.1f}]")
        else:
            parts.append(f"{path} --")
    print("  ".join(parts), flush=True)
