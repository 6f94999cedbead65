"""Run the exported ONNX encoder with onnxruntime: the embedded backend and Triton's Python-backend
encoder both use this, so they behave the same."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load_cuda_libraries(ort) -> None:
    """onnxruntime-gpu wheels find CUDA and cuDNN in the nvidia-* wheels (those torch installs) only once asked to;
    where the libraries are on the system's path instead (the NGC container), asking is harmless."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the session then reports what it cannot load
            logging.getLogger("fos.encoder").warning("onnxruntime.preload_dlls: %s", exc)


class Encoder:
    """One onnxruntime session; ``run`` takes padded arrays and returns the graph's only output."""

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "auto"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device in ("auto", "gpu") and "CUDAExecutionProvider" in ort.get_available_providers():
            _load_cuda_libraries(ort)
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "gpu":
            raise RuntimeError("device=gpu asked for, but this onnxruntime has no CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # On a CPU, one session per process, fed one batch at a time: every core, no spinning threads
        # left burning CPU between requests. On a GPU the CPU only launches kernels and runs a few shape
        # operations: a pool of threads there only waits on cores that tokenizers and HTTP workers need.
        options.intra_op_num_threads = threads or (1 if len(providers) > 1 else available_cores())
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.device = "gpu" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "gpu" and self.device != "gpu":  # onnxruntime falls back to the CPU with only a log line
            raise RuntimeError("device=gpu asked for, but onnxruntime could not start its CUDAExecutionProvider (see its log)")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        out = self.session.run([self.output_name], {name: feeds[name] for name in self.input_names})[0]
        return np.asarray(out, dtype=np.float32)
