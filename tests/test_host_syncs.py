"""A training step reads nothing back from the device except on logging and statistics steps.

On a GPU every such read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` ...) makes the host
wait until the GPU has finished all queued work, so the next step's kernels are launched into an
idle GPU. Here the reads are counted on the CPU, where they are the same calls: in the steps
between two logging steps there must be none (the data sampler's reads of its own CPU index
tensors excepted)."""

import collections
import traceback

import lightning as L
import pytest
import torch

from tests.test_training import make_cfg

READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")


@pytest.mark.slow
@pytest.mark.parametrize("ffn", ["tree", "dense"])
def test_no_host_reads_between_logging_steps(tmp_path, cache_dir, monkeypatch, ffn):
    from treeffn.training import train as train_module

    seen: collections.Counter = collections.Counter()
    watching = {"on": False}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if watching["on"]:
                frames = traceback.extract_stack()[:-1]
                if not any(f.filename.endswith(("treeffn/data/sampler.py", "torch/utils/data/dataloader.py"))
                           for f in frames):
                    seen[" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[-4:])] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class Watch(L.Callback):
        # steps 12..19 run with log_every_n_steps = stats_every_n_steps = 10: none of them logs
        def on_train_batch_start(self, trainer, *args):
            watching["on"] = 11 <= trainer.global_step < 19

        def on_train_batch_end(self, trainer, *args):
            watching["on"] = 11 < trainer.global_step < 19

    real_trainer = L.Trainer

    def trainer_with_watch(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Watch()]
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(L, "Trainer", trainer_with_watch)
    tree = ["tree.depth=2"] if ffn == "tree" else ["tree=dense"]
    result = train_module.train(make_cfg(cache_dir, *tree, "trainer.max_steps=22", "trainer.log_every_n_steps=10",
                                         "trainer.val_check_interval=22", "checkpoint.every_n_steps=22",
                                         "logger=csv"), tmp_path / "run")
    assert result["status"] == "finished"
    assert not seen, f"host reads of tensors during non-logging steps: {dict(seen)}"
