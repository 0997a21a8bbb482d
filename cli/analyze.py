"""``treeffn analyze run=<run dir> [text=validation|kjv] [max_blocks=256|all] [seed=0] [device=auto] [out=<dir>]``."""

from __future__ import annotations

import sys

USAGE = ("usage: treeffn analyze run=<run dir> [text=validation|kjv] [max_blocks=256|all] [seed=0] [device=auto] "
         "[out=<dir>]")
KEYS = {"run", "text", "max_blocks", "seed", "device", "out"}


def parse(args: list[str]) -> dict:
    opts = {"text": "validation", "max_blocks": "256", "seed": "0", "device": "auto", "out": None}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"treeffn analyze: error: {arg!r} is not an option; {USAGE}")
        opts[key] = value
    if not opts.get("run"):
        raise SystemExit(f"treeffn analyze: error: run= is missing; {USAGE}")
    if opts["max_blocks"] != "all" and (not opts["max_blocks"].isdigit() or int(opts["max_blocks"]) < 1):
        raise SystemExit(f"treeffn analyze: error: max_blocks={opts['max_blocks']} must be an integer >= 1 or all")
    if not opts["seed"].isdigit():
        raise SystemExit(f"treeffn analyze: error: seed={opts['seed']} must be an integer >= 0")
    if opts["device"] not in ("auto", "cpu", "cuda") and not opts["device"].startswith("cuda:"):
        raise SystemExit(f"treeffn analyze: error: device={opts['device']} is not allowed; use auto, cpu, cuda or cuda:<i>")
    return opts


def main() -> None:
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    opts = parse(args)
    from pathlib import Path

    from treeffn.analysis.analyze import NothingToAnalyse, analyse_run, format_verdicts
    from treeffn.config import ConfigError

    try:
        import torch

        device = opts["device"] if opts["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        max_blocks = None if opts["max_blocks"] == "all" else int(opts["max_blocks"])
        analysis = analyse_run(Path(opts["run"]), opts["text"], max_blocks, opts["out"], device, int(opts["seed"]))
    except NothingToAnalyse as e:
        print(f"treeffn analyze: nothing to analyse: {e}")
        return
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"treeffn analyze: error: {e}", file=sys.stderr)
        sys.exit(2)
    t = analysis["thresholds"]
    print(f"routing on {analysis['tokens']:,} held-out tokens ({analysis['text']}: {analysis['sample']}), hard "
          f"routing (eval path), {len(analysis['checkpoints'])} checkpoints")
    for line in format_verdicts(analysis):
        print(line)
    print(f"trends against the initial weights: spreading / concentrating if the leaf entropy rose / fell by >= "
          f"{t['trend_if_entropy_change_at_least']}; absolute verdicts: balanced if >= "
          f"{t['balanced_if_leaf_entropy_at_least']}, collapsed if < {t['collapsed_if_leaf_entropy_below']}")
    if analysis.get("against_training"):
        c = analysis["against_training"]
        print(f"against the run's last validation (same {c['tokens']:,} tokens): largest per-layer differences "
              f"dead nodes {c['max_abs_diff_dead_frac']:.2g}, leaf entropy {c['max_abs_diff_leaf_entropy']:.2g}")
    out = Path(opts["out"]) if opts["out"] else Path(opts["run"]) / "analysis"
    print(f"wrote {out / 'analysis.json'} and {', '.join(analysis['plots'])}")


if __name__ == "__main__":
    main()
