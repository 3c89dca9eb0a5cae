"""The core never imports Triton or tritonclient; only tessera.triton adapters (and the client/CLI tools) may."""

from __future__ import annotations

import ast
from pathlib import Path

import tessera

PKG = Path(tessera.__file__).parent
TOOLS = {"client.py", "cli.py", "demo.py"}  # client-side tools; quality/ is a tool package too
FORBIDDEN = {"triton_python_backend_utils", "tritonclient", "tessera_export"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layering_core_has_no_triton_imports():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] in ("triton", "quality") or rel.name in TOOLS:  # adapters and tools
            continue
        bad = _imports(path) & FORBIDDEN
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert offenders == []


def test_layering_checker_catches_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import triton_python_backend_utils as pb_utils\nfrom tritonclient.grpc import X\n")
    assert _imports(bad) & FORBIDDEN == {"triton_python_backend_utils", "tritonclient"}
