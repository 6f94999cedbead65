"""What can be checked of the Docker deployment without a Docker engine: schema, lint, and that
compose, the Dockerfiles and the exported repository agree."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from export.repository import WARMUP_DIR, encoder_config, render, warmup_files
from fos_runtime import batching, spec
from shim.repository import parse
from shim.serve import add_arguments as serve_arguments

from helpers import run_tritonserver

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class _ComposeLoader(yaml.SafeLoader):
    """Knows compose's !reset and !override tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def compose(name: str = "compose.yaml") -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def test_compose_matches_the_compose_spec():
    r = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_pass_hadolint():
    files = sorted(str(p) for p in (ROOT / "docker").glob("*.Dockerfile"))
    assert files
    r = subprocess.run([str(BIN / "hadolint"), *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_wiring_agrees():
    c = compose()["services"]
    triton, shim, export = c["triton"], c["shim"], c["export"]
    # Triton reads the repository the export service writes, read-only.
    assert "./model_repository:/models:ro" in triton["volumes"]
    assert "--model-repository=/models" in triton["command"]
    assert any(v.startswith("./model_repository:/app/model_repository") for v in export["volumes"])
    assert "--repository /app/model_repository" in export["command"][0]
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    # The shim talks gRPC to the triton service and listens where its ports point.
    args = shim["command"]
    assert args[args.index("--triton") + 1] == "triton:8001"
    port = args[args.index("--port") + 1]
    assert {p.split(":")[0] for p in shim["ports"]} == {"8080", "8081", "8082"}
    assert {p.split(":")[1] for p in shim["ports"]} == {port}
    assert shim["depends_on"]["triton"]["condition"] == "service_healthy"
    # TensorRT's engines outlive a restart, in a volume at the path export writes; it holds one TensorRT version's.
    from export.repository import TENSORRT_CACHE

    assert f"trt-cache:{TENSORRT_CACHE}" in triton["volumes"]
    version = re.search(r"tritonserver:(\S+)", triton["image"]).group(1)
    assert compose()["volumes"]["trt-cache"]["name"].endswith(f"-{version}")
    assert triton["build"]["args"]["TRITON_VERSION"] == version
    assert f"mkdir -p {TENSORRT_CACHE} && chmod 1777 {TENSORRT_CACHE}" in (ROOT / "docker" / "triton.Dockerfile").read_text()
    # The shim's flags in compose exist.
    import argparse

    parser = argparse.ArgumentParser()
    serve_arguments(parser)
    parsed = parser.parse_args(args[1:])
    # Docker's SIGKILL (after stop_grace_period, default 10 s) must not cut short tritonserver's unloading or the
    # shim's graceful shutdown (a Triton config review).
    exit_timeout = next(int(a.split("=")[1]) for a in triton["command"] if a.startswith("--exit-timeout-secs="))
    assert int(triton.get("stop_grace_period", "10s").rstrip("s")) > exit_timeout
    assert int(shim.get("stop_grace_period", "10s").rstrip("s")) > parsed.graceful_timeout
    # The served names the export service writes are the ones the README tells Dify to use.
    readme = (ROOT / "README.md").read_text()
    for model in re.findall(r"--model (\S+)", _resolve(export["command"][0], {})):
        assert f"`{model}`" in readme
        spec.triton_name(model)


def test_cpu_override_only_touches_known_services():
    override = compose("compose.cpu.yaml")["services"]
    assert set(override) <= set(compose()["services"])
    assert override["triton"]["deploy"] == {"__reset__": True}
    assert override["export"]["environment"]["FOS_DEVICE"] == "cpu"


def _resolve(text: str, env: dict[str, str]) -> str:
    """Compose's ``$${NAME:-default}`` (the shell's own substitution) with these variables."""

    def value(m: re.Match) -> str:
        return env.get(m.group(1), m.group(2))

    return re.sub(r"\$\$\{(\w+):-([^}]*)\}", value, text)


def test_cpu_deployment_exports_for_the_python_encoder_on_the_shared_engines():
    import argparse
    import shlex

    from export.main import add_arguments, options_from_args
    from export.repository import render

    base = compose()["services"]["export"]
    override = compose("compose.cpu.yaml")["services"]["export"]["environment"]
    env = {k: _resolve(v.replace("${", "$${"), {}) for k, v in override.items()}
    assert env == {"FOS_PRECISION": "fp32", "FOS_DEVICE": "cpu", "FOS_ENCODER_BACKEND": "python"}
    assert set(env) <= set(base["environment"]) - {"FOS_EMBED_MODEL", "FOS_RERANK_MODEL"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for call in _resolve(base["command"][0], env).split("&&"):
        opts = options_from_args(parser.parse_args(shlex.split(call)[2:]))
        assert (opts.encoder_backend, opts.device, opts.precision, opts.engine) == ("python", "cpu", "fp32", "auto")
    # Without the override the GPU container keeps ONNX Runtime's backend.
    for call in _resolve(base["command"][0], {}).split("&&"):
        opts = options_from_args(parser.parse_args(shlex.split(call)[2:]))
        assert (opts.encoder_backend, opts.device, opts.precision) == ("onnxruntime", "gpu", "fp16")
    # What such an export writes: a CPU Python encoder whose spec carries the engine, decided where Triton runs.
    s = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=512, encoder_inputs=("input_ids",), pad_token_id=0,
        vocab_size=10, dimension=4,
    )  # fmt: skip
    c = parse(render(encoder_config(s, "python")))
    assert c.backend == "python" and c.instance_group[0].kind == c.instance_group[0].KIND_CPU
    assert all(i.allow_ragged_batch for i in c.input)
    assert spec.ModelSpec.from_json(c.parameters[spec.SPEC_PARAMETER].string_value).engine == "auto"


def test_triton_image_pins_the_locked_tokenizer_packages():
    lock = (ROOT / "uv.lock").read_text()
    dockerfile = (ROOT / "docker" / "triton.Dockerfile").read_text()
    # The tokenizer packages, and the engines of the CPU deployment's Python encoder.
    for package in ("transformers", "fugashi", "unidic-lite", "sentencepiece", "openvino", "onnxruntime"):
        locked = re.search(rf'name = "{package}"\nversion = "([^"]+)"', lock).group(1)
        assert f'"{package}=={locked}"' in dockerfile, package
    exposed = re.findall(r"EXPOSE (\d+)", (ROOT / "docker" / "shim.Dockerfile").read_text())
    assert exposed == ["8080"]


def test_gpu_encoder_config_for_the_container():
    s = spec.ModelSpec(
        served_name="cl-nagoya/ruri-large",
        task="embed",
        source="cl-nagoya/ruri-large",
        max_length=512,
        encoder_inputs=("input_ids", "attention_mask", "token_type_ids"),
        pad_token_id=0,
        vocab_size=32768,
        precision="fp16",
        device="gpu",
        dimension=1024,
    )
    c = parse(render(encoder_config(s, "onnxruntime", tensorrt_cache="/trt-cache/e-1")))
    assert c.backend == "onnxruntime" and c.instance_group[0].kind == c.instance_group[0].KIND_GPU
    trt = c.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    # Engines built once are kept (a start without them builds for minutes), in the export's own folder.
    assert trt.parameters["trt_engine_cache_enable"] == trt.parameters["trt_timing_cache_enable"] == "1"
    assert trt.parameters["trt_engine_cache_path"] == trt.parameters["trt_timing_cache_path"] == "/trt-cache/e-1"
    assert not any(i.allow_ragged_batch for i in c.input)  # the ORT backend batches equal shapes only
    # It warms up every shape the shim's row and length buckets send it, as the Python encoder does itself.
    shapes = [(w.batch_size, w.inputs["input_ids"].dims[0]) for w in c.model_warmup]
    assert sorted(shapes) == sorted(batching.warm_up_shapes(batching.plan_for("gpu"), 512)) and len(set(shapes)) == len(shapes)
    assert shapes[:3] == [(1, 16), (256, 256), (128, 512)]  # TensorRT meets the widest range of rows and widths first
    assert all(set(w.inputs) == set(s.encoder_inputs) for w in c.model_warmup)
    files = warmup_files(c)
    assert files["ones-256"] == np.ones(256, dtype="<i8").tobytes() and len(files) == len({w for _, w in shapes})
    assert all(w.batch_size <= c.max_batch_size for w in c.model_warmup)
    assert not encoder_config(s, "python").model_warmup
    assert not encoder_config(dataclasses.replace(s, device="cpu"), "onnxruntime").model_warmup
    with pytest.raises(ValueError):
        encoder_config(dataclasses.replace(s, device="cpu"), "python", tensorrt_cache="/trt-cache/e-1")


def test_tensorrt_engines_are_kept_per_export(tmp_path):
    from export.repository import TENSORRT_CACHE, tensorrt_cache_folder

    one, other = tmp_path / "one.onnx", tmp_path / "other.onnx"
    one.write_bytes(b"weights A")
    other.write_bytes(b"weights B")
    folder = tensorrt_cache_folder("cl-nagoya--ruri-large", one)
    # One level under the image's folder: ONNX Runtime creates only the last.
    assert folder.rpartition("/")[0] == TENSORRT_CACHE and folder.rpartition("/")[2].startswith("cl-nagoya--ruri-large__encoder-")
    # The same export finds its engines again; other weights under the same name do not find them.
    assert tensorrt_cache_folder("cl-nagoya--ruri-large", one) == folder
    assert tensorrt_cache_folder("cl-nagoya--ruri-large", other) != folder


def test_tokenizer_instances_follow_the_device_unless_given():
    from export.repository import tokenizer_config

    s = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=512, encoder_inputs=("input_ids",), pad_token_id=0,
        vocab_size=10, dimension=4,
    )  # fmt: skip
    assert tokenizer_config(s).instance_group[0].count == 1  # a CPU's cores belong to the encoder
    gpu = dataclasses.replace(s, device="gpu")
    assert tokenizer_config(gpu).instance_group[0].count == 4  # one MeCab process cannot feed a GPU
    assert tokenizer_config(gpu, 7).instance_group[0].count == 7
    assert tokenizer_config(gpu).max_batch_size == encoder_config(gpu, "onnxruntime").max_batch_size == 256


def test_a_ragged_encoder_takes_more_rows_at_once_than_a_run_holds():
    # Triton's Python encoder sorts every row it is handed into runs of at most max_rows: handed more, it pads less.
    # The ONNX Runtime backend runs each execution as it comes, so there an execution is a run.
    s = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=512, encoder_inputs=("input_ids",), pad_token_id=0,
        vocab_size=10, dimension=4, device="gpu",
    )  # fmt: skip
    plan = batching.plan_for("gpu")
    assert encoder_config(s, "python").max_batch_size == plan.execution_rows > plan.max_rows
    assert encoder_config(s, "onnxruntime").max_batch_size == plan.max_rows
    cpu = dataclasses.replace(s, device="cpu")
    assert encoder_config(cpu, "python").max_batch_size == batching.plan_for("cpu").max_rows


