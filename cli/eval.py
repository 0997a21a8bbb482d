"""``treeffn eval [key=value ...]``: perplexity and lm-eval tasks for a trained model (settings:
conf/eval.yaml; the work is in treeffn.evaluation.runner)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import run_verb


def evaluate(cfg: dict) -> int:
    from treeffn.evaluation.runner import evaluate as run_evaluation

    run_evaluation(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("eval", evaluate, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
