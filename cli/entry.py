"""One way through every verb: ``treeffn <verb> [key=value ...] [--cfg job [--resolve]] [--help]``.

Each verb's settings are one YAML file in conf/ (CONFIGS below); the command line overrides
its keys in Hydra's syntax (``key=value``, ``list=[a,b]``, ``'quoted=value'``), and before
anything runs preflight.check_overrides refuses a key the file does not have, naming the
closest ones ("did you mean ...?").

``treeffn train`` runs under ``@hydra.main``: it needs Hydra's run dirs, sweeps (``-m``) and
launchers. Every other verb goes through run_verb(), which composes the verb's file with
Hydra's compose API. That is a choice: the other way, ``@hydra.main`` with ``hydra.run.dir: .``
and ``hydra.output_subdir: null``, still makes a Hydra run (a run-dir notion these verbs do not
have, Hydra's logging set-up, its multi-line error printing) that every verb config would have
to switch off piece by piece. The compose API gives the same parser and composition and nothing
else: no output dir, no .hydra folder, no log file, no change of working directory, and every
error is worded here.

Bad input ends every verb the same way: one line ``treeffn <verb>: error: ...`` on stderr and
exit status 2 (refuse, refused); nothing has been written by then.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_BAD_INPUT = 2  # nothing ran; the message names the field or file

# verb -> its config file in conf/ (without .yaml). prepare takes the training config: it runs
# the data preparation `treeffn train` would run first.
CONFIGS = {"train": "config", "prepare": "config", "eval": "eval", "generate": "generate", "analyze": "analyze",
           "report": "report", "prune": "prune", "bench": "bench"}
OPTIONS = "key=value overrides, --cfg job [--resolve] and --help"
TRAIN_OPTIONS = "key=value overrides, -m (one run per value), --cfg job [--resolve], --help and --hydra-help"


class BadInput(ValueError):
    """Input a verb cannot work with; the message is the one line the user sees."""


def one_line(message) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(message).__name__


def refused(verb: str, message) -> int:
    """Print the refusal line; returns the exit status for a verb's main() to return."""
    print(f"treeffn {verb}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def refuse(verb: str, message) -> NoReturn:
    """One line on stderr, exit 2 (for code that cannot return a status, e.g. under @hydra.main)."""
    sys.exit(refused(verb, message))


def resolved(cfg, verb: str) -> dict:
    """The composed config as plain data; a broken interpolation is one line. (A required key
    left unset stays ``???``: train's own checks name what it is for, e.g. data.path.)"""
    try:
        return to_plain(cfg)
    except BadInput as e:
        refuse(verb, e)


def to_plain(cfg) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # OmegaConf raises several kinds here
        raise BadInput(str(e).strip().splitlines()[0]) from None


def check_required(cfg, verb: str) -> None:
    """A key the verb's file marks ``???`` must be given."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise BadInput(f"{missing[0]} is required: give {missing[0]}=... (`treeffn {verb} --help` lists the keys)")


# ------------------------------------------------------------------------------ the non-training verbs
def run_verb(verb: str, work: Callable[[dict], int | None], argv: list[str], errors: tuple = (),
             flag_hints: dict[str, str] | None = None) -> int:
    """Compose conf/<verb>.yaml with the command's overrides, check them, then ``work(config)``.

    ``work`` gets the resolved config as a plain dict and returns an exit status (None: 0). A
    BadInput, a treeffn ConfigError or one of ``errors`` raised anywhere becomes the one-line
    refusal. ``flag_hints`` maps a former ``--flag`` to the override that replaced it."""
    from treeffn.config import ConfigError

    try:
        show, resolve, overrides = parse_options(verb, argv, flag_hints or {})
        from treeffn.cli.preflight import OverrideError, check_overrides

        try:
            check_overrides(overrides, config_name=CONFIGS[verb], verb=verb)
        except OverrideError as e:
            raise BadInput(str(e)) from None
        cfg = compose(CONFIGS[verb], overrides)
        if show:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")
            return 0
        if CONFIGS[verb] != "config":  # the training config's checks name what a missing key is for
            check_required(cfg, verb)
        return work(to_plain(cfg)) or 0
    except (BadInput, ConfigError, *errors) as e:
        return refused(verb, e)


def parse_options(verb: str, argv: list[str], flag_hints: dict[str, str]) -> tuple[str | None, bool, list[str]]:
    """(the --cfg part to print or None, --resolve, the overrides); any other --flag is refused,
    with the key=value form it probably meant."""
    show, resolve, overrides = None, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if value not in ("job", "all"):
                raise BadInput(f"--cfg {value or '(nothing)'} is not allowed; use --cfg job (treeffn {verb} has no "
                               f"Hydra run config to print)")
            show = value
            continue
        if arg == "--resolve":
            resolve = True
        elif arg.startswith("-"):
            raise BadInput(unknown_option(verb, arg, argv[i + 1] if i + 1 < len(argv) else None, flag_hints))
        else:
            overrides.append(arg)
        i += 1
    return show, resolve, overrides


def unknown_option(verb: str, flag: str, following: str | None, flag_hints: dict[str, str]) -> str:
    """The refusal of a ``--flag``: with its key=value form when a key of the verb is close."""
    import difflib

    name, _, value = flag.lstrip("-").partition("=")
    if not value and following and "=" not in following and not following.startswith("-"):
        value = following
    hint = flag_hints.get(f"--{name}")
    if hint is None:
        keys = {k.replace(".", "_"): k for k in config_keys(CONFIGS[verb])}
        close = difflib.get_close_matches(name.replace("-", "_"), list(keys), n=1, cutoff=0.75)
        hint = f"{keys[close[0]]}={value or '...'}" if close else None
    meant = f"; did you mean {hint}?" if hint else f"; `treeffn {verb} --help` lists the keys"
    options = TRAIN_OPTIONS if verb == "train" else OPTIONS
    return f"{flag} is not an option of treeffn {verb}, which takes {options}{meant}"


def compose(config_name: str, overrides: list[str]):
    """conf/<config_name>.yaml with the overrides (Hydra's compose API: no run, nothing written)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides)
    except Exception as e:  # Hydra's composition errors span several lines with hints: keep the first
        raise BadInput(str(e).strip().splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()


def config_keys(config_name: str) -> list[str]:
    """Every dotted key of a verb's config with its defaults."""
    from omegaconf import OmegaConf

    from treeffn.cli.preflight import _all_keys

    return _all_keys(OmegaConf.to_container(compose(config_name, []), resolve=False))


# ------------------------------------------------------------------------------ settings of a verb
def path_setting(cfg: dict, key: str) -> str | None:
    """A file or folder value as text (Hydra reads ``out=2024`` as a number)."""
    value = cfg.get(key)
    return None if value is None else str(value)


def int_setting(cfg: dict, key: str, low: int, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"{key}={value!r} is not allowed; it must be an integer >= {low}"
                       + (" (or null)" if optional else ""))
    return value


def bool_setting(cfg: dict, key: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise BadInput(f"{key}={value!r} is not allowed; use {key}=true or {key}=false")
    return value


# ------------------------------------------------------------------------------ --help
def print_help(verb: str, description: str) -> None:
    """``treeffn <verb> --help``: usage, what the verb does, and its keys with their defaults."""
    from importlib import resources

    config_name = CONFIGS[verb]
    sweep = " [-m]" if verb == "train" else ""
    print(f"usage: treeffn {verb} [key=value ...]{sweep} [--cfg job [--resolve]] [--help]\n")
    print(f"{description}.\n")
    if config_name != "config":
        text = resources.files("treeffn.conf").joinpath(f"{config_name}.yaml").read_text()
        print(f"keys, with their defaults (conf/{config_name}.yaml; ??? marks a required key):\n")
        print(text.rstrip())
        return
    import textwrap

    from omegaconf import OmegaConf

    from treeffn.config_files import group_choices

    print("presets (group=choice; conf/<group>/*.yaml, sweeps/<group>/*.yaml):")
    for group, choice in preset_groups().items():
        line = f"{', '.join(group_choices(group))} (default: {'none' if choice == 'None' else choice})"
        print(textwrap.fill(line, width=100, initial_indent=f"  {group:<15} ", subsequent_indent=" " * 18))
    print("\nkeys, with the defaults of those presets (conf/config.yaml and its groups; add new top-level keys "
          "with +key=value):\n")
    print(OmegaConf.to_yaml(compose(config_name, [])).rstrip())
    if verb == "prepare":
        print("\nprepare reads the data.* keys (and model.* for the defaults that depend on it) and writes shards "
              "under data.cache_dir/prepared; no run dir.")


def preset_groups() -> dict[str, str]:
    """The training config's groups and their default choices (hydra/launcher included)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            cfg = hydra_compose("config", return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    groups = [g for g in choices if "/" not in g] + ["hydra/launcher"]
    order = ["model", "tree", "data", "optim", "trainer", "logger", "checkpoint"]
    groups.sort(key=lambda g: order.index(g) if g in order else len(order))
    return {g: str(choices[g]) for g in groups}
