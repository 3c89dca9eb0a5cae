"""The core never imports Triton or tritonclient; only tessera.triton adapters (and the client/CLI tools) may.
The pure core (engine, scheduling, plans, cost, predictor, early exit, patch index, loop) imports no torch
either, directly or through another module: it runs (and is simulated) without it."""

from __future__ import annotations

import ast
from pathlib import Path

import tessera

PKG = Path(tessera.__file__).parent
TOOLS = {"client.py", "cli.py", "demo.py", "openai_front.py"}  # client-side tools; quality/ is a tool package too
FORBIDDEN = {"triton_python_backend_utils", "tritonclient", "tessera_export"}
PURE_CORE = ("engine", "scheduler", "plan", "request", "cost", "predictor", "early_exit", "patch_index", "errors",
             "options", "interfaces", "config", "loop", "fanin", "faults", "bench.simulate",
             "lora_spec", "lora_registry", "lora_cache", "bal", "cascade", "cascade_control")


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


def test_layering_pure_core_imports_neither_torch_nor_triton():
    """Imported in a fresh interpreter: neither torch nor the Triton stub module is loaded by any of them
    (this follows every transitive import, which the AST check above does not)."""
    import subprocess
    import sys

    code = ("import sys\n"
            + "".join(f"import tessera.{m}\n" for m in PURE_CORE)
            + "print(sorted(m for m in ('torch', 'triton_python_backend_utils', 'diffusers', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_layering_pure_core_check_catches_torch(tmp_path):
    import subprocess
    import sys

    (tmp_path / "leaky.py").write_text("import torch\n")
    code = "import sys; sys.path.insert(0, %r); import leaky; print('torch' in sys.modules)" % str(tmp_path)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
