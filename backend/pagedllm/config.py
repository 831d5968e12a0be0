"""Engine configuration: one dataclass shared by the offline API, the Triton model and the launcher.

The Triton model reads these from `config.pbtxt` parameters (all strings there); `pagedllm serve` writes them
from its command-line flags. Zero means "derive it" for `num_kv_blocks` and `max_model_len`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class EngineConfig:
    model_dir: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16  (auto: bf16/fp16 on CUDA, fp32 on CPU)
    kernels: str = "auto"  # auto | triton | torch  (auto: triton on CUDA, torch on CPU)
    block_size: int = 16  # tokens per KV block, a power of two >= 16
    num_kv_blocks: int = 0  # 0: from kv_cache_memory_fraction (CUDA), or rank.CPU_DEFAULT_KV_TOKENS' worth (CPU)
    kv_cache_memory_fraction: float = 0.9  # of the GPU memory left after the weights
    max_num_seqs: int = 64  # sequences decoded together at most
    max_model_len: int = 0  # 0: the checkpoint's max_position_embeddings
    max_num_batched_tokens: int = 2048  # tokens in one forward pass (prefill is chunked to fit)
    # While streams decode, prefill chunks take at most this many tokens a step, so that long prompts arriving
    # do not stretch the gap between their tokens. -1: auto (on CPU, where a step's time grows with every token,
    # engine.CPU_PREFILL_TOKENS_WHILE_DECODING; on CUDA no bound beyond max_num_batched_tokens, as vLLM);
    # 0: no bound.
    max_prefill_tokens_while_decoding: int = -1
    enable_prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix that an earlier request computed
    # Decode steps padded to a ladder of batch sizes over buffers made once, and on CUDA replayed as CUDA graphs
    # captured at start-up (on CPU the same padded path runs eagerly). False: every step eager, unpadded.
    cuda_graphs: bool = True
    tensor_parallel_size: int = 1  # ranks the model is split across (one process each; see parallel.py)

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "EngineConfig":
        """Build from string values (Triton config parameters), ignoring unknown keys and empty strings."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            raw = values.get(f.name)
            if raw is None or raw == "":
                continue
            kwargs[f.name] = _cast(f.default, raw, f.name)
        return cls(**kwargs)

    def to_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def _cast(default, raw: str, name: str):
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError as e:
        raise ValueError(f"engine parameter {name!r}: cannot parse {raw!r}") from e


def instance_device(device: str, instance_kind: str, device_id: str) -> str:
    """The device an instance runs on. A KIND_GPU instance runs on the GPU Triton gave it (instance_group's
    `gpus`: one instance per listed GPU), unless the `device` parameter names one; with tensor parallelism its
    ranks take that GPU and the next ones. KIND_CPU and KIND_MODEL instances keep `device` (auto: a GPU when
    there is one, else the CPU)."""
    if instance_kind == "GPU" and device in ("auto", "cuda"):
        return f"cuda:{int(device_id)}"
    return device
