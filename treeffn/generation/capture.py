"""CUDA-graph capture of a decode step, and a CPU check that a step could be captured.

A CUDA graph replays the kernels a step launched during capture, with the same arguments and
buffers. A step can be captured only if it

* never waits for the device: no ``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero``,
  boolean-mask indexing, ``bincount``/``unique`` (their output size depends on the data), no
  copy to the host;
* has the same shapes and host-side arguments on every call (positions live in device tensors);
* allocates nothing new the first time it runs inside the capture (Triton compilation, cuBLAS
  workspaces and treeffn's decode workspace happen in the warm-up before it).

``HostSyncGuard`` checks the first point on any device, the CPU included: it runs the step under
a dispatch mode that raises on every operator that synchronises on CUDA or has a data-dependent
output shape. tests/test_generation.py runs every model family's decode step under it.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators (aten names without overload) that read device data on the host or size their
# output by it. On CUDA each one is a synchronisation, which a graph capture rejects.
SYNCING_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), int()/float()/bool() of a tensor, .tolist()
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero", "aten::nonzero_static_fallback", "aten::argwhere",
    "aten::masked_select", "aten::masked_scatter",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::bincount", "aten::histc",
    "aten::allclose",
})


class CaptureUnsafe(RuntimeError):
    """A decode step did something a CUDA graph cannot contain."""


class HostSyncGuard(TorchDispatchMode):
    """``with HostSyncGuard(): step()`` raises CaptureUnsafe at the first syncing operator.

    Also flags index operations with a boolean mask (their result size depends on the data)
    and ``repeat_interleave`` with tensor repeats. ``seen`` lists every operator the step ran.
    """

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.seen.append(name)
        if name in SYNCING_OPS:
            raise CaptureUnsafe(f"{name} synchronises with the device (or sizes its output by the data)")
        if name in ("aten::index", "aten::index_put", "aten::index_put_") and len(args) > 1:
            for idx in args[1] or ():
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    raise CaptureUnsafe(f"{name} with a boolean mask: the result size depends on the data")
        if name == "aten::repeat_interleave" and args and isinstance(args[0], torch.Tensor) and len(args) == 1:
            raise CaptureUnsafe("repeat_interleave with tensor repeats sizes its output by the data")
        if name == "aten::_to_copy" and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
                raise CaptureUnsafe("a copy to the host inside the step")
        return func(*args, **kwargs)


class CudaGraphStep:
    """A zero-argument step function, captured once and replayed.

    The step must read its inputs from and write its outputs to tensors that live across calls
    (the decode loop's buffers). ``warmup`` eager calls on a side stream come first (as
    PyTorch's own graph tools do): they compile Triton kernels and allocate workspaces, and they
    change those buffers, so the caller sets them afterwards.
    """

    def __init__(self, step, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.step = step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        torch.cuda.synchronize()

    def __call__(self) -> None:
        self.graph.replay()
