"""Load a trained model and its tokenizer without re-training: for eval, analysis and reports.

Three sources, one result (``LoadedModel``):

* a run dir written by ``treeffn train``: the model is rebuilt from ``config.yaml`` exactly as
  training built it, then ``checkpoints/last.ckpt`` (or another checkpoint) is loaded into it;
* a checkpoint path: a Lightning ``.ckpt``, or a ``.safetensors`` / ``.pt`` state dict; the
  config comes from ``run=`` or, when not given, from the run dir the checkpoint sits in
  (``<run>/checkpoints/<file>``);
* a Hugging Face model dir written by ``save_pretrained`` or ``treeffn.models.hf.save_hf``: any
  stock causal LM, or a tree model (model_type treeffn_opt / treeffn_gpt2 / treeffn_llama).

Nothing from a run dir is executed: ``config.yaml`` is parsed as YAML data, checkpoints are
read with ``torch.load(weights_only=True)`` or safetensors, and Hugging Face dirs load with
``trust_remote_code=False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from treeffn.config import ConfigError

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


class ModelLoadError(ConfigError):
    """A run dir, checkpoint or model dir that cannot give a model; the message is one line."""


@dataclass
class LoadedModel:
    model: object            # a transformers PreTrainedModel, in eval mode, on the CPU
    tokenizer: object
    source: str              # "run" (run dir + checkpoint) or "hf_dir"
    weights: Path            # the checkpoint file or the Hugging Face dir the weights came from
    run_dir: Path | None = None
    config: dict | None = None       # the run's resolved training config (source "run")
    step: int | None = None          # training step of the checkpoint, when it says
    ffn: str = "dense"               # "tree" or "dense"
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ run dirs
def read_run_config(run_dir: Path) -> dict:
    """The resolved training config of a run dir, as plain data."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ModelLoadError(f"{run_dir} is not a treeffn run dir: it has no config.yaml")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML or interpolation errors: one line
        raise ModelLoadError(f"{path} could not be read: {str(e).splitlines()[0]}") from None
    missing = [k for k in ("model", "tree", "data") if not isinstance(cfg.get(k), dict)]
    if missing:
        raise ModelLoadError(f"{path} has no {', '.join(missing)} section; is it a treeffn training config?")
    return cfg


def find_run_checkpoint(run_dir: Path) -> Path:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    others = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    hint = f"; it has {others[-1].name}: pass ckpt={others[-1]}" if others else \
        " (training ended before its first checkpoint?)"
    raise ModelLoadError(f"run dir {run_dir} holds no model: no checkpoints/last.ckpt{hint}")


