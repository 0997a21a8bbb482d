"""Checks a command's Hydra overrides before Hydra runs, so that a typo is one clear line.

Hydra's own messages for an unknown preset or key span a dozen lines with search paths and
stack-trace hints; here we name the override, and list the allowed choices or the closest keys.
"""

from __future__ import annotations

import difflib
from importlib import resources


class OverrideError(ValueError):
    pass


# The config roots: conf/, then sweeps/ (hydra.searchpath in conf/config.yaml; groups sweep, strategy).
CONFIG_PACKAGES = ("treeffn.conf", "treeffn.sweeps")


def group_choices(group: str) -> list[str]:
    """Option names of a config group (<root>/<group>/*.yaml in any config root)."""
    names: set[str] = set()
    for package in CONFIG_PACKAGES:
        folder = resources.files(package).joinpath(group)
        if folder.is_dir():
            names.update(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def check_overrides(args: list[str], config_name: str = "config", verb: str = "train") -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from hydra._internal.utils import get_args_parser

    try:  # Hydra's own flags (--cfg job, -m, --info ...) are parsed the way Hydra parses them
        plain = get_args_parser().parse_args(args).overrides
    except SystemExit:
        return  # let Hydra report its own usage error
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except HydraException as e:
        raise OverrideError(str(e).strip().splitlines()[0]) from None
    first_choices: list[str] = []
    keys: list[str] = []
    multirun = any(a in ("-m", "--multirun") for a in args)
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra"):
            continue
        choices = group_choices(key)
        if o.is_sweep_override() and not multirun and not choices:
            raise OverrideError(f"{o.input_line}: Hydra reads the commas as a list of runs; quote the value "
                                f"('{key}=\"...\"') or add -m to sweep")
        if choices:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in choices:
                    raise OverrideError(f"{key}={value} is not a {key} preset; choose one of: {', '.join(choices)}")
            first_choices.append(f"{key}={values[0]}")
        else:
            keys.append(key)
    if not keys:
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=first_choices)
    GlobalHydra.instance().clear()
    known = _all_keys(OmegaConf.to_container(cfg, resolve=False))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; `treeffn {verb} --cfg job` lists the keys"
            raise OverrideError(f"{key} is not a config key{hint} (add a new key with +{key}=...)")


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            keys.append(path)
            keys += _all_keys(v, path + ".")
    return keys
