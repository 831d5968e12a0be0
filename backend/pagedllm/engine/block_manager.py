"""The KV cache's fixed-size blocks: which are free, which belong to each sequence, and (prefix caching) which
already hold the K/V of a known prefix, so that a request sharing it (a system prompt, an earlier chat turn, the
same soft prompt) skips computing it.

Only full blocks are shared. A full block's key chains its content onto the key of the block before it, so the
key names the whole prefix up to the block's end, which is what its K/V depend on. Shared blocks are counted
(ref counts) and only ever read: a sequence writes K/V at positions >= num_computed_tokens, and the blocks it
reuses all lie before that. A block whose count falls to 0 returns to the free list but keeps its key until it
is allocated again: until then a later request may still reuse it.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks held by no sequence, the next to allocate first: never-cached ones, then cached ones least
        # recently freed first (an OrderedDict, because a cache hit takes a block out of the middle).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref = [0] * num_blocks  # sequences holding each block
        self._cached: dict[bytes, int] = {}  # key of a full block -> the block holding its K/V
        self._key: list[bytes | None] = [None] * num_blocks  # the reverse map: each block's key, if cached
        self.num_cached_tokens_hit = 0  # prompt tokens whose K/V were reused rather than computed

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached or not: all of them can be allocated."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq lacks to hold its first num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding seq's leading full blocks, for a sequence not yet started. Never the block
        of its last token: that token must be computed to get the logits of the next. Only looks: pass the
        result to can_grow and grow, which take the blocks."""
        if not self.enable_prefix_caching:
            return []
        matched = []
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(key)
            if block is None:
                break
            assert self._key[block] == key  # the two maps agree: the block still holds this prefix
            matched.append(block)
        return matched

    def can_grow(self, seq: Sequence, num_tokens: int, prefix: list[int] | tuple = ()) -> bool:
        """Can seq hold num_tokens tokens, its first blocks being `prefix` (from match_prefix) when it has none?
        Reused blocks need no allocation, but those that were free leave the free list."""
        needed = self.extra_blocks_needed(seq, num_tokens) - len(prefix)
        return needed <= len(self._free) - sum(self._ref[b] == 0 for b in prefix)

    def grow(self, seq: Sequence, num_tokens: int, prefix: list[int] | tuple = ()) -> None:
        """Give seq enough blocks for num_tokens tokens, the reused `prefix` first (their tokens count as
        computed). The caller checked can_grow."""
        for block in prefix:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens += len(prefix) * self.block_size
        seq.num_cached_blocks += len(prefix)  # reused blocks are cached already
        self.num_cached_tokens_hit += len(prefix) * self.block_size
        for _ in range(self.extra_blocks_needed(seq, num_tokens)):
            block, _ = self._free.popitem(last=False)
            key = self._key[block]
            if key is not None:  # evict: its K/V are about to be overwritten
                del self._cached[key]
                self._key[block] = None
            self._ref[block] = 1
            seq.block_table.append(block)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that seq's last step filled, so that later requests can reuse them. Called after
        each step; it looks only at the blocks filled since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        keys = self._hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            block = seq.block_table[i]
            # Another sequence may have computed the same block in the same step: the first one keeps the key.
            if keys[i] not in self._cached:
                self._cached[keys[i]] = block
                self._key[block] = keys[i]
        seq.num_cached_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted before the head's.
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None
                if self._key[block] is None:  # holds nothing reusable: allocate it before any cached block
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of seq's first num_blocks blocks (all full), computed once per sequence and kept on it.

        A key is BLAKE2b-256 of (the previous block's key, the block's content): a collision, which would hand
        one request another's K/V, is out of reach (unlike Python's 64-bit hash(), where hash(-1) == hash(-2)
        and crafted prompts could collide). Content is the token ids, except at positions that came from
        prompt_embeds: there, a digest of the embedding rows (tagged, so neither can pose as the other)."""
        bs, keys = self.block_size, seq.block_hashes
        if seq.prompt_embeds is not None and seq.embeds_digests is None and len(keys) < num_blocks:
            seq.embeds_digests = embeds_digests(seq.prompt_embeds, bs)
        while len(keys) < num_blocks:
            i = len(keys)
            h = hashlib.blake2b(keys[-1] if keys else b"", digest_size=32)
            first_token = i * bs  # the block's first position that holds a token id rather than an embedding
            if seq.embeds_digests is not None and i < len(seq.embeds_digests):
                h.update(b"E" + seq.embeds_digests[i])
                first_token = min((i + 1) * bs, seq.num_prompt_tokens)
            h.update(b"T" + array("q", seq.token_ids[first_token:(i + 1) * bs]).tobytes())
            keys.append(h.digest())
        return keys


def embeds_digests(embeds: torch.Tensor, block_size: int) -> list[bytes]:
    """A digest of each block's rows of a prompt_embeds tensor (dtype included), from one host copy of the whole
    tensor: one device sync per sequence, not one per block or step. Sequence.embeds_digests may be set ahead,
    from the host tensor converted to the model's dtype, so that the engine thread need not copy it back."""
    rows = embeds.detach().cpu().contiguous()
    tag = str(rows.dtype).encode()
    rows = rows.view(torch.uint8).numpy().reshape(rows.shape[0], -1)  # raw bytes: numpy has no bfloat16
    digests = []
    for start in range(0, len(rows), block_size):
        h = hashlib.blake2b(tag, digest_size=32)
        h.update(rows[start:start + block_size])  # contiguous rows: hashed in place, not copied
        digests.append(h.digest())
    return digests
