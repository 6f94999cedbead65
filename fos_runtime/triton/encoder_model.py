"""Triton Python model that runs the exported ONNX encoder with onnxruntime.

For tritonservers without the ONNX Runtime backend (the one in the ``nvidia-pytriton`` wheel). The
container uses the ONNX Runtime backend on the same ``model.onnx`` instead.

Its inputs allow ragged batches, so Triton's dynamic batcher hands over requests of different
lengths together; they are regrouped by length and run as few padded batches, exactly as the
embedded backend does.
"""

import json
from pathlib import Path

from fos_runtime.triton.pythonpath import honour_pythonpath

honour_pythonpath()

import triton_python_backend_utils as pb_utils

from fos_runtime import batching, encoder, padding, spec, tokenization


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output_name = config["output"][0]["name"]
        self.spec = spec.ModelSpec.from_json(config["parameters"][spec.SPEC_PARAMETER]["string_value"])
        device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.encoder = encoder.Encoder(path, device=device)
        self.plan = batching.plan_for(self.encoder.device)

    def execute(self, requests):
        encodeds, errors = [], {}
        for n, request in enumerate(requests):
            try:
                arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.encoder.input_names}
                encodeds.append(padding.unpad(arrays))
            except Exception as exc:
                errors[n] = f"encoder: bad request: {exc}"
                encodeds.append(tokenization.Encoded(input_ids=[]))
        try:
            outputs = batching.run(self.encoder, encodeds, self.spec.pad_token_id, self.spec.encoder_inputs, self.plan)
        except Exception as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"encoder: {exc}")) for _ in requests]
        responses = []
        for n, out in enumerate(outputs):
            if n in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[n])))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)]))
        return responses
