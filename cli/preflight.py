"""Checks a command's Hydra overrides before Hydra runs, so that a mistake is one clear line and
nothing is written (Hydra creates the run dir, and under -m rewrites multirun.yaml, before any
of treeffn's own checks can run).

Hydra's own messages for an unknown preset or key span a dozen lines with search paths and
stack-trace hints; here we name the override, and list the allowed choices or the closest keys.
Checked: the override syntax; empty values; sweeps with no values; presets; keys, including
``+key`` additions, against the keys treeffn's config files define (a key no preset reads
would be ignored silently); each value of a sweep (the same checks a run makes at its start);
and that the run dir's folder can be written.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources

from treeffn.config_files import CONFIG_PACKAGES, group_choices  # noqa: F401  (also this module's names)


class OverrideError(ValueError):
    pass


# Keys of the eval section beyond the defaults in conf/config.yaml: any key of the eval verb's config.
EVAL_CONFIG = "eval.yaml"


def check_overrides(args: list[str], config_name: str = "config", verb: str = "train") -> None:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:  # Hydra's own flags (--cfg job, -m, --info ...) are parsed the way Hydra parses them
        parsed, unknown = get_args_parser().parse_known_args(args)
    except SystemExit:
        return  # let Hydra report its own usage error
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        from treeffn.cli.entry import unknown_option

        at = args.index(flags[0])
        raise OverrideError(unknown_option(verb, flags[0], args[at + 1] if at + 1 < len(args) else None, {}))
    for arg in parsed.overrides:
        if "=" not in arg and not arg.startswith("~"):
            raise OverrideError(f"{arg!r} is not key=value; `treeffn {verb} --help` lists the keys")
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as e:
        raise OverrideError(str(e).strip().splitlines()[0]) from None
    training = config_name == "config"  # train and prepare: presets, + additions, sweeps, a run dir
    first_choices: list[str] = []
    keys: list = []
    for o in overrides:
        key = o.key_or_group
        if not o.is_delete() and not o.is_sweep_override() and o.value() == "":
            raise OverrideError(f"{o.input_line} gives {key} no value; give it one (null where none is allowed), "
                                f"or leave it out")
        if o.is_sweep_override():
            if verb != "train":
                raise OverrideError(f"{o.input_line}: Hydra reads the commas as a list of runs, and treeffn {verb} "
                                    f"runs once; give a list ({key}=[{o.input_line.split('=', 1)[1]}]) or quote the value "
                                    f"('{key}=\"...\"')")
            if not parsed.multirun:
                raise OverrideError(f"{o.input_line} gives several values; add -m to run one job per value "
                                    f"(treeffn train -m ...), or give one value")
            values = _sweep_values(o)
            if values == []:
                raise OverrideError(f"{o.input_line} sweeps over no values, so no job would run; give at least one")
        if key.startswith("hydra") or o.is_delete():
            continue
        choices = group_choices(key) if training else []
        if choices:
            values = _sweep_values(o) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values or []:
                if value not in choices:
                    raise OverrideError(f"{key}={value} is not a {key} preset; choose one of: {', '.join(choices)}")
            first_choices.append(f"{key}={values[0]}" if values else o.input_line)
        else:
            keys.append(o)
    if keys and not training:
        check_verb_keys(keys, config_name, verb)
    elif keys:
        check_keys(keys, first_choices, config_name, verb)
    if parsed.multirun:
        check_sweep_values(overrides)
    if verb == "train":
        check_run_dir_writable(overrides, parsed.multirun)


def _sweep_values(o) -> list[str] | None:
    """The values a sweep override takes, or None when Hydra cannot list them (interval, glob)."""
    from hydra.errors import HydraException

    try:
        return list(o.sweep_string_iterator())
    except HydraException:
        return None


# ------------------------------------------------------------------------------ keys
def check_keys(overrides: list, first_choices: list[str], config_name: str, verb: str = "train") -> None:
    """Every key must be one treeffn reads for the chosen presets. ``+key`` adds a key; it is
    refused under treeffn's sections (model, tree, data, ...) unless some preset defines it,
    because nothing would read it; top-level additions (``+note=...``) are free annotations."""
    from omegaconf import OmegaConf

    cfg, choices = _compose(config_name, first_choices)
    known = set(_all_keys(OmegaConf.to_container(cfg, resolve=False)))
    sections = _section_schemas(choices)
    for o in overrides:
        key, adding = o.key_or_group, o.is_add() or o.is_force_add()
        section = key.split(".", 1)[0]
        if key in known:
            if o.is_add():
                raise OverrideError(f"+{key}: {key} is already a config key; set it without the +: {key}=...")
            continue
        if section in sections:
            presets = sorted(name for name, keys in sections[section].items() if key in keys)
            if presets and section not in choices:  # a section conf/config.yaml extends on request (eval)
                if adding:
                    continue
                raise OverrideError(f"{key} is not set by default; add it with +{key}=...")
            if presets:
                raise OverrideError(f"{key} is not a setting of {section}={choices[section]}, so it would be ignored; "
                                    f"it belongs to {section}={' or '.join(presets)}: choose that or drop {key}")
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; `treeffn {verb} --cfg job` lists the keys"
            raise OverrideError(f"{key} is not a config key{hint} (treeffn reads no other {section}.* keys)")
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.75 if adding else 0.6)
        if adding and not close:
            continue  # a new top-level annotation: stored in config.yaml and part of the run's identity
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; `treeffn {verb} --cfg job` lists the keys"
        raise OverrideError(f"{key} is not a config key{hint}" + ("" if adding else f" (add a new key with +{key}=...)"))


def check_verb_keys(overrides: list, config_name: str, verb: str) -> None:
    """A verb other than train reads exactly the keys of conf/<verb>.yaml: any other key, added
    with + or not, would be ignored."""
    from omegaconf import OmegaConf

    cfg, _ = _compose(config_name, [])
    known = sorted(_all_keys(OmegaConf.to_container(cfg, resolve=False)))
    for o in overrides:
        key = o.key_or_group
        if key in known:
            if o.is_add():
                raise OverrideError(f"+{key}: {key} is already a key of treeffn {verb}; set it without the +: {key}=...")
            continue
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"`treeffn {verb} --help` lists the keys"
        raise OverrideError(f"{key} is not a key of treeffn {verb} (conf/{config_name}.yaml); {hint}")


def _compose(config_name: str, overrides: list[str]):
    """The config with these preset choices (no other overrides), and the choice of each group."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict, read_write

    GlobalHydra.instance().clear()
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    with read_write(cfg), open_dict(cfg):  # hydra.* keys are Hydra's business
        del cfg["hydra"]
    return cfg, choices


