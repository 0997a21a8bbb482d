"""``treeffn prune run=<run dir> [key=value ...]``: remove subtrees no token reaches.

Keys:
    run=<dir>           the training run to prune (required); its hf/ dir, else its last checkpoint
    out=<dir>           where the pruned Hugging Face model goes (default <run dir>/pruned)
    text=validation     the text whose routes are counted: the run's validation split, or a UTF-8 file
    min_visits=0        drop nodes visited at most this often (0: only never-reached subtrees, exact)
    batch_size=<n>      blocks per forward pass (default: the run's data.batch_size)
    max_blocks=<n>      count on the first n blocks only

Prints parameters before/after and the perplexity change on the counting text; writes
<out>/prune.json. Exit status 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import sys

KEYS = {"run": str, "out": str, "text": str, "min_visits": int, "batch_size": int, "max_blocks": int}


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="treeffn prune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    values: dict = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not key=value; keys: {', '.join(KEYS)}")
        if key not in KEYS:
            raise ValueError(f"{key} is not a prune setting; choose from: {', '.join(KEYS)}")
        try:
            values[key] = KEYS[key](value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not allowed; it must be an integer") from None
    if "run" not in values:
        raise ValueError("give run=<run dir>")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        values = parse(argv)
    except ValueError as e:
        print(f"treeffn prune: error: {e}", file=sys.stderr)
        return 2
    from treeffn.analysis.pruning import prune_run
    from treeffn.config import ConfigError

    try:
        report = prune_run(values.pop("run"), **values)
    except ConfigError as e:  # includes ModelLoadError
        print(f"treeffn prune: error: {e}", file=sys.stderr)
        return 2
    print(f"counted routes of {report.count_tokens:,} tokens ({report.text}), dropping nodes visited "
          f"<= {report.min_visits} times")
    for i, layer in enumerate(report.layers):
        print(f"  layer {i}: kept {layer['kept']} of {layer['total']} {layer['kind']}")
    print(f"parameters: {report.params_before:,} -> {report.params_after:,} "
          f"(FFN {report.ffn_params_before:,} -> {report.ffn_params_after:,}, "
          f"{100 * (1 - report.ffn_params_after / report.ffn_params_before):.1f}% of FFN parameters removed)")
    print(f"perplexity (hard routing): {report.ppl_before:.4f} -> {report.ppl_after:.4f} "
          f"(change {report.ppl_change:+.6f})")
    print(f"pruned model: {report.out_dir}")
    return 0


def run() -> None:
    """Entry point for ``treeffn prune`` (cli/main.py VERBS): exits with main()'s status."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
