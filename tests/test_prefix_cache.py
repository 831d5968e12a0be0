"""Prefix caching: requests that share a prompt prefix reuse its KV blocks, skip computing it, and still produce
transformers' greedy tokens — for input_ids and prompt_embeds, across preemption and eviction."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine_utils import BLOCK, make_engine, run_to_completion, token_ids
from hf_reference import embeds_fp16, hf_greedy
from pagedllm.engine.engine import LLMEngine
from pagedllm.sampling_params import SamplingParams

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(4, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = tokens(3 * BLOCK, seed=100)  # three full blocks, e.g. a system prompt


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)



def record_chunks(engine: LLMEngine) -> list[tuple[str, int, int]]:
    """Record (request id, first position, tokens) of every chunk the engine runs."""
    chunks, run = [], engine.runner.run

    def spy(batch):
        chunks.extend((i.seq.request_id, i.seq.num_computed_tokens, i.num_new_tokens) for i in batch)
        return run(batch)

    engine.runner.run = spy
    return chunks


def check_blocks(engine: LLMEngine) -> None:
    """Ref counts are the number of running sequences holding each block, the free list is exactly the blocks
    nobody holds, and the cache's two maps agree."""
    bm = engine.block_manager
    held = Counter(b for s in engine.scheduler.running for b in s.block_table)
    assert bm._ref == [held[b] for b in range(bm.num_blocks)]
    assert set(bm._free) == {b for b in range(bm.num_blocks) if not held[b]}
    assert all(bm._key[b] == key for key, b in bm._cached.items())
    assert sum(k is not None for k in bm._key) == len(bm._cached)


def add(engine: LLMEngine, rid: str, params: SamplingParams = GREEDY, **prompt) -> None:
    engine.add(engine.make_request(rid, params, **prompt))


