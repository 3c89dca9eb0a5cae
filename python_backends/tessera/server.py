"""Launch the real tritonserver shipped by nvidia-pytriton, wait until ready, and stop it for sure.

The recipe (measured, ../shared/reference/feasibility.md §5.1): copy pytriton's tritonserver tree once,
put the stub that matches this interpreter into backends/python, put the interpreter's LIBDIR first on
LD_LIBRARY_PATH (the stub links the system libpython otherwise), bind loopback addresses. Shutdown is
not guaranteed upstream, so `stop()` escalates and then kills whatever is left in the server's process
group (its Python stubs included).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RuntimeUnavailableError, TesseraError
from .wire import SERVER_HTTP_ENV, WARMUP_SAMPLE

log = logging.getLogger(__name__)


class ServerStartError(TesseraError, RuntimeError):
    """tritonserver exited or never became ready; the message carries the server's own error lines."""


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def triton_workspace() -> Path:
    """A per-venv copy of pytriton's tritonserver with this interpreter's stub installed (built once)."""
    try:
        import pytriton  # noqa: F401  (only to locate the shipped server)
    except ImportError as e:
        raise RuntimeUnavailableError("tritonserver: nvidia-pytriton==0.7.0 is not installed in this environment") from e
    src = Path(sys.modules["pytriton"].__file__).parent / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    ws = Path(sys.prefix) / "tessera-tritonserver"
    stub_src = src / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub_src.exists():
        raise RuntimeUnavailableError(f"tritonserver: no Python backend stub for Python {pyver} in {src}")
    ready = ws / ".tessera-ready"
    if not ready.exists():
        tmp = ws.with_name(ws.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        shutil.copy2(stub_src, tmp / "backends" / "python" / "triton_python_backend_stub")
        (tmp / ".tessera-ready").write_text("ok\n")
        shutil.rmtree(ws, ignore_errors=True)
        tmp.rename(ws)
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [libdir, str(_site_packages() / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # One thread everywhere: two threads on the shared 2 cores gave 100x outliers (feasibility §3.3).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class TritonServer:
    """One tritonserver process on loopback. Use as a context manager, or start()/stop()."""

    repo: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    address: str = "127.0.0.1"
    log_path: Path | None = None
    exit_timeout_s: int = 20
    extra_args: list[str] = field(default_factory=list)
    staged: bool = True  # load engines after the rest is ready (explicit model control), see start()
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.repo = Path(self.repo).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.log_path is None:
            self.log_path = self.repo.parent / f"tritonserver-{self.http_port}.log"

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        ws = triton_workspace()
        return [
            str(ws / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={ws / 'backends'}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-info=true",
            *self._staging_args(),
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        """The server's environment, plus its own HTTP address for the models (explicit model control: an
        engine whose loop stopped marks itself not ready through the repository API, tessera.triton)."""
        env = server_env()
        if self.staged:
            env[SERVER_HTTP_ENV] = self.http_url
        return env

    def _staging_args(self) -> list[str]:
        if not self.staged:
            return []
        first = [m for m in repository_models(self.repo) if m not in engine_models(self.repo)]
        return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in first)]

    def start(self, timeout_s: float = 300.0) -> TritonServer:
        if not self.repo.is_dir():
            raise ServerStartError(f"repo: not a directory: {self.repo}")
        cmd = self.command()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        log.info("[tessera] starting tritonserver: %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            deadline = time.monotonic() + timeout_s
            self.wait_ready(timeout_s)
            if self.staged:
                for model in engine_models(self.repo):
                    self.load(model, deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def load(self, model: str, timeout_s: float = 300.0) -> None:
        """Load `model` through the repository API and wait for it (its warm-up included). Engines are loaded
        this way once the components are ready: Triton refuses BLS while the server itself is not ready,
        and an engine warms every component over BLS and profiles its cost model before it reports ready."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=max(timeout_s, 1.0)):
                pass
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise ServerStartError(f"tritonserver could not load {model}: {body}\n{self.errors()}") from e
        except OSError as e:
            raise ServerStartError(f"tritonserver did not answer loading {model}: {e}\n{self.errors()}") from e

    def is_ready(self) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {self.proc.returncode} before it was ready:\n{self.errors()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.errors()}")

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def errors(self, limit: int = 40) -> str:
        """The server's own error lines (E-prefixed log lines, failed model states, 'error:' lines)."""
        lines = self.log_text().splitlines()
        picked = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower() or "UNAVAILABLE" in ln]
        return "\n".join((picked or lines)[-limit:])

    def stub_pids(self) -> list[int]:
        """Processes still in the server's process group (the server itself and its Python stubs)."""
        if self.proc is None:
            return []
        return _group_members(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, wait for the exit timeout, escalate to SIGKILL, then kill any stub left in the group."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("[tessera] tritonserver ignored SIGTERM for %ss; killing it", self.exit_timeout_s + 10)
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if getattr(self, "_log", None):
            self._log.close()
        log.info("[tessera] tritonserver stopped (pid %s)", pgid)

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def repository_models(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def engine_models(repo: Path) -> list[str]:
    """Models with Tessera's warm-up sample: the engines (they call the other models over BLS while they
    warm up)."""
    return [m for m in repository_models(repo) if WARMUP_SAMPLE in (Path(repo) / m / "config.pbtxt").read_text()]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM tritonserver if the launching process dies without stop()
    (a killed benchmark or test run must not leave a server and its stubs behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ')' that closes the command name: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] != "Z":
            members.append(int(entry.name))
    return members
