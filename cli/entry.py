"""What every Hydra verb does with its composed config before the work starts."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2  # nothing ran; the message names the field or file


def refuse(verb: str, message) -> None:
    """One line on stderr, exit 2."""
    print(f"treeffn {verb}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def resolved(cfg, verb: str) -> dict:
    """The composed config as plain data; an interpolation or missing-value error is one line."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # OmegaConf raises several kinds here
        refuse(verb, str(e).splitlines()[0])
