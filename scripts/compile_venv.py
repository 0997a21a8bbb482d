"""Byte-compile a virtual environment on every core: what ``pip install`` does file by file.

The README installs with ``pip install --no-compile`` and then runs this with the venv's
Python. pip's own compile step writes a .pyc for each of the ~14,000 .py files the pinned
dependencies install, one after another: 33 s of the 62 s install on the 2-core machine
(results/setup/install_time.txt). The same files on both cores take about half that. The .pyc
files must exist: where PYTHONDONTWRITEBYTECODE is set, Python never writes them itself, and
every treeffn process would then compile what it imports again (14-17 s each).

Compiled: the venv's site-packages, and the repository's own packages (treeffn/, cli/: an
editable install imports them from here). A file that does not compile for this Python (a
package's test data written for a newer one) is skipped, as pip skips it.

    .venv/bin/python scripts/compile_venv.py
"""

from __future__ import annotations

import compileall
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print("compile_venv.py: error: run it with the virtual environment's Python "
              "(.venv/bin/python scripts/compile_venv.py)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    paths = sysconfig.get_paths()
    folders = sorted({paths["purelib"], paths["platlib"]}) + [str(REPO / "treeffn"), str(REPO / "cli")]
    for folder in folders:
        # workers=0: one process per core; quiet=2: no line per file, none for the skipped ones
        compileall.compile_dir(folder, quiet=2, workers=0)
    print(f"byte-compiled {sys.prefix} and {REPO.name}/ in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
