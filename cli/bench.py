"""``treeffn bench [key=value ...]``: tree-FFN speed against a dense MLP (settings:
conf/bench.yaml; the work is in treeffn.bench)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import BadInput, run_verb

# The --flags of the argparse interface this verb had before issue 17, and what replaced them
# where the name alone does not say it (the others are found as the closest key).
FORMER_FLAGS = {"--decode": "mode=decode", "--tune": "mode=tune", "--loss-curve": "mode=loss_curve loss_curve.steps=N",
                "--loss-batch": "loss_curve.batch=N", "--loss-block": "loss_curve.block=N"}


def bench(cfg: dict) -> int:
    from treeffn.bench import run_bench
    from treeffn.bench.problems import BenchInputError  # imports torch: not before the work starts

    try:
        return run_bench(cfg)
    except BenchInputError as e:
        raise BadInput(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    return run_verb("bench", bench, sys.argv[1:] if argv is None else argv, flag_hints=FORMER_FLAGS)


if __name__ == "__main__":
    raise SystemExit(main())
