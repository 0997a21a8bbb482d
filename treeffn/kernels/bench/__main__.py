"""``python -m treeffn.kernels.bench`` = ``treeffn bench`` (for machines with the repo on PYTHONPATH only)."""

from treeffn.kernels.bench.cli import main

raise SystemExit(main())
