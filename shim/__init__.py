"""fake-openai-server: OpenAI-compatible embeddings and rerank for Japanese models."""

__version__ = "0.1.0"
