"""treeffn's decode loop: prefill, then one fixed-shape step per new token, eager or CUDA-graphed.

``DecodeLoop(model, batch_size, max_len, graphs=...)`` holds a StaticDecoder (decoder.py) and
the buffers of one decode step: the current token ids, the position, the logits, the tokens
generated so far and which sequences have finished. ``run(prompt, max_new_tokens)`` generates:

1. prefill: the whole prompt in one eager forward (writes the KV cache at 0 .. P-1), which gives
   the first new token;
2. N - 1 decode steps. Greedy: the step (forward, argmax, end-of-text bookkeeping, position + 1)
   is one function; with ``graphs=True`` it is captured once in a CUDA graph (capture.py) and
   each step is one ``replay()``. Sampling: the graph holds the forward; temperature / top-k /
   top-p sampling runs eagerly between replays (it draws from a torch.Generator).

The host waits for the device only at the end, after the prefill (to time the two phases apart)
and, when stopping at end-of-text, every ``check_every`` steps. Finished sequences receive the
pad token, as Hugging Face ``generate()`` does.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from treeffn.generation.capture import CudaGraphStep
from treeffn.generation.decoder import StaticDecoder


@dataclass
class Sampling:
    """greedy=True: argmax. Otherwise softmax(logits / temperature) over the top_k tokens (0 = all)
    whose cumulative probability first exceeds top_p (1.0 = all), as Hugging Face orders them."""
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationOutput:
    tokens: torch.Tensor          # (B, n) new tokens on the CPU (pads after a sequence's end-of-text)
    prompt_tokens: int
    prefill_s: float
    decode_s: float               # the decode steps, host time included, synchronised at the end
    decode_steps: int
    mode: str                     # "eager" or "graph"
    capture_s: float = 0.0        # graph warm-up and capture (first run of a loop only)
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(1, self.decode_steps)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps made per second (the steady state: prefill excluded)."""
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """All new tokens per second of prefill + decode."""
        total = self.prefill_s + self.decode_s
        return self.batch_size * self.new_tokens / total if total > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "mode": self.mode, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_steps": self.decode_steps, "ms_per_step": self.ms_per_step,
                "decode_tokens_per_s": self.decode_tokens_per_s, "tokens_per_s": self.tokens_per_s,
                "capture_s": self.capture_s, **self.extra}


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    logits = logits.float()
    if s.greedy:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)  # ascending
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@contextlib.contextmanager
def routing_stats_off(model: nn.Module):
    """Tree layers count node visits only where asked; generation leaves the counts alone."""
    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    saved = [m.track_stats for m in layers]
    for m in layers:
        m.track_stats = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.track_stats = value