def finish_all(engine: LLMEngine, got: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    got = {} if got is None else got
    for rid, outs in run_to_completion(engine, after_step=lambda: check_blocks(engine)).items():
        got.setdefault(rid, []).extend(token_ids(outs))
    return got


@pytest.mark.parametrize("kernels", ["auto", "triton"])  # triton: on CPU, Triton's interpreter
def test_second_request_skips_the_shared_prefix(model, kernels):
    engine = make_engine(model, kernels=kernels)
    chunks = record_chunks(engine)
    a, b = PREFIX + tokens(5, seed=1), PREFIX + tokens(7, seed=2)
    add(engine, "a", prompt_token_ids=a)
    got = finish_all(engine)
    assert engine.block_manager.num_cached_tokens_hit == 0
    add(engine, "b", prompt_token_ids=b)
    finish_all(engine, got)
    assert chunks[0] == ("a", 0, len(a))
    assert [c for c in chunks if c[0] == "b"][0] == ("b", 3 * BLOCK, 7)  # prefill starts after the 3 blocks
    assert engine.block_manager.num_cached_tokens_hit == 3 * BLOCK
    assert got["a"] == hf_greedy(model, ids=a, max_new_tokens=MAX_TOKENS)
    assert got["b"] == hf_greedy(model, ids=b, max_new_tokens=MAX_TOKENS)


def test_next_chat_turn_reuses_the_blocks_filled_while_decoding(model):
    engine = make_engine(model, max_num_batched_tokens=20)  # prefills are chunked too
    chunks = record_chunks(engine)
    turn1 = PREFIX + tokens(5, seed=8)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    add(engine, "turn1", params, prompt_token_ids=turn1)
    got = finish_all(engine)
    turn2 = turn1 + got["turn1"] + tokens(6, seed=9)  # 53 + 24 + 6 tokens; 76 were computed by turn 1
    add(engine, "turn2", params, prompt_token_ids=turn2)
    finish_all(engine, got)
    assert [c for c in chunks if c[0] == "turn2"][0] == ("turn2", 4 * BLOCK, len(turn2) - 4 * BLOCK)
    assert engine.block_manager.num_cached_tokens_hit == 4 * BLOCK  # the 4th block was filled by decoding
    assert got["turn1"] == hf_greedy(model, ids=turn1, max_new_tokens=24)
    assert got["turn2"] == hf_greedy(model, ids=turn2, max_new_tokens=24)


def test_prompt_embeds_hit_only_on_identical_embeddings(model):
    engine = make_engine(model)
    chunks = record_chunks(engine)
    a, b = PREFIX + tokens(5, seed=3), PREFIX + tokens(9, seed=4)
    other = tokens(len(b), seed=5)  # same length, other embeddings
    prompts = {"a": embeds_fp16(model, a), "b": embeds_fp16(model, b), "other": embeds_fp16(model, other)}
    got = {}
    bm = engine.block_manager
    for rid in ("a", "b", "other"):
        before = bm.num_cached_tokens_hit
        add(engine, rid, prompt_embeds=prompts[rid])
        finish_all(engine, got)
        assert bm.num_cached_tokens_hit - before == {"a": 0, "b": 3 * BLOCK, "other": 0}[rid], rid
    # The same tokens as input_ids must not hit the embeddings' blocks (placeholder ids are not the content).
    add(engine, "ids", prompt_token_ids=a)
    finish_all(engine, got)
    assert bm.num_cached_tokens_hit == 3 * BLOCK
    assert [c for c in chunks if c[0] == "b"][0] == ("b", 3 * BLOCK, 9)
    for rid, p in prompts.items():
        assert got[rid] == hf_greedy(model, embeds=p, max_new_tokens=MAX_TOKENS), rid
    assert got["ids"] == hf_greedy(model, ids=a, max_new_tokens=MAX_TOKENS)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block(model):
    engine = make_engine(model)
    chunks = record_chunks(engine)
    got = {}
    for rid in ("first", "again"):
        add(engine, rid, prompt_token_ids=PREFIX)
        finish_all(engine, got)
    assert [c for c in chunks if c[0] == "again"][0] == ("again", 2 * BLOCK, BLOCK)  # the last token's block
    assert engine.block_manager.num_cached_tokens_hit == 2 * BLOCK
    ref = hf_greedy(model, ids=PREFIX, max_new_tokens=MAX_TOKENS)
    assert got["first"] == got["again"] == ref


def test_running_sequences_share_blocks_and_finishing_one_keeps_them(model):
    engine = make_engine(model)
    a, b = PREFIX + tokens(4, seed=6), PREFIX + tokens(6, seed=7)
    add(engine, "a", SamplingParams(max_tokens=3, temperature=0), prompt_token_ids=a)
    got = {}
    for out in engine.step():  # a's prefill: its three prefix blocks are now cached
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    add(engine, "b", prompt_token_ids=b)
    for out in engine.step():
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    seq_a, seq_b = engine._requests["a"].seq, engine._requests["b"].seq
    shared = seq_a.block_table[:3]
    assert seq_b.block_table[:3] == shared and seq_b.block_table[3] != seq_a.block_table[3]
    assert [engine.block_manager._ref[blk] for blk in shared] == [2, 2, 2]
    check_blocks(engine)
    while "a" in engine._requests:  # a finishes first (3 tokens): its shared blocks stay with b
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert seq_b.block_table[:3] == shared and [engine.block_manager._ref[blk] for blk in shared] == [1, 1, 1]
    assert not set(shared) & set(engine.block_manager._free)
    check_blocks(engine)
    finish_all(engine, got)
    assert got["a"] == hf_greedy(model, ids=a, max_new_tokens=3)
    assert got["b"] == hf_greedy(model, ids=b, max_new_tokens=MAX_TOKENS)


def test_preemption_with_shared_prefixes_matches_and_returns_every_block(model):
    # 9 blocks cannot hold five sequences of 4-5 blocks: the newest are preempted, and on restart they reuse
    # the prefix (and their own blocks) where still cached.
    engine = make_engine(model, num_kv_blocks=9)
    ps = [PREFIX[:2 * BLOCK] + tokens(n, seed=10 + n) for n in (3, 9, 17, 20, 30)]
    for i, p in enumerate(ps):
        add(engine, f"r{i}", SamplingParams(max_tokens=24, temperature=0), prompt_token_ids=p)
    got = finish_all(engine)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_cached_tokens_hit > 0
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(model, ids=p, max_new_tokens=24), i


def test_warmup_leaves_nothing_in_the_cache(model):
    """The CUDA warmup (one dummy request, run at start) leaves no cached blocks behind: found on an H200, where
    its blocks of zeros took cache space and skewed the cache-hit counts."""
    engine = make_engine(model)
    engine.warmup()  # runs by itself on CUDA; called directly here so that CPU runs check it too
    assert engine.block_manager.num_cached_blocks == 0
    assert engine.block_manager.enable_prefix_caching
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    check_blocks(engine)


def test_eviction_reuses_cached_free_blocks_and_never_serves_stale_ones(model):
    engine = make_engine(model, num_kv_blocks=8)
    bm = engine.block_manager
    p1, p2 = PREFIX + tokens(5, seed=20), tokens(70, seed=21)
    got = {}
    add(engine, "p1", prompt_token_ids=p1)  # 53 + 12 tokens, 64 computed: 4 full blocks, all cached
    finish_all(engine, got)
    keys1 = list(engine.block_manager._cached)
    assert len(keys1) == 4
    add(engine, "p2", prompt_token_ids=p2)  # 70 + 12 tokens: 6 blocks, the 4 never used and 2 of p1's
    finish_all(engine, got)
    survivors = [k for k in keys1 if k in bm._cached]
    assert len(survivors) == 2  # p1's tail blocks went first, so its first two blocks are still cached
    assert bm.num_cached_tokens_hit == 0
    add(engine, "p1 again", prompt_token_ids=p1)
    finish_all(engine, got)
    assert bm.num_cached_tokens_hit == 2 * BLOCK  # the surviving head of p1; its evicted blocks are recomputed
    assert got["p1"] == got["p1 again"] == hf_greedy(model, ids=p1, max_new_tokens=MAX_TOKENS)
    assert got["p2"] == hf_greedy(model, ids=p2, max_new_tokens=MAX_TOKENS)


def test_disabled_shares_nothing(model):
    engine = make_engine(model, enable_prefix_caching=False)
    chunks = record_chunks(engine)
    a = PREFIX + tokens(5, seed=30)
    got = {}
    for rid in ("a", "again"):
        add(engine, rid, prompt_token_ids=a)
        finish_all(engine, got)
    assert [c[1] for c in chunks if c[2] > 1] == [0, 0]
    assert engine.block_manager.num_cached_tokens_hit == 0 and engine.block_manager.num_cached_blocks == 0
    assert got["a"] == got["again"] == hf_greedy(model, ids=a, max_new_tokens=MAX_TOKENS)
