"""ONNX Runtime sessions, shared by deploy (timing layers) and export (checking whole models)."""

from __future__ import annotations

from pathlib import Path


def require(module: str):
    """Imports ``module`` or says which extra installs it."""
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(f"{module} is missing: install the export extra (pip install 'compconv[export]')") from error


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimisation enabled."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
