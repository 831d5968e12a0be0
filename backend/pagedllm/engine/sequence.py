"""A request as the engine tracks it: its tokens, its KV blocks and how far its prefill has got."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    # Prompt tokens; for an embeddings prompt, placeholders (0) whose inputs come from prompt_embeds.
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int  # the request's seed, or a random one drawn at arrival
    prompt_embeds: torch.Tensor | None = None  # [num_prompt_tokens, hidden] on the model's device and dtype
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Prefix caching (block_manager.py): the keys of its full blocks so far (they outlive preemption), the
    # digest of each block's prompt embedding rows, and how many blocks of its table are registered.
    block_hashes: list[bytes] = field(default_factory=list)
    embeds_digests: list[bytes] | None = None
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache when it was first scheduled
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_ids_before_min_tokens: list[int] = field(default_factory=list)  # the sampler bans these until min_tokens
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it first joined the running batch (queue time ends)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
