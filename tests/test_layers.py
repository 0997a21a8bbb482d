"""The import contracts of pyproject.toml (treeffn's rooms, no circles, no import of the command
line) hold for the code, and fail on a planted violation, function-level imports included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter in ``cwd``: lint-imports puts cwd first on sys.path, so `treeffn` and
    # the contract type (tests/import_contracts.py) are the ones found there.
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_code_keeps_its_contracts():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The package, its config and the contract type in a scratch folder (no weights, no caches)."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "treeffn", root / "treeffn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.xz", "*.egg-info"))
    (root / "tests").mkdir()
    for name in ("__init__.py", "import_contracts.py"):
        shutil.copy(ROOT / "tests" / name, root / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


PLANTED = {
    # a low room reaching up, inside a function
    "layers_imports_training": ("treeffn/layers/planted.py",
                                "def f():\n    from treeffn.training.train import train\n    return train\n",
                                "treeffn.layers.planted -> treeffn.training.train"),
    # the library importing the command line (not in the graph: installed from cli/)
    "results_imports_cli": ("treeffn/results/planted.py",
                            "def f():\n    from treeffn.cli.train import main\n    return main\n",
                            "treeffn.results.planted imports treeffn.cli.train"),
    "kernels_imports_cli_by_name": ("treeffn/kernels/planted.py",
                                    "def f():\n    from treeffn import cli\n    return cli\n",
                                    "treeffn.kernels.planted imports treeffn.cli"),
    # two modules of one room importing each other
    "circle_in_data": ("treeffn/data/planted.py",
                       "from treeffn.data import tokenizer\n\n\ndef f():\n    return tokenizer\n",
                       "No cycles are allowed in treeffn.data"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_violation_breaks_a_contract(copy, case):
    path, source, expected = PLANTED[case]
    planted = copy / path
    extra = None
    if case == "circle_in_data":  # and the way back
        extra = copy / "treeffn/data/tokenizer.py"
        original = extra.read_text()
        extra.write_text(original + "\n\ndef _planted():\n    from treeffn.data import planted\n    return planted\n")
    planted.write_text(source)
    try:
        proc = lint(copy)
    finally:
        planted.unlink()
        if extra is not None:
            extra.write_text(original)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout[-3000:]
