"""The lm-evaluation-harness adapter: the in-memory model as an ``HFLM``, local or hub tasks.

lm-eval is an optional extra (``pip install 'treeffn[eval]'``), imported only here and only
when tasks are asked for. The model is never saved and re-read: ``HFLM(pretrained=<model
object>)`` scores it as it is, already in eval mode, so a tree model runs its hard-routing
inference path.

Task names are checked before any model is loaded: a local task (``local_tasks.py``) or group
needs nothing else; any other name is looked up in the harness' own index of built-in tasks
(which takes a few seconds to build, so it is only built when a non-local name appears).
"""

from __future__ import annotations

import difflib
import functools
import logging
from dataclasses import asdict, dataclass, field

from treeffn.config import ConfigError
from treeffn.evaluation.local_tasks import GROUPS, local_tasks

INSTALL_HINT = "pip install 'treeffn[eval]' (or: pip install 'lm-eval[hf]')"


def require_lm_eval() -> str:
    """The installed lm-eval version, or a one-line error that says how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate: the [hf] extra)
    except ImportError as e:
        missing = getattr(e, "name", None) or "lm_eval"
        raise ConfigError(f"tasks need lm-evaluation-harness with its Hugging Face backend, but {missing!r} is not "
                          f"installed: {INSTALL_HINT}; or pass tasks=[] for perplexity only") from None
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - an unusual install
        return getattr(lm_eval, "__version__", "unknown")


# ------------------------------------------------------------------------------ task names
@dataclass
class TaskPlan:
    names: list[str]                 # task names after expanding treeffn's groups
    specs: list                      # what goes to simple_evaluate: dicts (local) or names (hub)
    task_manager: object = field(repr=False, default=None)

    @property
    def zero_shot_only(self) -> set[str]:
        """Local tasks whose YAML pins ``num_fewshot: 0`` (perplexity tasks): one run covers every shot count."""
        return {s["task"] for s in self.specs if isinstance(s, dict) and s.get("num_fewshot") == 0}

    def check_hub_data(self) -> None:
        """Build the hub tasks once, so a data set the machine cannot get fails before any model work.

        (``datasets`` caches what it downloads: the evaluation itself then reads the local copy.)
        """
        hub = [s for s in self.specs if isinstance(s, str)]
        if not hub:
            return
        try:
            self.task_manager.load(hub)
        except OSError as e:  # ConnectionError / FileNotFoundError from datasets
            raise ConfigError(data_error_message(e, hub)) from None

    def subset(self, names: list[str]) -> "TaskPlan":
        keep = [(n, s) for n, s in zip(self.names, self.specs) if n in names]
        return TaskPlan(names=[n for n, _ in keep], specs=[s for _, s in keep], task_manager=self.task_manager)


def plan_tasks(requested: list[str], task_dirs: list[str] = (), cache_dir=None) -> TaskPlan:
    """Check every task name and turn it into a harness spec; unknown names fail with close matches."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    local = local_tasks(task_dirs)
    names: list[str] = []
    for name in requested:
        for task in GROUPS.get(name, [name]):
            if task not in names:
                names.append(task)
    outside = [n for n in names if n not in local]
    if outside:
        manager = builtin_task_manager()
        known = set(manager.all_tasks)
        unknown = [n for n in outside if n not in known]
        if unknown:
            raise ConfigError(unknown_task_message(unknown[0], [*local, *GROUPS, *known]))
    else:
        manager = TaskManager(include_defaults=False)
    specs = [local[n].harness_config(cache_dir) if n in local else n for n in names]
    return TaskPlan(names=names, specs=specs, task_manager=manager)


