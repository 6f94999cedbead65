"""ModernBERT (ruri v3) traced with onnxruntime's own attention operators.

Traced as transformers writes it, each layer's attention is some forty small operators (rotary embedding by slices and
concatenations, scores materialised and masked, a NaN guard) and onnxruntime's fusions know none of it. At 4,096 tokens
that graph took 44.9 s and 6.1 GB on a 2-core Xeon, and OpenVINO 30.6 s and 10.5 GB; with ``RotaryEmbedding`` and
``MultiHeadAttention`` (com.microsoft; OpenVINO reads both) 23.1 s and 3.1 GB, and OpenVINO 18.0 s and 3.3 GB
(docs/benchmarks.md). The model's masks go in so that what is computed is unchanged (export's parity check holds it
to sentence-transformers): in the global layers padding rides in one more component of each head's queries and keys, so
that their attention takes no mask and onnxruntime runs its flash attention on the CPU; the local layers take a key
padding mask and their window (64 tokens either side) as a bias of (1, 1, sequence, sequence). No bias of a batch's
shape: onnxruntime 1.20.1, the ONNX Runtime backend's in the NGC tritonserver 25.02 container, computed every row after
a batch's first wrong with one of (batch, 1, sequence, sequence) (embeddings of cosine 0.31-0.90 against 1.32's), and
1.19 refuses it. Now 1.20.1 and 1.32 agree; 1.19 refuses the window, an error rather than a wrong answer
(docs/benchmarks.md; tests/test_container_onnxruntime.py).
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
        and layer_types <= {"full_attention", "sliding_attention"}
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
    """Scaled dot-product attention of (batch, sequence, heads * size) values; traced as the placeholder that becomes
    onnxruntime's ``MultiHeadAttention``. A global layer's queries and keys carry its padding in one more component a
    head (``_with_padding``; ``scale`` is the real head size's), and ``keys`` and ``window`` are None. A local layer's
    ``keys`` (batch, sequence; 1 real, 0 padding) is the key padding mask and ``window`` (1, 1, sequence, sequence) the
    additive bias."""

    @staticmethod
    def forward(ctx, q, k, v, keys, window, heads: int, scale: float):
        b, s, _ = q.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, heads, -1).transpose(1, 2)

        scores = torch.matmul(split(q), split(k).transpose(2, 3)) * scale
        if keys is not None:
            scores = scores.masked_fill(keys[:, None, None] == 0, torch.finfo(q.dtype).min) + window
        return torch.matmul(torch.softmax(scores, -1), split(v)).transpose(1, 2).reshape(v.shape)

    @staticmethod
    def symbolic(g, q, k, v, keys, window, heads: int, scale: float):
        inputs = (q, k, v) if keys is None else (q, k, v, keys, window)
        return g.op(f"{_PLACEHOLDER[0]}::{_PLACEHOLDER[1]}", *inputs, num_heads_i=heads, scale_f=scale).setType(v.type())


def _with_padding(t: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """(batch, sequence, heads * size) with ``column`` (batch, sequence, heads, 1) appended to every head: (batch,
    sequence, heads * (size + 1))."""
    b, s, heads, _ = column.shape
    return torch.cat((t.view(b, s, heads, -1), column), -1).view(b, s, -1)


def _rotary_tables(hf_config: Any, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (positions, head size / 2), as RotaryEmbedding takes them."""
    d = hf_config.hidden_size // hf_config.num_attention_heads
    inverse = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    angles = torch.outer(torch.arange(hf_config.max_position_embeddings).float(), inverse)
    return angles.cos(), angles.sin()


@contextlib.contextmanager
def traced_with_fused_attention(hf_config: Any):
    """While tracing: every ModernBERT layer's attention as RotaryEmbedding and MultiHeadAttention, its masks and rotary
    positions built once by the model (the keys that are not padding, and the local layers' window), and the split of
    its fused projections by fixed sizes (``chunk`` traces into shape arithmetic). The classes are put back as they were
    afterwards."""
    from transformers.models.modernbert import modeling_modernbert as mb

    tables = {kind: _rotary_tables(hf_config, p["rope_theta"]) for kind, p in hf_config.rope_parameters.items()}
    heads = int(hf_config.num_attention_heads)

    def model(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            raise RuntimeError("ModernBERT traced without its attention mask: export traces padded inputs")
        b, s = input_ids.shape
        positions = torch.arange(s)
        # Compared as booleans: the distances as a (sequence, sequence) int64 tensor took 0.5 GB at 8,192 tokens.
        far = (positions[None, :] > positions[:, None] + self.config.sliding_window) | (
            positions[None, :] < positions[:, None] - self.config.sliding_window
        )
        window = torch.zeros(()).masked_fill(far, torch.finfo(torch.float32).min)[None, None]
        # The global layers' padding as one more component of each head's queries (1) and keys (0, or -1e4 / scale
        # where padding): a padded key's score falls by 1e4, and their attention takes no mask, which lets onnxruntime
        # run its flash attention (a key padding mask there took 2 GB more at 8,192 tokens; docs/benchmarks.md).
        padding = (1 - attention_mask.float()) * (-1e4 * (self.config.hidden_size // heads) ** 0.5)
        components = (torch.ones(b, s, heads, 1), padding[:, :, None, None].expand(b, s, heads, 1))
        # Given a mapping by layer type, the model hands each layer its entry as it is, and builds no masks of its own.
        # The rotary positions ride along, so that they are built once rather than in every layer.
        rows = positions[None].expand(b, s)
        masks = {
            "full_attention": (rows, *components),
            "sliding_attention": (rows, attention_mask.to(torch.int32), window),
        }
        return model_forward(self, input_ids=input_ids, attention_mask=masks, **kwargs)

    def attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        q, k, v = self.Wqkv(hidden_states).split(self.config.hidden_size, dim=-1)
        kind = self.config.layer_types[self.layer_idx]
        cos, sin = tables[kind]
        positions, *masks = attention_mask
        q, k = (_Rotary.apply(t, positions, cos, sin, heads) for t in (q, k))
        scale = (self.config.hidden_size // heads) ** -0.5
        if kind == "sliding_attention":
            keys, window = masks
        else:
            q, k = (_with_padding(t, c) for t, c in zip((q, k), masks, strict=True))
            keys = window = None
        return self.Wo(_Attention.apply(q, k, v, keys, window, heads, scale)), None

    def mlp(self, hidden_states):
        x, gate = self.Wi(hidden_states).split(self.config.intermediate_size, dim=-1)
        return self.Wo(self.act(x) * gate)

    model_forward = mb.ModernBertModel.forward
    originals = (model_forward, mb.ModernBertAttention.forward, mb.ModernBertMLP.forward)
    mb.ModernBertModel.forward, mb.ModernBertAttention.forward, mb.ModernBertMLP.forward = model, attention, mlp  # type: ignore[method-assign]
    try:
        yield
    finally:
        mb.ModernBertModel.forward, mb.ModernBertAttention.forward, mb.ModernBertMLP.forward = originals  # type: ignore[method-assign]


def finish(path: Path) -> dict[str, int]:
    """The traced placeholder as com.microsoft MultiHeadAttention (a local layer's key padding mask its fifth input, its
    window the sixth); returns the fused operators by type."""
    import onnx

    model = onnx.load(str(path))
    counts = {"MultiHeadAttention": 0, "RotaryEmbedding": 0}
    for node in model.graph.node:
        if (node.domain, node.op_type) == _PLACEHOLDER:
            q, k, v, *masks = node.input  # the local layers': key padding mask and window
            node.domain, node.op_type = "com.microsoft", "MultiHeadAttention"
            del node.input[:]
            node.input.extend([q, k, v, *(["", *masks] if masks else [])])
        if node.op_type in counts:
            counts[node.op_type] += 1
    kept = [o for o in model.opset_import if o.domain not in (_PLACEHOLDER[0], "com.microsoft")]
    del model.opset_import[:]
    model.opset_import.extend([*kept, onnx.helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return counts
