"""The exported encoders on the onnxruntime of the NGC container's ONNX Runtime backend.

There is no Docker here, so the container cannot run; its onnxruntime can, from PyPI at the same version, in an
environment of its own (``uv run --with``). That version is older than the project's, and it once computed ruri v3's
padded rows wrong where the project's computed them right, without an error (docs/benchmarks.md). The same files and the
same padded batch must give the same outputs on both."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fos_runtime import spec
from shim.repository import read_specs

from helpers import padded_batch

ROOT = Path(__file__).resolve().parent.parent
# NGC tritonserver release -> the onnxruntime its ONNX Runtime backend is built with (server's build.py, ort_version).
CONTAINER_ONNXRUNTIME = {"25.02": "1.20.1"}
# Padded rows, the first longer than ModernBERT's local attention (128 tokens, 64 either side) where the model allows:
# the wrong rows were those after a batch's first.
LONGEST = 200

_RUN = """
import sys, numpy as np, onnxruntime as ort
for model, feeds, out in zip(*[iter(sys.argv[1:])] * 3):
    inputs = dict(np.load(feeds))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    np.save(out, session.run(None, inputs)[0])
print(ort.__version__)
"""


def _container_release() -> str:
    match = re.search(r"^ARG TRITON_VERSION=(\S+)", (ROOT / "docker" / "triton.Dockerfile").read_text(), re.M)
    assert match, "docker/triton.Dockerfile names no TRITON_VERSION"
    return match[1]


def test_exports_give_the_containers_onnxruntime_the_same_outputs(exported, tmp_path):
    release = _container_release()
    assert release in CONTAINER_ONNXRUNTIME, f"add the onnxruntime of NGC tritonserver {release}'s ONNX Runtime backend"
    version = CONTAINER_ONNXRUNTIME[release]
    repo = exported["repository"]
    args, expected = [], {}
    for s in read_specs(repo):
        model = repo / spec.encoder_model(s.name) / "1" / "model.onnx"
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        longest = min(LONGEST, s.max_length)
        feeds = padded_batch((longest, longest // 2, 3), [i.name for i in session.get_inputs()])
        np.savez(tmp_path / f"{s.name}.npz", **feeds)
        expected[s.name] = session.run(None, feeds)[0]
        args += [str(model), str(tmp_path / f"{s.name}.npz"), str(tmp_path / f"{s.name}.out.npy")]
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    assert uv, "uv is not on PATH: the README's test command runs the tests with it"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [uv, "run", "--no-project", "--python", python, "--with", f"onnxruntime=={version}", "python", "-c", _RUN, *args]
    # Its own session, so that a timeout ends the Python that uv started too, not uv alone.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # A machine without PyPI (and onnxruntime not yet in uv's cache) fails here, as uv says.
    assert proc.returncode == 0 and out.strip().endswith(version), (out[-500:], err[-2000:])
    for name, want in expected.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert np.abs(got - want).max() < 1e-4, (name, np.abs(got - want).max(axis=-1))
