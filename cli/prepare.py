"""``treeffn prepare [overrides]``: prepare a run's corpus ahead of training (no run dir).

Takes the same overrides as ``treeffn train`` (``data=...``, ``data.*``, ``model=...`` for the
defaults that depend on it) and runs only the data preparation ``treeffn train`` would run
first: stream, tokenize, write shards under ``data.cache_dir/prepared``. Prints the folder,
which ``data=tokens data.path=<folder>`` can also train on (e.g. after copying it elsewhere).
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def compose_train_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    from treeffn.cli.preflight import OverrideError, check_overrides
    from treeffn.config import ConfigError, validate_train_config

    try:
        check_overrides(args)
        try:
            cfg = compose_train_config(args)
        except Exception as e:  # Hydra's composition and interpolation errors: one line
            raise ConfigError(str(e).strip().splitlines()[0]) from None
        validate_train_config(cfg)
        if cfg["data"]["source"] == "tokens":
            raise ConfigError("data=tokens is already prepared (token files or a prepared folder); nothing to do")
        from treeffn.data.datamodule import TextDataModule

        data = TextDataModule(cfg["data"], seed=cfg["seed"])
        folder = data.prepare()
        train, val, _ = data.open_streams()
    except (ConfigError, OverrideError) as e:
        print(f"treeffn prepare: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"prepared corpus: {folder}")
    print(f"  {len(train):,} training tokens, {len(val):,} validation tokens")
    print(f"  train on it anywhere with: data=tokens data.path={folder} data.tokenizer={cfg['data']['tokenizer']}")
    return 0


def run() -> None:
    sys.exit(main())