def read_state_dict(path: Path) -> tuple[dict, int | None]:
    """Tensors of a checkpoint file, with the ``model.`` prefix of our LightningModule removed.

    Returns (state dict, training step or None).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_module_prefix(load_file(str(path), device="cpu")), None
    import pickle

    import torch

    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"checkpoint {path} holds objects other than tensors and plain data, which "
                             f"treeffn does not unpickle (torch.load weights_only=True): {first}") from None
    except (RuntimeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"checkpoint {path} could not be read: {first}") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):  # Lightning
        step = payload.get("global_step")
        return _strip_module_prefix(payload["state_dict"]), int(step) if isinstance(step, int) else None
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return _strip_module_prefix(payload), None
    raise ModelLoadError(f"checkpoint {path} is neither a Lightning checkpoint nor a state dict of tensors")


def _strip_module_prefix(state: dict) -> dict:
    """CausalLMModule keeps the HF model as ``self.model``: its keys start with ``model.``."""
    if state and all(k.startswith("model.model.") or k.startswith("model.lm_head.") for k in state):
        return {k[len("model."):]: v for k, v in state.items()}
    return dict(state)


def locate_run(run_dir: str | Path | None = None, ckpt: str | Path | None = None) -> tuple[Path, Path]:
    """(run dir, checkpoint file) after checking that both are there; reads and imports nothing heavy."""
    ckpt_path = Path(ckpt).expanduser() if ckpt else None
    if ckpt_path is not None and not ckpt_path.is_file():
        raise ModelLoadError(f"ckpt={ckpt}: no such checkpoint file")
    if ckpt_path is not None and ckpt_path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"ckpt={ckpt} has suffix {ckpt_path.suffix!r}; allowed: {', '.join(CHECKPOINT_SUFFIXES)}")
    if run_dir is None:
        if ckpt_path is None:
            raise ModelLoadError("give run=<run dir>, ckpt=<checkpoint> or model.path=<Hugging Face model dir>")
        run = ckpt_path.resolve().parent.parent  # <run>/checkpoints/<file>
        if not (run / "config.yaml").is_file():
            raise ModelLoadError(f"ckpt={ckpt}: no config.yaml in {run} to rebuild the model from; "
                                 f"pass run=<the run dir that wrote it>")
    else:
        run = Path(run_dir).expanduser()
        if not run.exists():
            raise ModelLoadError(f"run={run_dir}: no such run dir")
        if not run.is_dir():
            raise ModelLoadError(f"run={run_dir} is a file, not a run dir")
        if not (run / "config.yaml").is_file():
            raise ModelLoadError(f"run={run_dir} is not a treeffn run dir: it has no config.yaml")
    return run, ckpt_path if ckpt_path is not None else find_run_checkpoint(run)


def load_from_run(run_dir: str | Path | None = None, ckpt: str | Path | None = None) -> LoadedModel:
    """Rebuild a run's model from its config.yaml and load a checkpoint's weights into it."""
    run, ckpt_path = locate_run(run_dir, ckpt)
    cfg = read_run_config(run)

    from treeffn.data.tokenizer import load_tokenizer
    from treeffn.models.build import build_model

    tokenizer = load_tokenizer(cfg["data"]["tokenizer"])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # pretrained=False: a fine-tuning run (model.init_from) rebuilds its shapes without reading the
    # dense checkpoint it started from; its own checkpoint holds every weight.
    model = build_model(cfg["model"], cfg["tree"], vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                        bos_id=bos, eos_id=tokenizer.eos_token_id, pretrained=False)
    state, step = read_state_dict(ckpt_path)
    load_weights(model, state, ckpt_path, run)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source="run", weights=ckpt_path, run_dir=run,
                       config=cfg, step=step, ffn=cfg["tree"]["ffn"])


def load_weights(model, state: dict, ckpt_path: Path, run_dir: Path) -> None:
    """Strict load with a one-line error that says which keys do not fit."""
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise ModelLoadError(f"checkpoint {ckpt_path} does not fit the model of {run_dir / 'config.yaml'}: "
                             f"keys {'; '.join(problems)}")


# ------------------------------------------------------------------------------ Hugging Face dirs
def locate_pretrained_dir(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model.path={path}: no such directory")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model.path={path} is not a Hugging Face model dir: it has no config.json")
    return folder


def load_pretrained_dir(path: str | Path) -> LoadedModel:
    """A model dir written by ``save_pretrained`` (config.json + weights + tokenizer files)."""
    folder = locate_pretrained_dir(path)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model.path={path}: config.json is not valid JSON ({e})") from None

    import treeffn.models.hf  # noqa: F401  registers the tree model types (treeffn_opt, ...) with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"model.path={path} has model_type {model_type!r}, which neither transformers nor "
                             f"treeffn knows; treeffn loads Hugging Face causal LMs and dirs written by save_hf")
    from treeffn.models.hf import no_weight_bars

    try:
        with no_weight_bars():
            model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, dtype="float32")
    except Exception as e:  # transformers raises many kinds: the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model.path={path} could not be loaded: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model.path={path}: no usable tokenizer in the dir ({first}); save it with "
                             f"tokenizer.save_pretrained") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"model.path={path}: the tokenizer has no end-of-text token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from treeffn.models.swap import tree_layers

    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source="hf_dir", weights=folder,
                       ffn="tree" if tree_layers(model) else "dense")


# ------------------------------------------------------------------------------ one entry point
def check_model_source(run: str | None = None, model_path: str | None = None, ckpt: str | None = None) -> None:
    """The path checks of ``load_model`` alone: a wrong path fails before anything heavy starts."""
    if model_path and (run or ckpt):
        raise ModelLoadError("give either model.path=<Hugging Face dir> or run=/ckpt=, not both")
    if model_path:
        locate_pretrained_dir(model_path)
    else:
        locate_run(run, ckpt)


def load_model(run: str | None = None, model_path: str | None = None, ckpt: str | None = None) -> LoadedModel:
    """What ``treeffn eval run=... | model.path=... | ckpt=...`` evaluates."""
    check_model_source(run, model_path, ckpt)
    if model_path:
        return load_pretrained_dir(model_path)
    return load_from_run(run, ckpt)
