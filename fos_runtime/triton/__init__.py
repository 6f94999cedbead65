"""Triton Python-backend models. Export copies each one to ``<model>/1/model.py``; they run only
inside tritonserver, where ``triton_python_backend_utils`` exists."""
