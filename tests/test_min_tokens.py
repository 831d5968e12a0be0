"""min_tokens (vLLM's semantics): until a request has generated that many tokens, EOS and its stop tokens cannot
be sampled and stop strings do not end it; after, they work as usual. Through the engine and the `llm` model."""
from __future__ import annotations

import numpy as np
import pytest

from engine_utils import make_engine, run_to_completion, token_ids
from hf_reference import hf_greedy
from pagedllm.errors import InvalidRequest
from pagedllm.sampling_params import SamplingParams
from triton_helpers import stream_one

PROMPT = [5, 17, 99, 41, 3, 250, 77]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir)


def generate(engine, **params) -> list[int]:
    engine.add(engine.make_request("r", SamplingParams(temperature=0, **params), prompt_token_ids=PROMPT))
    return token_ids(run_to_completion(engine)["r"])


def test_a_stop_token_cannot_end_the_request_before_min_tokens(engine, tiny_llama_dir):
    ref = hf_greedy(str(tiny_llama_dir), ids=PROMPT, max_new_tokens=12)
    stop = ref[1]  # greedy would stop after 2 tokens
    assert generate(engine, max_tokens=12, stop_token_ids=[stop]) == ref[:2]
    held = generate(engine, max_tokens=12, stop_token_ids=[stop], min_tokens=4)
    assert len(held) >= 4 and stop not in held[:4]  # banned from sampling until the 4th token
    assert held[:1] == ref[:1]  # the first token was not the stop token anyway


def test_eos_is_banned_before_min_tokens_unless_ignored(engine, tiny_llama_dir):
    ref = hf_greedy(str(tiny_llama_dir), ids=PROMPT, max_new_tokens=12)
    engine.eos_token_ids = frozenset({ref[0]})  # the very first greedy token is "EOS"
    try:
        assert generate(engine, max_tokens=12) == ref[:1]
        held = generate(engine, max_tokens=12, min_tokens=3)
        assert len(held) >= 3 and ref[0] not in held[:3]
    finally:
        engine.eos_token_ids = frozenset(engine.spec.eos_token_ids)


def test_min_tokens_longer_than_max_tokens_is_refused(engine):
    with pytest.raises(InvalidRequest, match="min_tokens"):
        engine.make_request("bad", SamplingParams(max_tokens=4, min_tokens=5), prompt_token_ids=PROMPT)


def test_max_tokens_minus_one_runs_to_the_model_length(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_model_len=32)
    got = generate(engine, max_tokens=None, ignore_eos=True)
    assert len(PROMPT) + len(got) == 32


def test_min_tokens_through_the_llm_model(llm_server, tiny_llama_dir):
    ref = hf_greedy(str(tiny_llama_dir), ids=PROMPT, max_new_tokens=12)
    values = {"input_ids": np.array(PROMPT, np.int64), "max_tokens": np.array([12], np.int32),
              "temperature": np.array([0.0], np.float32), "stop_token_ids": np.array([ref[1]], np.int64)}
    assert stream_one(llm_server.grpc_url, values).token_ids == ref[:2]
    held = stream_one(llm_server.grpc_url, {**values, "min_tokens": np.array([4], np.int32)})
    assert held.error is None and len(held.token_ids) >= 4 and ref[1] not in held.token_ids[:4]


def test_stop_strings_are_not_searched_before_min_tokens():
    from pagedllm.stop_strings import StopStringFilter

    f = StopStringFilter(["ab"])
    assert f.feed("xab", finished=False, search=False) == ("xab", False)  # too early: passed on
    assert f.feed("cab", finished=False) == ("c", True)  # the next one counts
