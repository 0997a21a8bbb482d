"""How ``treeffn bench`` times things: two numbers per call, and the machine's ceilings.

* ``loop_us`` (the figure a user waits for): wall time of a loop of back-to-back calls,
  synchronised once at the end, divided by the number of calls. Host time (Python, launches) is
  included; the calls rotate over several copies of the weights, larger together than the
  last-level cache, as the layers of a model would. Several rounds; the caller alternates the
  order of the paths between rounds and takes medians.
* ``gpu_us`` (a diagnostic, never a speed-up on its own): on a GPU the median of per-call CUDA
  event timings with the L2 flushed before each call and a spin kernel in front, so the host has
  enqueued the whole call before the events start: the device's own time. On a CPU it is the
  wall time of single calls with the cache flushed before each.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# Larger than the GPU's L2 (60 MB on an H200) / this CPU's L3 (32 MB).
FLUSH_BYTES = {"cuda": 512 << 20, "cpu": 96 << 20}
# Weights the loop timing rotates over, at least (several times the last-level cache).
ROTATE_BYTES = {"cuda": 192 << 20, "cpu": 96 << 20}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``gpu(fn)``: per-call device time (see the module docstring); ``loop(fns)``: host-inclusive."""

    def __init__(self, device: torch.device, rep_ms: float = 100.0, warmup_ms: float = 25.0):
        self.device, self.rep_ms, self.warmup_ms = device, rep_ms, warmup_ms
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.empty(FLUSH_BYTES["cuda" if self.cuda else "cpu"], dtype=torch.int8, device=device)
        self.spin_cycles = 0

    def flush(self):
        self.flush_buf.zero_() if self.cuda else self.flush_buf.add_(1)

    def _one(self, fn) -> float:
        self.flush()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.spin_cycles:
                torch.cuda._sleep(self.spin_cycles)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def gpu(self, fn) -> dict:
        """Median per-call time of ``fn`` with the cache flushed before each call (GPU: device time)."""
        fn()
        sync(self.device)
        host = []
        for _ in range(5):  # host time to enqueue one call (the GPU is idle, so nothing waits)
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            sync(self.device)
        host_us = statistics.median(host)
        # ~2 cycles per ns at the H200's clocks; twice the enqueue time, plus a margin.
        self.spin_cycles = int(2000 * (2 * host_us + 50)) if self.cuda else 0
        first = [self._one(fn) for _ in range(3)]
        est_us = max(min(first), 1.0)
        for _ in range(max(1, min(200, int(self.warmup_ms * 1e3 / est_us)))):
            fn()
        sync(self.device)
        cap = 200 if self.cuda else 60  # each call also pays a flush (and on a GPU a spin)
        reps = max(5 if est_us > 2e5 else 10, min(cap, int(self.rep_ms * 1e3 / est_us)))
        times = sorted(self._one(fn) for _ in range(reps))
        self.spin_cycles = 0
        q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
        return {"gpu_us": statistics.median(times), "gpu_p10_us": q(0.1), "gpu_p90_us": q(0.9), "gpu_reps": reps,
                "host_enqueue_us": host_us}

    def loop_calls(self, fns: list, est_us: float) -> int:
        """How many calls one loop round makes: about rep_ms / 5 of work, at least 2 rotations."""
        return max(2 * len(fns), min(2000, int(self.rep_ms * 200 / max(est_us, 1.0))))

    def loop_round(self, fns: list, calls: int) -> float:
        """µs per call of ``calls`` back-to-back calls cycling through ``fns``; one sync at the end."""
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        sync(self.device)
        return (time.perf_counter() - t0) * 1e6 / calls


def rotation_copies(device: torch.device, weight_bytes: int) -> int:
    """Weight copies a loop rotates over so that together they exceed the last-level cache."""
    need = ROTATE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(2, min(8, -(-need // max(1, weight_bytes))))


def measure_ceilings(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict:
    """Copy bandwidth (bytes read + written) and a large GEMM's rate, on random data."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)  # several times the L2 / L3
    m = 8192 if device.type == "cuda" else 1024
    gdt = dtype if device.type == "cuda" else torch.float32
    t_copy = _copy_us(n, device, timer)  # each helper frees its buffers when it returns
    t_mm = _gemm_us(m, device, gdt, timer)
    return {"copy_GBps": 2 * n / t_copy / 1e3, "gemm_TFLOPs": 2 * m**3 / t_mm / 1e6,
            "gemm": f"{m}x{m}x{m} {str(gdt).replace('torch.', '')}", "copy_bytes": n}


def _copy_us(n: int, device: torch.device, timer: Timer) -> float:
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    return timer.gpu(lambda: dst.copy_(src))["gpu_us"]


def _gemm_us(m: int, device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    return timer.gpu(lambda: a @ b)["gpu_us"]


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict:
    """Where and when a measurement ran: versions, device, the CPU's load average, the command."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
        "host_cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(), "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = "not installed"
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=10, cwd=os.path.dirname(__file__)).stdout.strip() or None
    except Exception:
        env["git"] = None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(device_name=prop.name, sm_count=prop.multi_processor_count, cuda=torch.version.cuda)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            pass
    else:
        env["device_name"] = f"CPU ({env['host_cpu']}, {torch.get_num_threads()} threads)"
    return env
