"""``fos export``: Hugging Face model -> ONNX -> Triton model set, proven equal to sentence-transformers."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from fos_runtime import batching, engines, spec, workdirs

DEFAULT_REPOSITORY = Path("model_repository")
WORKDIR_PREFIX = "fos-export-"  # then the pid of the export that made it (fos_runtime.workdirs)


@dataclasses.dataclass
class ExportOptions:
    model: str
    task: spec.Task
    name: str | None = None
    repository: Path = DEFAULT_REPOSITORY
    precision: str = "fp32"
    max_length: int | None = None
    encoder_backend: str = "onnxruntime"
    device: str = "cpu"
    tensorrt: bool = False
    tokenizer_instances: int | None = None  # None: the device's default (fos_runtime.batching)
    encoder_instances: int = 1  # Triton encoder instances on the device (each its own process and engine session)
    engine: str = "auto"  # what runs the encoder (fos_runtime.engines.CHOICES), recorded in the spec
    normalize: bool = True
    prompts: dict[str, str] | None = None  # set or replace these of the model's prompts
    default_prompt_name: str | None = None  # None: the model's own; "" : none
    trust_remote_code: bool = False
    local_files_only: bool | None = None  # None: found out (load.locate)
    openvino_int8: bool = False  # int8 on the CPU: OpenVINO's own int8 of the fp32 graph beside onnxruntime's (NNCF)
    calibration: Path | None = None  # text (a line an input) OpenVINO's int8 takes its ranges from, too


class ParityError(RuntimeError):
    pass


MAX_NAME = 128  # in Triton's spelling; folders beside the repository add ~30 characters to it, of 255 a name


def _check_new_name(served: str) -> None:
    """Fail before the slow steps on a name Triton cannot hold, on one that shares its Triton name with another ('/'
    is spelt '--' there: `a/b` and `a--b` would replace each other), and on one too long to export again."""
    name = spec.triton_name(served)
    if "--" in served.strip():
        raise ValueError(
            f"cannot serve a model named {served!r}: Triton's names spell '/' as '--', so it would be the same model as "
            f"{served.strip().replace('--', '/')!r}; choose another --name"
        )
    if len(name) > MAX_NAME:
        raise ValueError(f"cannot serve a model named {served!r}: at most {MAX_NAME} characters (--name)")


def framing_tokens(tokenizer) -> tuple[int | None, int | None]:
    """The special tokens the tokenizer opens and closes an input with ([CLS] and [SEP], <s> and </s>), each None if it
    adds none there (not the text's own first or last token, which may be special too: [UNK])."""
    framed, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    opened = bool(bare) and framed[: len(bare)] != bare and framed[0] in special
    closed = bool(bare) and framed[-len(bare) :] != bare and framed[-1] in special
    return (int(framed[0]) if opened else None), (int(framed[-1]) if closed else None)


def _step(log: Callable[[str], None], n: int, total: int, text: str):
    log(f"[{n}/{total}] {text} ...")
    return time.perf_counter()


def export(opts: ExportOptions, log: Callable[[str], None] = print) -> spec.ModelSpec:
    """Run every step; raises ParityError (after writing the report) if the check fails."""
    from . import calibration, convert, load, parity, repository

    if opts.precision not in convert.PRECISIONS:
        raise ValueError(f"precision must be one of {convert.PRECISIONS}")
    if opts.engine not in engines.CHOICES:
        raise ValueError(f"engine must be one of {engines.CHOICES}")
    if Path(opts.model).is_file():
        raise ValueError(f"{opts.model} is a file: pass the folder that holds the model (config.json and its weights)")
    served = opts.name or spec.default_served_name(opts.model)
    _check_new_name(served)
    if opts.tensorrt and (opts.encoder_backend, opts.device) != ("onnxruntime", "gpu"):
        raise ValueError("--tensorrt needs --encoder-backend onnxruntime --device gpu")
    if opts.encoder_instances < 1 or (opts.tokenizer_instances is not None and opts.tokenizer_instances < 1):
        raise ValueError("--encoder-instances and --tokenizer-instances must be at least 1")
    if opts.engine.startswith(engines.OPENVINO):
        wanted = {"openvino": ("fp32", "int8"), "openvino-int8": ("int8",)}.get(opts.engine, ("fp32",))
        if opts.device != "cpu" or opts.precision not in wanted:
            raise ValueError(
                f"--engine {opts.engine}: OpenVINO serves {' and '.join(wanted)} exports for the CPU "
                f"(--device cpu --precision {wanted[0]})"
            )
    if opts.openvino_int8 and (opts.precision, opts.device) != ("int8", "cpu"):
        raise ValueError("--openvino-int8 goes with --precision int8 --device cpu")
    if opts.calibration is not None and not opts.openvino_int8:
        raise ValueError("--calibration is for OpenVINO's int8 (--openvino-int8)")
    if opts.engine in ("openvino", "openvino-int8") and opts.precision == "int8" and not opts.openvino_int8:
        raise ValueError(f"--engine {opts.engine} on an int8 export needs --openvino-int8")
    if opts.openvino_int8 and importlib.util.find_spec("nncf") is None:
        raise ValueError("--openvino-int8 needs nncf, which comes with the export extra")
    calibration_texts = calibration.read(opts.calibration) if opts.calibration is not None else []
    total = 5
    local_only = load.locate(opts.model) if opts.local_files_only is None else opts.local_files_only
    load.check_task(opts.model, opts.task, local_only)
    where = " from the local cache (the hub is not used)" if local_only else ""
    t = _step(log, 1, total, f"loading {opts.model} ({opts.task}) with sentence-transformers{where}")
    source = load.load(opts.model, opts.task, opts.max_length, opts.trust_remote_code, local_only)
    log(
        f"      done in {time.perf_counter() - t:.1f}s: max_length={source.max_length}, inputs={list(source.encoder_inputs)}"
        + (f", dimension={source.dimension}" if opts.task == "embed" else "")
    )

    if opts.tensorrt and source.max_length > batching.WARM_UP_LONGEST:
        # TensorRT's provider builds its engines again for every shape past those it has seen (minutes for a
        # 24-layer model), and warm-up runs shapes only up to WARM_UP_LONGEST tokens: a longer input would stall the
        # encoder's one instance past any client's timeout while it builds.
        raise ValueError(
            f"--tensorrt: {opts.model} takes {source.max_length} tokens, past the {batching.WARM_UP_LONGEST} that warm-up "
            f"builds TensorRT's engines for; export it with --max-length {batching.WARM_UP_LONGEST} or less, or without "
            "--tensorrt"
        )

    start, end = framing_tokens(source.tokenizer)
    s = spec.ModelSpec(
        served_name=served,
        task=opts.task,
        source=opts.model,
        max_length=source.max_length,
        encoder_inputs=source.encoder_inputs,
        pad_token_id=int(source.tokenizer.pad_token_id or 0),
        vocab_size=len(source.tokenizer),
        precision=opts.precision,
        device=opts.device,
        ragged=opts.encoder_backend == "python",
        engine=opts.engine,
        dimension=source.dimension,
        normalize=opts.normalize,
        model_normalizes=source.model_normalizes,
        start_token_id=start,
        end_token_id=end,
        **prompts_of(source, opts),
    )

    with workdirs.fresh(WORKDIR_PREFIX) as tmp:
        work = Path(tmp)
        t = _step(log, 2, total, "converting to ONNX (pooling and activation inside the graph)")
        traced = convert.to_onnx(source, work / "raw.onnx", opts.precision, opts.device)
        fused = convert.optimize(source, work / "raw.onnx", work / "fp32.onnx")
        fp32 = work / ("fp32.onnx" if fused is not None else "raw.onnx")
        shown = fused if fused is not None else traced
        ops = ", ".join(f"{op} x{n}" for op, n in sorted((shown or {}).items()))
        log(f"      done in {time.perf_counter() - t:.1f}s" + (f" (fused: {ops or 'nothing'})" if shown is not None else ""))
        if warning := convert.unfused_attention(fused):
            log(f"      {warning}")

        final = fp32
        if opts.precision != "fp32":
            t = _step(log, 3, total, f"converting to {opts.precision}")
            final = work / f"{opts.precision}.onnx"
            convert.to_precision(fp32, final, opts.precision)
            log(f"      done in {time.perf_counter() - t:.1f}s")
        else:
            log(f"[3/{total}] precision fp32: nothing to convert")

        t = _step(log, 4, total, f"writing the Triton models into {opts.repository}")
        repo = Path(opts.repository)
        with repository.staging_for(repo, s.name) as folder:
            staging = Path(folder)
            repository.write(
                s,
                staging,
                final,
                source.tokenizer,
                opts.encoder_backend,
                opts.tensorrt,
                tokenizer_instances=opts.tokenizer_instances,
                encoder_instances=opts.encoder_instances,
                sample_texts=parity.SENTENCES,
            )
            names = f"{s.name} (ensemble), {spec.tokenizer_model(s.name)}, {spec.encoder_model(s.name)}"
            log(f"      {names} [{opts.encoder_backend}]")
            if opts.openvino_int8:
                _openvino_int8(s, fp32, staging, calibration_texts, log)
            # Checked where it was written: an export that fails leaves the repository as it was (an earlier export of
            # the same name included), never a model that did not pass.
            _check(source, s, staging, opts, served, total, log)
            repository.publish(staging, repo, s.name, log)
    return s


def _check(
    source, s: spec.ModelSpec, staging: Path, opts: ExportOptions, served: str, total: int, log: Callable[[str], None]
) -> None:
    """Parity on every engine that may serve the staged export, and the record of those that passed."""
    from . import parity

    _step(log, 5, total, "checking parity with sentence-transformers, on each engine that may serve it")
    reports = parity.check(source, s, staging)
    for report in reports:
        for line in report.lines():
            log("      " + line)
    # Serving picks only among the variants recorded here: a failing OpenVINO variant is never served, and the
    # export as such stands or falls with onnxruntime on the file as written.
    folder = spec.encoder_file(staging, s.name).parent
    engines.write_record(folder, {r.engine: r.figures for r in reports if r.ok})
    if not reports[0].ok:
        raise ParityError(f"{served}: exported model differs from sentence-transformers beyond tolerance")
    log("      engines that may serve it: " + ", ".join(r.engine for r in reports if r.ok))
    if opts.engine != "auto":  # what was asked must be servable here, not refused later by every fos serve
        try:
            engines.resolve(opts.engine, folder, s.precision, gpu=opts.device == "gpu")
        except engines.NotServable as exc:
            raise ParityError(f"{served}: {exc}") from exc


def _openvino_int8(s: spec.ModelSpec, fp32: Path, repository: Path, texts: list[str], log: Callable[[str], None]) -> None:
    """OpenVINO's own int8 of the fp32 graph beside onnxruntime's int8 (``convert.to_openvino_int8``); the parity check
    then runs it as it runs every variant, and only a passing one is ever served."""
    from fos_runtime import tokenization

    from . import calibration, convert

    t = time.perf_counter()
    target = spec.openvino_int8_file(spec.encoder_file(repository, s.name))
    batches = calibration.batches(s, tokenization.Tokenizer(spec.tokenizer_files(repository, s.name), s.max_length), texts)
    log(f"      OpenVINO int8: NNCF on {len(batches)} calibration batches ...")
    try:
        convert.to_openvino_int8(fp32, target, batches)
    except Exception as exc:  # asked for: the export fails rather than end without it (its staging folder goes)
        raise RuntimeError(f"OpenVINO int8 (--openvino-int8) could not be made: {type(exc).__name__}: {exc}") from exc
    log(f"      OpenVINO int8 (NNCF, {len(batches)} calibration batches): done in {time.perf_counter() - t:.1f}s")


def prompts_of(source, opts: ExportOptions) -> dict:
    """The model's own prompts (sentence-transformers' config), ruri's by model id or served name where it has none,
    then the user's; and the default prompt, the user's over the model's."""
    prompts = dict(source.prompts)
    if not any(prompts.values()):
        # By the served name too: offline, ruri is a directory served under its hub id (fos serve --model ID=DIR).
        prompts.update(spec.known_prompts(opts.model) or spec.known_prompts(opts.name or ""))
    prompts.update(opts.prompts or {})
    default = source.default_prompt_name if opts.default_prompt_name is None else opts.default_prompt_name or None
    if default is not None and default not in prompts:
        raise ValueError(f"default prompt {default!r} is not one of the model's prompts ({', '.join(sorted(prompts)) or 'none'})")
    if any(prompts.values()) and not source.pools_prompt:
        # The served graph pools every token: the prompt's would be in the mean, and the answers wrong.
        raise ValueError(
            f"{opts.model} pools without its prompt tokens (include_prompt=false), so it cannot be served with prompts "
            f"({', '.join(name for name, text in prompts.items() if text)})"
        )
    return {"prompts": prompts, "default_prompt_name": default}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face id (e.g. cl-nagoya/ruri-large) or local directory")
    p.add_argument("--task", required=True, choices=spec.TASKS)
    p.add_argument(
        "--name", help="served model name, the id clients ask for (default: --model's Hugging Face id, or its directory's name)"
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="fp16 for GPU, int8 (dynamic quantization) for CPU"
    )
    p.add_argument("--max-length", type=int, help="tokens per input (default: the model's own)")
    p.add_argument(
        "--encoder-backend",
        choices=("onnxruntime", "python"),
        default="onnxruntime",
        help="onnxruntime: the tritonserver container; python: the pip tritonserver (nvidia-pytriton)",
    )
    p.add_argument("--device", choices=batching.DEVICES, default="cpu", help="where Triton runs the encoder")
    p.add_argument(
        "--engine",
        choices=engines.CHOICES,
        default="auto",
        help="what runs the encoder in fos serve and in Triton's Python encoder, decided where it runs (auto: "
        f"{engines.AUTO_RULE}); fos serve --engine overrides it",
    )
    p.add_argument(
        "--tensorrt",
        action="store_true",
        help="container on GPU: let ONNX Runtime run the encoder through TensorRT (fp16 engines)",
    )
    p.add_argument(
        "--tokenizer-instances",
        type=int,
        metavar="N",
        help="Triton tokenizer model instances (processes); default 1 with --device cpu, 4 with --device gpu",
    )
    p.add_argument(
        "--encoder-instances",
        type=int,
        default=1,
        metavar="N",
        help="Triton encoder model instances on the device (default 1). On a GPU one instance keeps it busy only part "
        "of the time: its host process launches the kernels and pads the batches while the GPU waits",
    )
    p.add_argument("--raw", action="store_true", help="serve raw vectors instead of L2-normalised ones")
    p.add_argument(
        "--prompt",
        "--prefix",
        dest="prompt",
        action="append",
        default=None,
        metavar="NAME=TEXT",
        help="text put before inputs of input_type NAME, over the model's own prompts (repeatable)",
    )
    p.add_argument(
        "--default-prompt",
        metavar="NAME",
        help="the prompt for requests without input_type (default: the model's default_prompt_name; '' for none)",
    )
    p.add_argument(
        "--openvino-int8",
        action="store_true",
        help="with --precision int8: OpenVINO's own int8 of the fp32 graph too (NNCF's static quantization; 2-3 minutes "
        "for ruri-large on 2 cores), served where --engine is openvino-int8 or openvino (auto keeps onnxruntime's)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="with --openvino-int8: text like what will be served, one input a line, that OpenVINO's int8 takes its "
        "activation ranges from besides the built-in sentences",
    )
    p.add_argument("--trust-remote-code", action="store_true")


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    prompts = None
    if args.prompt is not None:
        prompts = {}
        for item in args.prompt:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SystemExit(f"--prompt wants NAME=TEXT, got {item!r}")
            prompts[key] = value
    return ExportOptions(
        model=args.model,
        task=cast(spec.Task, args.task),
        name=args.name,
        repository=args.repository,
        precision=args.precision,
        max_length=args.max_length,
        encoder_backend=args.encoder_backend,
        device=args.device,
        tensorrt=args.tensorrt,
        tokenizer_instances=args.tokenizer_instances,
        encoder_instances=args.encoder_instances,
        engine=args.engine,
        normalize=not args.raw,
        prompts=prompts,
        default_prompt_name=args.default_prompt,
        trust_remote_code=args.trust_remote_code,
        openvino_int8=args.openvino_int8,
        calibration=args.calibration,
    )


def run(args: argparse.Namespace) -> int:
    from .load import ModelUnavailable

    try:
        export(options_from_args(args), log=lambda line: print(line, flush=True))
    except (ParityError, ModelUnavailable, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("export finished", flush=True)
    return 0
