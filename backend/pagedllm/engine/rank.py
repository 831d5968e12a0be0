"""What every tensor-parallel rank builds, rank 0 (the engine) and the workers alike: its device, its shard of
the model, its KV cache (sized from its own free memory, then agreed on across ranks) and its model runner.
It logs what an operator watches at load: each weight file, the weights' size, the cache and how many
tokens it holds."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngineConfig
from ..kernels import get_ops
from ..model.llama import LlamaForCausalLM
from ..model.spec import ModelSpec, safetensors_files
from ..model.weights import Shard, load_weights
from . import parallel
from .model_runner import Distributed, ModelRunner

log = logging.getLogger("pagedllm")
CPU_DEFAULT_KV_TOKENS = 16384


@dataclass
class RankModel:
    device: torch.device
    dtype: torch.dtype
    ops: object
    model: LlamaForCausalLM
    runner: ModelRunner
    num_blocks: int
    max_model_len: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA GPU is visible")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """auto: float32 on CPU; on CUDA fp16 for fp16 checkpoints (what they were trained and tested in), else
    bf16 (bf16 checkpoints can overflow fp16's range; fp32 ones are cast to half the memory)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if checkpoint_dtype == "float16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def build_rank(config: EngineConfig, spec: ModelSpec, rank: int, distributed: Distributed | None = None
               ) -> RankModel:
    """This rank's model and cache. With tensor parallelism the process group must exist already."""
    world = config.tensor_parallel_size
    device = parallel.rank_device(resolve_device(config.device), rank)
    dtype = resolve_dtype(config.dtype, device, spec.torch_dtype)
    ops = get_ops(config.kernels if config.kernels != "auto" else ("triton" if device.type == "cuda" else "torch"))
    shard = Shard(rank, world)
    max_model_len = spec.model_length(config.max_model_len)
    model, weight_bytes = _load_model(config, spec, device, dtype, ops, shard, max_model_len)
    bs = config.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
    per_block = ModelRunner.kv_bytes_per_block(spec, bs, dtype, model.num_kv_heads)
    num_blocks = config.num_kv_blocks or _default_num_blocks(config, device, per_block)
    if world > 1:
        num_blocks = parallel.agree_on_blocks(num_blocks, device)
    # A sequence must always fit in the cache by itself, or preemption could never make room for it.
    max_model_len = min(max_model_len, num_blocks * bs)
    log.info("pagedllm rank %d/%d on %s: weights %.2f GiB; KV cache %d blocks of %d tokens = %d tokens "
             "(%.2f GiB), %d sequences of the full length %d", rank, world, device, weight_bytes / 2**30,
             num_blocks, bs, num_blocks * bs, num_blocks * per_block / 2**30, num_blocks * bs // max_model_len,
             max_model_len)
    runner = ModelRunner(model, num_blocks, bs, config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                         static_decode=config.cuda_graphs, cuda_graphs=config.cuda_graphs, distributed=distributed,
                         samples=rank == 0)
    return RankModel(device, dtype, ops, model, runner, num_blocks, max_model_len)


def _load_model(config: EngineConfig, spec: ModelSpec, device, dtype, ops, shard: Shard, max_model_len: int):
    files = safetensors_files(Path(config.model_dir))
    start = time.monotonic()
    log.info("pagedllm: loading %s (%d file%s) as %s on %s%s", config.model_dir, len(files),
             "s" if len(files) > 1 else "", dtype, device,
             f", tensor-parallel rank {shard.rank} of {shard.world}" if shard.world > 1 else "")

    def progress(path, tensors):
        log.info("pagedllm: loaded %s (%d tensors so far, %.1f s)", path.name, tensors, time.monotonic() - start)

    weights = load_weights(config.model_dir, spec, dtype, device, shard, on_file=progress)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    model = LlamaForCausalLM(spec, weights, ops, max_positions=max_model_len, shard=shard,
                             all_reduce=parallel.all_reduce if shard.world > 1 else None)
    return model, weight_bytes


def _default_num_blocks(config: EngineConfig, device: torch.device, per_block: int) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * config.kv_cache_memory_fraction) // per_block)
    return CPU_DEFAULT_KV_TOKENS // config.block_size
