"""last.ckpt is a hard link to each periodic checkpoint (no second write of the same state), and
any later save of last.ckpt replaces the link without touching the periodic file."""

import os

import pytest
import torch

from tests.test_training import make_cfg
from treeffn.atomic import link_atomic


def global_step(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


@pytest.mark.parametrize("keep_all", [False, True])
def test_last_checkpoint_is_the_newest_periodic_file_not_a_copy(tmp_path, cache_dir, keep_all):
    from treeffn.training.train import train

    run = tmp_path / "run"
    result = train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=6", "checkpoint.every_n_steps=2",
                            f"checkpoint.keep_all={str(keep_all).lower()}", "trainer.val_check_interval=6",
                            "logger=csv"), run)
    assert result["status"] == "finished"
    folder = run / "checkpoints"
    periodic = sorted(p.name for p in folder.glob("step*.ckpt"))
    assert periodic == (["step0000002.ckpt", "step0000004.ckpt", "step0000006.ckpt"] if keep_all
                        else ["step0000006.ckpt"])
    last = folder / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert os.path.samefile(last, folder / "step0000006.ckpt")  # one file, two names
    assert global_step(last) == 6
    assert not list(folder.glob(".*"))  # no temporary names left behind


def test_a_later_save_replaces_the_link_and_leaves_the_periodic_file(tmp_path):
    from treeffn.atomic import atomic_open

    periodic, last = tmp_path / "step0000002.ckpt", tmp_path / "last.ckpt"
    periodic.write_bytes(b"step 2")
    link_atomic(periodic, last)
    assert os.path.samefile(periodic, last)
    with atomic_open(last, "wb") as f:  # what a preemption or the end of a run does
        f.write(b"step 3")
    assert last.read_bytes() == b"step 3" and periodic.read_bytes() == b"step 2"
    periodic.unlink()  # keep_all=false removes the older periodic file; last.ckpt stays whole
    assert last.read_bytes() == b"step 3"


def test_without_hard_links_last_is_an_atomic_copy(tmp_path, monkeypatch):
    periodic, last = tmp_path / "step0000002.ckpt", tmp_path / "last.ckpt"
    periodic.write_bytes(b"x" * 1000)
    last.write_bytes(b"older")

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    link_atomic(periodic, last)
    assert last.read_bytes() == periodic.read_bytes() and not os.path.samefile(periodic, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step0000002.ckpt"]
