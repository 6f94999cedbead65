"""Step 3 of export: write the Triton model set (tokenizer, encoder, ensemble) for one model.

Configs are built as ModelConfig protobufs and printed by protobuf itself, so names come from
``fos_runtime.spec`` and the text is always valid ``config.pbtxt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import fos_runtime
from fos_runtime import batching, spec, workdirs

ENCODER_BACKENDS = ("onnxruntime", "python")
PERF_INPUT = "perf_analyzer_input.json"  # beside the ensemble's config.pbtxt
WARMUP_DIR = "warmup"  # beside an encoder's config.pbtxt: the data its model_warmup reads (Triton's name)
# Where the container's TensorRT engines are kept between starts: the image makes the folder (ONNX Runtime creates only
# the last level of a cache path), compose.yaml mounts a volume over it. Without it every start builds them again.
TENSORRT_CACHE = "/trt-cache"

_RUNTIME_DIR = Path(fos_runtime.__file__).parent


def _tensor(group, name: str, data_type: int, dims: list[int]) -> None:
    group.add(name=name, data_type=data_type, dims=dims)


def _output_dims(s: spec.ModelSpec) -> tuple[str, list[int]]:
    return spec.output_tensor(s.task), [s.dimension] if s.task == "embed" else [1]


def _text_inputs(s: spec.ModelSpec) -> list[str]:
    return [spec.TEXT, spec.TEXT_PAIR] if s.task == "rerank" else [spec.TEXT]


def _optional_inputs(s: spec.ModelSpec) -> list[str]:
    return [spec.DETECT_TRUNCATION, spec.MAX_DOC_TOKENS] if s.task == "rerank" else [spec.DETECT_TRUNCATION]


_OPTIONAL_TYPES = {spec.DETECT_TRUNCATION: mc.TYPE_BOOL, spec.MAX_DOC_TOKENS: mc.TYPE_INT64}


def _add_optional_inputs(c: mc.ModelConfig, s: spec.ModelSpec) -> None:
    for name in _optional_inputs(s):
        c.input.add(name=name, data_type=_OPTIONAL_TYPES[name], dims=[1], optional=True)


def tokenizer_config(s: spec.ModelSpec, instances: int | None = None) -> mc.ModelConfig:
    c = mc.ModelConfig(name=spec.tokenizer_model(s.name), backend="python", max_batch_size=batching.plan_for(s.device).max_rows)
    for name in _text_inputs(s):
        _tensor(c.input, name, mc.TYPE_STRING, [1])
    _add_optional_inputs(c, s)
    for name in s.encoder_inputs:
        _tensor(c.output, name, mc.TYPE_INT64, [-1])
    _tensor(c.output, spec.NUM_TOKENS, mc.TYPE_INT64, [1])
    _tensor(c.output, spec.TRUNCATED, mc.TYPE_BOOL, [1])
    c.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances or batching.plan_for(s.device).tokenizer_instances)
    c.dynamic_batching.max_queue_delay_microseconds = 0
    c.parameters[spec.SPEC_PARAMETER].string_value = s.to_json()
    return c


def tensorrt_cache_folder(name: str, onnx_file: Path) -> str:
    """The engine cache folder of one export: ONNX Runtime names its engines after the graph's structure, not its
    weights, so an export of other weights under the same name must not find the last one's engines."""
    with onnx_file.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{TENSORRT_CACHE}/{spec.encoder_model(name)}-{digest[:16]}"


