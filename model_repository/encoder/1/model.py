"""Triton Python-backend entry point: the shared runner serves this model (see vlaserve.runner)."""

from vlaserve.runner import TritonPythonModel  # noqa: F401
