"""``fos serve``: export what the repository lacks, then serve the API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fos_runtime import spec

from .auth import load_keys
from .backends.base import Backend
from .service import Limits


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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="HF_ID_OR_DIR",
        help="export this model into the repository first if it is not there (embed or rerank is detected)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="for models exported by --model")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    defaults = Limits()
    p.add_argument("--max-inputs", type=int, default=defaults.max_inputs, help="inputs per embeddings request")
    p.add_argument("--max-input-chars", type=int, default=defaults.max_input_chars, help="characters per input")
    p.add_argument("--max-documents", type=int, default=defaults.max_documents, help="documents per rerank request")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body size")
    p.add_argument(
        "--max-inputs-in-flight",
        type=int,
        default=defaults.max_inputs_in_flight,
        help="inputs admitted at once over all requests; past it, 429 with Retry-After",
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


def ensure_exported(models: list[str], repository: Path, precision: str) -> None:
    """Export each model the repository lacks; raises export's errors (``ModelUnavailable`` first of
    all, before anything slow, when the model can be had from nowhere)."""
    for model in models:
        try:
            name = spec.triton_name(spec.default_served_name(model))
        except ValueError:
            from export.load import locate

            locate(model)  # a directory that is not there says so
            raise
        if (repository / name / "config.pbtxt").exists():  # served as it is: no hub, no torch
            print(f"{model}: already in {repository}", flush=True)
            continue
        from export.load import detect_task, locate
        from export.main import ExportOptions, export

        local_only = locate(model)
        task = detect_task(model, local_only)
        print(f"{model}: not in {repository}; exporting it (task {task}, {precision})", flush=True)
        export(
            ExportOptions(model=model, task=task, repository=repository, precision=precision, local_files_only=local_only),
            log=lambda line: print(line, flush=True),
        )


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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    configure_logging(args.log_level)
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
    backend: Backend
    if args.triton:
        from .backends.triton import TritonBackend

        backend = TritonBackend([u.strip() for item in args.triton for u in item.split(",") if u.strip()])
    else:
        from .backends.embedded import EmbeddedBackend

        backend = EmbeddedBackend(args.repository, threads=args.threads)
    limits = Limits(
        max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars,
        max_documents=args.max_documents,
        max_inputs_in_flight=args.max_inputs_in_flight,
        max_body_bytes=args.max_body_bytes,
        truncate=args.truncate,
    )
    keys = load_keys(args.api_key, args.api_key_file)
    uvicorn.run(
        create_app(backend, limits, keys),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0
