"""``treeffn prepare [key=value ...]``: prepare a run's corpus ahead of training (no run dir).

Takes the same overrides as ``treeffn train`` (``data=...``, ``data.*``, ``model=...`` for the
defaults that depend on it; its config is conf/config.yaml) and runs only the data preparation
``treeffn train`` would run first: stream, tokenize, write shards under
``data.cache_dir/prepared``. Prints the folder, which ``data=tokens data.path=<folder>`` can also
train on (e.g. after copying it elsewhere).
"""

from __future__ import annotations

import sys

from treeffn.cli.entry import run_verb


def prepare(cfg: dict) -> int:
    from treeffn.config import ConfigError, validate_train_config

    validate_train_config(cfg)
    if cfg["data"]["source"] == "tokens":
        raise ConfigError("data=tokens is already prepared (token files or a prepared folder); nothing to do")
    from treeffn.data.datamodule import TextDataModule

    data = TextDataModule(cfg["data"], seed=cfg["seed"])
    folder = data.prepare()
    train, val, _ = data.open_streams()
    print(f"prepared corpus: {folder}")
    print(f"  {len(train):,} training tokens, {len(val):,} validation tokens")
    print(f"  train on it anywhere with: data=tokens data.path={folder} data.tokenizer={cfg['data']['tokenizer']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("prepare", prepare, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
