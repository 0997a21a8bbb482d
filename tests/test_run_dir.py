"""The run dir's rules, one at a time and without training: injective names, ownership, the
experiment identity, atomic files and folders (with injected write failures), the CSV parts'
single timeline, the memory estimate, and path arguments every verb accepts."""

from __future__ import annotations

import csv
import errno
import os

import pytest
import torch

from treeffn.atomic import atomic_folder, atomic_open, remove_temporaries, storage_error, write_text_atomic
from treeffn.cli.main import path_arguments
from treeffn.config_files import run_name
from treeffn.config import ConfigError, check_training_memory
from treeffn.training.run_files import (MARKER, check_run_dir_is_ours, check_same_experiment, claim_run_dir,
                                        release_run_dir, start_metrics_part)


# ------------------------------------------------------------------ names
def test_run_names_keep_commands_apart():
    accented = [run_name("+note='héllo wörld ☃'"), run_name("+note='hèllo wärld ☃'")]
    assert accented[0] != accented[1]  # issue 18, case 2: both used to be +note=_h_llo_w_rld_
    assert all(n.startswith("+note=_h_llo_w_rld") and "@" in n for n in accented)
    assert run_name("model=opt125m,tree.depth=6") == "model=opt125m,tree.depth=6"  # clean names stay as they are
    assert run_name("") == "default"
    long_a, long_b = run_name("x=" + "a" * 300), run_name("x=" + "a" * 299 + "b")
    assert long_a != long_b and len(long_a) <= 200 and len(long_b) <= 200
    assert run_name("data.path=a/b") != run_name("data.path=a_b")  # "/" cleaned to "_" must not merge them


# ------------------------------------------------------------------ ownership and identity
def test_only_new_empty_or_marked_folders_are_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_run_dir_is_ours(tmp_path / "new")  # does not exist yet
    (tmp_path / "empty").mkdir()
    check_run_dir_is_ours(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"holds notes.txt, which treeffn did not write \(no \.treeffn-run"):
        check_run_dir_is_ours(mine)
    claimed = tmp_path / "claimed"
    claim_run_dir(claimed)
    release_run_dir(claimed)
    (claimed / "config.yaml").write_text("{}")
    assert (claimed / MARKER).is_file()
    check_run_dir_is_ours(claimed)  # treeffn's own
    with pytest.raises(ConfigError, match="is the current folder or holds it"):
        check_run_dir_is_ours(tmp_path)


def test_the_identity_covers_every_setting_but_the_run_settings(tmp_path):
    from omegaconf import OmegaConf

    saved = {"model": {"name": "tiny"}, "tree": {"depth": 6}, "seed": 0, "note": "héllo wörld ☃",
             "trainer": {"max_steps": 10}, "data": {"cache_dir": "/a", "block_size": 32}}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    same = {**saved, "trainer": {"max_steps": 99}, "data": {"cache_dir": "/b", "block_size": 32}}
    check_same_experiment(same, tmp_path)  # longer training, another cache: the same experiment
    with pytest.raises(ConfigError, match=r"different note \(note: 'héllo wörld ☃' there, 'hèllo wärld ☃' here\)"):
        check_same_experiment({**saved, "note": "hèllo wärld ☃"}, tmp_path)
    with pytest.raises(ConfigError, match=r"different extra \(extra: unset there, 1 here\)"):
        check_same_experiment({**saved, "extra": 1}, tmp_path)


