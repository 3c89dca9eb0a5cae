"""Triton adapters: the only modules that import triton_python_backend_utils. `model.py` shims in the
repository import TritonPythonModel from here."""
