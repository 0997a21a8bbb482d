"""Peak memory of the data path, measured the way a user runs it (issue 13's and 18's bounds).

Each case runs a real ``treeffn`` command under ``/usr/bin/time -v`` in a fresh cache and
records its peak resident set size ("Maximum resident set size"), wall time and exit code:

    tokens_1p5gb     treeffn train data=tokens data.path=<1.5 GB .u16> ... trainer.max_steps=3   (bound 2.5 GB)
    prepare_jsonl    treeffn prepare data=files data.path=<>= 300 MB .jsonl>                     (bound 2 GB)
    prepare_parquet  treeffn prepare data=files data.path=<the same documents as .parquet>       (bound 2 GB)
    single_line_50mb treeffn prepare data=files data.path=<50 MB .txt, one line>                 (bound 1.5 GB)

    python scripts/data_memory.py --out results/data_memory [--work /tmp/treeffn-data-memory] [--cases ...]

The corpora are built from the embedded texts (Shakespeare and the King James Bible), repeated
with a distinct prefix per copy so that no two documents are equal. The random token file
holds uniform ids below the embedded vocabulary (8192). Writes ``<out>/data_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BOUNDS_GB = {"tokens_1p5gb": 2.5, "prepare_jsonl": 2.0, "prepare_parquet": 2.0, "single_line_50mb": 1.5}
TREEFFN = [sys.executable, "-m", "treeffn.cli.main"]


def embedded_texts() -> list[str]:
    from treeffn.data.corpus import read_documents

    return [d["text"] for corpus in ("shakespeare", "kjv") for d in read_documents(corpus)]


def write_jsonl(path: Path, min_bytes: int) -> dict:
    texts = embedded_texts()
    size, docs, copy = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < min_bytes:
            for t in texts:
                line = json.dumps({"text": f"Copy {copy}. {t}"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                docs += 1
            copy += 1
    return {"bytes": path.stat().st_size, "documents": docs}


def write_parquet(jsonl: Path, path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, rows = None, []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line)["text"])
            if len(rows) == 2000:
                table = pa.table({"text": rows})
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                rows = []
    if rows:
        table = pa.table({"text": rows})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return {"bytes": path.stat().st_size}


def write_single_line(path: Path, min_bytes: int) -> dict:
    text = " ".join(t.replace("\n", " ") for t in embedded_texts())
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < min_bytes:
            f.write(text + " ")
            written += len(text.encode()) + 1
        f.write("\n")
    return {"bytes": path.stat().st_size, "lines": 1}


def write_tokens(path: Path, n_bytes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    chunk = 1 << 26
    with open(path, "wb") as f:
        left = n_bytes // 2
        while left:
            n = min(chunk, left)
            f.write(rng.integers(0, 8192, size=n, dtype=np.uint16).tobytes())
            left -= n
    return {"bytes": path.stat().st_size}


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    started = time.time()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    tail = [line for line in out.stderr.splitlines() if not line.startswith("\t")][-5:]
    return {"command": " ".join(cmd[2:]).replace("treeffn.cli.main", "treeffn"), "exit_code": out.returncode,
            "peak_rss_gb": round(peak_kb / 2**20, 3), "wall_s": round(time.time() - started, 1),
            "stdout_tail": out.stdout.strip().splitlines()[-3:], "stderr_tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/data_memory")
    ap.add_argument("--work", default="/tmp/treeffn-data-memory")
    ap.add_argument("--cases", nargs="*", default=list(BOUNDS_GB))
    ap.add_argument("--jsonl-mb", type=int, default=310)
    args = ap.parse_args()
    work, out_dir = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    inputs, cases = {}, {}
    for case in args.cases:
        cache = work / f"cache-{case}"
        shutil.rmtree(cache, ignore_errors=True)
        env_case = dict(env, TREEFFN_CACHE=str(cache))
        if case == "tokens_1p5gb":
            train, val = work / "train-1p5gb.u16", work / "val.u16"
            if not train.exists():
                inputs["train-1p5gb.u16"] = write_tokens(train, 1_500_000_000, 0)
                inputs["val.u16"] = write_tokens(val, 2_000_000, 1)
            cmd = [*TREEFFN, "train", "data=tokens", f"data.path={train}", f"data.val_path={val}",
                   "trainer.max_steps=3", f"hydra.run.dir={work / 'run-tokens'}", "resume=never"]
        elif case in ("prepare_jsonl", "prepare_parquet"):
            jsonl = work / "corpus.jsonl"
            if not jsonl.exists():
                inputs["corpus.jsonl"] = write_jsonl(jsonl, args.jsonl_mb * 10**6)
            path = jsonl
            if case == "prepare_parquet":
                path = work / "corpus.parquet"
                if not path.exists():
                    inputs["corpus.parquet"] = write_parquet(jsonl, path)
            cmd = [*TREEFFN, "prepare", "data=files", f"data.path={path}"]
        elif case == "single_line_50mb":
            path = work / "one-line-50mb.txt"
            if not path.exists():
                inputs["one-line-50mb.txt"] = write_single_line(path, 50 * 10**6)
            val = work / "val.txt"
            val.write_text("\n\n".join(embedded_texts()[:3]) + "\n", encoding="utf-8")
            cmd = [*TREEFFN, "prepare", "data=files", f"data.path={path}", f"data.val_path={val}"]
        else:
            raise SystemExit(f"unknown case {case}; choose from {', '.join(BOUNDS_GB)}")
        load = os.getloadavg()
        cases[case] = {**timed(cmd, work, env_case), "bound_gb": BOUNDS_GB[case],
                       "load_avg_before": [round(x, 2) for x in load]}
        prepared = list((cache / "prepared").glob("*/meta.json"))
        if prepared:
            meta = json.loads(prepared[0].read_text())
            cases[case]["prepared"] = {"train_tokens": meta["splits"]["train"]["tokens"],
                                       "validation_tokens": meta["splits"]["validation"]["tokens"],
                                       "seconds": meta["prepared"]["seconds"],
                                       "tokens_per_s": meta["prepared"]["tokens_per_s"]}
        c = cases[case]
        print(f"{case}: exit {c['exit_code']}, peak RSS {c['peak_rss_gb']} GB (bound {c['bound_gb']}), "
              f"{c['wall_s']} s", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    import torch

    record = {"cases": cases, "inputs": inputs, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "numpy": np.__version__},
              "command": " ".join(["python", *sys.argv])}
    path = out_dir / "data_memory.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    record["cases"] = {**old.get("cases", {}), **cases}
    record["inputs"] = {**old.get("inputs", {}), **inputs}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
