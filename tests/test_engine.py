"""The engine on its own (no server): greedy output equals transformers, token for token, for input_ids and
for prompt_embeds, across block boundaries, batching, chunked prefill and preemption; blocks always return."""
from __future__ import annotations

import pytest
import torch

from engine_utils import BLOCK, make_engine, run_to_completion, token_ids
from hf_reference import embeds_fp16, hf_greedy
from pagedllm.engine.engine import LLMEngine
from pagedllm.errors import InvalidRequest
from pagedllm.sampling_params import SamplingParams
from pagedllm.tiny_model import make_tiny_model

PROMPT_LENGTHS = (1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5)
MAX_TOKENS = 24  # decoding crosses at least one block boundary for every prompt
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "qwen3"])
def checkpoint(request, tmp_path_factory) -> str:
    arch = request.param
    extra = {"rope_scaling": "llama3"} if arch == "llama" else {"tie_embeddings": True} if arch == "qwen2" else {}
    return str(make_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, seed=1, **extra))


def prompts(vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run_all(engine: LLMEngine, requests: dict[str, dict]) -> dict[str, list[int]]:
    """Add every request, step until all finish, return each one's tokens."""
    for rid, kw in requests.items():
        engine.add(engine.make_request(rid, kw.pop("params", GREEDY), **kw))
    outputs = run_to_completion(engine)
    return {rid: token_ids(outputs.get(rid, [])) for rid in requests}


def test_batch_of_ids_and_embeds_matches_transformers(checkpoint):
    engine = make_engine(checkpoint)
    requests = {}
    for i, p in enumerate(prompts()):
        requests[f"ids{i}"] = {"prompt_token_ids": p}
        requests[f"emb{i}"] = {"prompt_embeds": embeds_fp16(checkpoint, p)}
    got = run_all(engine, requests)
    for i, p in enumerate(prompts()):
        assert got[f"ids{i}"] == hf_greedy(checkpoint, ids=p, max_new_tokens=MAX_TOKENS), f"input_ids len {len(p)}"
        ref = hf_greedy(checkpoint, embeds=embeds_fp16(checkpoint, p), max_new_tokens=MAX_TOKENS)
        assert got[f"emb{i}"] == ref, f"prompt_embeds len {len(p)}"


def test_each_prompt_alone_matches_transformers(checkpoint):
    engine = make_engine(checkpoint)
    for i, p in enumerate(prompts(seed=1)):
        got = run_all(engine, {"r": {"prompt_token_ids": p}})["r"]
        assert got == hf_greedy(checkpoint, ids=p, max_new_tokens=MAX_TOKENS), f"len {len(p)}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("llama"), arch="llama", seed=3))


def test_chunked_prefill_matches_transformers(llama):
    engine = make_engine(llama, max_num_batched_tokens=7)  # every prompt is cut into chunks of <= 7 tokens
    ps = prompts(seed=2)
    got = run_all(engine, {f"r{i}": {"prompt_token_ids": p} for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(llama, ids=p, max_new_tokens=MAX_TOKENS)


def test_preemption_recomputes_and_still_matches(llama):
    # 9 blocks of 16 tokens cannot hold all five sequences at once: the newest are preempted and recomputed.
    engine = make_engine(llama, num_kv_blocks=9)
    ps = prompts(seed=3)
    got = run_all(engine, {f"r{i}": {"prompt_token_ids": p} for i, p in enumerate(ps)})
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(llama, ids=p, max_new_tokens=MAX_TOKENS)


def test_request_joins_the_running_batch_at_the_next_step(llama):
    engine = make_engine(llama, max_prefill_tokens_while_decoding=0)  # b's whole prompt in one step
    a, b = prompts(seed=4)[2], prompts(seed=4)[4]
    engine.add(engine.make_request("a", GREEDY, prompt_token_ids=a))
    got = {"a": [], "b": []}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    engine.add(engine.make_request("b", GREEDY, prompt_token_ids=b))
    step_outputs = engine.step()  # one forward pass: a's decode token and b's whole prefill
    assert {o.request_id for o in step_outputs} == {"a", "b"}
    assert len(engine.scheduler.running) == 2
    for out in step_outputs:
        got[out.request_id] += out.new_token_ids
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got["a"] == hf_greedy(llama, ids=a, max_new_tokens=MAX_TOKENS)
    assert got["b"] == hf_greedy(llama, ids=b, max_new_tokens=MAX_TOKENS)
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_stop_conditions(llama):
    engine = make_engine(llama)
    p = prompts(seed=5)[3]
    ref = hf_greedy(llama, ids=p, max_new_tokens=MAX_TOKENS)
    stop_at = ref[5]
    outs = {}
    for rid, params in {
        "len": SamplingParams(max_tokens=4, temperature=0),
        "stop": SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[stop_at]),
    }.items():
        engine.add(engine.make_request(rid, params, prompt_token_ids=p))
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert [t for o in outs["len"] for t in o.new_token_ids] == ref[:4]
    assert outs["len"][-1].finish_reason == "length"
    assert [t for o in outs["stop"] for t in o.new_token_ids] == ref[:ref.index(stop_at) + 1]
    assert outs["stop"][-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(llama):
    engine = make_engine(llama)
    assert engine.eos_token_ids == {2}  # the tiny checkpoint's </s>, from generation_config.json
    # Random weights rarely produce </s>: declare a token the greedy continuation does produce to be EOS.
    p = prompts(seed=6)[1]
    ref = hf_greedy(llama, ids=p, max_new_tokens=MAX_TOKENS)
    engine.eos_token_ids = frozenset({ref[2]})
    got = run_all(engine, {"r": {"prompt_token_ids": p}})["r"]
    assert got == ref[:ref.index(ref[2]) + 1]
    ignore = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    got = run_all(engine, {"r": {"prompt_token_ids": p, "params": ignore}})["r"]
    assert got == ref and len(got) == MAX_TOKENS


def test_abort_frees_blocks(llama):
    engine = make_engine(llama)
    engine.add(engine.make_request("a", GREEDY, prompt_token_ids=prompts()[4]))
    engine.step()
    assert engine.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama):
    engine = make_engine(llama)
    p = prompts(seed=7)[3]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = run_all(engine, {"r": {"prompt_token_ids": p, "params": params}})["r"]
    others = {f"o{i}": {"prompt_token_ids": q, "params": SamplingParams(max_tokens=12, temperature=1.0, seed=i)}
              for i, q in enumerate(prompts(seed=8))}
    batched = run_all(engine, {"r": {"prompt_token_ids": p, "params": params}, **others})
    assert batched["r"] == alone
    other_seed = run_all(engine, {"r": {"prompt_token_ids": p, "params": SamplingParams(
        max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=99)}})["r"]
    assert other_seed != alone
    top1 = run_all(engine, {"r": {"prompt_token_ids": p, "params": SamplingParams(
        max_tokens=12, temperature=1.0, top_k=1, seed=5)}})["r"]
    assert top1 == hf_greedy(llama, ids=p, max_new_tokens=12)


@pytest.mark.parametrize("kwargs, params, message", [
    ({"prompt_token_ids": []}, GREEDY, "input_ids: the prompt is empty"),
    ({"prompt_token_ids": [1, 99999]}, GREEDY, "input_ids: token id 99999 is outside the vocabulary"),
    ({"prompt_token_ids": [-1]}, GREEDY, "input_ids: token id -1"),
    ({"prompt_token_ids": [5] * 600}, GREEDY, "input_ids: the prompt has 600 tokens"),
    ({"prompt_embeds": torch.zeros(3, 32)}, GREEDY, "prompt_embeds: expected shape [seq_len, 64] but got [3, 32]"),
    ({"prompt_embeds": torch.zeros(0, 64)}, GREEDY, "prompt_embeds: the prompt is empty"),
    ({"prompt_embeds": torch.full((2, 64), float("nan"))}, GREEDY, "prompt_embeds: contains NaN or Inf"),
    ({"prompt_embeds": torch.zeros(2, 3, 64)}, GREEDY, "prompt_embeds: expected shape"),
    ({}, GREEDY, "prompt: send exactly one"),
    ({"prompt_token_ids": [5]}, SamplingParams(max_tokens=0), "max_tokens"),
    ({"prompt_token_ids": [5]}, SamplingParams(temperature=-1), "temperature"),
    ({"prompt_token_ids": [5]}, SamplingParams(top_p=0), "top_p"),
    ({"prompt_token_ids": [5]}, SamplingParams(top_k=-5), "top_k"),
    ({"prompt_token_ids": [5]}, SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
])
def test_bad_requests_are_refused_with_the_input_named(llama, kwargs, params, message):
    engine = make_engine(llama)
    with pytest.raises(InvalidRequest) as e:
        engine.make_request("bad", params, **kwargs)
    assert message in str(e.value)
    assert engine.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_kernels_match_transformers(make_tiny, arch):
    """The same parity with kernels=triton (on CPU they run in Triton's interpreter: small shapes)."""
    extra = {"rope_scaling": "llama3"} if arch == "llama" else {"tie_embeddings": True}
    model_dir = str(make_tiny(arch, seed=1, **extra))
    engine = make_engine(model_dir, kernels="triton", max_num_batched_tokens=24)  # the 3-block prompt is chunked
    assert engine.ops.name == "triton"
    ps = prompts(seed=9)
    params = SamplingParams(max_tokens=6, temperature=0)
    requests = {f"ids{i}": {"prompt_token_ids": p, "params": params} for i, p in enumerate(ps)}
    requests["emb"] = {"prompt_embeds": embeds_fp16(model_dir, ps[3]), "params": params}
    got = run_all(engine, requests)
    for i, p in enumerate(ps):
        assert got[f"ids{i}"] == hf_greedy(model_dir, ids=p, max_new_tokens=6), f"len {len(p)}"
    assert got["emb"] == hf_greedy(model_dir, embeds=embeds_fp16(model_dir, ps[3]), max_new_tokens=6)


def test_triton_and_torch_sample_the_same_tokens(llama):
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=11)
    got = {}
    for kernels in ("torch", "triton"):
        engine = make_engine(llama, kernels=kernels)
        got[kernels] = run_all(engine, {"r": {"prompt_token_ids": prompts(seed=10)[3], "params": params}})["r"]
    assert got["torch"] == got["triton"]


def test_sharded_checkpoint_loads_and_matches(make_tiny):
    model_dir = str(make_tiny("mistral", seed=4, shards=3))
    engine = make_engine(model_dir)
    p = prompts(seed=11)[3]
    assert run_all(engine, {"r": {"prompt_token_ids": p}})["r"] == hf_greedy(model_dir, ids=p,
                                                                             max_new_tokens=MAX_TOKENS)


def test_bfloat16_on_cpu_runs_the_whole_loop(llama):
    """bf16 rounds differently from transformers' fp32, so no token parity: finite logits and a full run."""
    engine = make_engine(llama, dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16 and engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    got = run_all(engine, {"r": {"prompt_token_ids": prompts(seed=12)[4],
                                 "params": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)}})["r"]
    assert len(got) == 8 and all(0 <= t < engine.spec.vocab_size for t in got)
    ref = hf_greedy(llama, ids=prompts(seed=12)[4], max_new_tokens=8)
    assert got[0] == ref[0]  # the first token's margin is wide enough to survive bf16


def test_step_outputs_are_snapshots_the_engine_does_not_change_later(llama):
    """StepOutputs are read on other threads while the engine goes on (the Triton model's sender thread): a
    count or finish reason read live off the request made an early streamed response claim to be the last."""
    engine = make_engine(llama)
    engine.add(engine.make_request("r", GREEDY, prompt_token_ids=prompts()[2]))
    outs = run_to_completion(engine)["r"]
    assert [o.num_output_tokens for o in outs] == list(range(1, MAX_TOKENS + 1))
    assert [o.finish_reason for o in outs] == [None] * (MAX_TOKENS - 1) + ["length"]


@pytest.mark.parametrize("n", [3, 5, 9])
def test_the_padded_decode_path_matches_eager_and_transformers(llama, n):
    """Decode steps padded to the captured sizes (cuda_graphs on: on CPU the same path without capture) give
    what unpadded steps give: batches off the ladder, sequences finishing mid-batch, preemption, prefix hits."""
    ps = [p for p in prompts(seed=20)] + [p for p in prompts(seed=21)]
    ps = ps[:n]
    shared = prompts(seed=22)[4]  # 53 tokens: 3 full blocks two requests share
    requests = {f"r{i}": {"prompt_token_ids": p, "params": SamplingParams(max_tokens=4 + 3 * i, temperature=0)}
                for i, p in enumerate(ps)}
    requests["s1"] = {"prompt_token_ids": shared + [7], "params": GREEDY}
    requests["s2"] = {"prompt_token_ids": shared + [9], "params": GREEDY}
    got = {}
    for cuda_graphs in (True, False):
        engine = make_engine(llama, num_kv_blocks=9, cuda_graphs=cuda_graphs)  # too few: preemption
        assert (engine.runner.static is not None) == cuda_graphs
        got[cuda_graphs] = run_all(engine, {k: dict(v) for k, v in requests.items()})
        assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_cached_tokens_hit > 0
    assert got[True] == got[False]
    for i, p in enumerate(ps):
        assert got[True][f"r{i}"] == hf_greedy(llama, ids=p, max_new_tokens=4 + 3 * i)
    assert got[True]["s1"] == hf_greedy(llama, ids=shared + [7], max_new_tokens=MAX_TOKENS)


def test_a_one_token_recompute_chunk_is_not_taken_for_a_decode_step(llama):
    """A preempted sequence recomputing its generated tokens can be scheduled one token that is not its newest
    (it samples nothing). Beside decoding sequences that batch looks decode-only; the padded path would feed the
    newest token at that position and shift every later row's logits onto its neighbour."""
    ps = prompts(seed=23)[:4] + prompts(seed=24)[:4]
    requests = {f"r{i}": {"prompt_token_ids": p, "params": SamplingParams(max_tokens=30 + i, temperature=0)}
                for i, p in enumerate(ps)}
    # few blocks: preemption while others decode; one prefill token a step beside them: one-token recomputes
    engine = make_engine(llama, num_kv_blocks=7, cuda_graphs=True, max_num_seqs=4, max_num_batched_tokens=64,
                         max_prefill_tokens_while_decoding=1)
    schedule, seen = engine.scheduler.schedule, []

    def recording_schedule():
        batch = schedule()
        seen.append([(item.num_new_tokens, item.samples,
                      item.seq.num_computed_tokens >= item.seq.num_prompt_tokens) for item in batch])
        return batch

    engine.scheduler.schedule = recording_schedule
    got = run_all(engine, {k: dict(v) for k, v in requests.items()})
    mixed = [b for b in seen if any(s for _, s, _ in b) and any(n == 1 and not s and g for n, s, g in b)]
    assert mixed, "the case under test did not arise: a decode batch beside a one-token recompute chunk"
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(llama, ids=p, max_new_tokens=30 + i), f"r{i}"


def test_the_torch_kernels_run_the_padded_path_without_graphs(llama):
    """The PyTorch reference attention syncs with the host, so it is never captured: with kernels=torch and
    cuda_graphs on, padded decode steps run eagerly (on CUDA, capture used to fail at start-up)."""
    from pagedllm.engine.model_runner import graphs_capturable

    assert not graphs_capturable(torch.device("cuda"), "torch")
    assert graphs_capturable(torch.device("cuda"), "triton") and not graphs_capturable(torch.device("cpu"), "triton")
    engine = make_engine(llama, kernels="torch", cuda_graphs=True)
    assert engine.runner.static is not None and not engine.runner.static.graphs
    ps = prompts(seed=25)[:3]
    got = run_all(engine, {f"r{i}": {"prompt_token_ids": p} for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(llama, ids=p, max_new_tokens=MAX_TOKENS)
