"""fos_runtime pieces that only show on other machines: the GPU encoder's fallback, Triton's stub environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fos_runtime import spec
from fos_runtime.encoder import Encoder
from shim.repository import read_specs


def test_a_gpu_encoder_that_lands_on_the_cpu_is_an_error(exported, monkeypatch):
    # onnxruntime-gpu that cannot load CUDA (a library missing) runs the session on the CPU with only a log
    # line: a GPU deployment would then serve, slowly, from the CPU. Asking for the GPU must fail instead.
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    s = read_specs(exported["repository"])[0]
    path = exported["repository"] / spec.encoder_model(s.name) / "1" / "model.onnx"
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        Encoder(path, device="gpu")
    assert Encoder(path, device="auto").device == "cpu"  # auto: the CPU is a fine answer


def test_triton_models_keep_scikit_learn_out():
    # transformers imports scikit-learn whenever it is installed; in Triton's stub, given numpy 1.26 for the
    # stub's sake, the environment's scipy (built for numpy 2) then breaks the tokenizer model's import.
    code = "from fos_runtime.triton.pythonpath import honour_pythonpath\nhonour_pythonpath()\nimport sklearn"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "sklearn" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import fos_runtime.triton.pythonpath\nimport transformers\nimport sklearn"])
    assert r.returncode == 0  # only the stub's entry point keeps it out
