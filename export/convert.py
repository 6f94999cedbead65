"""Step 2 of export: the model (pooling, Normalize, score activation included) to one ONNX graph,
then the precision the user asked for."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fos_runtime import spec

from .load import Source

PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 17
# Architectures whose attention onnxruntime.transformers knows how to fuse.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "distilbert"}


class Graph(torch.nn.Module):
    """Runs the sentence-transformers modules on padded tensors and returns one float32 tensor."""

    def __init__(self, source: Source):
        super().__init__()
        self.model = source.model
        self.input_names = source.encoder_inputs
        self.output_key = source.output_key
        self.activation = source.activation

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        features = dict(zip(self.input_names, tensors, strict=True))
        out = self.model(features)[self.output_key]
        if self.activation is not None:
            out = self.activation(out)
        return out.float()


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module):
    """Trace attention as plain MatMul/Softmax, the pattern onnxruntime's fusion recognises.

    transformers 5 defaults to SDPA, which traces into a NaN-guarded softmax (IsNaN/Where) that the
    fusion does not match, leaving every layer's attention unfused. Eager and SDPA compute the same
    function; the model is put back as it was afterwards."""
    from transformers import PreTrainedModel

    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    before = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m, impl in zip(models, before, strict=True):
            m.set_attn_implementation(impl)


def to_onnx(source: Source, path: Path, precision: str = "fp32", device: str = "cpu") -> dict[str, int] | None:
    """The graph as traced; for ModernBERT on the CPU with onnxruntime's attention operators, which it returns by type
    (else None: BERT-like models are fused afterwards by ``optimize``)."""
    from fos_runtime.padding import pad
    from fos_runtime.tokenization import Encoded

    from . import modernbert

    # Two rows of different length, so the traced graph is the padded, masked one.
    sample = Encoded(input_ids=[[2, 10, 11, 12, 3], [2, 10, 3]], token_type_ids=[[0, 0, 0, 1, 1], [0, 1, 1]])
    arrays = pad(sample, pad_token_id=source.tokenizer.pad_token_id or 0, inputs=source.encoder_inputs)
    args = tuple(torch.from_numpy(arrays[name]) for name in source.encoder_inputs)
    out = spec.output_tensor(source.task)
    axes = {name: {0: "batch", 1: "sequence"} for name in source.encoder_inputs}
    axes[out] = {0: "batch"}
    fused_attention = modernbert.applies(source.hf_config, precision, device)
    with warnings.catch_warnings(), torch.inference_mode(), contextlib.ExitStack() as tracing:
        if getattr(source.hf_config, "model_type", "") in _BERT_LIKE:
            tracing.enter_context(_eager_attention(source.model))
        if fused_attention:
            tracing.enter_context(modernbert.traced_with_fused_attention(source.hf_config))
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            Graph(source).eval(),
            args,
            str(path),
            input_names=list(source.encoder_inputs),
            output_names=[out],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return modernbert.finish(path) if fused_attention else None


def optimize(source: Source, src: Path, dst: Path) -> dict[str, int] | None:
    """Fuse attention, LayerNorm and GELU for BERT-like models; returns the fused operators by type,
    or None where the architecture is not one onnxruntime knows.

    The residual Add stays apart from the LayerNormalization after it (no SkipLayerNormalization): onnxruntime's CPU
    kernel for that op ran 5x slower than the two ops (1.32; fos_runtime.encoder.CPU_DISABLED_OPTIMIZERS), and a GPU
    session fuses them again when it loads (its kernel is fast)."""
    model_type = getattr(source.hf_config, "model_type", "")
    if model_type not in _BERT_LIKE:
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False

    # Its fusions log every step at INFO; the export prints its own progress.
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = optimize_model(
                str(src),
                model_type="bert",
                num_heads=int(source.hf_config.num_attention_heads),
                hidden_size=int(source.hf_config.hidden_size),
                opt_level=0,  # Python fusions only; the session applies its own graph optimisations
                optimization_options=options,
            )
        model.save_model_to_file(str(dst))
    finally:
        logging.disable(logging.NOTSET)
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def unfused_attention(fused: dict[str, int] | None) -> str | None:
    """What to tell the user when a BERT-like graph came out without fused attention, else None.

    The graph is still right, so export goes on; but onnxruntime then runs each layer's attention as separate
    operators, which costs time on every request, and nothing else would show it. onnxruntime 1.30's fusion does
    not match transformers 5's eager attention mask; 1.31 does."""
    if fused is None or fused.get("Attention"):
        return None
    import onnxruntime
    import transformers

    return (
        f"warning: attention was not fused (onnxruntime {onnxruntime.__version__}, transformers "
        f"{transformers.__version__}): the encoder runs slower on onnxruntime. onnxruntime 1.31 or later fuses "
        "transformers 5's attention; install it (the project's uv.lock does) and export again."
    )


def to_precision(src: Path, dst: Path, precision: str) -> None:
    if precision == "fp16":
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx.load(str(src)))
        # Inputs and outputs stay int64 / float32: clients and the shim never see half floats.
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst))
    elif precision == "int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Fused ops (com.microsoft) defeat ONNX shape inference; their tensors are float32.
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    else:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")


def to_openvino_int8(src: Path, dst: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """OpenVINO's own int8 of the fp32 graph ``src``: NNCF's static quantization (weights and activations), its
    activation ranges taken from ``batches`` (padded encoder inputs), saved as OpenVINO IR ``dst`` (.xml, and .bin
    beside it; float weights NNCF leaves are stored in fp16, OpenVINO's default). On AMD Zen 4 (ruri-large's shape) it
    ran 1.86-1.96x OpenVINO bf16 on uniform shapes and 1.33-1.66x at the server's (docs/benchmarks.md)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches),
        model_type=nncf.ModelType.TRANSFORMER,  # keeps softmax, layer norms and the like in float
        preset=nncf.QuantizationPreset.MIXED,  # activations asymmetric: GELU's outputs are mostly positive
        subset_size=len(batches),
    )
    ov.save_model(quantized, str(dst))
