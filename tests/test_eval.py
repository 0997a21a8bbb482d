"""treeffn eval on tiny real runs, offline: perplexity equals training's, real lm-eval tasks, records, errors."""

import importlib.util
import io
import json
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY, run_cli
from treeffn.config import ConfigError

pytestmark = pytest.mark.slow

# lm-eval is the optional extra '.[eval]'; tests that run its tasks need it (and CI installs it).
HAVE_LM_EVAL = all(importlib.util.find_spec(m) is not None for m in ("lm_eval", "accelerate"))
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed: pip install -e '.[eval]'")


def train_cfg(cache_dir, *overrides):
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}", "trainer.max_steps=10", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def eval_cfg(*overrides):
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def run_eval(*overrides):
    """evaluate() in this process; returns (record, printed text)."""
    from rich.console import Console

    from treeffn.evaluation.runner import evaluate

    out = io.StringIO()
    record = evaluate(eval_cfg(*overrides), console=Console(file=out, width=140, highlight=False))
    return record, " ".join(out.getvalue().split())  # rich wraps long paths; compare words


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One tiny tree run and one tiny dense run, trained once for this module."""
    from treeffn.training.train import train

    root = tmp_path_factory.mktemp("eval-runs")
    train(train_cfg(cache_dir, "tree.depth=2"), root / "tree")
    train(train_cfg(cache_dir, "tree=dense"), root / "dense")
    return root


@needs_lm_eval
def test_eval_reproduces_training_ppl_and_runs_local_tasks_at_0_and_2_shots(runs):
    run = runs / "tree"
    logged = json.loads((run / "result.json").read_text())
    record, printed = run_eval(f"run={run}", "tasks=[treeffn_nextline_hamlet,treeffn_rolling_hamlet]",
                               "num_fewshot=[0,2]", "limit=6", "batch_size=8", "texts=[validation,kjv]",
                               "text_max_tokens=2048")
    val = record["perplexity"]["validation"]
    assert val["ppl"] == pytest.approx(logged["val_ppl"], rel=1e-4)
    assert abs(val["rel_diff_to_training"]) < 1e-4
    assert val["blocks"] == 4 * 8  # trainer.limit_val_batches=4 batches of data.batch_size=8
    assert record["perplexity"]["kjv"]["tokens"] == (2048 // 32) * 31

    # eval.json: metrics, task versions, lm-eval version, shots, seed; the same record in result.json
    saved = json.loads((run / "eval.json").read_text())
    mc = saved["tasks"]["treeffn_nextline_hamlet"]
    assert set(mc) == {"0shot", "2shot"}
    for shots, entry in mc.items():
        assert entry["shots"] == int(shots[0]) and 0.0 <= entry["metrics"]["acc"] <= 1.0
        assert entry["version"] == 1.0 and entry["samples"] == 6 and entry["seed"] == 0
        assert entry["lm_eval_version"] == saved["lm_eval_version"] == "0.4.13"
    rolling = saved["tasks"]["treeffn_rolling_hamlet"]
    assert set(rolling) == {"0shot"}  # a perplexity task has no few-shot form: run once
    assert rolling["0shot"]["metrics"]["word_perplexity"] > 1.0
    assert rolling["0shot"]["metrics"]["bits_per_byte"] > 0.0
    result = json.loads((run / "result.json").read_text())
    assert result["eval"] == saved and result["val_ppl"] == logged["val_ppl"]

    # tree models: hard routing on the inference path, and the output says so
    assert record["model"]["ffn"] == "tree" and "impl=gather" in record["model"]["routing"]
    assert "evaluated on the inference path: hard routing, model.eval(), TreeFFN impl=gather" in printed
    assert "treeffn_nextline_hamlet" in printed and "relative difference" in printed

    # a second eval of the same weights adds to the record instead of replacing it
    run_eval(f"run={run}", "tasks=[]", "texts=[shakespeare]", "text_max_tokens=1024")
    merged = json.loads((run / "eval.json").read_text())
    assert {"validation", "kjv", "shakespeare"} <= set(merged["perplexity"])
    assert set(merged["tasks"]["treeffn_nextline_hamlet"]) == {"0shot", "2shot"}


@needs_lm_eval
@pytest.mark.parametrize("kind", ["tree", "dense"])
def test_a_model_saved_by_treeffn_evaluates_the_same_through_model_path(runs, tmp_path, kind):
    from treeffn.models.hf import save_hf
    from treeffn.models.load import load_from_run

    loaded = load_from_run(runs / kind)
    save_hf(loaded.model, loaded.tokenizer, tmp_path / "hf")
    same = ["tasks=[treeffn_completion_hamlet]", "limit=4", "texts=[validation]", "max_length=32"]
    from_run, _ = run_eval(f"run={runs / kind}", *same)
    from_dir, printed = run_eval(f"model.path={tmp_path / 'hf'}", *same, "data.block_size=32", "batch_size=8",
                                 "validation_limit=4")
    assert from_dir["model"]["source"] == "hf_dir" and from_dir["model"]["ffn"] == kind
    assert (from_dir["model"]["routing"] is not None) == (kind == "tree")
    assert ("hard routing" in printed) == (kind == "tree")
    assert from_dir["perplexity"]["validation"]["blocks"] == from_run["perplexity"]["validation"]["blocks"]
    assert from_dir["perplexity"]["validation"]["ppl"] == pytest.approx(
        from_run["perplexity"]["validation"]["ppl"], rel=1e-5)
    run_task = from_run["tasks"]["treeffn_completion_hamlet"]["0shot"]["metrics"]
    assert from_dir["tasks"]["treeffn_completion_hamlet"]["0shot"]["metrics"] == pytest.approx(run_task)
    assert (tmp_path / "hf" / "eval.json").exists()


@needs_lm_eval
def test_unknown_task_lists_close_matches_and_offline_hub_task_fails_early(runs):
    with pytest.raises(ConfigError) as e:
        run_eval(f"run={runs / 'tree'}", "tasks=[treeffn_nextline_hamlett]")
    msg = str(e.value)
    assert "unknown task 'treeffn_nextline_hamlett'" in msg and "treeffn_nextline_hamlet" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="hub tasks \\(arc_easy\\) need the network") as e:
        run_eval(f"run={runs / 'tree'}", "tasks=[arc_easy]")  # HF_DATASETS_OFFLINE=1 (conftest)
    assert "\n" not in str(e.value)


def test_an_earlier_checkpoint_gets_its_own_record_and_leaves_result_json(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "tree", run)
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "early.ckpt")
    before = (run / "result.json").read_text()
    record, printed = run_eval(f"ckpt={run / 'checkpoints' / 'early.ckpt'}", "tasks=[]", "texts=[kjv]",
                               "text_max_tokens=512")
    assert record["model"]["run_dir"] == str(run.resolve()) and record["model"]["step"] == 10
    assert (run / "eval-early.json").exists() and (run / "result.json").read_text() == before
    assert "result.json left as it is" in printed


@pytest.mark.parametrize("make, fragment", [
    (lambda root: f"run={root}/nowhere", "no such run dir"),
    (lambda root: f"run={root}/config-only", "holds no model: no checkpoints/last.ckpt"),
    (lambda root: f"ckpt={root}/nowhere.ckpt", "no such checkpoint file"),
    (lambda root: f"model.path={root}/nowhere", "no such directory"),
])
def test_bad_model_inputs_fail_with_one_line(runs, tmp_path, make, fragment):
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.yaml").write_text((runs / "tree" / "config.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        run_eval(make(tmp_path), "tasks=[]")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_lm_eval_says_how_to_install_and_perplexity_still_works(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the [eval] extra sees
    with pytest.raises(ConfigError, match=r"pip install 'treeffn\[eval\]'"):
        run_eval(f"run={runs / 'tree'}", "tasks=[treeffn_rolling_kjv]")
    record, _ = run_eval(f"run={runs / 'tree'}", "tasks=[]", "texts=[kjv]", "text_max_tokens=1024")
    assert record["perplexity"]["kjv"]["ppl"] > 1.0 and record["lm_eval_version"] is None


def test_cli_error_is_one_line_with_nonzero_exit_and_writes_nothing(tmp_path):
    out = run_cli(["eval", f"run={tmp_path}/missing"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"treeffn eval: error: run={tmp_path}/missing: no such run dir", out.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra or log files in the current dir


def test_default_eval_config_is_the_documented_one():
    from treeffn.evaluation.runner import default_eval_config
    from treeffn.evaluation.settings import EvalSettings

    cfg = default_eval_config()
    assert cfg["tasks"] == ["treeffn_offline"] and cfg["texts"] == ["validation", "kjv"]
    s = EvalSettings.from_config({**cfg, "run": "somewhere"})
    assert s.num_fewshot == [0] and s.validation_limit == "run"
    with pytest.raises(ConfigError, match="limit=0 is not allowed"):
        EvalSettings.from_config({**cfg, "run": "x", "limit": 0})
