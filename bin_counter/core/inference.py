"""The torch-free half of inference: ONNX Runtime over numpy batches, and which engine a process runs.

A served model needs only this, numpy and Pillow (`core.pixels`); `core.engine` adds the PyTorch side (eager
forward passes, export, int8 quantisation) that training and a GPU endpoint use.

Which engine runs, chosen per process:
  BIN_COUNTER_ENGINE=onnx   ONNX Runtime (the default on CPU)
  BIN_COUNTER_ENGINE=torch  eager PyTorch of the same logged weights (the default when a GPU is there: AMP on CUDA)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bin_counter import BinCounterError
from bin_counter.core.choices import ENGINES

ENGINE_VARIABLE = "BIN_COUNTER_ENGINE"
# ONNX Runtime's threads per session (0: one per physical core, its default). A server with several workers on one
# machine sets it to cores / workers, or every worker's pool fights for every core.
THREADS_VARIABLE = "BIN_COUNTER_ONNX_THREADS"
INPUT, OUTPUT = "image", "output"


class OnnxSession:
    """One ONNX graph on ONNX Runtime's CPU provider: float32 (B, 3, H, W) batches in, (B, K) arrays out."""
    name = "onnx"

    def __init__(self, graph: str | Path | bytes, profile_prefix: Path | None = None):
        """`profile_prefix`: ONNX Runtime's own profiler records every node's run there (end_profiling)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # its warnings about unused initialisers say nothing to a user
        options.intra_op_num_threads = session_threads()
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]

    __call__ = run


def session_threads() -> int:
    try:
        return max(int(os.environ.get(THREADS_VARIABLE, 0)), 0)
    except ValueError:
        return 0


def requested_engine() -> str | None:
    """The engine BIN_COUNTER_ENGINE asks for, or None for the default; an unknown name is an error."""
    value = os.environ.get(ENGINE_VARIABLE, "").strip().lower()
    if value and value not in ENGINES:
        raise BinCounterError(f"{ENGINE_VARIABLE}={value!r}: choose one of {', '.join(ENGINES)}")
    return value or None


def onnx_runtime_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime cannot be imported ({exc})"
    return None
