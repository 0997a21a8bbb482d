"""``treeffn bench mode=tune``: a measurement of tile candidates for the Triton kernels.

The kernels run fixed tiles (``route_config``, ``combine_config``, ``gcoef_config`` in
triton_tree.py, ``decode_config`` in triton_decode.py): nothing here changes what they run. This
module times the candidates below against those fixed tiles, each passed to the launcher for
one call (``tile=``), and writes tune.json; a fixed table is changed by editing it, with the
record cited. Kernels: route / combine / gcoef (the multi-launch path-only kernels) and decode
(the one-launch inference kernel). Times are GPU-only medians (timing.py); a candidate whose
output differs from the fixed tile's is reported and never counted as best.
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
                placement: str = "node", space: list[dict] | None = None) -> list[dict]:
    """Every tile of ``space`` (default DECODE_SPACE) at each token count: checked against the
    fixed tile's output and path, then timed (GPU-only). Returns one record per (tokens, tile)."""
    from treeffn.kernels import triton_decode as td

    layer = make_tree(d, trees, depth, device, dtype, placement)
    w_in, b_in, w_out = (t.detach() for t in (layer.w_in, layer.b_in, layer.w_out))
    out = []
    for T in tokens:
        x = torch.randn(T, d, device=device).to(dtype)
        y_ref, node_ref = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu")
        fixed = td.decode_config(T, d, trees, depth + 1)
        for tile in space or DECODE_SPACE:
            def call(tile=tile):
                return td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu", tile=tile)

            try:
                y, node = call()
                ok = torch.equal(node, node_ref) and rel(y, y_ref) < 1e-2
                us = timer.gpu(call)
                out.append({"tokens": T, "tile": tile, "fixed": fixed, "ok": ok, "gpu_us": us["gpu_us"],
                            "host_enqueue_us": us["host_enqueue_us"]})
            except Exception as e:  # a tile the compiler rejects (registers, shared memory)
                out.append({"tokens": T, "tile": tile, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return out


def best_decode_tiles(records: list[dict]) -> dict[int, dict]:
    """tokens -> the fastest candidate that agreed with the fixed tile."""
    best: dict[int, dict] = {}
    for r in records:
        if r.get("ok") and (r["tokens"] not in best or r["gpu_us"] < best[r["tokens"]]["gpu_us"]):
            best[r["tokens"]] = r
    return best


def _path_kernel_calls(tt, x, w_in, b_in, w_out, trees: int, depth: int, dtype):
    """kernel -> (fixed-tile reference output, call(tile) -> output, check(output, reference))."""
    z_ref, node_ref = tt.route(x, w_in, b_in, trees, depth, inference=True)
    return {
        "route": ((z_ref, node_ref), lambda tile: tt.route(x, w_in, b_in, trees, depth, inference=True, tile=tile),
                  lambda out, ref: torch.equal(out[1], ref[1])),
        "combine": (tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0),
                    lambda tile: tt.combine(z_ref, node_ref, w_out, depth, dtype, True, False, 0, tile=tile),
                    lambda out, ref: rel(out, ref) < 1e-2),
        # backward's dL/dz, with dL/dy = x as a stand-in
        "gcoef": (tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0),
                  lambda tile: tt.grad_coef(x, z_ref, node_ref, w_out, depth, True, 0, tile=tile),
                  lambda out, ref: rel(out, ref) < 1e-3),
    }


def run_tune(args, out_dir: Path) -> dict:
    """Time the route, combine, gcoef and decode kernels alone for each tile candidate (inference)."""
    from treeffn.kernels import triton_tree as tt
    from treeffn.kernels.triton_decode import DECODE_MAX_TOKENS

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    timer = Timer(device, rep_ms=min(args.rep_ms, 50))
    out = []
    for name in args.configs:
        d, ffn, trees, depth = parse_preset(name)
        layer = make_tree(d, trees, depth, device, dtype, "node")
        w_in, b_in, w_out = (t.detach() for t in (layer.w_in, layer.b_in, layer.w_out))
        for T in args.tokens:
            x = torch.randn(T, d, device=device).to(dtype)
            fixed = {"route": tt.route_config(T, d, True), "combine": tt.combine_config(T, trees * (depth + 1), d),
                     "gcoef": tt.gcoef_config(T, depth + 1, d)}
            best = {}
            for kernel, (ref, call, check) in _path_kernel_calls(tt, x, w_in, b_in, w_out, trees, depth, dtype).items():
                for tile in TUNE_SPACE[kernel]:
                    bt = tile.get("BT", 1)
                    if (bt > 1 and bt > 2 * T) or (T >= 2048 and bt < 4):
                        continue  # tiles far larger than the batch, or a million tiny programs
                    try:
                        ok = check(call(tile), ref)
                        t = timer.gpu(lambda: call(tile))["gpu_us"]
                    except Exception as e:
                        out.append({"config": name, "tokens": T, "kernel": kernel, "tile": tile, "error": str(e)[:200]})
                        continue
                    out.append({"config": name, "tokens": T, "kernel": kernel, "tile": tile, "fixed": fixed[kernel],
                                "gpu_us": t, "ok": ok})
                    if ok and t < best.get(kernel, (1e30,))[0]:
                        best[kernel] = (t, tile)
            print(f"{name:<15} T={T:<6} " + "  ".join(
                f"{k}: best {v[0]:.1f} us {v[1]} (fixed {fixed[k]})" for k, v in best.items()), flush=True)
        decode_tokens = [T for T in args.tokens if T <= DECODE_MAX_TOKENS]
        for r in tune_decode(device, dtype, d, trees, depth, decode_tokens, timer):
            out.append({"config": name, "kernel": "decode", **r})
        for T, r in best_decode_tiles([r for r in out if r.get("kernel") == "decode" and r["config"] == name]).items():
            print(f"{name:<15} T={T:<6} decode: best {r['gpu_us']:.1f} us {r['tile']} (fixed {r['fixed']})",
                  flush=True)
        (out_dir / "tune.json").write_text(json.dumps({"tune": out}, indent=1))
    return {"tune": out}
