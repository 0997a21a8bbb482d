"""An import-linter contract type for a package the import graph cannot see: the command line.

cli/ is installed as ``treeffn.cli`` (pyproject's package-dir), but it is not a folder under
treeffn/, so grimp, which finds a package's modules on disk, has no ``treeffn.cli`` in its graph
and drops an import of it (``from treeffn.cli.train import run_name`` leaves no edge at all);
the built-in contracts cannot even name the module. This contract reads the import statements of
every module of the package itself, those inside functions included, and fails on any that
names a forbidden module.

pyproject.toml registers it (``contract_types``); ``lint-imports`` and tests/test_layers.py run it.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output


class ImportsNoneOfContract(Contract):
    """Modules of ``package`` import none of ``forbidden``, whether or not those are in the graph."""

    type_name = "imports_none_of"

    package = fields.StringField()
    forbidden = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        forbidden = list(self.forbidden)
        root = _package_folder(self.package)
        found = []
        for module in sorted(graph.find_descendants(self.package) | {self.package}):
            for line, name in _imports(_module_file(root, self.package, module), module):
                if _within(name, forbidden):
                    found.append((module, name, line))
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, imported, line in check.metadata["found"]:
            output.print_error(f"{importer} imports {imported} (l.{line})", bold=False)
        output.new_line()


def _within(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent


def _module_file(root: Path, package: str, module: str) -> Path:
    parts = module.split(".")[len(package.split(".")):]
    folder = root.joinpath(*parts)
    return folder / "__init__.py" if (folder / "__init__.py").is_file() else folder.with_suffix(".py")


def _imports(module_file: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute name) of everything the module's import statements name, anywhere in it:
    the module imported from, and each ``module.name`` (a name may be a submodule)."""
    package = module if module_file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found
