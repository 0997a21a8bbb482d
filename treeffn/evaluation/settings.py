"""The settings of one ``treeffn eval``, checked before anything heavy is imported.

``conf/eval.yaml`` documents every key; ``EvalSettings.from_config`` turns the composed config
(a plain dict) into typed settings or fails with one line that names the key and what is
allowed. Pure Python: a wrong command fails in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treeffn.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "32", "bf16")
WANDB = ("auto", "off")


def _int(key: str, value, low: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= {low}"
                          + (" or null" if allow_none else ""))
    return value


def _str_list(key: str, value) -> list[str]:
    """A list of names; a single string (``tasks=arc_easy``) counts as a list of one."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}={value!r} is not allowed; give a list of names, e.g. {key}=[a,b]")
    return list(value)


@dataclass
class EvalSettings:
    run: str | None = None
    model_path: str | None = None
    ckpt: str | None = None
    tasks: list[str] = field(default_factory=list)
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    limit: int | float | None = None
    batch_size: int = 16
    texts: list[str] = field(default_factory=lambda: ["validation"])
    text_max_tokens: int | None = None
    validation_limit: str | int | float = "run"
    block_size: int | None = None
    cache_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    max_length: int | None = None
    bootstrap_iters: int = 100000
    task_dirs: list[str] = field(default_factory=list)
    output_dir: str | None = None
    wandb: str = "auto"
    verbose: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "EvalSettings":
        model = cfg.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model={model!r} is not allowed; use model.path=<Hugging Face model dir>")
        data = cfg.get("data") or {}
        s = cls(
            run=_path_or_none("run", cfg.get("run")),
            model_path=_path_or_none("model.path", model.get("path")),
            ckpt=_path_or_none("ckpt", cfg.get("ckpt")),
            tasks=_str_list("tasks", cfg.get("tasks")),
            texts=_str_list("texts", cfg.get("texts")),
            task_dirs=_str_list("task_dirs", cfg.get("task_dirs")),
            batch_size=_int("batch_size", cfg.get("batch_size", 16), 1),
            text_max_tokens=_int("text_max_tokens", cfg.get("text_max_tokens"), 2, allow_none=True),
            block_size=_int("data.block_size", data.get("block_size"), 2, allow_none=True),
            cache_dir=data.get("cache_dir"),
            seed=_int("seed", cfg.get("seed", 0), 0),
            max_length=_int("max_length", cfg.get("max_length"), 1, allow_none=True),
            bootstrap_iters=_int("bootstrap_iters", cfg.get("bootstrap_iters", 100000), 0),
            output_dir=_path_or_none("output_dir", cfg.get("output_dir")),
            verbose=bool(cfg.get("verbose", False)),
        )
        shots = cfg.get("num_fewshot", 0)
        shots = [shots] if not isinstance(shots, (list, tuple)) else list(shots)
        s.num_fewshot = [_int("num_fewshot", k, 0) for k in shots] or [0]
        limit = cfg.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                                  or (isinstance(limit, float) and limit > 1)):
            raise ConfigError(f"limit={limit!r} is not allowed; give documents per task (an integer >= 1), "
                              f"a fraction in (0, 1], or null for all")
        s.limit = limit
        vlimit = cfg.get("validation_limit", "run")
        if vlimit != "run" and (isinstance(vlimit, bool) or not isinstance(vlimit, (int, float)) or vlimit <= 0
                                or (isinstance(vlimit, float) and vlimit > 1)):
            raise ConfigError(f"validation_limit={vlimit!r} is not allowed; use run (what training validated on), "
                              f"a number of batches, or a fraction in (0, 1]")
        s.validation_limit = vlimit
        s.device = str(cfg.get("device", "auto"))
        if s.device not in DEVICES and not s.device.startswith("cuda:"):
            raise ConfigError(f"device={s.device!r} is not allowed; choose one of: {', '.join(DEVICES)}, cuda:<n>")
        s.precision = str(cfg.get("precision", "auto"))
        if s.precision not in PRECISIONS:
            raise ConfigError(f"precision={s.precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
        s.wandb = "off" if cfg.get("wandb", "auto") in (False, "off") else str(cfg.get("wandb", "auto"))
        if s.wandb not in WANDB:
            raise ConfigError(f"wandb={s.wandb!r} is not allowed; choose one of: {', '.join(WANDB)}")
        if s.model_path and (s.run or s.ckpt):
            raise ConfigError("give either model.path=<Hugging Face model dir> or run=/ckpt=, not both")
        if not (s.model_path or s.run or s.ckpt):
            raise ConfigError("nothing to evaluate: give run=<run dir>, ckpt=<checkpoint> or model.path=<model dir>")
        if not s.tasks and not s.texts:
            raise ConfigError("nothing to measure: tasks=[] and texts=[]; name a task or a text set")
        return s

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _path_or_none(key: str, value) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a path")
    return value