def test_encoder_instances_are_an_export_option():
    import argparse

    from export.main import ExportOptions, add_arguments, export, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--model", "m", "--task", "embed", "--device", "gpu", "--encoder-instances", "2"]
    opts = options_from_args(parser.parse_args(args))
    assert opts.encoder_instances == 2
    assert options_from_args(parser.parse_args(["--model", "m", "--task", "embed"])).encoder_instances == 1
    s = spec.ModelSpec(
        served_name="m", task="embed", source="m", max_length=512, encoder_inputs=("input_ids",), pad_token_id=0,
        vocab_size=10, dimension=4, device="gpu",
    )  # fmt: skip
    group = encoder_config(s, "python", instances=2).instance_group
    assert len(group) == 1 and (group[0].kind, group[0].count) == (group[0].KIND_GPU, 2)
    with pytest.raises(ValueError, match="at least 1"):  # refused before the model is loaded
        export(ExportOptions(model="/nonexistent", name="m", task="embed", encoder_instances=0), log=lambda _: None)


def test_tritonserver_runs_the_onnxruntime_encoders_warm_up(exported, tmp_path):
    # The container's encoder (ONNX Runtime backend) cannot run here; its model_warmup can, on the Python encoder of
    # the same inputs: Triton fails the load if a sample or its data file is wrong (a mask of zeros once was).
    from shim.repository import read_specs

    repo = tmp_path / "repo"
    s = next(x for x in read_specs(exported["repository"]) if x.task == "embed")
    for name in (s.name, spec.tokenizer_model(s.name), spec.encoder_model(s.name)):
        shutil.copytree(exported["repository"] / name, repo / name)
    path = repo / spec.encoder_model(s.name) / "config.pbtxt"
    config = parse(path.read_text())
    gpu = encoder_config(dataclasses.replace(s, device="gpu"), "onnxruntime")
    for sample in gpu.model_warmup:
        if sample.batch_size <= config.max_batch_size and sample.inputs[spec.INPUT_IDS].dims[0] <= s.max_length:
            config.model_warmup.add().CopyFrom(sample)
    assert len(config.model_warmup) >= 10
    path.write_text(render(config))
    (path.parent / WARMUP_DIR).mkdir()
    for name, data in warmup_files(config).items():
        (path.parent / WARMUP_DIR / name).write_bytes(data)
    with run_tritonserver(repo, tmp_path) as triton:
        ready = httpx.get(f"http://{triton['http']}/v2/models/{spec.encoder_model(s.name)}/ready")
        assert ready.status_code == 200


