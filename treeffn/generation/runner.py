"""``treeffn generate`` from a resolved config to printed text and tokens/s.

Order of work (cheap checks first, so a wrong command fails before a model is loaded):
settings (one line per bad value), the model source's paths, the model (as ``treeffn eval``
loads it: treeffn.models.load), device and dtype, the prompt, an untimed warm-up, the timed
generation (treeffn.generation.loop), the text and the figures; a JSON record only if asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from treeffn.config import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GenerateSettings:
    run: str | None = None
    ckpt: str | None = None
    model_path: str | None = None
    prompt: str = ""
    max_new_tokens: int = 128
    batch_size: int = 1
    compile: bool = False
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    warmup: bool = True
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "GenerateSettings":
        s = cls()
        s.run, s.ckpt = cfg.get("run"), cfg.get("ckpt")
        s.model_path = (cfg.get("model") or {}).get("path")
        prompt = cfg.get("prompt")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, (str, int, float)):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}; quote it: prompt=\"...\"")
        s.prompt = str(prompt)
        s.max_new_tokens = _int(cfg, "max_new_tokens", 1, 1 << 20)
        s.batch_size = _int(cfg, "batch_size", 1, 4096)
        s.compile, s.greedy = _bool(cfg, "compile"), _bool(cfg, "greedy")
        s.stop_at_eos, s.warmup = _bool(cfg, "stop_at_eos"), _bool(cfg, "warmup")
        s.temperature = _float(cfg, "temperature")
        if not s.temperature > 0:
            raise ConfigError(f"temperature={s.temperature} must be > 0 (greedy=true for argmax decoding)")
        s.top_k = _int(cfg, "top_k", 0, 1 << 30)
        s.top_p = _float(cfg, "top_p")
        if not 0 < s.top_p <= 1:
            raise ConfigError(f"top_p={s.top_p} must be in (0, 1]")
        s.seed = _int(cfg, "seed", -(1 << 62), 1 << 62)
        s.device = str(cfg.get("device", "auto"))
        if s.device not in ("auto", "cpu", "cuda") and not s.device.startswith("cuda:"):
            raise ConfigError(f"device={s.device!r} is not allowed; choose one of: auto, cpu, cuda, cuda:<n>")
        s.dtype = str(cfg.get("dtype", "auto"))
        if s.dtype not in DTYPES:
            raise ConfigError(f"dtype={s.dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
        s.output = cfg.get("output")
        return s


def _int(cfg: dict, key: str, low: int, high: int) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} is out of range; it must be {low}..{high}")
    return value


def _float(cfg: dict, key: str) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    return float(value)


def _bool(cfg: dict, key: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def resolve_device_and_dtype(s: GenerateSettings):
    import torch

    if s.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if s.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={s.device}: CUDA is not available on this machine; use device=cpu")
        device = torch.device(s.device)
    if s.compile and device.type != "cuda":
        raise ConfigError(f"compile=true captures the decode step in a CUDA graph and needs a CUDA device "
                          f"(device is {device}); use compile=false")
    if s.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, s.dtype)
    return device, dtype


def encode_prompt(tokenizer, text: str, batch_size: int, device):
    import torch

    ids = tokenizer(text)["input_ids"] if text else []
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("the prompt is empty and the tokenizer has no start token; give prompt=\"...\"")
        ids = [start]
    return torch.tensor([ids] * batch_size, dtype=torch.long, device=device)


def generate_from_config(cfg: dict, out=print) -> dict:
    """Run one ``treeffn generate``; returns the record (written to ``output`` only if set)."""
    s = GenerateSettings.from_config(cfg)
    from treeffn.models.load import check_model_source

    check_model_source(run=s.run, model_path=s.model_path, ckpt=s.ckpt)
    if s.output and Path(s.output).is_dir():
        raise ConfigError(f"output={s.output} is a directory; give a file name for the JSON record")
    device, dtype = resolve_device_and_dtype(s)

    import torch

    from treeffn.generation.decoder import StaticDecoder
    from treeffn.generation.loop import DecodeLoop, Sampling, routing_stats_off
    from treeffn.models.load import load_model

    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    loaded = load_model(run=s.run, model_path=s.model_path, ckpt=s.ckpt)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    prompt = encode_prompt(tok, s.prompt, s.batch_size, device)
    limit = StaticDecoder.position_limit_of(model)
    if prompt.shape[1] + s.max_new_tokens > limit:
        raise ConfigError(f"the prompt ({prompt.shape[1]} tokens) + max_new_tokens={s.max_new_tokens} exceed the "
                          f"model's {limit} positions")
    sampling = Sampling(greedy=s.greedy, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with routing_stats_off(model):
        loop = DecodeLoop(model, s.batch_size, prompt.shape[1] + s.max_new_tokens, graphs=s.compile,
                          eos_id=eos, pad_id=pad)
        warm_s = 0.0
        if s.warmup:
            t1 = time.perf_counter()
            loop.run(prompt, min(4, s.max_new_tokens), sampling, stop_at_eos=False)
            warm_s = time.perf_counter() - t1
        result = loop.run(prompt, s.max_new_tokens, sampling, stop_at_eos=s.stop_at_eos)
    texts = [tok.decode(row[: _length(row, eos)].tolist(), skip_special_tokens=True) for row in result.tokens]
    ffn = describe_ffn(model)
    mode = "CUDA graph" if s.compile else "eager"
    out(f"model: {loaded.weights} ({ffn}) on {device}, {str(dtype).replace('torch.', '')}, decode loop {mode}")
    same = s.batch_size > 1 and len(set(texts)) == 1
    for i, text in enumerate(texts[:1] if same else texts):
        head = "" if s.batch_size == 1 else (f"[all {s.batch_size} sequences] " if same else f"[{i}] ")
        out(f"{head}{s.prompt}{text}")
    n = result.new_tokens
    out(f"{n} new tokens x {s.batch_size} sequence(s): {result.tokens_per_s:.1f} tokens/s "
        f"(prefill {1e3 * result.prefill_s:.1f} ms for {prompt.shape[1]} prompt tokens; decode "
        f"{result.ms_per_step:.2f} ms/step = {result.decode_tokens_per_s:.1f} tokens/s)"
        + (f"; warm-up {warm_s:.2f} s" if s.warmup else "")
        + (f"; graph capture {result.capture_s:.2f} s" if s.compile and not s.warmup else ""))
    record = {"settings": asdict(s), "model": {"weights": str(loaded.weights), "source": loaded.source, "ffn": ffn,
                                               "step": loaded.step},
              "device": str(device), "dtype": str(dtype), "load_s": load_s, "warmup_s": warm_s,
              "prompt_ids": prompt[0].tolist(), "texts": texts, "tokens": result.tokens.tolist(),
              "timing": result.as_dict()}
    if s.output:
        path = Path(s.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        out(f"wrote {path}")
    return record


def _length(row, eos) -> int:
    """Tokens up to (without) the first end-of-text."""
    if eos is None:
        return len(row)
    hits = (row == eos).nonzero()
    return int(hits[0]) if hits.numel() else len(row)


def describe_ffn(model) -> str:
    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    if not layers:
        return "dense FFN"
    first = layers[0]
    kind = type(first).__name__
    return f"{kind} x {len(layers)}, {first.trees} trees of depth {first.depth}"
