"""Building an engine for a test and running it to the end: the one copy of both.

On CPU by default; bench/gpu_check.sh runs the engine tests with PAGEDLLM_TEST_DEVICE=cuda (fp32, Triton kernels).
"""
from __future__ import annotations

import os
from typing import Callable

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.request import StepOutput

DEVICE = os.environ.get("PAGEDLLM_TEST_DEVICE", "cpu")
BLOCK = 16


def make_engine(model_dir, **overrides) -> LLMEngine:
    """A test-sized engine: 64 blocks of 16 tokens, fp32 (transformers' reference dtype), on DEVICE."""
    settings = {"block_size": BLOCK, "num_kv_blocks": 64, "device": DEVICE, "dtype": "float32", **overrides}
    return LLMEngine(EngineConfig(model_dir=str(model_dir), **settings))


def run_to_completion(engine: LLMEngine, after_step: Callable[[], None] = lambda: None
                      ) -> dict[str, list[StepOutput]]:
    """Step until every request finished; each request's outputs in order. Every KV block must be back."""
    outputs: dict[str, list[StepOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        after_step()
    assert engine.num_free_blocks == engine.block_manager.num_blocks, "KV blocks leaked"
    return outputs


def token_ids(outputs: list[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]
