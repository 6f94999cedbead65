"""Run the exported encoder with onnxruntime or OpenVINO (``engines``): the embedded backend, Triton's Python-backend
encoder and export's parity check all use this, so they behave the same."""

from __future__ import annotations

import concurrent.futures
import glob
import logging
import os
import queue
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import engines
from .cores import available_cores

# Graph optimisations a CPU session goes without. SkipLayerNormFusion puts a residual Add and its LayerNormalization
# back into one SkipLayerNormalization, whose CPU kernel (onnxruntime 1.32) ran 5x slower than the two: 0.50 against
# 0.10 ms at ruri-large's 144x1024 on an AVX-512 Xeon, 12-14% of an int8 run of 8x18 tokens (docs/benchmarks.md).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def threads_per_instance(instance_group: Sequence[Mapping]) -> int:
    """Each CPU instance's share of the cores, from a Triton model config's ``instance_group``.

    Every instance is a process of its own with its own session: at every core each, N instances would run N times
    as many threads as cores, and each run would wait on the others'."""
    instances = sum(int(g.get("count", 1)) for g in instance_group if g.get("kind", "KIND_CPU") == "KIND_CPU")
    return max(1, available_cores() // max(1, instances))


# --engine-streams auto. onnxruntime's int8 on 16 AMX cores, served (docs/benchmarks.md, 2026-11-27): 4 streams of 4
# threads gave dify-embed c=16 1.40x and batch-embed c=2 1.24x one stream of 16 threads, rerank c=2 0.99x; 2 streams
# 1.24x, 1.22x and 1.02x. A small run leaves most of 16 threads waiting at each layer; int8's light tokens make the run's
# fixed cost weigh most. Each stream holds its own copy of the model. fp32 and OpenVINO were not measured to gain.
# Two at least from 2 threads: on 2 Zen 4 cores (2026-11-28, ruri-large int8, two runs) 2 streams against one gave
# batch-embed c=2 1.07-1.14x, rerank c=2 1.25-1.32x, dify-embed c=16 1.02-1.06x and c=1 and c=4 0.99-1.06x, once a
# lone run took every thread (the encoder's session over all of them); before that, c=1's p50 was 1.5-1.7x one stream's.
CORES_PER_STREAM = 4
AUTO_STREAMS_MAX = 4


def auto_streams(choice: engines.Choice, device: str, threads: int) -> int:
    """The streams ``--engine-streams auto`` gives an encoder: for onnxruntime's int8 on a CPU, a stream per
    ``CORES_PER_STREAM`` of its threads, at least 2 (from 2 threads) and at most ``AUTO_STREAMS_MAX``; one otherwise."""
    if device != "cpu" or choice != engines.Choice(engines.ONNXRUNTIME, "int8") or threads < 2:
        return 1
    return max(2, min(AUTO_STREAMS_MAX, threads // CORES_PER_STREAM))


def _load_cuda_libraries(ort) -> None:
    """onnxruntime-gpu wheels find CUDA and cuDNN in the nvidia-* wheels (those torch installs) only once asked to;
    where the libraries are on the system's path instead (the NGC container), asking is harmless."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the session then reports what it cannot load
            logging.getLogger("fos.encoder").warning("onnxruntime.preload_dlls: %s", exc)


class Encoder:
    """The chosen engine's session; ``run`` takes padded arrays and returns the graph's only output. With ``streams``
    above 1 (a CPU), ``run_many`` computes that many batches at once, each on its share of the threads.

    ``engine``: one of ``engines.CHOICES``, resolved against the export's parity record (``engines.resolve``), or a
    ``engines.Choice`` run as it is (export's parity check, before there is a record). ``precision``: what the ONNX
    file holds. ``self.engine`` is what runs, ``self.reason`` why it was picked. ``streams``: None is
    ``auto_streams`` on onnxruntime, one on OpenVINO."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        device: str = "auto",
        engine: str | engines.Choice = engines.ONNXRUNTIME,
        precision: str = "fp32",
        streams: int | None = 1,
        gpu: int = 0,
    ):
        """``gpu``: which GPU onnxruntime's CUDA provider runs on (a Triton GPU instance's device id)."""
        path = Path(path)
        asked_streams = streams
        self._openvino: engines.OpenVINOSession | None = None
        self._wide: Any = None  # onnxruntime's session over every thread, where it has streams
        self.lone_run_threads: int | None = None  # its threads
        if isinstance(engine, engines.Choice):
            self.engine, self.reason = engine, "asked for"
        else:
            self.engine, self.reason = choose_engine(path, engine, precision, device)
        if self.engine.engine == engines.OPENVINO:
            streams = streams or 1
            if device == "gpu":
                raise engines.NotServable("OpenVINO runs on the CPU, and this encoder is on the GPU")
            self._openvino = engines.OpenVINOSession(path, self.engine.compute, threads or available_cores(), streams)
            self.streams = self._openvino.streams  # OpenVINO may grant another number
            self.run_threads = max(1, (threads or available_cores()) // self.streams)
            self.device = "cpu"
            self.input_names = self._openvino.input_names
            self._pool(self._openvino.requests)
            return
        import onnxruntime as ort

        providers: list = ["CPUExecutionProvider"]
        if _gpu_likely(device):
            _load_cuda_libraries(ort)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        elif device == "gpu":
            raise RuntimeError("device=gpu asked for, but this onnxruntime has no CUDAExecutionProvider")
        # On a CPU, every core, shared by the streams. On a GPU the CPU only launches kernels and runs a few shape
        # operations: a pool of threads there only waits on cores that tokenizers and HTTP workers need.
        total = threads or (1 if len(providers) > 1 else available_cores())
        if streams is None:
            streams = auto_streams(engines.Choice(engines.ONNXRUNTIME, precision), "gpu" if len(providers) > 1 else "cpu", total)
        if streams > 1 and len(providers) > 1:
            raise RuntimeError(
                f"{streams} engine streams asked for: streams share a CPU's cores, and this encoder would run on the GPU "
                "(leave streams at 1, or keep the encoder on the CPU: device cpu)"
            )
        # A thread a stream at least: more streams than threads would run more threads than asked for.
        self.streams = max(1, min(streams, total))
        if self.streams < streams:
            logging.getLogger("fos.encoder").warning("streams cut from %d to %d: a thread each at least", streams, total)
        self.run_threads = total // self.streams  # each run's threads: what a CPU run's fixed cost scales with
        cpu_only = {} if len(providers) > 1 else {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)}

        def session(intra_threads: int):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = intra_threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(str(path), sess_options=options, providers=providers, **cpu_only)

        # One session a stream: a run on each at once, each on its own threads (onnxruntime's runs on one session
        # share its one pool of threads). Each holds its own copy of the weights.
        sessions = [session(self.run_threads) for _ in range(self.streams)]
        # And one over every thread, for a round of one run, which would leave the other streams' cores idle (a lone
        # Dify query at low load): it runs there while no stream does (``run_many``).
        self._wide = session(total) if self.streams > 1 else None
        self.lone_run_threads = total if self._wide is not None else None
        self.session = sessions[0]
        self.device = "gpu" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "auto" and len(providers) > 1 and self.device == "cpu":
            # The CPU as onnxruntime falls back to it is set up for a GPU: one thread, and the engine picked for one.
            logging.getLogger("fos.encoder").warning(
                "onnxruntime's CUDA provider did not start (see its log): the encoder runs on the CPU, set up for it"
            )
            self.__init__(path, threads, "cpu", engine, precision, asked_streams)  # type: ignore[misc]
            return
        if device == "gpu" and self.device != "gpu":  # onnxruntime falls back to the CPU with only a log line
            raise RuntimeError("device=gpu asked for, but onnxruntime could not start its CUDAExecutionProvider (see its log)")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name
        self.engine = engines.Choice(engines.ONNXRUNTIME, precision)
        self._shrink = None  # the GPU's arena is left as it is: freeing CUDA memory stalls the device
        if self.device == "cpu":
            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if self.device == "cpu":  # each session's first run sets it up, as OpenVINO's requests' do
            warm = engines.first_run_feeds(self.input_names)
            for each in [*sessions, *([self._wide] if self._wide is not None else [])]:
                each.run([self.output_name], warm)
        self._pool(sessions)

    def _pool(self, runners: Sequence) -> None:
        """What runs a batch, one per stream (onnxruntime sessions, OpenVINO infer requests), and the threads that run
        a round's batches at once."""
        # Runners not running now: a run takes one and gives it back, so that no two runs share one's threads or buffers.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for runner in runners:
            self._idle.put(runner)
        self._streams = (
            concurrent.futures.ThreadPoolExecutor(self.streams, thread_name_prefix="fos-stream") if self.streams > 1 else None
        )
        # Callers run_many takes at once. With streams, two: a second round's runs queue behind the first's on the same
        # streams and take those that its last runs leave idle (rerank on 4 AMX streams: one run of 5-6 kept one busy).
        self.rounds_at_once = 2 if self._streams is not None else 1

    def close(self) -> None:
        """Its stream threads end (once idle: call it when no run is left)."""
        if self._streams is not None:
            self._streams.shutdown()

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        runner = None
        try:
            runner = self._idle.get()
            if self._openvino is not None:
                return self._openvino.run(runner, feeds)
            return self._run_session(runner, feeds)
        finally:
            if runner is not None:
                self._idle.put(runner)

    def _run_session(self, session, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        large = self._shrink is not None and engines.is_large(feeds[self.input_names[0]].shape)
        inputs = {name: feeds[name] for name in self.input_names}
        out = session.run([self.output_name], inputs, self._shrink if large else None)[0]
        return np.asarray(out, dtype=np.float32)

    def _run_wide(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """``run`` on the session over every thread, holding every stream's runner so that no stream runs meanwhile;
        on a stream's, as ``run``, where one is running now."""
        taken: list = []
        try:
            while len(taken) < self.streams:
                taken.append(self._idle.get_nowait())
        except queue.Empty:
            for runner in taken:
                self._idle.put(runner)
            return self.run(feeds)
        try:
            return self._run_session(self._wide, feeds)
        finally:
            for runner in taken:
                self._idle.put(runner)

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
        """``run`` of each batch, in order: up to ``streams`` of them at once where the encoder has streams; a lone
        batch over every thread where no stream is running."""
        if len(feeds) == 1 and self._wide is not None:
            return [self._run_wide(feeds[0])]
        if self._streams is None or len(feeds) < 2:
            return [self.run(f) for f in feeds]
        work = [self._streams.submit(self.run, f) for f in feeds]
        concurrent.futures.wait(work)  # every run ends before the round answers, failed or not
        return [w.result() for w in work]


def choose_engine(path: Path, engine: str, precision: str, device: str = "auto") -> tuple[engines.Choice, str]:
    """The variant ``Encoder(path, device=device, engine=engine, precision=precision)`` runs, and why, without loading
    it; raises ``engines.NotServable``."""
    return engines.resolve(engine, Path(path).parent, precision, gpu=_gpu_likely(device))


def _gpu_likely(device: str) -> bool:
    """Whether onnxruntime would put this encoder on a GPU: only it runs there, so ``auto`` keeps to it."""
    return cuda_available() and (device == "gpu" or (device == "auto" and gpu_visible()))


def gpu_visible() -> bool:
    """Whether this process may see an NVIDIA GPU, without initialising CUDA (which a later fork could not use):
    onnxruntime-gpu lists its CUDA provider on any machine, and a container started without GPUs has none of their
    device files (/dev/nvidia0..., WSL 2's /dev/dxg). Where that cannot be told (not Linux), True: the encoder still
    moves to the CPU if CUDA fails."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and (not hidden.strip() or hidden.strip().startswith("-1")):
        return False
    return not sys.platform.startswith("linux") or any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/dxg"))


def cuda_available() -> bool:
    """Whether this onnxruntime has its CUDA provider (a GPU build)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
