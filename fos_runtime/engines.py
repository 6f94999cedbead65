"""Which engine runs an exported encoder, at which compute precision: onnxruntime as exported, OpenVINO on the
fp32 graph in f32 or in bf16 (CPUs with AMX or AVX512-BF16), or OpenVINO's own int8 of an int8 export.

An export's precision is what its ONNX file holds (fp32, fp16, int8); bf16 is a serving choice on an fp32 export:
OpenVINO computes in bf16 where the CPU has units for it. An int8 export holds onnxruntime's dynamic quantization
(which OpenVINO cannot read) and, where export was asked for it (``--openvino-int8``), OpenVINO's static int8 of the
same graph (``spec.OPENVINO_INT8_FILE``), served only when asked for too. Export's parity check runs every variant this
machine can run and records which passed beside the model (``engines.json``); ``auto`` and explicit choices serve only
a variant recorded there, so what serves is what was checked. Without the record (an older export) only onnxruntime
serves. ``auto`` on an fp32 export: OpenVINO bf16 where the CPU has bf16 units, OpenVINO f32 where it has AVX-512
without them, else onnxruntime.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import spec

log = logging.getLogger("fos.engines")

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
# What a user may ask for: a variant, an engine at its best checked precision, or auto.
VARIANTS = ("onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8")
CHOICES = ("auto", "onnxruntime", "openvino", "openvino-fp32", "openvino-bf16", "openvino-int8")
# What ``auto`` serves (``resolve``), as fos export's and fos serve's --engine help both say it.
AUTO_RULE = (
    "OpenVINO bf16 on a CPU with AMX or AVX512-BF16, OpenVINO f32 on one with AVX-512 but neither, where export's "
    "parity check passed it; else onnxruntime"
)

RECORD = "engines.json"  # beside model.onnx: the variants export's parity check passed

# /proc/cpuinfo flags of bf16 matrix or vector units: Intel AMX (Sapphire Rapids on), AVX512-BF16 (Cooper Lake,
# AMD Zen 4 on).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One way of running the graph: an engine and the precision it computes in."""

    engine: str  # onnxruntime | openvino
    compute: str  # onnxruntime: the export's precision (fp32, fp16, int8); openvino: fp32, bf16 or int8

    @property
    def variant(self) -> str:
        """The key in the parity record and the name ``--engine`` takes."""
        return ONNXRUNTIME if self.engine == ONNXRUNTIME else f"{OPENVINO}-{self.compute}"

    def __str__(self) -> str:
        return f"{self.engine} {self.compute}"


@dataclasses.dataclass(frozen=True)
class Cpu:
    """What the engine choice needs to know of this machine's CPU."""

    bf16_flags: tuple[str, ...]  # of BF16_FLAGS, those /proc/cpuinfo lists
    openvino: bool  # openvino imports
    openvino_bf16: bool  # OpenVINO's CPU plugin lists BF16 among its capabilities
    model: str = ""
    avx512: bool = False  # /proc/cpuinfo lists avx512f

    @property
    def bf16(self) -> bool:
        """bf16 units that OpenVINO uses: both the CPU and OpenVINO say so."""
        return bool(self.bf16_flags) and self.openvino_bf16

    @classmethod
    def detect(cls) -> Cpu:
        flags, model = cpuinfo()
        bf16_flags, avx512 = tuple(f for f in BF16_FLAGS if f in flags), "avx512f" in flags
        try:
            import openvino as ov

            capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            return cls(bf16_flags, True, "BF16" in capabilities, model, avx512)
        except Exception as exc:  # not installed, or no CPU plugin for this machine
            log.info("openvino is not usable here: %s", exc)
            return cls(bf16_flags, False, False, model, avx512)


