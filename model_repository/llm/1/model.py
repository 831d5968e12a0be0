"""Triton loads this file; the model itself lives in the pagedllm package (backend/pagedllm/serving)."""
from pagedllm.serving.triton_model import TritonPythonModel  # noqa: F401
