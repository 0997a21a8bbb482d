"""Bandwidth of the collectives FSDP and DDP use, between the GPUs of this machine: all-gather
(FSDP's parameter gather), reduce-scatter (its gradient reduction) and all-reduce (DDP's), one
process per GPU through NCCL, as torch.distributed runs them.

    python3 scripts/collective_bandwidth.py --out $OUT/collectives.json          # every GPU
    python scripts/collective_bandwidth.py --out /tmp/c.json --backend gloo --world 2 --sizes-mib 4   # CPU check

Bus bandwidth as nccl-tests defines it: bytes of the whole tensor x (n - 1) / n / time for
all-gather and reduce-scatter, x 2 (n - 1) / n for all-reduce. Median of the timed repeats,
after warm-up; each repeat waits for the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)
    cuda = args.backend == "nccl"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    n = args.world
    rows = []
    for mib in args.sizes_mib:
        for dtype in (torch.bfloat16, torch.float32):
            numel = mib * 2**20 // dtype.itemsize // n * n  # the whole tensor; each rank holds 1/n
            full = torch.empty(numel, dtype=dtype, device=dev)
            shard = torch.ones(numel // n, dtype=dtype, device=dev)
            ops = {"all_gather": lambda: dist.all_gather_into_tensor(full, shard),
                   "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full),
                   "all_reduce": lambda: dist.all_reduce(full)}
            for name, op in ops.items():
                times = []
                for i in range(args.warmup + args.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    op()
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                t = statistics.median(times)
                factor = 2 * (n - 1) / n if name == "all_reduce" else (n - 1) / n
                rows.append({"op": name, "dtype": str(dtype).removeprefix("torch."), "tensor_mib": mib,
                             "median_ms": round(t * 1e3, 3), "bus_gb_per_s": round(numel * dtype.itemsize * factor / t / 1e9, 1)})
    if rank == 0:
        out = {"backend": args.backend, "world": n, "repeats": args.repeats, "rows": rows,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}
        if cuda:
            out["peer_access"] = {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
                                  for a in range(n) for b in range(n) if a != b}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        for r in rows:
            print(f"{r['op']:15} {r['dtype']:9} {r['tensor_mib']:6} MiB {r['median_ms']:9.3f} ms {r['bus_gb_per_s']:7.1f} GB/s")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--world", type=int, default=None, help="processes (default: every GPU)")
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--port", type=int, default=29531)
    args = ap.parse_args()
    args.world = args.world or torch.cuda.device_count()
    mp.spawn(worker, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