def encoder_config(s: spec.ModelSpec, backend: str, tensorrt_cache: str | None = None, instances: int = 1) -> mc.ModelConfig:
    """``tensorrt_cache``: run the encoder through TensorRT, its engines kept in that folder (``tensorrt_cache_folder``)."""
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"encoder backend must be one of {ENCODER_BACKENDS}")
    plan = batching.plan_for(s.device)
    # The ONNX Runtime backend runs each execution as one run; the Python encoder cuts its own runs from its rows.
    rows = plan.execution_rows if backend == "python" else plan.max_rows
    c = mc.ModelConfig(name=spec.encoder_model(s.name), backend=backend, max_batch_size=rows)
    if backend == "onnxruntime":
        c.default_model_filename = "model.onnx"
    for name in s.encoder_inputs:
        # The Python encoder pads requests of different lengths together itself (ragged); the
        # ONNX Runtime backend can batch only requests of equal shape.
        c.input.add(name=name, data_type=mc.TYPE_INT64, dims=[-1], allow_ragged_batch=backend == "python")
    out, dims = _output_dims(s)
    _tensor(c.output, out, mc.TYPE_FP32, dims)
    if backend == "python":
        c.parameters[spec.SPEC_PARAMETER].string_value = s.to_json()
    kind = mc.ModelInstanceGroup.KIND_GPU if s.device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    c.instance_group.add(kind=kind, count=instances)
    if merges_calls(s, backend):
        c.dynamic_batching.max_queue_delay_microseconds = plan.queue_delay_us
    if backend == "onnxruntime":
        # The Python encoder warms itself up (batching.warm_up); ONNX Runtime's backend runs these at load, so that no
        # request pays a new shape's first run (about 47 ms on a GPU). Ids and token types of zeros (a token), a mask
        # of ones (warmup_files: a row of zeros would be no input at all). Triton repeats the row batch_size times.
        for rows, width in _extremes_first(batching.warm_up_shapes(plan, s.max_length)):
            sample = c.model_warmup.add(name=f"{rows}x{width}", batch_size=rows)
            for name in s.encoder_inputs:
                tensor = sample.inputs[name]
                tensor.data_type = mc.TYPE_INT64
                tensor.dims.append(width)
                if name == spec.ATTENTION_MASK:
                    tensor.input_data_file = f"ones-{width}"
                else:
                    tensor.zero_data = True
    if tensorrt_cache is not None:
        if backend != "onnxruntime" or s.device != "gpu":
            raise ValueError("the TensorRT accelerator needs --encoder-backend onnxruntime --device gpu")
        # ONNX Runtime's TensorRT execution provider: builds engines at the first load (minutes), then runs faster
        # than CUDA kernels alone; fp16 engines from an fp32 or fp16 graph. Later loads read the engines, and the
        # timing cache shortens builds for shapes outside them.
        trt = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(2 << 30)
        for cache in ("engine", "timing"):
            trt.parameters[f"trt_{cache}_cache_enable"] = "1"
            trt.parameters[f"trt_{cache}_cache_path"] = tensorrt_cache
    return c


def merges_calls(s: spec.ModelSpec, backend: str) -> bool:
    """Whether the encoder gets Triton's dynamic batching. The Python encoder cuts its own runs from the rows it gets
    (at most ``max_tokens`` each). ONNX Runtime's backend runs what the batcher gives it, and the batcher merges calls
    of equal shape up to ``max_batch_size`` rows, bounding neither their tokens (no Triton setting does, and a custom
    batching strategy cannot in 25.02) nor their rows to a warmed-up bucket. A 512-token model's merged run is at most
    twice the shim's bound on one call; ruri v3's would be 256 rows x 8,192 tokens, tens of GB of activations on a GPU.
    So only encoders whose widest merge stays within twice the bound merge calls; the others run each call alone."""
    plan = batching.plan_for(s.device)
    return backend == "python" or plan.max_rows * s.max_length <= 2 * plan.max_tokens


