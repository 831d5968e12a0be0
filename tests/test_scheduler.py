"""The scheduler and block manager on their own: budgets, chunking, admission order, preemption, freeing."""
from __future__ import annotations

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Sequence, SequenceStatus
from pagedllm.sampling_params import SamplingParams


def seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence(rid, [7] * prompt_len, prompt_len, SamplingParams(), seed=0)


def run(sched: Scheduler):
    """One step as the engine does it: schedule, then mark the tokens computed and 'sample' one token."""
    batch = sched.schedule()
    for item in batch:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.token_ids.append(1)
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
