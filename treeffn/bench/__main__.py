"""``python -m treeffn.bench`` = ``treeffn bench`` (for machines with the repo on PYTHONPATH only)."""

from treeffn.bench.cli import main

raise SystemExit(main())
