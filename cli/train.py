"""Hydra entry point of ``treeffn train``; the work is in treeffn.training.train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from treeffn.cli.entry import refuse, resolved
from treeffn.config_files import gpu_of_job, run_name  # run_name: also this module's name (tests, older callers)

EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1/SIGUSR2 stopped training after a checkpoint; rerun to continue
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) stopped training after a checkpoint (128 + SIGINT, as shells report it)


if not OmegaConf.has_resolver("treeffn_run_name"):
    OmegaConf.register_new_resolver("treeffn_run_name", run_name)
if not OmegaConf.has_resolver("treeffn_gpu_of_job"):
    OmegaConf.register_new_resolver("treeffn_gpu_of_job", lambda: gpu_of_job())


@hydra.main(config_path="pkg://treeffn.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from treeffn.config import ConfigError

    config = resolved(cfg, "train")  # interpolation and missing-value errors: one line, exit 2
    run_dir = HydraConfig.get().runtime.output_dir
    quiet_library_logs()
    from treeffn.training.train import Preempted, train

    hydra_cfg = HydraConfig.get()
    command = {"argv": sys.argv[1:], "overrides": list(hydra_cfg.overrides.task),
               "job_num": OmegaConf.select(hydra_cfg, "job.num")}
    try:
        result = train(config, run_dir, command=command)
    except ConfigError as e:
        remove_if_empty(run_dir)  # Hydra made the folder; a refused command leaves nothing behind
        refuse("train", e)
    except Preempted as e:
        from treeffn.training.reliability import pass_on_signal

        print(f"treeffn train: {e.status}: {e}", file=sys.stderr)
        remove_if_empty(run_dir)  # stopped before anything was written: leave no empty folder
        pass_on_signal(e.signal_name)  # under submitit: its SIGUSR2 handler requeues the job and exits
        sys.exit(EXIT_INTERRUPTED if e.status == "interrupted" else EXIT_PREEMPTED)
    if result.get("already_finished"):
        print(f"run dir {result['run_dir']} holds this command's finished run ({result['steps']} steps, validation "
              f"perplexity {result['val_ppl']:.2f}); nothing to do (raise trainer.max_steps to train further)")
        print(f"run dir: {result['run_dir']}")
        return result["val_loss"]
    print_summary(result)
    return result["val_loss"]


def remove_if_empty(folder: str) -> None:
    import os

    try:
        os.rmdir(folder)
    except OSError:
        pass


def quiet_library_logs() -> None:
    """Hydra's root handler would print every Lightning message twice; keep Lightning's own."""
    import logging

    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.fabric").propagate = False
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported, if ever


def print_summary(result: dict) -> None:
    ffn = result["ffn"]
    if ffn == "tree" and result["tree"].get("family") == "leaf":
        t = result["tree"]
        arch = (f"leaf-FFF: {t['trees']} trees x depth {t['depth']} ({2 ** t['depth']} leaves each, "
                f"{result['ffn_units']} units/layer), activation={t['activation']}")
    elif ffn == "tree":
        t = result["tree"]
        arch = (f"tree FFN: {t['trees']} trees x depth {t['depth']} ({result['ffn_units']} nodes/layer), "
                f"placement={t['placement']}, activation={t['activation']}")
    else:
        arch = f"dense FFN: {result['ffn_units']} units/layer"
    print(f"model {result['model']}: {result['params_total']:,} parameters, {result['params_ffn']:,} in FFNs; {arch}")
    print(f"active FFN units per token: {result['active_ffn_units']} of {result['ffn_units']} "
          f"({100 * result['active_ffn_fraction']:.1f}%)")
    if result.get("ffn_flops_per_token_infer"):
        print(f"FFN forward FLOPs per token (all layers): inference path {result['ffn_flops_per_token_infer']:,}, "
              f"training path {result['ffn_flops_per_token_train']:,}, dense MLP "
              f"{result['dense_ffn_flops_per_token']:,} "
              f"({100 * result['ffn_flops_per_token_infer'] / result['dense_ffn_flops_per_token']:.1f}% of dense "
              f"at inference)")
    print(f"trained {result['steps']} steps, {result['tokens_seen']:,} tokens in {result['wall_s']:.1f} s")
    line = f"validation perplexity {result['val_ppl']:.2f} (loss {result['val_loss']:.4f})"
    if result.get("unigram_val_ppl"):
        line += f"; unigram perplexity of the validation text {result['unigram_val_ppl']:.2f}"
    print(line)
    if result.get("hard_soft_gap") is not None:
        print(f"leaf routing: hard-descent loss {result['val_loss']:.4f} vs soft-mixture loss "
              f"{result['val_soft_loss']:.4f} (gap {result['hard_soft_gap']:+.4f})")
    if result.get("routing"):
        m = result["routing"]["mean"]
        print(f"routing (validation, mean over layers): dead nodes {100 * m['dead_frac']:.1f}%, "
              f"normalized leaf entropy {m['leaf_entropy']:.3f}")
    if result.get("hf_dir"):
        print(f"Hugging Face model: {result['hf_dir']} (AutoModelForCausalLM.from_pretrained after import treeffn)")
    print(f"run dir: {result['run_dir']}")


if __name__ == "__main__":
    main()
