"""``treeffn generate [key=value ...]``: text and tokens/s from a trained model (settings:
conf/generate.yaml; the work is in treeffn.generation.runner)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import run_verb


def generate(cfg: dict) -> int:
    from treeffn.generation.runner import generate_from_config

    generate_from_config(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("generate", generate, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
