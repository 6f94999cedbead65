"""``fos serve``: export what the repository lacks, then serve the API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fos_runtime import engines, spec

from . import repository as repo
from .auth import load_keys
from .backends.base import Backend
from .service import Limits

if TYPE_CHECKING:
    from fastapi import FastAPI

ARGS_ENV = "FOS_SERVE_ARGS"  # the parent's arguments, for worker processes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository")
    p.add_argument(
        "--triton",
        metavar="HOST:PORT[,HOST:PORT...]",
        action="append",
        default=[],
        help="Triton gRPC address(es), repeatable or comma-separated; requests spread over the healthy ones. "
        "Without it, the embedded backend serves",
    )
    p.add_argument(
        "--triton-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a Triton call of up to max_batch_size inputs may take (a request of k such calls gets k times it); "
        "past it, 504 (default 60)",
    )
    p.add_argument(
        "--triton-rounds-in-flight",
        type=int,
        metavar="N",
        help="rounds of coalesced requests in flight per model and Triton endpoint (default: 1 for a CPU encoder, 4 for "
        "a GPU one, which Triton feeds while it tokenizes the next); more lowers latency at light load, fewer makes "
        "larger batches",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (with --triton: one process answers about a thousand small requests a "
        "second; the embedded backend batches within one process and needs one)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]HF_ID_OR_DIR",
        help="export this model into the repository first if it is not there (embed or rerank is detected); served as "
        "the Hugging Face id, or a directory's own name, unless NAME= says otherwise (cl-nagoya/ruri-v3-310m=/models/ruri)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        help="for --model: export at this precision (default fp32), again if the repository holds another one; "
        "without it, a model already exported is served as it is",
    )
    p.add_argument(
        "--engine",
        choices=engines.CHOICES,
        help="what runs the encoders (embedded backend; default: what each model was exported with, auto unless told): "
        f"auto: {engines.AUTO_RULE}; openvino: its best checked precision here; "
        "openvino-fp32|bf16|int8: that one. bf16 is computed from the fp32 export; int8 is OpenVINO's own, in an int8 "
        "export made with --openvino-int8",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="encoder threads, onnxruntime's or OpenVINO's (default: the cores available, up to the CPU quota; 1 on a GPU)",
    )
    p.add_argument(
        "--engine-streams",
        type=_streams,
        default=None,
        metavar="N|auto",
        help="CPU encoders: compute up to N batches of a round at once, each on its share of the threads (CPUs with "
        "many cores, where one small batch cannot keep them all busy); onnxruntime holds a copy of the model per "
        "stream. auto (default): onnxruntime int8 gets a stream per 4 cores, at most 4 (16 cores: 4); others 1",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where the embedded backend runs its encoders: auto is onnxruntime's GPU where it has one, else the CPU; "
        "cpu keeps them on the CPU of a machine with a GPU (OpenVINO needs it there)",
    )
    defaults = Limits()
    p.add_argument("--max-inputs", type=int, default=defaults.max_inputs, help="inputs per embeddings request")
    p.add_argument("--max-input-chars", type=int, default=defaults.max_input_chars, help="characters per input")
    p.add_argument("--max-documents", type=int, default=defaults.max_documents, help="documents per rerank request")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body size")
    p.add_argument(
        "--max-inputs-in-flight",
        type=int,
        default=defaults.max_inputs_in_flight,
        help="inputs admitted at once over all requests; past it, 429 with Retry-After; a request with more is a 400",
    )
    p.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="reject inputs longer than the model's context (400) unless a request sends truncate=true; by default they are cut",
    )
    p.add_argument("--api-key", action="append", default=[], help="require this bearer key (repeatable; also FOS_API_KEYS)")
    p.add_argument("--api-key-file", type=Path, help="file with one key per line")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight to finish")
    p.add_argument("--log-level", default="info")


def _streams(value: str) -> int | None:
    """--engine-streams: a count of 1 or more, or auto (None: each encoder's own, ``encoder.auto_streams``)."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of streams (1 or more) or auto, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"at least 1 stream, or auto, not {n}")
    return n


def ensure_exported(models: list[str], repository: Path, precision: str | None) -> None:
    """Export each model the repository lacks, or holds at another precision than ``precision``
    (asked for int8, serving the fp32 export already there would be serving something else).
    Raises export's errors: ``ModelUnavailable`` first of all, before anything slow, when the model
    can be had from nowhere."""
    for value in models:
        served, model = split_model(value)
        try:
            name = spec.triton_name(served if served is not None else spec.default_served_name(model))
        except ValueError:
            from export.load import locate

            locate(model)  # a directory that is not there says so
            raise
        config = repository / name / "config.pbtxt"
        try:
            stored = repo.read_spec(config) if config.exists() else None
            lacks = repo.missing_parts(repository, stored) if stored is not None else []
        except repo.Unreadable:
            stored, lacks = None, [f"a readable {config}"]
        # NAME=SOURCE names its source: where NAME holds another model's export, serving it would answer with the
        # wrong model under the asked-for name. (A bare id or directory is served as it is, offline exports too.)
        moved = served is not None and stored is not None and not _same_source(stored.source, model)
        if lacks:
            print(f"{model}: {name} in {repository} lacks {' and '.join(lacks)}: exporting it again", flush=True)
            stored = None  # what is left of it cannot tell how it was exported
        elif config.exists() and not moved and (precision is None or stored is None or stored.precision == precision):
            # Served as it is: no hub, no torch.
            print(f"{model}: already in {repository}" + (f" ({stored.precision})" if stored else ""), flush=True)
            continue
        from export.load import detect_task, locate
        from export.main import ExportOptions, export

        local_only = locate(model)
        if stored is not None and moved:
            print(f"{model}: {served} in {repository} was exported from {stored.source}: exporting it again", flush=True)
            # The deployment's choices stay; what belongs to the old model (task, prompts, context) does not.
            options = dataclasses.replace(
                _same_choices(repository, stored, model, precision or stored.precision),
                task=detect_task(model, local_only),
                max_length=None,
                normalize=True,
                prompts=None,
                default_prompt_name=None,
            )
        elif stored is not None:
            print(f"{model}: in {repository} as {stored.precision}, not {precision}: exporting it again", flush=True)
            options = _same_choices(repository, stored, model, precision or "fp32")
        else:
            task = detect_task(model, local_only)
            if not lacks:
                print(f"{model}: not in {repository}; exporting it (task {task}, {precision or 'fp32'})", flush=True)
            options = ExportOptions(model=model, task=task, name=served, repository=repository, precision=precision or "fp32")
        options.local_files_only = local_only
        export(options, log=lambda line: print(line, flush=True))


def _same_source(stored: str, asked: str) -> bool:
    if Path(stored).exists() and Path(asked).exists():
        return Path(stored).resolve() == Path(asked).resolve()
    return stored == asked


def split_model(value: str) -> tuple[str | None, str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); anything else -> (None, value). Offline, the model comes from a directory
    whose own name is not the id clients (Dify's model settings) ask for. A path that exists is a path, '=' or not."""
    name, sep, source = value.partition("=")
    if not sep or Path(value).exists():
        return None, value
    return name, source


def _same_choices(repository: Path, stored: spec.ModelSpec, model: str, precision: str):
    """Options for exporting ``stored`` again at another precision, and otherwise as it was (a
    repository also served by Triton keeps its encoder backend, the prompts stay...)."""
    from export.main import ExportOptions

    encoder = repo.parse((repository / spec.encoder_model(stored.name) / "config.pbtxt").read_text(encoding="utf-8"))
    tokenizer = repo.parse((repository / spec.tokenizer_model(stored.name) / "config.pbtxt").read_text(encoding="utf-8"))
    accelerators = encoder.optimization.execution_accelerators.gpu_execution_accelerator
    engine = stored.engine
    # A variant of one precision (openvino-fp32, openvino-int8...) cannot serve another: the precision asked wins.
    if engine.startswith("openvino-") and (engine == "openvino-int8") != (precision == "int8"):
        print(f"{model}: --engine {engine} does not serve {precision} exports: exporting with --engine auto", flush=True)
        engine = "auto"
    # OpenVINO's int8 was made by NNCF at export: made again where the export had it and int8 is still asked for.
    had_openvino_int8 = spec.openvino_int8_file(spec.encoder_file(repository, stored.name)).exists()
    return ExportOptions(
        model=model,
        task=stored.task,
        name=stored.served_name,
        repository=repository,
        precision=precision,
        max_length=stored.max_length,
        encoder_backend=encoder.backend or "onnxruntime",
        device=stored.device,
        tensorrt=any(a.name == "tensorrt" for a in accelerators),
        tokenizer_instances=tokenizer.instance_group[0].count if tokenizer.instance_group else None,
        encoder_instances=encoder.instance_group[0].count if encoder.instance_group else 1,
        engine=engine,
        normalize=stored.normalize,
        prompts=stored.prompts,
        default_prompt_name=stored.default_prompt_name or "",
        openvino_int8=precision == "int8"
        and stored.device == "cpu"
        and (had_openvino_int8 or engine in ("openvino", "openvino-int8")),
    )


def _engines_servable(repository: Path, engine: str | None, device: str) -> bool:
    """Says which engine will run each model, and why; refuses an engine that cannot serve one (before loading)."""
    from fos_runtime.encoder import choose_engine, cuda_available

    if device == "gpu" and not cuda_available():
        print("error: --device gpu: this onnxruntime has no CUDA provider (install onnxruntime-gpu)", file=sys.stderr, flush=True)
        return False
    for s in repo.read_specs(repository):
        if lacks := repo.missing_parts(repository, s):
            print(
                f"error: {s.served_name} in {repository} lacks {' and '.join(lacks)}: export it again "
                f"(fos export, or fos serve --model {s.source})",
                file=sys.stderr,
                flush=True,
            )
            return False
        try:
            choice, why = choose_engine(spec.encoder_file(repository, s.name), engine or s.engine, s.precision, device)
        except engines.NotServable as exc:
            print(f"error: {s.served_name}: {exc}", file=sys.stderr, flush=True)
            return False
        print(f"{s.served_name}: {choice} ({why})", flush=True)
    return True


def configure_logging(level: str) -> None:
    """One line per record, in one format. huggingface_hub gives its loggers a handler of their own
    (when its logging module is first imported) and still lets them propagate, so under a configured
    root each of its lines would print twice, once bare and once formatted: its records go through
    the root's handler alone."""
    from huggingface_hub.utils import logging as hub_logging  # installs that handler, if not yet

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hub = hub_logging.get_logger()
    for handler in list(hub.handlers):
        hub.removeHandler(handler)


def build_app(args: argparse.Namespace) -> FastAPI:
    from .app import create_app

    backend: Backend
    if args.triton:
        from .backends.triton import TritonBackend

        urls = [u.strip() for item in args.triton for u in item.split(",") if u.strip()]
        tuning = {"timeout_s": args.triton_timeout, "rounds_in_flight": args.triton_rounds_in_flight}
        backend = TritonBackend(urls, **{k: v for k, v in tuning.items() if v})
    else:
        from .backends.embedded import EmbeddedBackend

        backend = EmbeddedBackend(
            args.repository, threads=args.threads, engine=args.engine, device=args.device, streams=args.engine_streams
        )
    limits = Limits(
        max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars,
        max_documents=args.max_documents,
        max_inputs_in_flight=args.max_inputs_in_flight,
        max_body_bytes=args.max_body_bytes,
        truncate=args.truncate,
    )
    return create_app(backend, limits, load_keys(args.api_key, args.api_key_file))


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process (--workers): the parent's arguments come through the environment."""
    args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
    args.repository = Path(args.repository)
    args.api_key_file = Path(args.api_key_file) if args.api_key_file else None
    configure_logging(args.log_level)
    return build_app(args)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    configure_logging(args.log_level)
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.workers > 1 and not args.triton:
        raise SystemExit("--workers needs --triton: the embedded backend batches requests within one process")
    if args.engine_streams is not None and args.triton:
        raise SystemExit("--engine-streams is the embedded backend's; Triton's encoder runs one batch at a time")
    if args.engine and args.triton:
        raise SystemExit("--engine chooses the embedded backend's engine; for Triton's Python encoder, export with --engine")
    if args.device != "auto" and args.triton:
        raise SystemExit("--device places the embedded backend's encoders; Triton's come from export's --device")
    if args.threads and args.triton:
        raise SystemExit("--threads sizes the embedded backend's encoders; Triton's encoders run in Triton")
    if args.precision and not args.model:
        raise SystemExit("--precision is the precision --model exports at; without --model the repository is served as it is")
    if args.model:
        if args.triton:
            raise SystemExit("--model exports for the embedded backend; with --triton, run `fos export` for Triton's repository")
        from export.load import ModelUnavailable
        from export.main import ParityError

        try:
            ensure_exported(args.model, args.repository, args.precision)
        except (ModelUnavailable, ParityError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    try:
        if not args.triton and not _engines_servable(args.repository, args.engine, args.device):
            return 1
    except repo.Unreadable as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    options = dict(
        host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=args.graceful_timeout
    )
    if args.workers == 1:
        uvicorn.run(build_app(args), **options)
    else:
        os.environ[ARGS_ENV] = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
        uvicorn.run("shim.serve:app_from_environment", factory=True, workers=args.workers, **options)
    return 0
