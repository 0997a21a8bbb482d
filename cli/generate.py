"""Hydra entry point of ``treeffn generate``; the work is in treeffn.generation.runner."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="pkg://treeffn.conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from treeffn.config import ConfigError

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # interpolation and missing-value errors: one line
        print(f"treeffn generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    try:
        from treeffn.generation.runner import generate_from_config

        generate_from_config(resolved)
    except ConfigError as e:
        print(f"treeffn generate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
