"""``treeffn analyze run=<run dir> [text=validation|kjv] [max_blocks=64] [out=<dir>]``."""

from __future__ import annotations

import sys

USAGE = "usage: treeffn analyze run=<run dir> [text=validation|kjv] [max_blocks=64] [out=<dir>]"
KEYS = {"run", "text", "max_blocks", "out"}


def parse(args: list[str]) -> dict:
    opts = {"text": "validation", "max_blocks": "64", "out": None}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"treeffn analyze: error: {arg!r} is not an option; {USAGE}")
        opts[key] = value
    if not opts.get("run"):
        raise SystemExit(f"treeffn analyze: error: run= is missing; {USAGE}")
    if not opts["max_blocks"].isdigit() or int(opts["max_blocks"]) < 1:
        raise SystemExit(f"treeffn analyze: error: max_blocks={opts['max_blocks']} must be an integer >= 1")
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
        analysis = analyse_run(Path(opts["run"]), opts["text"], int(opts["max_blocks"]), opts["out"])
    except NothingToAnalyse as e:
        print(f"treeffn analyze: nothing to analyse: {e}")
        return
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"treeffn analyze: error: {e}", file=sys.stderr)
        sys.exit(2)
    t = analysis["thresholds"]
    print(f"routing on {analysis['tokens']:,} held-out tokens ({analysis['text']}), hard routing (eval path), "
          f"{len(analysis['checkpoints'])} checkpoints")
    for line in format_verdicts(analysis):
        print(line)
    print(f"verdicts: balanced if normalized leaf entropy >= {t['balanced_if_leaf_entropy_at_least']}, "
          f"collapsed if < {t['collapsed_if_leaf_entropy_below']}, collapsing in between")
    out = Path(opts["out"]) if opts["out"] else Path(opts["run"]) / "analysis"
    print(f"wrote {out / 'analysis.json'} and {', '.join(analysis['plots'])}")


if __name__ == "__main__":
    main()