@functools.lru_cache(maxsize=1)
def builtin_task_manager():
    """The harness' index of its built-in tasks (several seconds to build: built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def unknown_task_message(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=5, cutoff=0.6)
    hint = (f"close matches: {', '.join(close)}" if close else
            f"offline tasks: {', '.join([*GROUPS, *GROUPS['treeffn_offline']])}; the harness lists its own with "
            f"`lm-eval ls tasks`")
    return f"unknown task {name!r}; {hint}"


# ------------------------------------------------------------------------------ running
@dataclass
class TaskResult:
    task: str
    shots: int                 # the few-shot count the harness used (perplexity tasks stay at 0)
    metrics: dict              # e.g. {"acc": 0.31, "acc_norm": 0.29}
    stderr: dict               # the harness' standard errors; None where it has none
    version: object            # the task config's metadata.version
    samples: int | None        # documents scored (after limit)
    samples_total: int | None  # documents in the task
    higher_is_better: dict

    def as_dict(self) -> dict:
        return asdict(self)


def run_tasks(model, tokenizer, plan: TaskPlan, num_fewshot: int, *, limit=None, batch_size: int = 16,
              seed: int = 0, max_length: int | None = None, bootstrap_iters: int = 100000,
              autocast_dtype=None, verbose: bool = False) -> list[TaskResult]:
    """Score the in-memory model on the planned tasks with ``num_fewshot`` shots."""
    import lm_eval

    if not verbose:  # the harness warns per truncated context; keep the command's output readable
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
    lm = make_hflm(model, tokenizer, batch_size=batch_size, max_length=max_length, autocast_dtype=autocast_dtype,
                   quiet=not verbose)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=plan.specs, num_fewshot=num_fewshot, limit=limit, task_manager=plan.task_manager,
            log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except OSError as e:  # ConnectionError / FileNotFoundError from datasets: a hub task offline
        raise ConfigError(data_error_message(e, [s for s in plan.specs if isinstance(s, str)])) from None
    return [task_result(name, out) for name in out["results"]]


def data_error_message(error: Exception, hub_tasks: list[str]) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = (f"; hub tasks ({', '.join(hub_tasks)}) need the network the first time; offline, use the local "
            f"tasks (tasks=[treeffn_offline])") if hub_tasks else ""
    return f"lm-eval could not load a task's data: {first}{hint}"


def make_hflm(model, tokenizer, *, batch_size: int, max_length: int | None, autocast_dtype=None, quiet: bool = True):
    """The harness' Hugging Face LM around our in-memory model (no copy, no save/reload).

    ``quiet``: rolling log-likelihood shows its one progress bar per task, not an extra bar per
    batch of windows (lm-eval 0.4.x asks for those unconditionally).
    """
    from lm_eval.models.huggingface import HFLM

    class TreeffnHFLM(HFLM):
        _inside_rolling = False

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._inside_rolling = quiet
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._inside_rolling = False

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self._inside_rolling,
                                                 override_bs=override_bs)

    return TreeffnHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                       device=str(next(model.parameters()).device), mixed_precision_dtype=autocast_dtype)


def task_result(name: str, out: dict) -> TaskResult:
    """One task's (or group's) numbers from simple_evaluate's output.

    The harness keys metrics as ``"<metric>,<filter>"``; with the default filter ("none") the
    metric name alone is kept, otherwise ``"<metric>/<filter>"``.
    """
    metrics, stderr = {}, {}
    for key, value in out["results"][name].items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        label_filter = "" if filt == "none" else f"/{filt}"
        if metric.endswith("_stderr"):
            stderr[metric[: -len("_stderr")] + label_filter] = value if isinstance(value, (int, float)) else None
        else:
            metrics[metric + label_filter] = value
    for metric in metrics:
        stderr.setdefault(metric, None)
    n = out.get("n-samples", {}).get(name, {})
    return TaskResult(task=name, shots=int(out.get("n-shot", {}).get(name, 0) or 0), metrics=metrics, stderr=stderr,
                      version=out.get("versions", {}).get(name), samples=n.get("effective"),
                      samples_total=n.get("original"), higher_is_better=out.get("higher_is_better", {}).get(name, {}))
