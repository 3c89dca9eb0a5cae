#!/opt/tessera/venv/bin/python
"""`tessera serve` on the container's own tritonserver (the GPU image's /opt/tritonserver, Triton 2.51 with
the TensorRT backend that `tessera export --target gpu` repositories need) instead of the Python-only server
that `tessera serve` copies from nvidia-pytriton. Same flags as `tessera serve`.

Everything but the binary is `tessera serve`'s own code: explicit model control with every model but the
engines loaded first and the engines loaded through the repository API once the server is ready (Triton
refuses BLS before that, and an engine warms its components over BLS before it reports ready), the server's
address handed to the engines (a dead engine loop marks the server not ready through it), the readiness
wait, and the SIGTERM handling that stops tritonserver and its stubs.
"""

import os
import sys
from pathlib import Path

import tessera.server
from tessera.cli import main

TRITON_HOME = Path(os.environ.get("TRITON_HOME", "/opt/tritonserver"))  # bin/tritonserver, backends/


def container_workspace() -> Path:
    """Stands in for tessera.server.triton_workspace: the image's server tree, whose backends/python holds
    the Python 3.11 stub copied from nvidia-pytriton 0.7.0 (the same Triton 2.51 python_backend)."""
    return TRITON_HOME


tessera.server.triton_workspace = container_workspace

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