def cpuinfo() -> tuple[set[str], str]:
    """The CPU's flags and model name, as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: OpenVINO's own capabilities alone cannot tell AMX from emulation
        return set(), ""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


class NotServable(RuntimeError):
    """The engine asked for cannot serve this export on this machine; the message says why and what to do."""


def read_record(folder: Path) -> dict[str, dict]:
    """The parity record beside the model: variant -> its figures; empty for exports older than the record."""
    path = Path(folder) / RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotServable(f"{path} cannot be read ({exc}): export the model again") from exc
    if not isinstance(record, dict):
        raise NotServable(f"{path} is not a parity record: export the model again")
    return record


def write_record(folder: Path, passed: Mapping[str, dict]) -> None:
    (Path(folder) / RECORD).write_text(json.dumps(dict(passed), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def resolve(requested: str, folder: Path, precision: str, gpu: bool, cpu: Cpu | None = None) -> tuple[Choice, str]:
    """The variant to serve the export in ``folder`` (ONNX file of ``precision``) with, and why (for the start-up
    log). ``gpu``: the encoder runs on a GPU, which only onnxruntime does here. Raises NotServable."""
    if requested not in CHOICES:
        raise NotServable(f"engine must be one of {', '.join(CHOICES)}, not {requested!r}")
    native = Choice(ONNXRUNTIME, precision)
    if requested == ONNXRUNTIME:
        return native, "asked for"
    if requested == "auto" and precision != "fp32":
        # An int8 export's OpenVINO int8 is served only when asked for: at the server's shapes it matched onnxruntime's
        # int8 rather than beat it (AMD Zen 4, docs/benchmarks.md).
        return native, f"auto picks OpenVINO for fp32 exports only, and this one is {precision}"
    if gpu:
        if requested != "auto":
            raise NotServable(
                f"--engine {requested}: OpenVINO runs on the CPU, and this encoder is on the GPU (fos serve --device cpu "
                "keeps it on the CPU)"
            )
        return native, "the encoder is on the GPU"
    record = read_record(folder)
    cpu = cpu or Cpu.detect()
    usable = [v for v in ("openvino-int8", "openvino-bf16", "openvino-fp32") if v in record]
    if not cpu.bf16:
        usable = [v for v in usable if v != "openvino-bf16"]
    if requested == "auto":
        if not cpu.openvino:
            return native, "openvino is not usable on this machine"
        if "openvino-bf16" in usable:
            units = " and ".join(cpu.bf16_flags)
            return Choice(OPENVINO, "bf16"), f"this CPU has bf16 units ({units}), and parity checked OpenVINO bf16"
        if cpu.bf16 and precision == "fp32":
            log.warning(
                "this CPU has bf16 units, but export's parity check did not pass OpenVINO bf16 (%s): serving onnxruntime; "
                "export again on a CPU with them (AMX or AVX512-BF16) to serve bf16",
                "no parity record: exported before engines were checked" if not record else f"passed: {', '.join(record)}",
            )
        if not cpu.bf16 and cpu.avx512 and "openvino-fp32" in usable:
            # Measured on an Intel Xeon with AVX-512 and no bf16 units: served 1.10-1.37x, alone 1.11-1.35x (2 cores,
            # docs/benchmarks.md). AVX2-only CPUs keep onnxruntime: not measured there.
            return Choice(OPENVINO, "fp32"), "AVX-512 without bf16 units: OpenVINO f32 outran onnxruntime fp32 on such a CPU"
        return native, "no bf16 units here" if not cpu.bf16 else "export's parity check did not pass OpenVINO bf16"
    if not cpu.openvino:
        raise NotServable(f"--engine {requested}: openvino does not load on this machine")
    wanted = usable if requested == OPENVINO else [requested]
    for variant in wanted:
        if variant in usable:
            return Choice(OPENVINO, variant.removeprefix("openvino-")), "asked for"
    if requested == "openvino-int8" and precision != "int8":
        raise NotServable("--engine openvino-int8 serves int8 exports (fos export --precision int8 --openvino-int8)")
    if requested in ("openvino", "openvino-int8") and precision == "int8" and "openvino-int8" not in record:
        raise NotServable(
            f"--engine {requested}: this int8 export has no OpenVINO int8 (fos export --precision int8 --openvino-int8)"
        )
    if requested == "openvino-bf16" and not cpu.bf16:
        raise NotServable(
            "--engine openvino-bf16: this CPU has no bf16 units OpenVINO uses (AMX or AVX512-BF16); use openvino-fp32"
        )
    checked = ", ".join(record) or "none: exported before engines were checked"
    raise NotServable(
        f"--engine {requested}: export's parity check did not pass it for this model (passed: {checked}); "
        "export the model again on this machine (fos export, or fos serve --model ... --precision ...)"
    )


def first_run_feeds(input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """A one-row input of 8 tokens for a session's first run, which sets it up: run at load, not in a request's time.
    Never 1 token: OpenVINO 2026.4.1, first run so, computes attention without a mask (ruri v3's global layers) wrong
    at every later length from about 17 tokens (tests/test_engines.py)."""
    return {name: np.full((1, 8), 0 if name == spec.TOKEN_TYPE_IDS else 1, dtype=np.int64) for name in input_names}


# A run whose attention is larger than any a 512-token model's can be (its 32 rows of 512): after it, the CPU engines
# give back the memory the run took. They otherwise keep their peak for the life of the process: one 8192-token input
# to a tiny ModernBERT left 3.2 GB resident with onnxruntime and 5 GB with OpenVINO. Below this, runs reuse that memory
# as before: giving it back after every ruri-large run of 16x128 cost onnxruntime about 5%, and OpenVINO's next run
# after a release took about 11 ms more (the tiny model's).
LARGE_RUN = 32 * 512 * 512


def is_large(shape: tuple[int, ...]) -> bool:
    """Whether a run of this (rows, width) is past ``LARGE_RUN``: attention's memory grows with rows x width^2."""
    rows, width = shape[0], shape[1]
    return rows * width * width > LARGE_RUN


class OpenVINOSession:
    """One compiled model and an infer request per stream: with ``streams`` above 1, that many batches run at once
    (each from a thread of its own, ``fos_runtime.encoder.Encoder``), each on its share of the threads; else one at a
    time over every thread, like onnxruntime's session.

    The compute precision is always set: left to itself OpenVINO runs bf16 on a CPU with bf16 units, which an fp32
    parity check would not have covered. Dynamic shapes ([-1, -1]), latency hint (one stream over every core) unless
    streams are asked for, no thread pinning (never slower here, much faster on a host shared with tokenizers and HTTP
    workers)."""

    def __init__(self, path: Path, compute: str, threads: int, streams: int = 1):
        import openvino as ov

        # OpenVINO emulates bf16 on AVX-512 CPUs without bf16 units (an Ice Lake Xeon, or a VM that hides AMX) and
        # reports bf16 as what runs: ruri-large ran 8-12 tokens/s there against 370 in f32.
        if compute == "bf16" and not Cpu.detect().bf16:
            raise NotServable("this CPU has no bf16 units OpenVINO uses (AMX or AVX512-BF16); OpenVINO would emulate bf16")
        core = ov.Core()
        # int8: the IR beside the (onnxruntime int8) ONNX file; what NNCF left in float (stored in fp16, OpenVINO's
        # default) is computed in f32, as export's parity check ran it.
        model = core.read_model(str(spec.openvino_int8_file(path) if compute == "int8" else path))
        model.reshape({i.get_any_name(): ov.PartialShape([-1, -1]) for i in model.inputs})
        precision = "bf16" if compute == "bf16" else "f32"
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "ENABLE_CPU_PINNING": False,
        }
        if streams > 1:
            config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams}
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        self.compiled = core.compile_model(model, "CPU", config)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        # Should OpenVINO still compute another precision than asked (units the check above misjudged): refuse.
        if got != precision:
            raise NotServable(f"OpenVINO runs {got}, not {precision}, on this CPU (bf16 needs AMX or AVX512-BF16)")
        self.input_names = tuple(i.get_any_name() for i in model.inputs)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        # The first run of a compiled model prepares its kernels, and each request's its own: at load, not in the first
        # requests' time.
        warm = first_run_feeds(self.input_names)
        for request in self.requests:
            self.run(request, warm)

    def run(self, request, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """``request`` (one of ``requests``, used by one caller at a time) run on ``feeds``."""
        out = np.asarray(request.infer({name: feeds[name] for name in self.input_names})[0], dtype=np.float32)
        # Between runs only: OpenVINO frees what no running request holds. Not with streams, where another request may
        # be running now (two rounds at once); releasing under running requests is not safe: with an AsyncInferQueue's
        # requests alive (the code before), OpenVINO 2026.4 corrupted the heap at the next round ("malloc(): invalid size").
        if self.streams == 1 and is_large(feeds[self.input_names[0]].shape):
            self.compiled.release_memory()
            # After a release OpenVINO 2026.4.1 fails the next run of the same shape on ruri v3's graph ("Memory has not
            # been allocated" in its fused RoPE), a client's retry of a long input; a run of another shape in between
            # sets it right. The first-run input's milliseconds, after a run of seconds, keep the memory given back.
            request.infer(first_run_feeds(self.input_names))
        return out  # infer copied it out of the request's reused buffer
