"""``treeffn <verb> [hydra overrides]``: hands the rest of argv to the verb's Hydra entry point.

Kept light: no torch import here, so `treeffn train --cfg job` answers in about a second.
"""

from __future__ import annotations

import importlib
import os
import sys

VERBS = {
    "train": ("treeffn.cli.train", "main", "train a dense or tree-FFN language model"),
    "prepare": ("treeffn.cli.prepare", "run", "tokenize a corpus once into memory-mapped shards (train does it too)"),
    "eval": ("treeffn.cli.eval", "main", "perplexity and lm-evaluation-harness tasks for a trained model"),
    "bench": ("treeffn.cli.bench", "main", "layer speed: tree kernels vs dense MLP (checked, then timed)"),
    "analyze": ("treeffn.cli.analyze", "main", "auto-pruning: routing statistics and plots over a run's checkpoints"),
    "report": ("treeffn.cli.report", "main", "a sweep's runs as the paper-style table (Markdown, CSV, LaTeX) and plots"),
    "prune": ("treeffn.cli.prune", "run", "remove subtrees no token reaches; save the smaller model"),
    "generate": ("treeffn.cli.generate", "main", "text and tokens/s from a trained model (static KV cache, CUDA graphs)"),
}

USAGE = """usage: treeffn <verb> [hydra overrides ...]

verbs:
{verbs}

Examples:
  treeffn train                                   tiny tree OPT on the embedded corpus (CPU, ~1 min)
  treeffn train model=opt125m tree.depth=6        OPT-125M shape, depth-6 trees
  treeffn train tree=dense                        the dense baseline
  treeffn train -m tree.placement=node,post_sum   a sweep (Hydra multirun)
  treeffn train --cfg job                         print the composed config
  treeffn prepare data=hub data.name=... data.max_train_tokens=N   prepare a corpus ahead of a sweep
  treeffn prune run=<run dir>                     drop unreached subtrees; params and perplexity before/after
  treeffn generate run=<run dir> prompt="To be"  text and tokens/s (compile=true: CUDA graphs)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs="\n".join(f"  {v:<8} {d}" for v, (_, _, d) in VERBS.items())))
        return 0
    if argv[0] in ("-V", "--version"):
        from treeffn import __version__

        print(f"treeffn {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"treeffn: unknown verb {verb!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module, func, _ = VERBS[verb]
    argv = [verb, *path_arguments(verb, argv[1:])]
    if verb in ("train", "generate"):
        from treeffn.cli.preflight import OverrideError, check_overrides

        try:
            check_overrides(argv[1:], **({"config_name": "generate", "verb": verb} if verb == "generate" else {}))
        except OverrideError as e:
            print(f"treeffn {verb}: error: {e}", file=sys.stderr)
            return 2
    if verb == "train" and not _first_process():
        # The other ranks of a multi-process run (started by Lightning, torchrun or srun) train
        # silently: their summary would repeat rank 0's, after its last line. Errors: stderr.
        sys.stdout = open(os.devnull, "w")
    # Hydra reads sys.argv itself; give it the verb's arguments under the verb's name. (Lightning
    # re-runs a command to start more ranks: treeffn.training.distributed.rank_command builds it.)
    sys.argv = [f"treeffn {verb}", *argv[1:]]
    try:
        getattr(importlib.import_module(module), func)()
    except KeyboardInterrupt:  # Ctrl-C before a run began (training handles its own: it saves first)
        print(f"\ntreeffn {verb}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
# Arguments that name a folder or file, per verb. Their values are whatever the user pastes,
# typically the "run dir: ..." line train prints, whose names hold "=" and ",".
PATH_KEYS = {
    "train": ("hydra.run.dir", "hydra.sweep.dir", "runs_root", "resume", "model.init_from", "data.path",
              "data.val_path", "data.tokenizer"),
    "eval": ("run", "ckpt", "model.path", "output_dir"),
    "prune": ("run", "out", "text"),
    "analyze": ("run", "out"),
    "report": ("sweep", "runs_root", "out"),
    "generate": ("run", "model.path", "output"),
    "prepare": ("data.path", "data.val_path", "data.tokenizer"),
}
HYDRA_VERBS = ("train", "eval", "generate", "prepare")


def path_arguments(verb: str, args: list[str]) -> list[str]:
    """Path values as the verb's parser needs them, quoted by the user or not.

    ``treeffn eval run=runs/trainer.max_steps=10`` would fail in Hydra's parser (an ``=`` in a
    value): such values are quoted for Hydra. Whatever Hydra parses stays as given (a sweep
    over paths, an interpolation). Verbs with plain key=value parsing (prune, analyze) get the
    bare path when the user quoted it for Hydra (``run='runs/a=1'``).
    """
    keys = PATH_KEYS.get(verb, ())
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys:
            out.append(arg)
            continue
        bare = _unquoted(value)
        if verb in HYDRA_VERBS:
            out.append(arg if _hydra_parses(arg) else f"{key}={_hydra_quoted(bare)}")
        else:
            out.append(f"{key}={bare}")
    return out


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        return inner.replace("\\" + value[0], value[0])
    return value


def _hydra_quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _hydra_parses(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_overrides([arg])
    except HydraException:
        return False
    return True


def _first_process() -> bool:
    """Global rank 0, from the variables launchers set for the others (the same rule as
    treeffn.training.distributed.is_global_zero, without importing torch here)."""
    return all(os.environ.get(k, "0").strip() in ("", "0")
               for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


if __name__ == "__main__":
    raise SystemExit(main())
