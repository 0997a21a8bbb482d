"""Host time per training step in each Lightning hook of `treeffn train` (tiny model, CPU),
from Lightning's SimpleProfiler: what the runner adds around forward, backward and the
optimizer. Run: python results/host_overhead_cpu/hook_times.py results/host_overhead_cpu"""
import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.profilers import SimpleProfiler


from treeffn.training.train import train


def main(out: Path) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    results = {}
    for ffn in ("dense", "tree"):
        profiler = SimpleProfiler()
        real = L.Trainer

        def with_profiler(*args, **kwargs):
            kwargs["profiler"] = profiler
            return real(*args, **kwargs)

        L.Trainer = with_profiler
        overrides = ["model=tiny", "data.block_size=32", "data.batch_size=2", "trainer=cpu", "trainer.max_steps=400",
                     "trainer.log_every_n_steps=20", "trainer.val_check_interval=400", "checkpoint.every_n_steps=400",
                     "trainer.limit_val_batches=2", "resume=never", "seed=0", f"tree={ffn}"]
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
        run_dir = Path("/tmp/host_overhead_hooks") / ffn
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        train(cfg, run_dir)
        L.Trainer = real
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        rows = {}
        for action, durations in profiler.recorded_durations.items():
            if len(durations) >= 300:  # per-step actions only
                rows[action] = {"calls": len(durations), "mean_ms": round(1e3 * sum(durations) / len(durations), 4)}
        results[ffn] = dict(sorted(rows.items(), key=lambda kv: -kv[1]["mean_ms"]))
    (out / "hook_times.json").write_text(json.dumps(results, indent=1))
    for ffn, rows in results.items():
        print(ffn)
        for action, r in list(rows.items())[:25]:
            print(f"  {r['mean_ms']:8.3f} ms x {r['calls']:4d}  {action}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
