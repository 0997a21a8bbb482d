"""``treeffn <verb> [key=value ...]``: hands the rest of argv to the verb.

Every verb speaks one dialect (cli/entry.py): Hydra-style overrides of its conf/<verb>.yaml,
``--cfg job``, ``--help``, one-line refusals with exit 2. train runs through Hydra's own entry
point (train() below); the others through cli/entry.py's run_verb.

Kept light: no torch import here, so `treeffn train --cfg job` answers in about a second.
"""

from __future__ import annotations

import importlib
import os
import sys

VERBS = {  # verb -> (its module, what it does); each module's main(argv) returns the exit status (train: train())
    "train": ("treeffn.cli.train", "train a dense or tree-FFN language model"),
    "prepare": ("treeffn.cli.prepare", "tokenize a corpus once into memory-mapped shards (train does it too)"),
    "eval": ("treeffn.cli.eval", "perplexity and lm-evaluation-harness tasks for a trained model"),
    "bench": ("treeffn.cli.bench", "layer speed: tree kernels vs dense MLP (checked, then timed)"),
    "analyze": ("treeffn.cli.analyze", "auto-pruning: routing statistics and plots over a run's checkpoints"),
    "report": ("treeffn.cli.report", "a sweep's runs as the paper-style table (Markdown, CSV, LaTeX) and plots"),
    "prune": ("treeffn.cli.prune", "remove subtrees no token reaches; save the smaller model"),
    "generate": ("treeffn.cli.generate", "text and tokens/s from a trained model (static KV cache, CUDA graphs)"),
}

USAGE = """usage: treeffn <verb> [key=value ...] [--cfg job [--resolve]] [--help]

verbs:
{verbs}

Every verb takes Hydra-style key=value overrides of its config (conf/<verb>.yaml; train and
prepare: conf/config.yaml); `treeffn <verb> --help` lists the keys, `--cfg job` prints the
composed config, and bad input is one line on stderr with exit status 2.

Examples:
  treeffn train                                   tiny tree OPT on the embedded corpus (CPU, ~1 min)
  treeffn train model=opt125m tree.depth=6        OPT-125M shape, depth-6 trees
  treeffn train tree=dense                        the dense baseline
  treeffn train -m tree.placement=node,post_sum   a sweep (Hydra multirun)
  treeffn train --cfg job                         print the composed config
  treeffn prepare data=hub data.name=... data.max_train_tokens=N   prepare a corpus ahead of a sweep
  treeffn eval run=<run dir>                      perplexity and the offline lm-eval tasks
  treeffn prune run=<run dir>                     drop unreached subtrees; params and perplexity before/after
  treeffn generate run=<run dir> prompt="To be"  text and tokens/s (compile=true: CUDA graphs)
  treeffn bench device=cpu                        tree layer vs dense MLP on the CPU
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs="\n".join(f"  {v:<8} {d}" for v, (_, d) in VERBS.items())))
        return 0
    if argv[0] in ("-V", "--version"):
        from treeffn import __version__

        print(f"treeffn {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"treeffn: error: unknown verb {verb!r}; choose one of: {', '.join(VERBS)}{hint}", file=sys.stderr)
        return 2
    module, description = VERBS[verb]
    try:
        if any(a in ("-h", "--help") for a in argv[1:]):
            from treeffn.cli.entry import print_help

            print_help(verb, description)
            return 0
        args = path_arguments(verb, argv[1:])
        if verb == "train":
            return train(args)
        return importlib.import_module(module).main(args)
    except KeyboardInterrupt:  # Ctrl-C before a run began (training handles its own: it saves first)
        print(f"\ntreeffn {verb}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `treeffn <verb> --cfg job | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def train(args: list[str]) -> int:
    """``treeffn train``: the overrides checked here, then Hydra's run (run dirs, -m, launchers)."""
    from treeffn.cli.entry import refused
    from treeffn.cli.preflight import OverrideError, check_overrides

    try:
        check_overrides(args)
    except OverrideError as e:
        return refused("train", e)
    if not _first_process():
        # The other ranks of a multi-process run (started by Lightning, torchrun or srun) train
        # silently: their summary would repeat rank 0's, after its last line. Errors: stderr.
        sys.stdout = open(os.devnull, "w")
    # Hydra reads sys.argv itself; give it the verb's arguments under the verb's name. (Lightning
    # re-runs a command to start more ranks: treeffn.training.distributed.rank_command builds it.)
    sys.argv = ["treeffn train", *args]
    from treeffn.cli.train import main as hydra_main

    hydra_main()
    return 0


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report when the reader of a pipe has gone
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
    "bench": ("out",),
}


def path_arguments(verb: str, args: list[str]) -> list[str]:
    """Path values as Hydra's parser needs them, quoted by the user or not.

    ``treeffn eval run=runs/trainer.max_steps=10`` would fail in Hydra's parser (an ``=`` in a
    value): such values are quoted for Hydra. Whatever Hydra parses stays as given (a sweep
    over paths, an interpolation, a value the user quoted: ``run='runs/a=1'``).
    """
    keys = PATH_KEYS.get(verb, ())
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys:
            out.append(arg)
            continue
        keep = _hydra_parses(arg, sweep_allowed=verb == "train")
        out.append(arg if keep else f"{key}={_hydra_quoted(_unquoted(value))}")
    return out


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        return inner.replace("\\" + value[0], value[0])
    return value


def _hydra_quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _hydra_parses(arg: str, sweep_allowed: bool) -> bool:
    """Hydra parses the override as it stands (as one value, where only train runs sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
    except HydraException:
        return False
    return sweep_allowed or not override.is_sweep_override()


def _first_process() -> bool:
    """Global rank 0, from the variables launchers set for the others (the same rule as
    treeffn.training.distributed.is_global_zero, without importing torch here)."""
    return all(os.environ.get(k, "0").strip() in ("", "0")
               for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


if __name__ == "__main__":
    raise SystemExit(main())
