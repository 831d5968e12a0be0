"""vllm_backend compatibility: the requests that vllm_backend's sample client (samples/client.py) sends, sent
the same way — tritonclient.grpc.aio stream_infer over a request iterator, `text_input` + `stream` +
`sampling_parameters` JSON with string values, the same dict as request parameters, only `text_output`
requested — and `text_output` read back."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from transformers import AutoTokenizer

from hf_reference import hf_greedy

PROMPTS = ["Hello, my name is\n", "The capital of France is\n", "The future of AI is\n"]
VLLM_SAMPLE_PARAMETERS = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "100"}


def create_request(prompt: str, stream: bool, request_id: int, sampling_parameters: dict,
                   exclude_input_in_output: bool | None = None, as_parameters: bool = True) -> dict:
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL"),
              grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([stream], dtype=bool))
    inputs[2].set_data_from_numpy(np.array([json.dumps(sampling_parameters).encode("utf-8")], dtype=np.object_))
    if exclude_input_in_output is not None:
        inputs.append(grpcclient.InferInput("exclude_input_in_output", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([exclude_input_in_output], dtype=bool))
    return {"model_name": "llm", "inputs": inputs, "outputs": [grpcclient.InferRequestedOutput("text_output")],
            "request_id": str(request_id), "parameters": sampling_parameters if as_parameters else None}


async def run_like_the_sample_client(url: str, stream: bool, sampling_parameters: dict,
                                     exclude_input_in_output: bool | None = None,
                                     as_parameters: bool = True) -> dict[str, list[bytes]]:
    client = grpcclient.InferenceServerClient(url=url)
    results: dict[str, list[bytes]] = {str(i): [] for i in range(len(PROMPTS))}

    async def requests():
        for i, prompt in enumerate(PROMPTS):
            yield create_request(prompt, stream, i, sampling_parameters, exclude_input_in_output, as_parameters)

    async for result, error in client.stream_infer(inputs_iterator=requests(), stream_timeout=120):
        assert error is None, error
        for piece in result.as_numpy("text_output"):
            results[result.get_response().id].append(piece)
    await client.close()
    return results


@pytest.mark.parametrize("stream", [False, True])
def test_the_sample_clients_requests(llm_server, stream):
    results = asyncio.run(run_like_the_sample_client(llm_server.grpc_url, stream, VLLM_SAMPLE_PARAMETERS))
    for i, prompt in enumerate(PROMPTS):
        text = b"".join(results[str(i)]).decode()
        if stream:
            assert len(results[str(i)]) > 1  # one response per token
            assert not text.startswith(prompt) or len(text) > len(prompt)
        else:
            assert len(results[str(i)]) == 1
            assert text.startswith(prompt) and len(text) > len(prompt)  # vllm_backend prepends the prompt


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_text_output_equals_transformers(llm_server, stream):
    tok = AutoTokenizer.from_pretrained(llm_server.model_dir)
    params = {"temperature": "0", "max_tokens": "12"}
    results = asyncio.run(run_like_the_sample_client(llm_server.grpc_url, stream, params,
                                                     exclude_input_in_output=True))
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(str(llm_server.model_dir), ids=tok(prompt)["input_ids"], max_new_tokens=12)
        want = tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert b"".join(results[str(i)]).decode() == want


# What Triton's OpenAI frontend (`--backend vllm`) puts in sampling_parameters for a completions request: typed
# JSON values, including keys that only restate defaults (n, best_of, penalties 0, logprobs null).
OPENAI_FRONTEND_PARAMETERS = {"n": 1, "best_of": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                              "temperature": 0, "top_p": 1.0, "max_tokens": 12, "logprobs": None, "user": "u1",
                              "logit_bias": {}, "skip_special_tokens": True}


def test_what_tritons_openai_frontend_sends_is_accepted(llm_server):
    tok = AutoTokenizer.from_pretrained(llm_server.model_dir)
    # It sends them in sampling_parameters only (not as request parameters, which cannot hold null or {}).
    results = asyncio.run(run_like_the_sample_client(llm_server.grpc_url, False, OPENAI_FRONTEND_PARAMETERS,
                                                     exclude_input_in_output=True, as_parameters=False))
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(str(llm_server.model_dir), ids=tok(prompt)["input_ids"], max_new_tokens=12)
        assert b"".join(results[str(i)]).decode() == tok.decode(ref, skip_special_tokens=True,
                                                                 clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("key, value", [("n", 2), ("best_of", 3), ("logprobs", 2), ("top_logprobs", 5),
                                        ("logit_bias", {"5": 10}), ("use_beam_search", True)])
def test_keys_that_would_change_the_result_are_refused_by_name(llm_server, key, value):
    from triton_helpers import stream_one

    values = {"input_ids": np.array([5, 6, 7], np.int64),
              "sampling_parameters": np.array([json.dumps({key: value}).encode()], dtype=np.object_)}
    res = stream_one(llm_server.grpc_url, values)
    assert res.error is not None and f"sampling_parameters.{key}" in res.error, res.error