def test_fos_triton_names_the_models_its_tritonserver_cannot_load(exported, tmp_path, capsys):
    # What `fos serve --model` and a default export write (the container's ONNX Runtime backend) stopped the wheel's
    # tritonserver with "unable to find backend library": fos triton names them and the way out instead.
    from shim.cli import main
    from shim.repository import read_specs

    repo = tmp_path / "repo"
    s = next(x for x in read_specs(exported["repository"]) if x.task == "embed")
    for name in (s.name, spec.tokenizer_model(s.name), spec.encoder_model(s.name)):
        shutil.copytree(exported["repository"] / name, repo / name)
    path = repo / spec.encoder_model(s.name) / "config.pbtxt"
    path.write_text(render(encoder_config(s, "onnxruntime")))
    assert main(["triton", "--repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert f"{spec.encoder_model(s.name)} (onnxruntime)" in err and "--encoder-backend python" in err
    assert s.name not in err.replace(spec.encoder_model(s.name), "")  # the ensemble is not one of them
    # Named by platform only, as a hand-written config may be.
    path.write_text(path.read_text().replace('backend: "onnxruntime"', 'platform: "onnxruntime_onnx"'))
    assert 'platform: "onnxruntime_onnx"' in path.read_text()
    assert main(["triton", "--repository", str(repo)]) == 2
    assert f"{spec.encoder_model(s.name)} (onnxruntime_onnx)" in capsys.readouterr().err
