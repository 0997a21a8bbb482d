"""Local lm-evaluation-harness tasks: YAML configs whose data are JSON lines files next to them.

The harness reads a local task through ``dataset_path: json`` and ``dataset_kwargs.data_files``,
but ``datasets`` resolves relative ``data_files`` against the current directory. Here every
``data_files`` entry of a task YAML is taken relative to the YAML file itself, so a task folder
can live anywhere (inside the installed package, or a folder given with ``task_dirs=``). The
resolved configs go to the harness as dicts, which ``TaskManager.load`` accepts like names.

The offline tasks shipped with treeffn are in ``treeffn/evaluation/tasks`` (built from the
embedded corpora by ``python -m treeffn.evaluation.build_tasks``). Group names expand to
several tasks: ``treeffn_offline`` runs all of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from treeffn.config import ConfigError

PACKAGED_TASKS_DIR = Path(__file__).parent / "tasks"

GROUPS = {
    "treeffn_offline": ["treeffn_completion_hamlet", "treeffn_nextline_hamlet", "treeffn_nextverse_kjv",
                        "treeffn_rolling_hamlet", "treeffn_rolling_kjv"],
    "treeffn_multiple_choice": ["treeffn_completion_hamlet", "treeffn_nextline_hamlet", "treeffn_nextverse_kjv"],
    "treeffn_rolling": ["treeffn_rolling_hamlet", "treeffn_rolling_kjv"],
}


@dataclass
class LocalTask:
    name: str
    yaml_path: Path
    config: dict  # the YAML as data, data_files already made absolute

    def harness_config(self, cache_dir: str | Path | None = None) -> dict:
        """A copy for ``TaskManager.load``; ``cache_dir`` keeps datasets' Arrow cache out of ~/.cache."""
        cfg = copy.deepcopy(self.config)
        if cache_dir is not None:
            cfg.setdefault("dataset_kwargs", {})["cache_dir"] = str(cache_dir)
        return cfg


def read_task_yaml(path: Path) -> LocalTask | None:
    """One task YAML as data; None for YAML files that define no single task (groups, includes)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"task file {path} is not valid YAML (or uses tags such as !function, which "
                          f"treeffn's local tasks do not run): {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        return None
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {split: _beside(path, f) for split, f in files.items()}
    elif files is not None:
        cfg["dataset_kwargs"]["data_files"] = _beside(path, files)
    return LocalTask(name=cfg["task"], yaml_path=path, config=cfg)


def _beside(yaml_path: Path, files):
    """``data_files`` value(s) relative to the YAML's folder -> absolute path strings."""
    if isinstance(files, list):
        return [_beside(yaml_path, f) for f in files]
    p = Path(str(files)).expanduser()
    return str(p if p.is_absolute() else (yaml_path.parent / p).resolve())


def local_tasks(task_dirs: list[str | Path] = ()) -> dict[str, LocalTask]:
    """All local tasks: the packaged ones, then those of ``task_dirs`` (a later one wins a name)."""
    tasks: dict[str, LocalTask] = {}
    for folder in [PACKAGED_TASKS_DIR, *map(Path, task_dirs)]:
        folder = folder.expanduser()
        if not folder.is_dir():
            raise ConfigError(f"task_dirs: {folder} is not a folder")
        for path in sorted(folder.rglob("*.yaml")):
            task = read_task_yaml(path)
            if task is not None:
                tasks[task.name] = task
    return tasks
