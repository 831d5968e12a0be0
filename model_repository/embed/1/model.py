"""Triton loads this file; the model lives in the pagedllm package (backend/pagedllm/serving/embed_model.py)."""
from pagedllm.serving.embed_model import TritonPythonModel  # noqa: F401
