"""return_logprobs: each generated token's log-probability under the model's raw distribution (before
temperature and penalties), equal to transformers' teacher-forced log-softmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_reference import hf_model
from pagedllm import LLM, SamplingParams
from triton_helpers import stream_one

IDS = [5, 9, 200, 31, 77, 140, 18]


def hf_logprobs(model_dir: str, prompt: list[int], generated: list[int]) -> list[float]:
    """log p(generated[i] | prompt + generated[:i]) from one transformers forward pass."""
    full = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = hf_model(model_dir)(full).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(generated)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(model=str(tiny_llama_dir), num_kv_blocks=64)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, return_logprobs=True),
    SamplingParams(max_tokens=10, temperature=0.7, top_k=20, seed=3, ignore_eos=True, return_logprobs=True,
                   repetition_penalty=1.2),
])
def test_logprobs_equal_transformers(llm, tiny_llama_dir, params):
    (out,) = llm.generate({"prompt_token_ids": IDS}, params)
    got = out.outputs[0]
    assert len(got.logprobs) == len(got.token_ids) == 10
    np.testing.assert_allclose(got.logprobs, hf_logprobs(str(tiny_llama_dir), IDS, got.token_ids), atol=1e-4)
    assert all(lp <= 0 for lp in got.logprobs)


def test_no_logprobs_unless_asked(llm):
    (out,) = llm.generate({"prompt_token_ids": IDS}, SamplingParams(max_tokens=3, temperature=0))
    assert out.outputs[0].logprobs is None


def test_logprobs_through_the_server(llm_server, llm):
    (want,) = llm.generate({"prompt_token_ids": IDS}, SamplingParams(max_tokens=8, temperature=0,
                                                                    return_logprobs=True))
    values = {"input_ids": np.array(IDS, np.int64), "max_tokens": np.array([8], np.int32),
              "temperature": np.array([0.0], np.float32), "return_logprobs": np.array([True])}
    for stream in (False, True):
        res = stream_one(llm_server.grpc_url, {**values, "stream": np.array([stream])})
        assert res.error is None
        assert res.token_ids == want.outputs[0].token_ids
        np.testing.assert_allclose(res.logprobs, want.outputs[0].logprobs, atol=1e-5)
    plain = stream_one(llm_server.grpc_url, {**values, "return_logprobs": np.array([False])})
    assert plain.error is None and plain.logprobs == [] and len(plain.token_ids) == 8
