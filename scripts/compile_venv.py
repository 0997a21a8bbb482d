"""Byte-compile a virtual environment on every core: what ``pip install`` does file by file.

The README installs with ``pip install --no-compile`` and then runs this with the venv's
Python (issue 17: the install of the main job within 60 s on the 2-core machine; figures in
results/setup/install_time.txt). The .pyc files must exist: where PYTHONDONTWRITEBYTECODE is set
(it is on this project's machines), Python never writes them itself, and every treeffn process
would compile what it imports again.

Compiled: the venv's site-packages, and the repository's own packages (treeffn/, cli/: an
editable install imports them from here). Left out, unlike pip: the dependencies' own test
suites (``tests/`` and ``test/`` folders: pandas, sympy, networkx, numpy, ... ship about 2,500
such files), which nothing imports at run time; Python compiles one in memory should anything
import it. A file that does not compile for this Python (a package's test data written for a
newer one) is skipped, as pip skips it.

    .venv/bin/python scripts/compile_venv.py
"""

from __future__ import annotations

import compileall
import re
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"[\\/]tests?[\\/]")  # a dependency's test suite


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print("compile_venv.py: error: run it with the virtual environment's Python "
              "(.venv/bin/python scripts/compile_venv.py)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    paths = sysconfig.get_paths()
    for folder in sorted({paths["purelib"], paths["platlib"]}):
        # workers=0: one process per core; quiet=2: no line per file, none for the skipped ones
        compileall.compile_dir(folder, quiet=2, workers=0, rx=SKIP)
    for folder in (REPO / "treeffn", REPO / "cli"):
        compileall.compile_dir(str(folder), quiet=2, workers=0)
    print(f"byte-compiled {sys.prefix} and {REPO.name}/ in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