def _extremes_first(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The shapes, the least rows and width, the most rows and the most width first: TensorRT's execution provider
    builds its engine again for each shape outside the rows and widths it has seen, so the widest range comes at once
    (the order costs nothing on CUDA alone)."""
    if not shapes:
        return shapes
    first = [min(shapes), max(shapes), max(shapes, key=lambda rw: (rw[1], rw[0]))]
    first = list(dict.fromkeys(first))
    return first + [rw for rw in shapes if rw not in first]


def warmup_files(config: mc.ModelConfig) -> dict[str, bytes]:
    """The files the encoder's ``model_warmup`` reads (Triton looks for them in ``warmup/`` beside config.pbtxt)."""
    return {
        tensor.input_data_file: np.ones(tensor.dims, dtype="<i8").tobytes()
        for sample in config.model_warmup
        for tensor in sample.inputs.values()
        if tensor.input_data_file
    }


def ensemble_config(s: spec.ModelSpec) -> mc.ModelConfig:
    c = mc.ModelConfig(name=s.name, platform="ensemble", max_batch_size=batching.plan_for(s.device).max_rows)
    for name in _text_inputs(s):
        _tensor(c.input, name, mc.TYPE_STRING, [1])
    _add_optional_inputs(c, s)
    out, dims = _output_dims(s)
    _tensor(c.output, out, mc.TYPE_FP32, dims)
    _tensor(c.output, spec.NUM_TOKENS, mc.TYPE_INT64, [1])
    _tensor(c.output, spec.TRUNCATED, mc.TYPE_BOOL, [1])
    tok = c.ensemble_scheduling.step.add(model_name=spec.tokenizer_model(s.name), model_version=-1)
    for name in [*_text_inputs(s), *_optional_inputs(s)]:
        tok.input_map[name] = name
    for name in s.encoder_inputs:
        tok.output_map[name] = f"_{name}"
    tok.output_map[spec.NUM_TOKENS] = spec.NUM_TOKENS
    tok.output_map[spec.TRUNCATED] = spec.TRUNCATED
    enc = c.ensemble_scheduling.step.add(model_name=spec.encoder_model(s.name), model_version=-1)
    for name in s.encoder_inputs:
        enc.input_map[name] = f"_{name}"
    enc.output_map[out] = out
    c.parameters[spec.SPEC_PARAMETER].string_value = s.to_json()
    return c


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config, as_utf8=True)


def perf_input(s: spec.ModelSpec, texts: Sequence[str]) -> str:
    """perf_analyzer's --input-data file: one request per text (rerank: the text against the others)."""
    rows = []
    for i, text in enumerate(texts):
        row = {spec.TEXT: {"content": [text], "shape": [1]}}
        if s.task == "rerank":
            row = {
                spec.TEXT: {"content": [texts[(i + 1) % len(texts)]], "shape": [1]},
                spec.TEXT_PAIR: {"content": [text], "shape": [1]},
            }
        rows.append(row)
    return json.dumps({"data": rows}, ensure_ascii=False, indent=1)


