"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, oldest first: a decoding
sequence takes one token, one still in prefill takes the next chunk of its prompt. Waiting sequences join
with what budget is left, so a new request starts its prefill at the next step while others keep decoding.
While any sequence is decoding, prefill chunks together take at most max_prefill_tokens_while_decoding tokens
a step: a step's time is what every decoding stream waits between two tokens, and long prompts arriving must
not stretch it (their prefill proceeds in smaller chunks instead).
When the cache runs out of blocks, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed (prompt plus tokens so far) when room returns.
With prefix caching, a sequence that starts (or restarts) first takes the cached blocks that already hold its
leading full blocks, and its prefill begins after them.

After the forward pass, `update_from_output` applies the step to every scheduled sequence: its new tokens
count as computed, the blocks they filled become reusable, and each sampled token is appended.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens this step feeds, starting at seq.num_computed_tokens
    # Does this step reach the sequence's last token, so that a new token is sampled? Decided when scheduled
    # (not a property): applying the step changes the state it would be computed from.
    samples: bool = field(init=False)

    def __post_init__(self):
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens_while_decoding: int = 0):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding  # 0: no bound
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the queues (finished or aborted) and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _prefill_budget(self) -> int:
        """Prefill tokens this step may take: bounded while some running sequence is decoding."""
        cap = self.max_prefill_tokens_while_decoding
        if cap and any(s.num_tokens - s.num_computed_tokens == 1 for s in self.running):
            return cap
        return self.max_num_batched_tokens

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        prefill_budget = self._prefill_budget()
        scheduled: list[ScheduledSequence] = []
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget) if remaining == 1 else min(remaining, budget, prefill_budget)
            if n == 0:  # a prefill with no prefill budget left this step: it goes on next step
                i += 1
                continue
            while not bm.can_grow(seq, seq.num_computed_tokens + n) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
            if not bm.can_grow(seq, seq.num_computed_tokens + n):
                self._preempt(self.running.pop())  # seq is the newest and still does not fit
                break
            bm.grow(seq, seq.num_computed_tokens + n)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            if remaining > 1:
                prefill_budget -= n
            i += 1

        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]  # not started (new or preempted): it holds no blocks
            prefix = bm.match_prefix(seq)  # cached blocks it can reuse: its prefill starts after them
            start = len(prefix) * bm.block_size
            n = min(seq.num_tokens - start, budget, prefill_budget)
            if not bm.can_grow(seq, start + n, prefix):
                break
            bm.grow(seq, start + n, prefix)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:  # first admission (a preempted one recomputes: not counted)
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = start
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            prefill_budget -= n
        return scheduled

    def update_from_output(self, batch: list[ScheduledSequence], sampled: list[int]) -> list[tuple[Sequence, int]]:
        """Apply a finished forward pass: each sequence's new tokens are now in the cache (and its full blocks
        reusable); the sequences that sampled get their token, in batch order. Returns (sequence, token) for
        those, for the engine to decide whether they stop."""
        tokens = iter(sampled)
        appended = []
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if item.samples:
                token = next(tokens)
                seq.token_ids.append(token)
                appended.append((seq, token))
        return appended

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
