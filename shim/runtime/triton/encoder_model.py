"""Triton Python model that runs the exported ONNX encoder with onnxruntime.

For tritonservers without the ONNX Runtime backend (the one in the ``nvidia-pytriton`` wheel). The
container uses the ONNX Runtime backend on the same ``model.onnx`` instead.
"""

import json
from pathlib import Path

from shim.runtime.triton.pythonpath import honour_pythonpath

honour_pythonpath()

import triton_python_backend_utils as pb_utils  # noqa: E402

from shim.runtime import encoder, spec  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output_name = config["output"][0]["name"]
        device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.encoder = encoder.Encoder(path, device=device)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in self.encoder.input_names
                }
                result = self.encoder.run(feeds)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, result)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"encoder: {exc}")))
        return responses
