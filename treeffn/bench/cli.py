"""``treeffn bench`` options, their checks (one line and exit 2 on bad input), and dispatch."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from treeffn.bench.problems import DTYPES, PATHS, PRESETS, TRITON_MODES, BenchInputError, parse_preset, split_configs

TOKENS_GPU = (1, 16, 128, 2048, 16384)
TOKENS_CPU = (1, 16, 128)
MAX_TOKENS = 1 << 20
DECODE_PRESETS = ("tiny", "gpt2_tiny", "llama_tiny", "opt125m", "opt350m", "opt1.3b", "opt2.7b", "gpt2_124m", "llama_1b")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        print(f"treeffn bench: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def write_record(out_dir, name: str, result: dict, md: str) -> None:
    """<name>.json (the raw record) and <name>.md beside it; the table is printed too."""
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir / f'{name}.json'} and {out_dir / f'{name}.md'}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="treeffn bench",
        description="Tree-FFN speed vs a dense MLP: every path checked against float64, then timed. Per call "
                    "two figures: the host-inclusive loop time (what a user waits for) and the GPU-only time "
                    "(a diagnostic). --decode: tokens/s of whole models through treeffn's decode loop.")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (auto: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--configs", default=",".join(PRESETS),
                   help=f"comma list of {', '.join(PRESETS)} or custom:d,ffn,K,D")
    p.add_argument("--tokens", default=None, help="comma list (default 1,16,128,2048,16384 on GPU; 1,16,128 on CPU)")
    p.add_argument("--paths", default=None, help=f"comma list of {', '.join(PATHS)} (default: all that run here)")
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
    p.add_argument("--decode", action="store_true",
                   help="end-to-end decode: tokens/s of a dense and a tree model (random init), eager and graphed")
    p.add_argument("--decode-model", default="opt1.3b", help=f"model preset for --decode ({', '.join(DECODE_PRESETS)})")
    p.add_argument("--decode-batches", default="1,8,32", help="comma list of batch sizes for --decode")
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens for --decode")
    p.add_argument("--decode-new", type=int, default=128, help="new tokens per run for --decode")
    p.add_argument("--decode-rounds", type=int, default=5, help="rounds (alternating order) for --decode")
    p.add_argument("--decode-depth", type=int, default=6, help="tree depth for --decode (trees: parameter-matched)")
    p.add_argument("--decode-layers", type=int, default=None, help="override the preset's layer count (smoke runs)")
    return p


def _int_list(text: str, what: str, low: int, high: int) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchInputError(f"{what} takes a comma list of integers, got {text!r}") from None
    if not values:
        raise BenchInputError(f"{what} is empty")
    for v in values:
        if not low <= v <= high:
            raise BenchInputError(f"{what} {v} is out of range; each value must be {low}..{high}")
    return values


def check_args(args) -> None:
    """Resolve defaults and refuse what cannot work, with one line naming the option."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise BenchInputError(f"--device {args.device!r} is not allowed; choose auto, cuda or cpu")
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise BenchInputError("--device cuda but no CUDA device is visible")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    if args.rep_ms <= 0:
        raise BenchInputError(f"--rep-ms must be positive, got {args.rep_ms}")
    args.configs = split_configs(args.configs)
    if not args.configs:
        raise BenchInputError("--configs is empty")
    for name in args.configs:
        parse_preset(name)
    args.tokens = (_int_list(args.tokens, "--tokens", 1, MAX_TOKENS) if args.tokens is not None
                   else list(TOKENS_GPU if on_gpu else TOKENS_CPU))
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            raise BenchInputError(f"--modes {m!r} is not allowed; choose fwd, fwdbwd")
    if not args.modes:
        raise BenchInputError("--modes is empty")
    from treeffn.kernels import triton_available

    args.can_triton = triton_available() and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1")
    default_paths = ["dense", "masked", "gather"] + (list(TRITON_MODES) if args.can_triton else [])
    args.paths = [p for p in args.paths.split(",") if p] if args.paths else default_paths
    for p in args.paths:
        if p not in PATHS:
            raise BenchInputError(f"--paths {p!r} is not allowed; choose from {', '.join(PATHS)}")
        if p in TRITON_MODES and not args.can_triton:
            raise BenchInputError(f"--paths {p} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if args.loss_curve < 0:
        raise BenchInputError(f"--loss-curve must be >= 0, got {args.loss_curve}")
    if args.decode:
        if args.decode_model not in DECODE_PRESETS:
            raise BenchInputError(f"--decode-model {args.decode_model!r} is not allowed; choose from "
                                  f"{', '.join(DECODE_PRESETS)}")
        args.decode_batches = _int_list(args.decode_batches, "--decode-batches", 1, 1024)
        for opt, v, low in (("--decode-prompt", args.decode_prompt, 1), ("--decode-new", args.decode_new, 2),
                            ("--decode-rounds", args.decode_rounds, 1), ("--decode-depth", args.decode_depth, 0)):
            if v < low:
                raise BenchInputError(f"{opt} must be at least {low}, got {v}")
        if args.decode_layers is not None and args.decode_layers < 1:
            raise BenchInputError(f"--decode-layers must be at least 1, got {args.decode_layers}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except BenchInputError as e:
        print(f"treeffn bench: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path("outputs") / "bench" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tune:
        from treeffn.bench.tune import run_tune

        run_tune(args, out_dir)
        return 0
    if args.loss_curve:
        from treeffn.bench.loss_curve import run_loss_curve

        result = run_loss_curve(args)
        (out_dir / "loss_curve.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.decode:
        from treeffn.bench.decode import decode_markdown, run_decode_bench

        result = run_decode_bench(args)
        write_record(out_dir, "decode", result, decode_markdown(result))
        return 0
    from treeffn.kernels import triton_available
    from treeffn.bench.layer import run_layer_bench
    from treeffn.bench.report import markdown

    if not args.can_triton:
        print("# triton paths not run: " + ("Triton is not installed" if not triton_available()
                                           else "no CUDA device (TRITON_INTERPRET=1 runs them slowly)"), flush=True)
    result = run_layer_bench(args, out_dir)
    write_record(out_dir, "bench", result, markdown(result))
    if result["failures"]:
        print(f"treeffn bench: {result['failures']} path(s) failed the float64 check", file=sys.stderr)
        return 1
    return 0
