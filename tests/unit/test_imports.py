"""The import directions of pyproject.toml's contracts hold, and a violation is caught."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def test_every_import_contract_holds(tmp_path):
    result = check_imports.lint(check_imports.lay_out(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "BROKEN" not in result.stdout and "4 kept" in result.stdout


def test_a_client_module_importing_the_server_breaks_a_contract(tmp_path):
    layout = check_imports.lay_out(tmp_path)
    sdk = layout / "camserve" / "client" / "sdk.py"
    sdk.write_text(sdk.read_text() + "\nfrom camserve.server import runtime  # noqa\n")
    core = layout / "camserve" / "explain" / "methods.py"
    core.write_text(core.read_text() + "\nimport onnxruntime  # noqa\n")
    result = check_imports.lint(layout)
    assert result.returncode != 0
    assert "camserve.client.sdk -> camserve.server.runtime" in result.stdout
    assert "camserve.explain.methods -> onnxruntime" in result.stdout