def copy_runtime(version_dir: Path, model_py: str) -> None:
    """Place ``fos_runtime`` beside model.py: the Python backend puts that folder on sys.path."""
    shutil.copytree(_RUNTIME_DIR, version_dir / "fos_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(_RUNTIME_DIR / "triton" / model_py, version_dir / "model.py")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
    # save_pretrained drops model_input_names changed on the instance (export asks BERT tokenizers
    # for token_type_ids again); record them so the served tokenizer returns the same tensors.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_input_names"] = list(tokenizer.model_input_names)
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def staging_for(repository: Path, name: str) -> tempfile.TemporaryDirectory:
    """A fresh folder shaped like a repository, beside ``repository`` and not in it (Triton would take a folder in it
    for a model), where one model set is written and checked before ``publish`` puts it in place. Its own to this
    process, so that two exports of one name at once each check and publish what they wrote; those of exports
    killed hard are removed here."""
    repository = repository.resolve()  # `--repository .` has no name: its folders would land inside it
    repository.mkdir(parents=True, exist_ok=True)
    return workdirs.fresh(f".{repository.name}.{name}.staging-", repository.parent)


def write(
    s: spec.ModelSpec,
    folder: Path,
    onnx_file: Path,
    tokenizer,
    encoder_backend: str = "onnxruntime",
    tensorrt: bool = False,
    tokenizer_instances: int | None = None,
    encoder_instances: int = 1,
    sample_texts: Sequence[str] = ("東京は日本の首都です。",),
) -> None:
    """Write the three models into ``folder`` (a staging folder: see ``publish``)."""
    tok_dir = folder / spec.tokenizer_model(s.name)
    enc_dir = folder / spec.encoder_model(s.name)
    ens_dir = folder / s.name
    for d in (tok_dir, enc_dir, ens_dir):
        (d / "1").mkdir(parents=True)

    (tok_dir / "config.pbtxt").write_text(render(tokenizer_config(s, tokenizer_instances)), encoding="utf-8")
    _save_tokenizer(tokenizer, spec.tokenizer_files(folder, s.name))
    copy_runtime(tok_dir / "1", "tokenizer_model.py")

    cache = tensorrt_cache_folder(s.name, onnx_file) if tensorrt else None
    encoder = encoder_config(s, encoder_backend, cache, encoder_instances)
    (enc_dir / "config.pbtxt").write_text(render(encoder), encoding="utf-8")
    for name, data in warmup_files(encoder).items():
        (enc_dir / WARMUP_DIR).mkdir(exist_ok=True)
        (enc_dir / WARMUP_DIR / name).write_bytes(data)
    shutil.copy(onnx_file, spec.encoder_file(folder, s.name))
    if encoder_backend == "python":
        copy_runtime(enc_dir / "1", "encoder_model.py")

    (ens_dir / "config.pbtxt").write_text(render(ensemble_config(s)), encoding="utf-8")
    (ens_dir / PERF_INPUT).write_text(perf_input(s, sample_texts), encoding="utf-8")


def _set_aside(repository: Path, d: str) -> Path:
    return repository.parent / f".{repository.name}.{d}.replaced"


@contextlib.contextmanager
def _publishing(repository: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """One publish into a repository at a time (between processes: an advisory lock on the folder, let go by the
    kernel when its holder dies)."""
    fd = os.open(repository, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"      waiting for another export to finish putting its model into {repository} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(staging: Path, repository: Path, name: str, log: Callable[[str], None] = print) -> Path:
    """Move a checked model set from ``staging`` into ``repository``, replacing an earlier export of the same name.

    The ensemble, which is what makes a model served (its ``fos_spec``), goes first and comes back last: a process
    killed between two moves (SIGKILL, the OOM killer, ``docker stop`` past its grace) leaves a model that is not
    served, never a served one whose tokenizer and encoder come from two exports. Across filesystems (a repository
    that is a mount point) each move is a copy that a kill can cut short, so this order matters most there. The old
    folders are set aside first and put back if a move fails with an exception."""
    repository = repository.resolve()
    order = (name, spec.tokenizer_model(name), spec.encoder_model(name))
    moved: list[Path] = []
    aside: list[tuple[Path, Path]] = []

    def set_aside(d: str) -> None:
        target, old = repository / d, _set_aside(repository, d)
        if target.exists():
            shutil.move(str(target), str(old))
            aside.append((old, target))

    def move_in(d: str) -> None:
        shutil.move(str(staging / d), str(repository / d))
        moved.append(repository / d)

    with _publishing(repository, log):
        for d in order:  # what a publish killed before left (an old encoder: gigabytes for ruri-large)
            shutil.rmtree(_set_aside(repository, d), ignore_errors=True)
        try:
            set_aside(name)
            for d in order[1:]:
                set_aside(d)
                move_in(d)
            move_in(name)
        except BaseException:
            for target in moved:
                shutil.rmtree(target, ignore_errors=True)
            for old, target in reversed(aside):  # the ensemble back last, over the parts it names
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(str(old), str(target))
            raise
        for old, _ in aside:
            shutil.rmtree(old, ignore_errors=True)
    return repository / name
