"""The engine: load a checkpoint, accept requests, and step the batch until every request finishes.

`make_request` validates a request and can run on any thread (it reads only what never changes);
`add`, `abort` and `step` belong to the single thread that drives the engine.
"""
from __future__ import annotations

import logging
import random

import torch

import torch.distributed as dist

from ..config import EngineConfig
from ..errors import InvalidRequest
from ..model.spec import load_model_spec
from ..model.weights import Shard
from ..sampling_params import SamplingParams
from ..tokenizer import load_tokenizer, max_token_chars, text_token_ids
from .block_manager import BlockManager, embeds_digests
from .model_runner import Distributed
from .parallel import Workers
from .rank import build_rank, resolve_device
from .request import Request, StepOutput
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("pagedllm")

# On CPU a step's time grows with its tokens: this bound keeps the running streams' inter-token gap within
# about 3x of a decode-only step while long prompts prefill (bench/fairness.py, bench/RESULTS.md).
CPU_PREFILL_TOKENS_WHILE_DECODING = 32  # 48 measured 2.7-2.9x, 64 1.8-3.7x: 32 (2.0-2.2x) leaves a margin


def _check_config(config: EngineConfig) -> None:
    """Settings under which the scheduler could never run a request (the server would load, then hang)."""
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("num_kv_blocks", "max_model_len"):  # 0: derived
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: derive it), got {getattr(config, name)}")
    if not 0 < config.kv_cache_memory_fraction <= 1:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {config.kv_cache_memory_fraction}")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        _check_config(config)
        self.config = config
        self.spec = load_model_spec(config.model_dir)
        self.tokenizer = load_tokenizer(config.model_dir)
        # Tensor parallelism: the workers start first, so that they load their shards while rank 0 loads its own.
        self.workers = None
        distributed = None
        if config.tensor_parallel_size > 1:
            Shard(0, config.tensor_parallel_size).check(self.spec)
            self.workers = Workers(config, resolve_device(config.device))
            self.workers.join()
            distributed = Distributed(self.workers.broadcast)
        rank = build_rank(config, self.spec, 0, distributed)
        self.device, self.dtype, self.ops, self.model = rank.device, rank.dtype, rank.ops, rank.model
        self.runner, self.max_model_len = rank.runner, rank.max_model_len
        self.block_manager = BlockManager(rank.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self._prefill_bound(config.max_prefill_tokens_while_decoding))
        self.eos_token_ids = frozenset(self.spec.eos_token_ids)
        # The longest text that could still fit in max_model_len tokens: longer ones are refused untokenized.
        self.max_prompt_chars = None if self.tokenizer is None else \
            self.max_model_len * max_token_chars(self.tokenizer)
        self._requests: dict[str, Request] = {}  # added and not finished
        log.info("pagedllm engine: %s on %s/%s, kernels=%s, tensor_parallel_size=%d, max_model_len=%d, "
                 "cuda_graphs=%s", self.spec.model_type, self.device, self.dtype, self.ops.name,
                 config.tensor_parallel_size, self.max_model_len, config.cuda_graphs)
        if self.device.type == "cuda":
            self.warmup()

    def worker_failure(self) -> str | None:
        """Which tensor-parallel rank died, if one did (the engine cannot serve without it)."""
        return None if self.workers is None else self.workers.failure()

    def close(self, graceful: bool = True) -> None:
        """Stop the tensor-parallel workers (nothing to do with one rank): told to stop, or killed when not
        graceful (a step may still be running on another thread, inside its collectives)."""
        if self.workers is not None:
            send_stop = lambda: dist.broadcast(self.runner.stop_message(), src=0)  # noqa: E731
            self.workers.stop(send_stop if graceful else None)

    def warmup(self) -> None:
        """Run one short request through prefill and decode, so that the Triton kernels are compiled (about a
        second each) before the first real request rather than during it."""
        n = min(2 * self.config.block_size + 1, self.max_model_len - 2)
        request = self.make_request("__warmup__", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                    prompt_token_ids=[0] * n)
        # Without prefix caching for its duration: its blocks of zeros must not sit in the cache afterwards.
        caching, self.block_manager.enable_prefix_caching = self.block_manager.enable_prefix_caching, False
        try:
            self.add(request)
            while self.has_unfinished():
                self.step()
        finally:
            self.block_manager.enable_prefix_caching = caching

    def _prefill_bound(self, setting: int) -> int:
        if setting >= 0:
            return setting
        return 0 if self.device.type == "cuda" else CPU_PREFILL_TOKENS_WHILE_DECODING

    # ---- requests (any thread) ------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text_input: this checkpoint has no tokenizer; send input_ids or prompt_embeds")
        return text_token_ids(self.tokenizer, text)

    def make_request(self, request_id: str, params: SamplingParams, prompt_token_ids=None,
                     prompt_embeds: torch.Tensor | None = None, prompt_name: str = "",
                     prompt_text: str | None = None) -> Request:
        """Validate one request and build it. Raises InvalidRequest naming the bad input (`prompt_name` names
        the input the prompt came in, when it was not input_ids or prompt_embeds; `prompt_text` is the text
        a text prompt was tokenized from)."""
        if (prompt_token_ids is None) == (prompt_embeds is None):
            raise InvalidRequest("prompt: send exactly one of input_ids, prompt_embeds, text_input")
        if prompt_embeds is not None:
            name = prompt_name or "prompt_embeds"
            n = self._check_embeds(prompt_embeds, name)
            # Cast where it arrived (the host, for server requests) and take the prefix-cache digests there,
            # so the engine thread never copies embeddings back from the GPU.
            narrower = torch.finfo(self.dtype).max < torch.finfo(prompt_embeds.dtype).max
            prompt_embeds = prompt_embeds.to(dtype=self.dtype)
            if narrower and not bool(torch.isfinite(prompt_embeds).all()):  # finite before, inf once cast
                raise InvalidRequest(f"{name}: values outside the range of the model's dtype ({self.dtype})")
            digests = embeds_digests(prompt_embeds, self.config.block_size) \
                if self.config.enable_prefix_caching else None
            prompt_embeds = prompt_embeds.to(device=self.device)
            token_ids = [0] * n
        else:
            name, token_ids = prompt_name or "input_ids", [int(t) for t in prompt_token_ids]
            n = len(token_ids)
            if n == 0:
                raise InvalidRequest(f"{name}: the prompt is empty")
            bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise InvalidRequest(f"{name}: token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.spec.vocab_size})")
        if n >= self.max_model_len:
            raise InvalidRequest(f"{name}: the prompt has {n} tokens but the model length is "
                                 f"{self.max_model_len} (prompt plus at least one generated token)")
        try:
            params.validate(self.spec.vocab_size, self.max_model_len)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop: stop strings need the checkpoint's tokenizer (use stop_token_ids)")
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        seq = Sequence(request_id, token_ids, n, params, seed, prompt_embeds)
        if params.min_tokens:
            eos = frozenset() if params.ignore_eos else self.eos_token_ids
            seq.stop_ids_before_min_tokens = sorted(eos | set(params.stop_token_ids))
        if prompt_embeds is not None:
            seq.embeds_digests = digests
        return Request(seq, self.tokenizer, self.eos_token_ids, self.max_model_len, prompt_text)

    def _check_embeds(self, t: torch.Tensor, name: str) -> int:
        if not isinstance(t, torch.Tensor):
            raise InvalidRequest(f"{name}: expected a tensor")
        hidden = self.spec.hidden_size
        if t.dim() != 2 or t.shape[1] != hidden:
            raise InvalidRequest(f"{name}: expected shape [seq_len, {hidden}] but got {list(t.shape)}")
        if t.shape[0] == 0:
            raise InvalidRequest(f"{name}: the prompt is empty (seq_len 0)")
        if not t.is_floating_point():
            raise InvalidRequest(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise InvalidRequest(f"{name}: contains NaN or Inf")
        return t.shape[0]

    # ---- the engine thread ----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise InvalidRequest(f"request_id: {request.request_id!r} is already running")
        self._requests[request.request_id] = request
        self.scheduler.add(request.seq)

    def abort(self, request_id: str) -> StepOutput | None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        out = request.on_abort()
        self.scheduler.finish(request.seq, "abort")
        return out

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        tokens, logprobs = self.runner.run(batch)
        outputs = []
        for (seq, token), logprob in zip(self.scheduler.update_from_output(batch, tokens), logprobs):
            request = self._requests[seq.request_id]
            out = request.on_token(token, logprob)
            if out.finished:
                self.scheduler.finish(seq, request.finish_reason)
                del self._requests[seq.request_id]
            outputs.append(out)
        return outputs