# ------------------------------------------------------------------ atomic writes, failures injected


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomic(target, "good record\n")
    with pytest.raises(OSError) as raised:
        with atomic_open(target, "w") as f:
            f.write("half a rec")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert storage_error(raised.value).filename == str(target)  # the message can name the file
    assert target.read_text() == "good record\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_checkpoint_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from treeffn.training.reliability import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 5, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def save_then_fill_the_disk(obj, f, *a, **kw):  # writes part of the file, then the disk is full
        real_save({"partial": torch.zeros(10)}, f)
        raise RuntimeError("PytorchStreamWriter failed writing file") from OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(RuntimeError) as raised:
        io.save_checkpoint({"global_step": 10, "w": torch.zeros(1000)}, path)
    assert storage_error(raised.value).errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 5 and torch.equal(loaded["w"], torch.arange(1000.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_failed_folder_export_leaves_the_previous_folder_whole(tmp_path):
    hf = tmp_path / "hf"
    with atomic_folder(hf) as staging:
        (staging / "config.json").write_text("old config")
        (staging / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(OSError):
        with atomic_folder(hf) as staging:  # issue 18, case 3: a new config.json, then the disk is full
            (staging / "config.json").write_text("new config")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (hf / "config.json").read_text() == "old config"
    assert (hf / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_leftovers_of_a_killed_writer_are_cleared_and_a_moved_folder_comes_back(tmp_path):
    (tmp_path / ".last.ckpt.tmp4242").write_bytes(b"half")
    (tmp_path / ".hf.old4242").mkdir()  # killed between the two renames of a folder swap
    (tmp_path / ".hf.old4242" / "config.json").write_text("previous")
    (tmp_path / ".lock").write_text("1")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "hf"]
    assert (tmp_path / "hf" / "config.json").read_text() == "previous"


# ------------------------------------------------------------------ metrics parts
def write_metrics(path, steps):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train/loss"])
        w.writeheader()
        w.writerows({"step": s, "train/loss": 1.0 / (s + 1)} for s in steps)


def read_steps(path):
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_metrics_parts_form_one_timeline_after_a_resume_from_an_older_checkpoint(tmp_path):
    write_metrics(tmp_path / "metrics.csv", [4, 9, 14, 19, 24])  # killed after step 25, last checkpoint at 15
    start_metrics_part(tmp_path, resume_step=15)
    assert read_steps(tmp_path / "metrics-part000.csv") == [4, 9, 14]  # steps 15.. are trained again
    assert read_steps(tmp_path / "superseded-part000.csv") == [19, 24]  # kept, apart
    write_metrics(tmp_path / "metrics.csv", [19, 24, 29])
    start_metrics_part(tmp_path, resume_step=10)  # the next resume goes back even further
    assert read_steps(tmp_path / "metrics-part000.csv") == [4, 9]
    assert read_steps(tmp_path / "metrics-part001.csv") == []
    assert read_steps(tmp_path / "superseded-part000.csv") == [19, 24, 14]
    assert read_steps(tmp_path / "superseded-part001.csv") == [19, 24, 29]


# ------------------------------------------------------------------ memory
def test_depth_20_on_the_tiny_default_is_refused_with_the_estimate():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["tree.depth=20"]), resolve=True)
    with pytest.raises(ConfigError, match=r"tree.depth=20 \(1 tree per layer\) needs an estimated 108.0 GiB .*"
                                          r"at least 96.0 GiB of training-path activations for 2,048 tokens .*"
                                          r"more than this machine's 4.0 GiB"):
        check_training_memory(cfg, 4 * 2**30, "this machine")
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        default = OmegaConf.to_container(compose("config"), resolve=True)
    check_training_memory(default, 4 * 2**30, "this machine")  # depth 6 fits easily


# ------------------------------------------------------------------ paths every verb accepts
PRINTED = "runs/+note=a_b,trainer.max_steps=10@0123456789"  # what `treeffn train` prints: "=", ",", "@"


@pytest.mark.parametrize("given", [PRINTED, f"'{PRINTED}'", f'"{PRINTED}"'])
def test_a_printed_run_dir_reaches_every_verb_as_one_path(given):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for verb, key in (("eval", "run"), ("train", "hydra.run.dir"), ("prune", "run"), ("analyze", "run"),
                      ("generate", "run"), ("report", "sweep"), ("bench", "out")):
        (arg,) = path_arguments(verb, [f"{key}={given}"])
        assert parser.parse_overrides([arg])[0].value() == PRINTED
    # only train runs sweeps: a path with commas is one path for every other verb
    assert path_arguments("train", ["seed=0,1", "data.path=a.txt,b.txt"]) == ["seed=0,1", "data.path=a.txt,b.txt"]
    (arg,) = path_arguments("analyze", ["run=runs/a,b"])
    assert parser.parse_overrides([arg])[0].value() == "runs/a,b"


def test_storage_error_finds_the_os_error_behind_a_wrapped_one():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/x/config.yaml")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert storage_error(wrapped).errno == errno.EROFS
    assert storage_error(ValueError("no")) is None
    assert os.path.basename(storage_error(OSError(errno.ENOSPC, "full", "/a/b")).filename) == "b"
