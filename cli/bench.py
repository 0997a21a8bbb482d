"""Entry point of ``treeffn bench`` (argparse: a benchmark has no config tree to compose).

The work is in treeffn.bench; ``treeffn bench --help`` lists the options.
"""

from __future__ import annotations

import sys


def main() -> None:
    from treeffn.bench import main as bench_main

    raise SystemExit(bench_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
