"""Wall time of a short OPT-350M tree run on the CPU whose last step is a periodic checkpoint:
last.ckpt as a hard link to that checkpoint (PeriodicCheckpoint, now) against Lightning's
save_last=True (before: the same state written a second time). Alternating, four rounds each.
Run: python results/checkpoint_link_cpu/ab.py results/checkpoint_link_cpu"""
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

import treeffn.training.reliability as reliability
from treeffn.training.train import train

OVERRIDES = ["model=opt350m", "data.block_size=64", "data.batch_size=1", "trainer.max_steps=2",
             "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "trainer.limit_val_batches=1",
             "resume=never", "seed=0"]
NEW = reliability.PeriodicCheckpoint


def lightning_save_last(last_ckpt, **kwargs):  # the callback as it was before
    return ModelCheckpoint(save_last=True, **kwargs)


def one_run(kind: str, run_dir: Path) -> dict:
    reliability.PeriodicCheckpoint = NEW if kind == "link" else lightning_save_last
    GlobalHydra.instance().clear()
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=OVERRIDES), resolve=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.sync()  # start each run with the previous runs' writes on disk
    start = time.perf_counter()
    result = train(cfg, run_dir)
    wall = time.perf_counter() - start
    folder = run_dir / "checkpoints"
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    last_is_link = os.path.samefile(folder / "last.ckpt", folder / "step0000002.ckpt")
    return {"kind": kind, "train_call_s": round(wall, 2), "training_s": result["wall_s"], "checkpoint_files": files,
            "last_is_a_second_name_of_the_step_file": last_is_link,
            "bytes_written_by_checkpoints": sum(files.values()) - (files["last.ckpt"] if last_is_link else 0)}


def main(out: Path) -> None:
    runs = []
    for rnd in range(4):
        for kind in (("link", "save_last") if rnd % 2 == 0 else ("save_last", "link")):
            runs.append({"round": rnd + 1, **one_run(kind, Path("/tmp/ckpt_ab") / kind)})
            print(json.dumps(runs[-1]), flush=True)
    summary = {k: statistics.median(r["train_call_s"] for r in runs if r["kind"] == k) for k in ("link", "save_last")}
    (out / "ab.json").write_text(json.dumps({"overrides": OVERRIDES, "cores": os.cpu_count(), "runs": runs,
                                             "median_train_call_s": summary}, indent=1))
    print(summary)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
