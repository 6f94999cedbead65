"""Code shared by Triton's Python models and the embedded backend.

Export copies this package verbatim next to every Triton ``model.py``, so it may import only numpy,
transformers and onnxruntime: never FastAPI, never Triton's client.
"""
