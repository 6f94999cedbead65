"""Triton Python model: text (and, for rerank, text pairs) -> padded token tensors + token counts."""

import json
import sys
from pathlib import Path

# The fos_runtime that export copied beside this file, whatever else is on the path (a newer checkout on PYTHONPATH,
# an installed package): the two were written together, so a repository exported by an older fos keeps working.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fos_runtime.triton.pythonpath import honour_pythonpath

honour_pythonpath()

import numpy as np
import triton_python_backend_utils as pb_utils

from fos_runtime import batching, padding, spec, tokenization


def _strings(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.spec = spec.ModelSpec.from_json(config["parameters"][spec.SPEC_PARAMETER]["string_value"])
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = tokenization.Tokenizer(folder, self.spec.max_length)
        # Lengths rounded up to buckets for a GPU encoder (padding.py), whose engine pays for each new shape.
        self.length_limit = batching.plan_for(self.spec.device).bucket_limit(self.spec.max_length)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = _strings(request, spec.TEXT)
                pairs = _strings(request, spec.TEXT_PAIR) if self.spec.task == "rerank" else None
                detect = pb_utils.get_input_tensor_by_name(request, spec.DETECT_TRUNCATION)
                cap = pb_utils.get_input_tensor_by_name(request, spec.MAX_DOC_TOKENS) if pairs is not None else None
                encoded = self.tokenizer.encode(
                    texts,
                    pairs,
                    detect_truncation=detect is not None and bool(detect.as_numpy().any()),
                    max_pair_tokens=int(cap.as_numpy().reshape(-1)[0]) if cap is not None else None,
                )
                arrays = padding.pad(encoded, self.spec.pad_token_id, self.spec.encoder_inputs, length_limit=self.length_limit)
                counts = np.asarray(encoded.lengths, dtype=np.int64).reshape(-1, 1)
                outputs = [pb_utils.Tensor(name, value) for name, value in arrays.items()]
                outputs.append(pb_utils.Tensor(spec.NUM_TOKENS, counts))
                outputs.append(pb_utils.Tensor(spec.TRUNCATED, np.asarray(encoded.cut, dtype=np.bool_).reshape(-1, 1)))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}")))
        return responses
