"""Dependencies point one way: export -> fos_runtime <- shim; bench is never needed to serve."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_runtime_imports_neither_shim_nor_export_nor_bench():
    imported = _imported_packages("fos_runtime")
    assert not {"shim", "export", "bench", "fastapi", "tritonclient", "torch"} & set(imported), imported


def test_only_serves_cli_imports_export():
    # fos serve --model exports what the repository lacks; the service and its backends must load without export
    # (and its torch).
    imported = _imported_packages("shim")
    assert imported.get("export", set()) == {"shim/serve.py"}, imported.get("export")


def test_export_does_not_import_the_shim():
    imported = _imported_packages("export")
    assert "shim" not in imported and "bench" not in imported, imported


def test_serving_does_not_need_bench():
    imported = _imported_packages("shim")
    assert "bench" not in imported, imported.get("bench")
    dockerfile = (ROOT / "docker" / "shim.Dockerfile").read_text()
    copies = [line.split() for line in dockerfile.splitlines() if line.split()[:1] in (["COPY"], ["ADD"])]
    sources = {source.rstrip("/") for words in copies if not words[1].startswith("--from") for source in words[1:-1]}
    assert sources and not sources & {".", "bench"}, sources  # COPY . . would bring bench in too
