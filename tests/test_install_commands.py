"""The README's two install commands, .ci/run and scripts/install_time.py say the same thing."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"^    (python3 -m venv .*)$", (ROOT / "README.md").read_text(), re.MULTILINE)


def test_the_readme_main_job_install_is_what_install_time_measures():
    spec = importlib.util.spec_from_file_location("install_time", ROOT / "scripts" / "install_time.py")
    install_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install_time)
    main_job, tests = _readme_commands()
    assert main_job == install_time.VARIANTS["--no-compile + compile_venv.py (after)"] + " && .venv/bin/treeffn train"
    assert tests.endswith(" && .venv/bin/python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_steps = [line.split("  #")[0].strip() for line in ci.splitlines()]
    for step in tests.split(" && "):
        assert step.replace(" install ", " install -q ", 1) in ci_steps, step  # CI's pip is quiet
