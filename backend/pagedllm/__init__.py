"""pagedllm: serve Llama-family LLMs from Triton Inference Server with a paged-KV engine.

`from pagedllm import LLM, SamplingParams` is the offline API; the Triton model lives in `pagedllm.serving`.
"""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name):  # lazy: importing pagedllm (e.g. for the CLI) must not pull in torch and transformers
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