class DecodeLoop:
    """Static buffers and (optionally) the CUDA graph of one decode step for batch B, up to
    ``max_len`` positions (prompt + new tokens). Build it after the model is on its device and
    dtype, in eval mode; reuse it for many ``run`` calls (the graph is captured once per step kind)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, graphs: bool = False,
                 eos_id: int | None = None, pad_id: int | None = None):
        if graphs and next(model.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()) before decoding")
        self.model, self.graphs = model, graphs
        self.decoder = StaticDecoder(model, batch_size, max_len)
        dev = self.decoder.device
        self.eos_id = eos_id
        self.pad = torch.tensor(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0), device=dev)
        B = batch_size
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.count = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.logits: torch.Tensor | None = None
        self._graphs: dict[str, CudaGraphStep] = {}

    # ------------------------------------------------------------------ steps (all buffers in place)
    def accept(self, nxt: torch.Tensor) -> None:
        """Record the chosen (B,) tokens; they are the next step's input."""
        if self.eos_id is not None:
            nxt = torch.where(self.finished, self.pad, nxt)
            self.finished |= nxt == self.eos_id
        nxt = nxt.unsqueeze(1)
        self.ids.copy_(nxt)
        self.out.index_copy_(1, self.count, nxt)
        self.count += 1

    def greedy_step(self) -> None:
        logits = self.decoder.forward(self.ids, self.pos)
        self.accept(logits.argmax(-1))
        self.pos += 1

    def forward_step(self) -> None:
        logits = self.decoder.forward(self.ids, self.pos)
        if self.logits is None or self.logits.shape != logits.shape:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        self.pos += 1

    def _reset(self, prompt_len: int) -> None:
        self.finished.zero_()
        self.count.zero_()
        self.pos.fill_(prompt_len)

    def _step_fn(self, kind: str):
        """The step to call: eager, or the replay of its CUDA graph (captured on first use)."""
        fn = self.greedy_step if kind == "greedy" else self.forward_step
        if not self.graphs:
            return fn, 0.0
        if kind not in self._graphs:
            t0 = time.perf_counter()
            if kind == "forward":
                self.forward_step()  # allocates the logits buffer outside the capture
            self.pos.zero_()
            self._graphs[kind] = CudaGraphStep(fn)
            return self._graphs[kind], time.perf_counter() - t0
        return self._graphs[kind], 0.0

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def run(self, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
            stop_at_eos: bool = True, check_every: int = 16) -> GenerationOutput:
        """Generate ``max_new_tokens`` after ``prompt`` (B, P) token ids (on the model's device).

        Tree layers count no node visits meanwhile (a graph captured here never contains counting)."""
        with routing_stats_off(self.model):
            return self._run(prompt, max_new_tokens, sampling, stop_at_eos, check_every)

    def _run(self, prompt, max_new_tokens, sampling, stop_at_eos, check_every) -> GenerationOutput:
        s = sampling or Sampling()
        B, P = prompt.shape
        if B != self.decoder.batch_size:
            raise ValueError(f"prompt batch {B} != the loop's batch size {self.decoder.batch_size}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if P < 1:
            raise ValueError("the prompt must have at least one token")
        if P + max_new_tokens > self.decoder.max_len:
            raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed the loop's {self.decoder.max_len} positions")
        step, capture_s = self._step_fn("greedy" if s.greedy else "forward")
        gen = None
        if not s.greedy:
            gen = torch.Generator(device=prompt.device).manual_seed(s.seed)
        stop = stop_at_eos and self.eos_id is not None
        dev = self.decoder.device
        _sync(dev)
        t0 = time.perf_counter()
        self._reset(0)
        logits = self.decoder.forward(prompt, self.pos)
        self.accept(sample_next(logits, s, gen))
        self.pos.fill_(P)
        _sync(dev)
        t1 = time.perf_counter()
        steps = 0
        for i in range(max_new_tokens - 1):
            if s.greedy:
                step()
            else:
                step()
                self.accept(sample_next(self.logits, s, gen))
            steps += 1
            if stop and (i + 1) % check_every == 0 and bool(self.finished.all()):
                break
        _sync(dev)
        t2 = time.perf_counter()
        tokens = self.out[:, :steps + 1].cpu()
        if stop:
            tokens = _trim_after_all_finished(tokens, self.eos_id)
        return GenerationOutput(tokens=tokens, prompt_tokens=P, prefill_s=t1 - t0, decode_s=t2 - t1,
                                decode_steps=steps, mode="graph" if self.graphs else "eager", capture_s=capture_s)


def _trim_after_all_finished(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Cut the pads after the step where the last sequence emitted end-of-text (what generate() returns)."""
    hit = tokens == eos_id
    if not bool(hit.any(dim=1).all()):
        return tokens
    end = int(hit.int().argmax(dim=1).max()) + 1
    return tokens[:, :end]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
             graphs: bool = False, eos_id: int | None = None, pad_id: int | None = None,
             stop_at_eos: bool = True) -> GenerationOutput:
    """One generation with a fresh DecodeLoop (tree layers stop counting visits meanwhile)."""
    loop = DecodeLoop(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, graphs=graphs,
                      eos_id=eos_id, pad_id=pad_id)
    return loop.run(prompt, max_new_tokens, sampling, stop_at_eos=stop_at_eos)
