"""``treeffn eval``: perplexity and lm-evaluation-harness tasks for trained models.

Where things are (the CLI is ``cli/eval.py``, its settings ``conf/eval.yaml``):

    runner.py       evaluate(cfg): the whole command, step by step; eval_after_train helpers
    settings.py     the checked settings of one evaluation (one-line errors, no heavy imports)
    perplexity.py   perplexity on packed token blocks, the way training validates
    harness.py      the lm-eval adapter: task names, HFLM around the in-memory model, results
    local_tasks.py  task YAMLs with JSON lines data next to them (offline tasks)
    tasks/          the offline tasks shipped with treeffn (built by build_tasks.py)
    record.py       eval.json, result.json["eval"], W&B
    table.py        the printed table

Models are loaded by ``treeffn.models.load`` (run dirs, checkpoints, Hugging Face dirs).
"""
