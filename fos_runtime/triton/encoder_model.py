"""Triton Python model that runs the exported encoder with onnxruntime or OpenVINO (``fos_runtime.engines``; the
spec's ``engine``, chosen at export, says which: ``auto`` picks by the CPU Triton runs on).

For tritonservers without the ONNX Runtime backend (the one in the ``nvidia-pytriton`` wheel), and for OpenVINO's
bf16 on CPUs with AMX or AVX512-BF16 (the container's CPU deployment).

Its inputs allow ragged batches, so Triton's dynamic batcher hands over requests of different
lengths together; they are regrouped by length and run as few padded batches, exactly as the
embedded backend does.
"""

import json
import os
import sys
import time
from pathlib import Path

# The fos_runtime that export copied beside this file, whatever else is on the path (a newer checkout on PYTHONPATH,
# an installed package): the two were written together, so a repository exported by an older fos keeps working.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fos_runtime.triton.pythonpath import honour_pythonpath

honour_pythonpath()

import numpy as np
import triton_python_backend_utils as pb_utils

from fos_runtime import batching, encoder, padding, spec


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output_name = config["output"][0]["name"]
        self.spec = spec.ModelSpec.from_json(config["parameters"][spec.SPEC_PARAMETER]["string_value"])
        device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # Triton starts a KIND_GPU instance on each GPU it names: each instance runs on its own.
        gpu = int(args.get("model_instance_device_id") or 0) if device == "gpu" else 0
        threads = encoder.threads_per_instance(config.get("instance_group", [])) if device == "cpu" else None
        self.encoder = encoder.Encoder(
            path, threads=threads, device=device, engine=self.spec.engine, precision=self.spec.precision, gpu=gpu
        )
        pb_utils.Logger.log_info(
            f"fos encoder {self.spec.served_name}: {self.encoder.engine} on the {self.encoder.device} ({self.encoder.reason})"
            + (f", {threads} threads" if threads else "")
        )
        self.plan = batching.plan_for(self.encoder.device, self.encoder.run_threads)
        started = time.perf_counter()
        shapes = batching.warm_up(self.encoder, self.plan, self.spec.pad_token_id, self.spec.encoder_inputs, self.spec.max_length)
        if shapes:
            pb_utils.Logger.log_info(f"fos encoder: warmed up {shapes} shapes in {time.perf_counter() - started:.1f}s")
        self.stats = batching.Stats()
        # FOS_ENCODER_TIMING=N: every N executions, where their time went (Triton's log), to tell the
        # encoder's own time from what surrounds it.
        self.report_every = int(os.environ.get("FOS_ENCODER_TIMING", "0") or 0)
        self.executions = 0
        self.seconds = 0.0

    def execute(self, requests):
        started = time.perf_counter()
        responses = self._execute(requests)
        self.executions += 1
        self.seconds += time.perf_counter() - started
        if self.report_every and self.executions % self.report_every == 0:
            s = self.stats
            pb_utils.Logger.log_info(
                f"fos encoder: {self.executions} executions, {s.rows / self.executions:.1f} rows and "
                f"{s.runs / self.executions:.2f} runs each; per execution {1000 * self.seconds / self.executions:.2f} ms, "
                f"of which the engine ({self.encoder.engine}) {1000 * s.seconds / self.executions:.2f} ms; padding efficiency "
                f"{s.padding_efficiency:.2f}"
            )
        return responses

    def _execute(self, requests):
        parts, errors = [], {}
        names = self.encoder.input_names
        for n, request in enumerate(requests):
            try:
                tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
                arrays = {name: t.as_numpy() if t is not None else None for name, t in tensors.items()}
                parts.append(padding.check_padded(arrays, names, self.spec.max_length, self.spec.vocab_size))
            except Exception as exc:
                errors[n] = f"encoder: bad request: {exc}"
                parts.append({name: np.zeros((0, 0), dtype=np.int64) for name in names})
        try:
            s = self.spec
            outputs = batching.run_padded(self.encoder, parts, s.pad_token_id, self.plan, self.stats, s.max_length)
        except Exception as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"encoder: {exc}")) for _ in requests]
        responses = []
        for n, out in enumerate(outputs):
            if n in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[n])))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)]))
        return responses
