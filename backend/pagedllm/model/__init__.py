"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) and its checkpoint loading."""
from .checkpoint import ModelSpec, load_model_spec
from .llama import LlamaForCausalLM

__all__ = ["ModelSpec", "load_model_spec", "LlamaForCausalLM"]
