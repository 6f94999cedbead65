"""What export, Triton's Python models and the shim's embedded backend share: model metadata
(``spec``), tokenization, padding, length batching and the encoder engines.

Export copies this package verbatim beside every Triton ``model.py``, so it imports only numpy,
transformers and the engines (onnxruntime): never FastAPI, never Triton's client, never ``shim``.
"""
