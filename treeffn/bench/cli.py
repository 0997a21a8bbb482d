"""``treeffn bench``: its settings (conf/bench.yaml), their checks, and dispatch to a mode.

The command line is cli/bench.py (key=value overrides, as every verb); run_bench() takes the
resolved settings. A setting that cannot work raises BenchInputError with one line naming it;
the CLI prints that line and exits 2.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from treeffn.bench.problems import DTYPES, PATHS, TRITON_MODES, BenchInputError, parse_preset, split_configs

MODES = ("layer", "decode", "tune", "loss_curve")
TOKENS_GPU = (1, 16, 128, 2048, 16384)
TOKENS_CPU = (1, 16, 128)
MAX_TOKENS = 1 << 20
DECODE_PRESETS = ("tiny", "gpt2_tiny", "llama_tiny", "opt125m", "opt350m", "opt1.3b", "opt2.7b", "gpt2_124m", "llama_1b")


def write_record(out_dir, name: str, result: dict, md: str) -> None:
    """<name>.json (the raw record) and <name>.md beside it; the table is printed too."""
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir / f'{name}.json'} and {out_dir / f'{name}.md'}")


def bench_args(cfg: dict) -> SimpleNamespace:
    """conf/bench.yaml's settings (resolved, plain data), checked, as the attributes the modes
    read (``args.decode_model``, ``args.loss_batch``, ...; scripts/h200_decode.py builds the same)."""
    import torch

    decode, loss = cfg.get("decode") or {}, cfg.get("loss_curve") or {}
    mode = cfg.get("mode", "layer")
    _choice("mode", mode, MODES)
    device = str(cfg.get("device", "auto"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BenchInputError(f"device={device!r} is not allowed; choose auto, cuda, cuda:<n> or cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise BenchInputError(f"device={device} but no CUDA device is visible")
    dtype = cfg.get("dtype") or ("bf16" if on_gpu else "fp32")
    _choice("dtype", dtype, sorted(DTYPES))
    rep_ms = cfg.get("rep_ms", 100.0)
    if isinstance(rep_ms, bool) or not isinstance(rep_ms, (int, float)) or rep_ms <= 0:
        raise BenchInputError(f"rep_ms={rep_ms!r} is not allowed; it must be a positive number of milliseconds")
    configs = split_configs(_text(cfg.get("configs")) or "")
    if not configs:
        raise BenchInputError("configs is empty; give presets or custom:d,ffn,K,D, e.g. configs=[opt125m-K24-D6]")
    for name in configs:
        parse_preset(name)
    tokens = cfg.get("tokens")
    tokens = _int_list("tokens", tokens, 1, MAX_TOKENS) if tokens is not None else list(TOKENS_GPU if on_gpu
                                                                                        else TOKENS_CPU)
    modes = _list("modes", cfg.get("modes", ["fwd", "fwdbwd"]))
    for m in modes:
        _choice("modes", m, ("fwd", "fwdbwd"))
    from treeffn.kernels import triton_available

    can_triton = triton_available() and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1")
    paths = cfg.get("paths")
    paths = _list("paths", paths) if paths is not None else ["dense", "masked", "gather"] + (
        list(TRITON_MODES) if can_triton else [])
    for p in paths:
        _choice("paths", p, PATHS)
        if p in TRITON_MODES and not can_triton:
            raise BenchInputError(f"paths: {p} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    _choice("placement", cfg.get("placement", "node"), ("node", "post_sum"))
    if mode == "decode":
        _choice("decode.model", decode.get("model"), DECODE_PRESETS)
        if decode.get("layers") is not None:
            _integer("decode.layers", decode["layers"], 1)
    return SimpleNamespace(
        mode=mode, device=device, dtype=dtype, configs=configs, tokens=tokens, paths=paths, modes=modes,
        can_triton=can_triton, placement=cfg.get("placement", "node"), rep_ms=float(rep_ms),
        seed=_integer("seed", cfg.get("seed", 0), 0), out=None if cfg.get("out") is None else str(cfg["out"]),
        loss_curve=_integer("loss_curve.steps", loss.get("steps", 200), 1),
        loss_batch=_integer("loss_curve.batch", loss.get("batch", 32), 1),
        loss_block=_integer("loss_curve.block", loss.get("block", 128), 2),
        decode_model=decode.get("model", "opt1.3b"),
        decode_batches=_int_list("decode.batches", decode.get("batches", [1, 8, 32]), 1, 1024),
        decode_prompt=_integer("decode.prompt", decode.get("prompt", 32), 1),
        decode_new=_integer("decode.new", decode.get("new", 128), 2),
        decode_rounds=_integer("decode.rounds", decode.get("rounds", 5), 1),
        decode_depth=_integer("decode.depth", decode.get("depth", 6), 0),
        decode_layers=decode.get("layers"))


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise BenchInputError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _text(value) -> str | None:
    """A list setting as comma text (what split_configs parses: ``custom:d,ffn,K,D`` holds commas)."""
    if value is None:
        return None
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _list(key: str, value) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise BenchInputError(f"{key} is empty")
    return items


def _integer(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BenchInputError(f"{key}={value!r} is not allowed; it must be an integer >= {low}")
    return value


def _int_list(key: str, value, low: int, high: int) -> list[int]:
    values = _list(key, value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise BenchInputError(f"{key} takes integers, e.g. {key}=[1,16]; got {v!r}")
        if not low <= v <= high:
            raise BenchInputError(f"{key}: {v} is out of range; each value must be {low}..{high}")
    return values


def run_bench(cfg: dict) -> int:
    """Run the mode conf/bench.yaml's ``mode`` names; the exit status (1: a path failed its check)."""
    args = bench_args(cfg)
    out_dir = Path(args.out or Path("outputs") / "bench" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "tune":
        from treeffn.bench.tune import run_tune

        run_tune(args, out_dir)
        return 0
    if args.mode == "loss_curve":
        from treeffn.bench.loss_curve import run_loss_curve

        result = run_loss_curve(args)
        (out_dir / "loss_curve.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.mode == "decode":
        from treeffn.bench.decode import decode_markdown, run_decode_bench

        result = run_decode_bench(args)
        write_record(out_dir, "decode", result, decode_markdown(result))
        return 0
    from treeffn.bench.layer import run_layer_bench
    from treeffn.bench.report import markdown
    from treeffn.kernels import triton_available

    if not args.can_triton:
        print("# triton paths not run: " + ("Triton is not installed" if not triton_available()
                                           else "no CUDA device (TRITON_INTERPRET=1 runs them slowly)"), flush=True)
    result = run_layer_bench(args, out_dir)
    write_record(out_dir, "bench", result, markdown(result))
    if result["failures"]:
        print(f"treeffn bench: {result['failures']} path(s) failed the float64 check", file=sys.stderr)
        return 1
    return 0
