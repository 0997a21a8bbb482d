"""Hydra entry point of ``treeffn eval``; the work is in treeffn.evaluation.runner."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="pkg://treeffn.conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from treeffn.config import ConfigError

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # interpolation and missing-value errors: one line
        print(f"treeffn eval: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    try:
        from treeffn.evaluation.runner import evaluate

        record = evaluate(resolved)
    except ConfigError as e:
        print(f"treeffn eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    validation = record["perplexity"].get("validation")
    return validation["ppl"] if validation else None


if __name__ == "__main__":
    main()
