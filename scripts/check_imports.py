"""Check the import contracts of pyproject.toml (``[tool.importlinter]``) with import-linter.

The components install as ``camserve.export``, ``camserve.server`` and ``camserve.client``
from top-level folders (``[tool.setuptools] package-dir``), which import-linter cannot follow
through an editable install. So the installed layout is laid out again in a temporary folder
(the Python files only, by the same package-dir table) and import-linter runs on that.

    python scripts/check_imports.py          # exit 0 when every contract holds
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def lay_out(target: Path, root: Path = ROOT) -> Path:
    """Copy each package's .py files to where it installs, under ``target``; returns it."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in config["packages"]:
        source = root / config["package-dir"].get(package, package.replace(".", "/"))
        folder = target / package.replace(".", "/")
        folder.mkdir(parents=True, exist_ok=True)
        for path in source.glob("*.py"):
            shutil.copy2(path, folder / path.name)
    return target


def lint(layout: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    """import-linter on ``layout`` with the project's contracts; its output captured."""
    linter = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(linter), str(root / "pyproject.toml"), "--no-cache"],
                          cwd=layout, env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        result = lint(lay_out(Path(folder)))
    print(result.stdout[-4000:] + result.stderr[-2000:], end="")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
