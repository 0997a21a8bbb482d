"""Every verb speaks one dialect (cli/entry.py): key=value overrides of its conf/<verb>.yaml,
``--help`` listing the keys, ``--cfg job``, and one refusal line with exit 2 and a "did you
mean" for a mistyped key. Then each verb runs once, as the README writes it, on one tiny run.

The verbs run in this process through treeffn.cli.main.main (the `treeffn` console script's
function), so torch is imported once for all of them; only the training runs in a subprocess.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from treeffn.cli.main import VERBS, main

# verb -> (a key --help must list, a mistyped override, the key it should suggest)
TYPOS = {
    "train": ("tree.depth", "tree.dpeth=3", "tree.depth"),
    "prepare": ("data.block_size", "data.blok_size=64", "data.block_size"),
    "eval": ("num_fewshot", "num_fewshots=2", "num_fewshot"),
    "generate": ("max_new_tokens", "max_new_token=3", "max_new_tokens"),
    "analyze": ("max_blocks", "max_block=3", "max_blocks"),
    "report": ("plots", "plot=false", "plots"),
    "prune": ("min_visits", "min_visit=1", "min_visits"),
    "bench": ("rep_ms", "rep_m=1", "rep_ms"),
}


def test_the_table_covers_every_verb():
    assert set(TYPOS) == set(VERBS)


@pytest.mark.parametrize("verb", sorted(TYPOS))
def test_help_lists_the_keys(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    key = TYPOS[verb][0].rsplit(".", 1)[-1]
    assert out.startswith(f"usage: treeffn {verb} [key=value ...]"), out
    assert re.search(rf"^ *{key}: ", out, re.MULTILINE), out


@pytest.mark.parametrize("verb", sorted(TYPOS))
def test_an_unknown_key_is_one_line_exit_2_with_the_nearest_key(verb, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, typo, meant = TYPOS[verb]
    assert main([verb, typo]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith(f"treeffn {verb}: error: {typo.split('=')[0]} is not a") and \
        f"did you mean {meant}" in captured.err, captured.err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("verb", sorted(set(TYPOS) - {"train"}))  # train's --cfg job: tests/test_cli.py
def test_cfg_job_prints_the_composed_config(verb, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key, _, _ = TYPOS[verb]
    assert main([verb, "--cfg", "job", f"{key}=7"]) == 0
    assert f"{key.rsplit('.', 1)[-1]}: 7" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra or log file


@pytest.mark.parametrize("verb, args, fragment", [
    ("analyze", ["--run", "x"], "did you mean run=x?"),
    ("bench", ["--decode"], "did you mean mode=decode?"),
    ("prune", ["run"], "'run' is not key=value"),
    ("eval", ["--cfg", "hydra"], "use --cfg job"),
    ("bench", ["tokens=1,16"], "give a list (tokens=[1,16])"),
    ("report", ["sweep=a,b"], "sweep=a,b is not a sweep name or dir"),  # a path: one value, commas and all
])
def test_flags_and_other_forms_are_refused_in_one_line(verb, args, fragment, capsys):
    assert main([verb, *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------ each verb once
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, cache_dir):
    """One tiny tree run, trained as a one-job sweep so that `treeffn report` has a sweep dir."""
    root = tmp_path_factory.mktemp("verbs")
    out = run_cli(["train", "-m", "seed=0", *TINY, "trainer.max_steps=10", "checkpoint.keep_all=true",
                   f"runs_root={root}/runs"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    run = Path(out.stdout.strip().splitlines()[-1].removeprefix("run dir: "))
    assert run.is_dir(), out.stdout[-2000:]
    return root / "runs" / "multirun", run


@pytest.mark.slow
def test_every_verb_runs_once_on_a_tiny_run(tiny_sweep, tmp_path, capsys, monkeypatch):
    sweep, run = tiny_sweep
    monkeypatch.chdir(tmp_path)

    def verb(*args: str) -> str:
        code = main(list(args))
        captured = capsys.readouterr()
        assert code == 0, (args, captured.err[-2000:])
        return captured.out

    assert "1/1" in verb("report", f"sweep={sweep}", "plots=false")
    assert "layer 0:" in verb("analyze", f"run={run}", "max_blocks=2")
    assert "change +0.000000" in verb("prune", f"run={run}", "max_blocks=2", f"out={tmp_path}/pruned")
    assert "tokens/s" in verb("generate", f"run={run}", "prompt=To", "max_new_tokens=3", "warmup=false")
    verb("eval", f"run={run}", "tasks=[]", "texts=[validation]")
    assert json.loads((run / "eval.json").read_text())["perplexity"]["validation"]["ppl"] > 1
    assert "bench.json" in verb("bench", "device=cpu", "configs=[custom:16,64,2,2]", "tokens=[2]",
                                "paths=[dense,masked]", "modes=[fwd]", "rep_ms=1", f"out={tmp_path}/bench")
    text = tmp_path / "corpus.txt"
    shutil.copy(Path(__file__).parents[1] / "README.md", text)
    assert "prepared corpus: " in verb("prepare", "data=files", f"data.path={text}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "corpus.txt", "pruned"]  # nothing else
