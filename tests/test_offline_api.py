"""The offline API: `LLM(model=DIR).generate(...)` with strings, token ids and embeddings mixed in one call,
results in input order, equal to the server's greedy output and to transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_reference import embeds_fp16, hf_greedy
from pagedllm import LLM, SamplingParams
from triton_helpers import stream_one

GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def llm(llm_server) -> LLM:
    return LLM(model=str(llm_server.model_dir), num_kv_blocks=64)


def test_mixed_prompts_in_input_order_equal_the_server(llm, llm_server):
    model_dir = str(llm_server.model_dir)
    ids = [5, 17, 200, 33, 9, 41]
    embeds = embeds_fp16(model_dir, [7, 8, 9, 10])
    prompts = ["Hello world, said the fox", {"prompt_token_ids": ids}, {"prompt_embeds": embeds},
               {"prompt_embeds": embeds.to(torch.bfloat16)}, {"prompt": "A second text"}]
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outs] == ["Hello world, said the fox", None, None, None, "A second text"]

    server = [
        stream_one(llm_server.grpc_url, {"text_input": np.array([prompts[0]]),
                                         "exclude_input_in_output": np.array([True]), **_greedy()}),
        stream_one(llm_server.grpc_url, {"input_ids": np.array(ids, np.int64), **_greedy()}),
        stream_one(llm_server.grpc_url, {"prompt_embeds": embeds.numpy(), **_greedy()}),
    ]
    for out, srv in zip(outs, server):
        assert srv.error is None
        assert out.outputs[0].token_ids == srv.token_ids
        assert out.outputs[0].text == srv.text
        assert out.outputs[0].finish_reason == srv.finish_reason
    assert outs[1].outputs[0].token_ids == hf_greedy(model_dir, ids=ids, max_new_tokens=10)
    assert outs[2].outputs[0].token_ids == hf_greedy(model_dir, embeds=embeds, max_new_tokens=10)
    assert outs[1].prompt_token_ids == ids and outs[2].num_prompt_tokens == 4
    # bf16 embeddings are cast to the model's dtype: same rows as fp16 here up to bf16 rounding
    assert len(outs[3].outputs[0].token_ids) == 10


def _greedy():
    return {"max_tokens": np.array([10], np.int32), "temperature": np.array([0.0], np.float32)}


def test_a_single_prompt_and_per_prompt_params(llm):
    (one,) = llm.generate("Just one", SamplingParams(max_tokens=3, temperature=0))
    assert len(one.outputs[0].token_ids) <= 3
    a, b = llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 6]}],
                        [SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=5, temperature=0)])
    assert len(a.outputs[0].token_ids) == 2 and len(b.outputs[0].token_ids) == 5
    assert b.outputs[0].token_ids[:2] == a.outputs[0].token_ids


def test_wrong_embedding_shape_is_a_value_error_naming_the_hidden_size(llm):
    with pytest.raises(ValueError, match=r"prompt_embeds: expected shape \[seq_len, 64\]"):
        llm.generate({"prompt_embeds": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="prompt"):
        llm.generate({"nothing": 1})
    assert not llm.engine.has_unfinished()  # a bad prompt in a list adds none of them
