"""``treeffn bench mode=tune``: tile choices of the Triton kernels, each checked, then timed.

Kernels: route / combine / gcoef (the multi-launch path-only kernels) and decode (the one-launch
inference kernel of triton_decode.py). Times are GPU-only medians (timing.py), a diagnostic for
choosing tiles; a tile whose output differs from the default's is reported and not chosen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from treeffn.bench.problems import DTYPES, make_tree, parse_preset, rel
from treeffn.bench.timing import Timer

TUNE_SPACE = {
    "route": [dict(SPEC=s, BT=bt, BD=bd) for s, bt, bd in
              [(3, 1, 2048), (3, 1, 1024), (2, 1, 2048), (2, 2, 1024), (1, 1, 2048), (1, 4, 1024),
               (1, 8, 512), (1, 16, 256), (1, 32, 128), (1, 64, 64), (1, 32, 256), (1, 64, 128)]],
    "combine": [dict(BT=bt, BE=be, BD=bd) for bt, be, bd in
                [(1, 512, 16), (1, 256, 32), (1, 128, 64), (2, 128, 32), (4, 64, 32), (8, 16, 64),
                 (16, 8, 64), (32, 4, 64), (64, 2, 64), (32, 8, 32), (64, 4, 32), (32, 2, 128)]],
    "gcoef": [dict(BT=bt, BD=bd) for bt, bd in [(1, 1024), (1, 256), (4, 256), (8, 128), (16, 64), (32, 32), (16, 128)]],
}
# The decode kernel: trees per program, levels per routing round, columns per load (and warps).
DECODE_SPACE = [dict(KB=kb, SPEC=s, BD=bd, num_warps=w) for kb, s, bd, w in
                [(1, 2, 1024, 4), (1, 2, 2048, 8), (1, 3, 1024, 8), (1, 1, 2048, 4), (2, 2, 1024, 8),
                 (1, 2, 512, 4), (4, 2, 512, 8), (1, 3, 512, 4)]]


def tune_decode(device, dtype, d: int, trees: int, depth: int, tokens: list[int], timer: Timer,
                placement: str = "node") -> list[dict]:
    """Every DECODE_SPACE tile at each token count: checked against the default tile's output and
    path, then timed (GPU-only). Returns one record per (tokens, tile)."""
    from treeffn.kernels import triton_decode as td

    layer = make_tree(d, trees, depth, device, dtype, placement)
    w_in, b_in, w_out = (t.detach() for t in (layer.w_in, layer.b_in, layer.w_out))
    saved = dict(td.CONFIG_OVERRIDES)
    out = []
    try:
        for T in tokens:
            x = torch.randn(T, d, device=device).to(dtype)
            td.CONFIG_OVERRIDES.clear()
            y_ref, node_ref = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu")
            default = td.decode_config(T, d, trees, depth + 1)
            for cfg in DECODE_SPACE:
                td.CONFIG_OVERRIDES.clear()
                td.CONFIG_OVERRIDES.update(cfg)
                try:
                    y, node = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu")
                    ok = torch.equal(node, node_ref) and rel(y, y_ref) < 1e-2
                    us = timer.gpu(lambda: td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu"))
                    out.append({"tokens": T, "tile": cfg, "default": default, "ok": ok, "gpu_us": us["gpu_us"],
                                "host_enqueue_us": us["host_enqueue_us"]})
                except Exception as e:  # a tile the compiler rejects (registers, shared memory)
                    out.append({"tokens": T, "tile": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    finally:
        td.CONFIG_OVERRIDES.clear()
        td.CONFIG_OVERRIDES.update(saved)
    return out


def best_decode_tiles(records: list[dict]) -> dict[int, dict]:
    """tokens -> the fastest tile that agreed with the default."""
    best: dict[int, dict] = {}
    for r in records:
        if r.get("ok") and (r["tokens"] not in best or r["gpu_us"] < best[r["tokens"]]["gpu_us"]):
            best[r["tokens"]] = r
    return best


def run_tune(args, out_dir: Path) -> dict:
    """Time the route, combine, gcoef and decode kernels alone for each tile choice (inference)."""
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
                            t = timer.gpu(lambda: tt.route(x, w_in, b_in, trees, depth, inference=True))["gpu_us"]
                        elif kernel == "combine":
                            y = tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0)
                            ok = rel(y, y_ref) < 1e-2
                            t = timer.gpu(lambda: tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0))["gpu_us"]
                        else:  # backward's dL/dz, with dL/dy = x as a stand-in
                            gz = tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0)
                            ok = rel(gz, gz_ref) < 1e-3
                            t = timer.gpu(lambda: tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0))["gpu_us"]
                    except Exception as e:
                        out.append({"config": name, "tokens": T, "kernel": kernel, "tile": cfg, "error": str(e)[:200]})
                        continue
                    out.append({"config": name, "tokens": T, "kernel": kernel, "tile": cfg, "gpu_us": t, "ok": ok})
                    if ok and t < best.get(kernel, (1e30,))[0]:
                        best[kernel] = (t, cfg)
            tt.CONFIG_OVERRIDES.clear()
            defaults = {"route": tt.route_config(T, d, True), "combine": tt.combine_config(T, trees * (depth + 1), d),
                        "gcoef": tt.gcoef_config(T, depth + 1, d)}
            print(f"{name:<15} T={T:<6} " + "  ".join(
                f"{k}: best {v[0]:.1f} us {v[1]} (default {defaults[k]})" for k, v in best.items()), flush=True)
        from treeffn.kernels.triton_decode import DECODE_MAX_TOKENS

        decode_tokens = [T for T in args.tokens if T <= DECODE_MAX_TOKENS]
        for r in tune_decode(device, dtype, d, trees, depth, decode_tokens, timer):
            out.append({"config": name, "kernel": "decode", **r})
        for T, r in best_decode_tiles([r for r in out if r.get("kernel") == "decode" and r["config"] == name]).items():
            print(f"{name:<15} T={T:<6} decode: best {r['gpu_us']:.1f} us {r['tile']} (default {r['default']})",
                  flush=True)
        (out_dir / "tune.json").write_text(json.dumps({"tune": out}, indent=1))
    return {"tune": out}
