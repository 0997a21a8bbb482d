"""Hydra entry point of ``treeffn generate``; the work is in treeffn.generation.runner."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from treeffn.cli.entry import refuse, resolved


@hydra.main(config_path="pkg://treeffn.conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from treeffn.config import ConfigError

    config = resolved(cfg, "generate")
    try:
        from treeffn.generation.runner import generate_from_config

        generate_from_config(config)
    except ConfigError as e:
        refuse("generate", e)


if __name__ == "__main__":
    main()
