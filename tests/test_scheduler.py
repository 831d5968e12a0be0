"""The scheduler and block manager on their own: budgets, chunking, admission order, preemption, freeing."""
from __future__ import annotations

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Sequence, SequenceStatus
from pagedllm.sampling_params import SamplingParams


def seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence(rid, [7] * prompt_len, prompt_len, SamplingParams(), seed=0)


def run(sched: Scheduler, cache: bool = False):
    """One step as the engine does it: schedule, then apply the step with every sampling sequence 'sampling'
    token 1. Without cache, prefix caching is off for the step (the tests above use look-alike prompts and check
    the plain accounting); with it, the filled blocks are registered as the engine does."""
    batch = sched.schedule()
    caching, sched.block_manager.enable_prefix_caching = sched.block_manager.enable_prefix_caching, cache
    try:
        sched.update_from_output(batch, [1] * sum(item.samples for item in batch))
    finally:
        sched.block_manager.enable_prefix_caching = caching
    return [(item.seq.request_id, item.num_new_tokens) for item in batch]


def test_blocks_cover_tokens_and_come_back():
    bm = BlockManager(num_blocks=4, block_size=16)
    s = seq("a", 17)
    assert bm.extra_blocks_needed(s, 17) == 2
    bm.grow(s, 17)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    assert not bm.can_grow(s, 65)
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and s.num_computed_tokens == 0


def test_running_decodes_go_first_and_new_prefills_take_the_rest_of_the_budget():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=20)
    sched.add(seq("a", 5))
    assert run(sched) == [("a", 5)]
    sched.add(seq("b", 30))
    assert run(sched) == [("a", 1), ("b", 19)]  # b's prefill is chunked to what the budget leaves
    assert run(sched) == [("a", 1), ("b", 11)]  # b finishes its prompt and samples
    assert run(sched) == [("a", 1), ("b", 1)]


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=2, max_num_batched_tokens=100)
    for r in "abc":
        sched.add(seq(r, 3))
    assert [r for r, _ in run(sched)] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    sched = Scheduler(BlockManager(3, 16), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 16), seq("b", 31)
    sched.add(a)
    sched.add(b)
    assert run(sched) == [("a", 16), ("b", 31)]  # 1 + 2 blocks: the cache is full
    # a needs a second block for its 17th token: b (the newest) is preempted and recomputed later.
    assert run(sched) == [("a", 1)]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.finish(a, "stop")
    assert sched.block_manager.num_free_blocks == 3
    assert run(sched) == [("b", 32)]  # prompt plus its sampled token, recomputed


def test_finish_removes_from_either_queue_and_frees():
    sched = Scheduler(BlockManager(8, 16), max_num_seqs=1, max_num_batched_tokens=100)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    run(sched)
    sched.finish(b, "abort")  # still waiting
    sched.finish(a, "abort")  # running, holding a block
    assert not sched.has_work() and sched.block_manager.num_free_blocks == 8
    assert a.finish_reason == b.finish_reason == "abort"


# ------------------------------------------------------------------------------------------- prefix caching
def prompt(rid: str, token_ids: list[int]) -> Sequence:
    return Sequence(rid, list(token_ids), len(token_ids), SamplingParams(), seed=0)


def computed_cached_and_freed(bm: BlockManager, seq: Sequence) -> list[int]:
    """Runs seq's whole prompt through bm (allocate, compute, register its full blocks), frees it (tail blocks
    first) and returns the block table it had."""
    n = seq.num_prompt_tokens
    bm.grow(seq, n)
    seq.num_computed_tokens = n
    bm.cache_full_blocks(seq)
    table = list(seq.block_table)
    bm.free(seq)
    return table


def test_a_cached_prefix_is_reused_and_its_free_blocks_count_against_growth():
    bm = BlockManager(num_blocks=4, block_size=16)
    a_table = computed_cached_and_freed(bm, prompt("a", range(48)))
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3  # free, but still cached

    assert len(bm.match_prefix(prompt("same", range(48)))) == 2  # never the block of the last token
    b = prompt("b", [*range(48), 99])
    prefix = bm.match_prefix(b)
    assert prefix == a_table and bm.can_grow(b, 49, prefix)  # 3 reused + 1 new: the whole cache
    assert not BlockManager(num_blocks=3, block_size=16).can_grow(b, 49, [])
    bm.grow(b, 49, prefix)
    assert b.block_table[:3] == prefix and b.num_computed_tokens == 48 and bm.num_free_blocks == 0
    assert bm.num_cached_tokens_hit == 48
    assert bm.match_prefix(prompt("other", [5, *range(1, 48), 99])) == []  # the first block differs

    c = prompt("c", [*range(32), 7, 7])  # shares b's first two blocks while b holds them
    prefix = bm.match_prefix(c)
    assert prefix == b.block_table[:2] and not bm.can_grow(c, 34, prefix)  # its third block has no room
    bm.free(b)
    assert bm.can_grow(c, 34, prefix)
    bm.grow(c, 34, prefix)
    assert bm.num_free_blocks == 1 and bm.num_cached_tokens_hit == 80


def test_allocation_evicts_the_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=2, block_size=16)
    a_table = computed_cached_and_freed(bm, prompt("a", range(32)))  # tail first: its 2nd block goes first
    fresh = prompt("fresh", [9] * 10)
    bm.grow(fresh, 10)
    assert fresh.block_table == [a_table[1]] and bm.num_cached_blocks == 1
    assert bm.match_prefix(prompt("a again", [*range(32), 1])) == [a_table[0]]  # its first block survives


def test_a_preempted_sequence_restarts_after_its_own_cached_blocks():
    sched = Scheduler(BlockManager(3, 16), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = prompt("a", [1] * 16), prompt("b", [2] * 31)
    sched.add(a)
    sched.add(b)
    assert run(sched, cache=True) == [("a", 16), ("b", 31)]
    assert run(sched, cache=True) == [("a", 1)]  # b is preempted; its full first block stays cached
    assert sched.num_preemptions == 1
    sched.finish(a, "stop")
    assert run(sched, cache=True) == [("b", 16)]  # recomputes only its second block (prompt + sampled token)
    assert sched.block_manager.num_cached_tokens_hit == 16


def test_prefill_chunks_are_bounded_while_a_sequence_decodes():
    """Long prompts arriving must not stretch the step that a decoding stream waits on: while any sequence
    decodes, prefill chunks together take at most max_prefill_tokens_while_decoding tokens a step."""
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=100,
                      max_prefill_tokens_while_decoding=10)
    sched.add(seq("a", 5))
    assert run(sched) == [("a", 5)]
    sched.add(seq("b", 30))
    sched.add(seq("c", 30))
    assert run(sched) == [("a", 1), ("b", 10)]  # a decodes: b gets the 10 prefill tokens, c waits
    assert run(sched) == [("a", 1), ("b", 10)]
    assert run(sched) == [("a", 1), ("b", 10)]  # b's prompt is done: it samples
    assert run(sched) == [("a", 1), ("b", 1), ("c", 10)]


def test_with_nothing_decoding_prefill_takes_the_whole_step_budget():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=100,
                      max_prefill_tokens_while_decoding=10)
    sched.add(seq("x", 40))
    sched.add(seq("y", 40))
    assert run(sched) == [("x", 40), ("y", 40)]