def _section_schemas(choices: dict) -> dict[str, dict[str, set[str]]]:
    """For each of treeffn's sections, the dotted keys each preset defines: {section: {preset: keys}}.

    Config groups (conf/<group>/*.yaml, with their own defaults lists) and the sections that
    conf/config.yaml defines itself (guard, eval; eval also takes every key of conf/eval.yaml)."""
    from omegaconf import OmegaConf

    conf = resources.files("treeffn.conf")
    schemas: dict = {}
    for group in sorted(choices):
        folder = conf.joinpath(group)
        if not folder.is_dir() or group == "hydra":
            continue
        presets = {p.name[:-5]: OmegaConf.to_container(OmegaConf.create(p.read_text())) or {}
                   for p in folder.iterdir() if p.name.endswith(".yaml")}
        schemas[group] = {name: _preset_keys(group, name, presets) for name in presets}
    base = OmegaConf.to_container(OmegaConf.create(conf.joinpath("config.yaml").read_text()))
    for section, value in base.items():
        if isinstance(value, dict) and section not in ("hydra", "defaults") and section not in schemas:
            schemas[section] = {"config": set(_all_keys(value, f"{section}."))}
    eval_keys = OmegaConf.to_container(OmegaConf.create(conf.joinpath(EVAL_CONFIG).read_text()))
    eval_keys = {k: v for k, v in eval_keys.items() if k not in ("defaults", "hydra")}
    schemas.setdefault("eval", {"config": set()})["config"] |= set(_all_keys(eval_keys, "eval."))
    return schemas


def _preset_keys(group: str, name: str, presets: dict, seen: tuple = ()) -> set[str]:
    body = presets.get(name) or {}
    keys = set(_all_keys({k: v for k, v in body.items() if k != "defaults"}, f"{group}."))
    for parent in body.get("defaults") or []:
        if isinstance(parent, str) and parent in presets and parent not in seen:
            keys |= _preset_keys(group, parent, presets, (*seen, name))
    return keys


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            keys.append(path)
            keys += _all_keys(v, path + ".")
    return keys


# ------------------------------------------------------------------------------ sweeps
def check_sweep_values(overrides: list) -> None:
    """Each value of each sweep override, with the others at their first value, passes the
    checks a run makes at its start: a bad value fails the sweep before multirun.yaml is written
    and before any job runs."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from treeffn.config import ConfigError, validate_train_config

    def line(o, value):
        return f"{'++' if o.is_force_add() else '+' if o.is_add() else ''}{o.key_or_group}={value}"

    sweeps = [(o, _sweep_values(o)) for o in overrides if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    sweeps = [(o, v) for o, v in sweeps if v]
    if not sweeps:
        return
    fixed = [o.input_line for o in overrides if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    firsts = {id(o): line(o, values[0]) for o, values in sweeps}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            for o, values in sweeps:
                others = [first for key, first in firsts.items() if key != id(o)]
                for value in values:
                    try:
                        cfg = OmegaConf.to_container(compose("config", overrides=[*fixed, *others, line(o, value)]),
                                                     resolve=True)
                    except Exception:
                        continue  # what compose itself rejects, the job reports as before
                    try:
                        validate_train_config(cfg)
                    except ConfigError as e:
                        raise OverrideError(f"{e} (in the sweep {o.input_line})") from None
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------ run dir
def check_run_dir_writable(overrides: list, multirun: bool) -> None:
    """The folder the run dir goes into must take new files: refuse /proc/..., a read-only
    filesystem or a folder without write permission now, in one line, instead of a traceback
    from Hydra's mkdir."""
    import tempfile
    from pathlib import Path

    given = {o.key_or_group: o.value() for o in overrides if not o.is_sweep_override()
             and o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir", "runs_root")}
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    target = given.get(key)
    if target is None:
        key = "runs_root"
        target = given.get("runs_root", "runs")
    if not isinstance(target, str) or "${" in target:
        return  # an interpolation: resolved by Hydra; writes there are checked when they happen
    folder = Path(os.path.expanduser(target)).absolute()
    if folder.is_symlink() and not folder.exists():
        raise OverrideError(f"{key}={target}: {folder.name} is a symlink to nothing (or a symlink loop); "
                            f"give a new or empty folder")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OverrideError(f"{key}={target} cannot be created: {folder} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".treeffn-probe-", dir=folder))
    except OSError as e:
        raise OverrideError(f"{key}={target} cannot be written: {folder} refuses new files ({e.strerror}); "
                            f"choose a writable folder") from None
