"""Text generation with a static KV cache, eager or through CUDA graphs (``treeffn generate``).

* ``decoder.StaticDecoder``: a causal LM's forward with a preallocated KV cache, capturable;
* ``loop.DecodeLoop`` / ``loop.generate``: prefill + fixed-shape decode steps, greedy or sampled;
* ``capture``: the CUDA-graph capture of a step, and ``HostSyncGuard`` (a CPU check that a step
  never waits for the device);
* ``runner``: what ``treeffn generate`` runs (load, tokenize, generate, print).
"""

from treeffn.generation.loop import DecodeLoop, GenerationOutput, Sampling, generate

__all__ = ["DecodeLoop", "GenerationOutput", "Sampling", "generate"]
