"""The launcher: a model that fails to load makes start/serve fail with the server's own error, and
nothing of that server survives."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tessera.server import ServerStartError, TritonServer, _group_members

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_repo(repo, tmp_path):
    """The ORT text encoder alone, with its ONNX file removed: initialize fails."""
    path = tmp_path / "broken"
    shutil.copytree(repo / "text_encoder", path / "text_encoder")
    (path / "text_encoder" / "1" / "model.onnx").unlink()
    return path


def test_launcher_failed_load_raises_with_server_error(broken_repo):
    srv = TritonServer(broken_repo, exit_timeout_s=5)
    with pytest.raises(ServerStartError) as e:
        srv.start(timeout_s=120)
    msg = str(e.value)
    assert "exited with code" in msg and "model.onnx" in msg
    assert _group_members(srv.proc.pid) == []


def test_serve_cli_exits_nonzero_on_failed_load(broken_repo):
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--repo", str(broken_repo)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    assert "model.onnx" in proc.stderr


def test_server_dies_with_a_killed_launcher(repo, tmp_path):
    """A launcher killed without stop() (SIGKILL) must not leave tritonserver or its stubs behind."""
    import time

    small = tmp_path / "small"
    shutil.copytree(repo / "text_encoder", small / "text_encoder")
    script = (
        "import os, sys\n"
        "from tessera.server import TritonServer\n"
        f"s = TritonServer({str(small)!r}, exit_timeout_s=5); s.start()\n"
        "print(s.proc.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    pgid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 60
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_members(pgid) == []
