"""fos_runtime pieces that only show on other machines: the GPU encoder's fallback, Triton's stub environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_triton_models_run_the_runtime_exported_beside_them(exported, tmp_path, monkeypatch):
    """A repository carries the fos_runtime it was exported with. Another on the path (a newer checkout on PYTHONPATH,
    an installed package) must not replace it under the older model.py: a repository outlives upgrades of fos."""
    import shutil

    from helpers import run_tritonserver

    repo = tmp_path / "repo"
    shutil.copytree(exported["repository"], repo)
    for model in ("test--ruri-tiny__tokenizer", "test--ruri-tiny__encoder"):
        with open(repo / model / "1" / "fos_runtime" / "__init__.py", "a") as f:
            f.write(f'\nprint("fos_runtime of the repository: {model}", flush=True)\n')
    for model in [d.name for d in repo.iterdir() if not d.name.startswith("test--ruri-tiny")]:
        shutil.rmtree(repo / model)  # one model set is enough
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's fos_runtime, ahead on PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", root)
    with run_tritonserver(repo, tmp_path):
        pass
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("triton-*/tritonserver-*.log"))
    assert "fos_runtime of the repository: test--ruri-tiny__tokenizer" in log
    assert "fos_runtime of the repository: test--ruri-tiny__encoder" in log
