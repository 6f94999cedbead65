"""fos_runtime pieces that only show on other machines: the GPU encoder's fallback, Triton's stub environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fos_runtime import spec
from fos_runtime.encoder import Encoder
from shim.repository import read_specs

from fakes import EchoEncoder


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


def test_a_gpu_encoder_runs_on_the_gpu_it_is_given(exported, monkeypatch):
    # Triton starts a KIND_GPU instance on each GPU; every instance ran on GPU 0.
    import onnxruntime as ort

    import fos_runtime.encoder
    from fos_runtime import engines

    given = []

    class Session:
        def __init__(self, path, sess_options, providers):
            given.append(providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_inputs(self):
            return [type("I", (), {"name": "input_ids"})()]

        def get_outputs(self):
            return [type("O", (), {"name": "out"})()]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(fos_runtime.encoder, "_load_cuda_libraries", lambda _: None)
    monkeypatch.setattr(fos_runtime.encoder, "gpu_visible", lambda: True)
    choice = engines.Choice(engines.ONNXRUNTIME, "fp16")
    assert Encoder("model.onnx", device="gpu", engine=choice, gpu=1).device == "gpu"
    assert given == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]
    # Streams share a CPU's cores: on the GPU they would be copies of the model fighting over one device.
    with pytest.raises(RuntimeError, match="streams share a CPU's cores"):
        Encoder("model.onnx", device="auto", engine=choice, streams=2)
    assert len(given) == 1  # refused before any session loads


def test_triton_models_keep_scikit_learn_out():
    # transformers imports scikit-learn whenever it is installed; in Triton's stub, given numpy 1.26 for the
    # stub's sake, the environment's scipy (built for numpy 2) then breaks the tokenizer model's import.
    code = "from fos_runtime.triton.pythonpath import honour_pythonpath\nhonour_pythonpath()\nimport sklearn"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "sklearn" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import fos_runtime.triton.pythonpath\nimport transformers\nimport sklearn"])
    assert r.returncode == 0  # only the stub's entry point keeps it out


def test_triton_encoder_answers_the_good_requests_of_an_execution_that_holds_a_bad_one(monkeypatch):
    """Triton hands the encoder several requests at once: one malformed (a client calling the encoder model directly)
    gets its own error, and the others in the same execution their vectors, as if it had not been there."""
    import importlib
    import types

    import numpy as np

    from fos_runtime import batching, padding
    from fos_runtime.tokenization import Encoded
    from fos_runtime.triton import pythonpath

    fake = types.SimpleNamespace(
        get_input_tensor_by_name=lambda request, name: (
            types.SimpleNamespace(as_numpy=lambda: request[name]) if name in request else None
        ),
        InferenceResponse=lambda output_tensors=None, error=None: types.SimpleNamespace(outputs=output_tensors, error=error),
        TritonError=str,
        Tensor=lambda name, array: array,
        Logger=types.SimpleNamespace(log_info=lambda message: None),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.setattr(pythonpath, "honour_pythonpath", lambda: None)  # nothing of the stub's environment here
    monkeypatch.delitem(sys.modules, "fos_runtime.triton.encoder_model", raising=False)
    encoder_model = importlib.import_module("fos_runtime.triton.encoder_model")
    monkeypatch.delitem(sys.modules, "fos_runtime.triton.encoder_model")

    model = encoder_model.TritonPythonModel()
    model.spec = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=8, encoder_inputs=spec.ENCODER_INPUTS_ALL, pad_token_id=0,
        vocab_size=50, dimension=2, device="gpu",
    )  # fmt: skip
    model.encoder, model.plan, model.stats, model.output_name = (
        EchoEncoder(),
        batching.PLANS["gpu"],
        batching.Stats(),
        "EMBEDDING",
    )
    model.report_every, model.executions, model.seconds = 0, 0, 0.0
    first = padding.pad(Encoded([[2, 7, 3], [2, 9, 9, 9, 3]]), 0, spec.ENCODER_INPUTS_ALL)
    second = padding.pad(Encoded([[2, 11, 3]]), 0, spec.ENCODER_INPUTS_ALL)
    bad = dict(second, input_ids=np.array([[2, 99, 3]]))  # outside the vocabulary: the engine would fail them all
    responses = model.execute([first, bad, second])
    assert responses[1].error == "encoder: bad request: token ids must be in [0, 50)"
    assert responses[0].error is None and responses[0].outputs[0].tolist() == [[3, 2], [5, 2]]
    assert responses[2].error is None and responses[2].outputs[0].tolist() == [[3, 2]]


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
