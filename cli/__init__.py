"""Command-line layer: argument dispatch only (installed as ``treeffn.cli``)."""
