"""pagedllm: serve Llama-family LLMs from Triton Inference Server with a paged-KV engine."""
__version__ = "0.1.0"
