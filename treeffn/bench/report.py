"""Markdown tables of a layer benchmark result (bench.json -> bench.md)."""

from __future__ import annotations


def _cell(r: dict, path: str, key: str, speed_key: str) -> str:
    if key not in r:
        return "skip" if "skipped" in r else "—"
    if path == "dense" or speed_key not in r:
        return f"{r[key]:.1f}"
    return f"{r[key]:.1f} ({r[speed_key]:.2f}×)"


def _table(result: dict, mode: str, key: str, speed_key: str) -> list[str]:
    paths = [p for p in result["args"]["paths"] if any(r["path"] == p and r["mode"] == mode for r in result["rows"])]
    lines = ["| config | tokens | " + " | ".join(paths) + " |", "|" + "---|" * (2 + len(paths))]
    keyed: dict = {}
    for r in result["rows"]:
        if r["mode"] == mode:
            keyed.setdefault((r["config"], r["tokens"]), {})[r["path"]] = r
    for (config, T), by_path in keyed.items():
        cells = [_cell(by_path.get(p, {}), p, key, speed_key) for p in paths]
        lines.append(f"| {config} | {T} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    gpu = "cuda" in str(result["args"].get("device", ""))
    lines = [
        f"# treeffn bench — {env['date']}", "",
        f"- device: {env['device_name']}; torch {env['torch']}; triton {env['triton']}; "
        f"dtype {result['args']['dtype']}; placement {result['args']['placement']}; "
        f"load average (1, 5, 15 min) {env.get('load_average_1_5_15')}",
        f"- command: `{env['command']}`",
        f"- measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), "
        f"GEMM {ceil['gemm']} {ceil['gemm_TFLOPs']:.1f} TFLOP/s",
        "- **loop µs** (what a user waits for): wall time per call of a loop of calls over "
        f"{'several weight copies larger than the L2' if gpu else 'several weight copies larger than the L3'}, "
        "synchronised at the end, host time included; median of rounds in alternating path order. "
        "(×) = dense loop time / path loop time, above 1 is faster than dense.",
        "- **GPU-only µs** (a diagnostic, not a speed-up): " + (
            "CUDA events per call, L2 flushed before each call, a spin kernel hides the host's enqueue."
            if gpu else "on the CPU: wall time of single calls, cache flushed before each."),
        "- triton = tree.impl=triton (mode auto: the one-launch decode kernel for inference up to 64 tokens); "
        "triton_decode = that kernel forced; triton_gather = the path-rows-only route + combine kernels; "
        "triton_dense = GEMM form with the Triton routing kernel", "",
    ]
    for mode in result["args"]["modes"]:
        title = "forward (inference)" if mode == "fwd" else "forward + backward (training)"
        lines += [f"## {title}: loop µs per call, host included", ""]
        lines += _table(result, mode, "loop_us", "speedup_vs_dense")
        lines += [f"## {title}: GPU-only µs per call (diagnostic)", ""]
        lines += _table(result, mode, "gpu_us", "gpu_only_speedup_vs_dense")
    lines += ["## achieved rates vs the measured ceilings (from the GPU-only time)", "",
              "| config | tokens | mode | path | GPU-only µs | GB/s (% copy) | TFLOP/s (% GEMM) | floor µs | × floor | "
              "rows touched | max rel err | flips |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "gpu_us" not in r:
            continue
        err = max(r["check"]["rel_err"].values())
        lines.append(
            f"| {r['config']} | {r['tokens']} | {r['mode']} | {r['path']} | {r['gpu_us']:.1f} | "
            f"{r['GBps']:.4g} ({r['pct_copy_bw']:.2g}%) | {r['TFLOPs']:.3g} ({r['pct_gemm']:.2g}%) | "
            f"{r['floor_us']:.3g} | {r['gpu_us'] / r['floor_us']:.3g} | {r['check'].get('distinct_rows', '')} | "
            f"{err:.1e} | {r['check'].get('routing_flips', '')} |")
    skipped = [r for r in result["rows"] if "skipped" in r]
    if skipped:
        lines += ["", "## not timed", ""]
        lines += [f"- {r['config']} T={r['tokens']} {r['mode']} {r['path']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines) + "\n"
