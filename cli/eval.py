"""Hydra entry point of ``treeffn eval``; the work is in treeffn.evaluation.runner."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from treeffn.cli.entry import refuse, resolved


@hydra.main(config_path="pkg://treeffn.conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from treeffn.config import ConfigError

    config = resolved(cfg, "eval")
    try:
        from treeffn.evaluation.runner import evaluate

        record = evaluate(config)
    except ConfigError as e:
        refuse("eval", e)
    validation = record["perplexity"].get("validation")
    return validation["ppl"] if validation else None


if __name__ == "__main__":
    main()
