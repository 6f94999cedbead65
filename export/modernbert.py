"""ModernBERT (ruri v3) traced with onnxruntime's own attention operators.

Traced as transformers writes it, each layer's attention is some forty small operators (rotary embedding by slices and
concatenations, scores materialised and masked, a NaN guard) and onnxruntime's fusions know none of it. At 4,096 tokens
that graph took 44.9 s and 6.1 GB on a 2-core Xeon, and OpenVINO 30.6 s and 10.5 GB; with ``RotaryEmbedding`` and
``MultiHeadAttention`` (com.microsoft; OpenVINO reads both) 23.1 s and 3.1 GB, and OpenVINO 18.0 s and 3.3 GB
(docs/benchmarks.md). The model's own masks (padding, and the 128-token window of its local layers) go in as the
attention's additive bias, so what is computed is unchanged; export's parity check holds it to sentence-transformers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

# The traced stand-in for MultiHeadAttention: onnxruntime's takes its bias as the sixth input, after two optional ones
# the exporter cannot leave empty, so it is renamed and rewired after the export (``finish``).
_PLACEHOLDER = ("fos", "MultiHeadAttention")


def applies(hf_config: Any, precision: str, device: str) -> bool:
    """ModernBERT with the default rotary embedding, exported for the CPU in fp32 or int8: the operators' CPU kernels
    are the ones export's parity check runs. fp16 and GPU exports keep the graph as transformers traces it."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    layer_types = set(getattr(hf_config, "layer_types", None) or ())
    return (
        getattr(hf_config, "model_type", "") == "modernbert"
        and precision in ("fp32", "int8")
        and device == "cpu"
        and bool(layer_types)
        and set(rope) >= layer_types
        and all(rope[kind].get("rope_type", "default") == "default" for kind in layer_types)
    )


class _Rotary(torch.autograd.Function):
    """Rotary embedding of (batch, sequence, hidden) by position, as transformers' ``apply_rotary_pos_emb`` (halves
    rotated, not interleaved); traced as onnxruntime's ``RotaryEmbedding``."""

    @staticmethod
    def forward(ctx, x, positions, cos, sin, heads: int):
        from transformers.models.modernbert.modeling_modernbert import rotate_half

        b, s, d = x.shape
        h = x.view(b, s, heads, d // heads).transpose(1, 2)
        c = torch.cat((cos, cos), -1)[positions].unsqueeze(1)
        si = torch.cat((sin, sin), -1)[positions].unsqueeze(1)
        return (h * c + rotate_half(h) * si).transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, x, positions, cos, sin, heads: int):
        return g.op("com.microsoft::RotaryEmbedding", x, positions, cos, sin, num_heads_i=heads, interleaved_i=0).setType(
            x.type()
        )


class _Attention(torch.autograd.Function):
    """Scaled dot-product attention of (batch, sequence, hidden) queries, keys and values with an additive bias of
    (batch, 1, sequence, sequence); traced as the placeholder that becomes onnxruntime's ``MultiHeadAttention``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, heads: int):
        b, s, d = q.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, heads, d // heads).transpose(1, 2)

        scores = torch.matmul(split(q), split(k).transpose(2, 3)) * (d // heads) ** -0.5 + bias
        return torch.matmul(torch.softmax(scores, -1), split(v)).transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, q, k, v, bias, heads: int):
        return g.op(f"{_PLACEHOLDER[0]}::{_PLACEHOLDER[1]}", q, k, v, bias, num_heads_i=heads).setType(q.type())


def _rotary_tables(hf_config: Any, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (positions, head size / 2), as RotaryEmbedding takes them."""
    d = hf_config.hidden_size // hf_config.num_attention_heads
    inverse = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    angles = torch.outer(torch.arange(hf_config.max_position_embeddings).float(), inverse)
    return angles.cos(), angles.sin()


@contextlib.contextmanager
def traced_with_fused_attention(hf_config: Any):
    """While tracing: every ModernBERT layer's attention as RotaryEmbedding and MultiHeadAttention, and the split of its
    fused projections by fixed sizes (``chunk`` traces into shape arithmetic). The model must build additive masks (eager
    attention: export.convert sets it). The classes are put back as they were afterwards."""
    from transformers.models.modernbert import modeling_modernbert as mb

    tables = {kind: _rotary_tables(hf_config, p["rope_theta"]) for kind, p in hf_config.rope_parameters.items()}
    heads = int(hf_config.num_attention_heads)

    def attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            raise RuntimeError("ModernBERT traced without its attention mask: export traces padded inputs")
        b, s, _ = hidden_states.shape
        q, k, v = self.Wqkv(hidden_states).split(self.config.hidden_size, dim=-1)
        cos, sin = tables[self.config.layer_types[self.layer_idx]]
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        q, k = (_Rotary.apply(t, positions, cos, sin, heads) for t in (q, k))
        return self.Wo(_Attention.apply(q, k, v, attention_mask, heads)), None

    def mlp(self, hidden_states):
        x, gate = self.Wi(hidden_states).split(self.config.intermediate_size, dim=-1)
        return self.Wo(self.act(x) * gate)

    originals = (mb.ModernBertAttention.forward, mb.ModernBertMLP.forward)
    mb.ModernBertAttention.forward, mb.ModernBertMLP.forward = attention, mlp  # type: ignore[method-assign]
    try:
        yield
    finally:
        mb.ModernBertAttention.forward, mb.ModernBertMLP.forward = originals  # type: ignore[method-assign]


def finish(path: Path) -> dict[str, int]:
    """The traced placeholder as com.microsoft MultiHeadAttention (the bias its sixth input); returns the fused
    operators by type."""
    import onnx

    model = onnx.load(str(path))
    counts = {"MultiHeadAttention": 0, "RotaryEmbedding": 0}
    for node in model.graph.node:
        if (node.domain, node.op_type) == _PLACEHOLDER:
            q, k, v, bias = node.input
            node.domain, node.op_type = "com.microsoft", "MultiHeadAttention"
            del node.input[:]
            node.input.extend([q, k, v, "", "", bias])
        if node.op_type in counts:
            counts[node.op_type] += 1
    kept = [o for o in model.opset_import if o.domain not in (_PLACEHOLDER[0], "com.microsoft")]
    del model.opset_import[:]
    model.opset_import.extend([*kept, onnx.helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return counts
