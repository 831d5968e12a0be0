"""End to end: a real tritonserver (started by the launcher) serving the tiny Llama, driven with tritonclient
over gRPC and with HTTP /generate and /generate_stream. Greedy output must equal transformers'."""
from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_reference import embeds_fp16, hf_greedy
from triton_helpers import GrpcStream, http_generate, metric, stream_one, wait_for_metric

MAX_TOKENS = 12
GREEDY = {"max_tokens": np.array([MAX_TOKENS], np.int32), "temperature": np.array([0.0], np.float32)}
STREAM = {**GREEDY, "stream": np.array([True])}
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def srv(llm_server):
    return llm_server


@pytest.fixture(scope="module")
def model_dir(srv) -> str:
    return str(srv.model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def ids_of(seed: int, n: int) -> list[int]:
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def as_list(value) -> list:
    """The generate extension's JSON gives a one-element output as a bare value."""
    return value if isinstance(value, list) else [value]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_grpc_stream_input_ids(srv, model_dir, tokenizer):
    ids = ids_of(0, 21)
    res = stream_one(srv.grpc_url, {"input_ids": np.array(ids, np.int64), **STREAM})
    assert res.error is None
    ref = hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS)
    assert res.token_ids == ref
    assert res.num_responses == len(ref)  # one response per step, the last one final
    assert res.finish_reason in ("length", "stop")
    assert res.text == decode(tokenizer, ref)


def test_grpc_stream_prompt_embeds(srv, model_dir):
    ids = ids_of(1, 17)
    embeds = embeds_fp16(model_dir, ids).numpy()
    res = stream_one(srv.grpc_url, {"prompt_embeds": embeds, **STREAM})
    assert res.error is None
    assert res.token_ids == hf_greedy(model_dir, embeds=torch.from_numpy(embeds), max_new_tokens=MAX_TOKENS)


def test_grpc_stream_text_input(srv, model_dir, tokenizer):
    res = stream_one(srv.grpc_url, {"text_input": np.array([PROMPT]), **STREAM})
    assert res.error is None
    ref = hf_greedy(model_dir, ids=tokenizer(PROMPT)["input_ids"], max_new_tokens=MAX_TOKENS)
    assert res.token_ids == ref
    assert res.text == decode(tokenizer, ref)  # pieces concatenate to the full text, spaces included


def test_non_streamed_text_equals_concatenated_stream(srv, tokenizer):
    values = {"text_input": np.array([PROMPT]), **GREEDY}
    whole = stream_one(srv.grpc_url, {**values, "stream": np.array([False])})
    assert whole.num_responses == 1
    assert whole.text == PROMPT + decode(tokenizer, whole.token_ids)  # vllm_backend: prompt prepended
    excluded = stream_one(srv.grpc_url, {**values, "exclude_input_in_output": np.array([True])})
    streamed = stream_one(srv.grpc_url, {**values, "stream": np.array([True])})
    assert excluded.text == streamed.text == decode(tokenizer, whole.token_ids)
    assert streamed.token_ids == whole.token_ids


def test_concurrent_streams_each_match_transformers(srv, model_dir):
    s = GrpcStream(srv.grpc_url)
    prompts = {f"r{i}": ids_of(10 + i, n) for i, n in enumerate((1, 15, 16, 17, 40, 7))}
    try:
        for rid, ids in prompts.items():
            max_tokens = MAX_TOKENS + 3 * int(rid[1:])  # different lengths: requests leave at different steps
            s.send(rid, {"input_ids": np.array(ids, np.int64), **STREAM,
                         "max_tokens": np.array([max_tokens], np.int32)})
        s.wait(len(prompts))
    finally:
        s.close()
    assert not s.errors
    for rid, ids in prompts.items():
        want = hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS + 3 * int(rid[1:]))
        assert s.results[rid].token_ids == want, rid


def test_vllm_backend_style_request(srv, tokenizer):
    """What vllm_backend's sample client sends: string-valued sampling_parameters, the same dict as request
    parameters, exclude_input_in_output; it reads text_output."""
    sampling = {"temperature": "0", "top_p": "0.95", "max_tokens": "8"}
    res = stream_one(srv.grpc_url, {"text_input": np.array([PROMPT]), "stream": np.array([False]),
                                    "sampling_parameters": np.array([json.dumps(sampling)]),
                                    "exclude_input_in_output": np.array([True])}, parameters=sampling)
    assert res.error is None and len(res.token_ids) <= 8
    assert res.text == decode(tokenizer, res.token_ids)


def test_http_generate_text_and_ids(srv, model_dir, tokenizer):
    code, body = http_generate(srv.http_url, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                                              "exclude_input_in_output": True})
    assert code == 200, body
    ref = hf_greedy(model_dir, ids=tokenizer(PROMPT)["input_ids"], max_new_tokens=MAX_TOKENS)
    assert as_list(body["token_ids"]) == ref
    assert body["text_output"] == decode(tokenizer, ref)
    ids = ids_of(3, 9)
    code, body = http_generate(srv.http_url, {"input_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert code == 200, body
    assert as_list(body["token_ids"]) == hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS)
    assert body["num_input_tokens"] == 9


def test_http_generate_stream_text_and_ids(srv, model_dir, tokenizer):
    body = {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    code, events = http_generate(srv.http_url, body, stream=True)
    assert code == 200
    ref = hf_greedy(model_dir, ids=tokenizer(PROMPT)["input_ids"], max_new_tokens=MAX_TOKENS)
    assert [t for e in events for t in as_list(e["token_ids"])] == ref
    assert "".join(e["text_output"] for e in events) == decode(tokenizer, ref)
    assert len(events) == len(ref)
    ids = ids_of(4, 33)
    code, events = http_generate(srv.http_url, {"input_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                "stream": True}, stream=True)
    assert code == 200
    want = hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS)
    assert [t for e in events for t in as_list(e["token_ids"])] == want


def test_http_embeds_fp32_and_base64_equal_grpc_fp16(srv, model_dir):
    ids = ids_of(7, 13)
    embeds = embeds_fp16(model_dir, ids).numpy()
    grpc = stream_one(srv.grpc_url, {"prompt_embeds": embeds, **GREEDY})
    assert grpc.error is None
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    code, fp32 = http_generate(srv.http_url, {**body, "prompt_embeds_fp32": embeds.astype(np.float32).ravel().tolist()},
                               stream=True)
    assert code == 200, fp32
    b64 = base64.b64encode(embeds.astype("<f2").tobytes()).decode()
    code, b64_events = http_generate(srv.http_url, {**body, "prompt_embeds_base64": b64}, stream=True)
    assert code == 200, b64_events
    for events in (fp32, b64_events):
        assert [t for e in events for t in as_list(e["token_ids"])] == grpc.token_ids


GOOD = {"input_ids": np.array([5, 6, 7], np.int64), **GREEDY}
BAD_REQUESTS = {
    "no prompt": ({**GREEDY}, "prompt: send exactly one"),
    "two prompts": ({**GOOD, "text_input": np.array(["hi"])}, "prompt: send exactly one"),
    "wrong dtype": ({"input_ids": np.array([5, 6], np.int32)}, "input_ids"),
    "wrong rank": ({"input_ids": np.array([[5, 6]], np.int64)}, "input_ids"),
    "hidden size": ({"prompt_embeds": np.zeros((3, 32), np.float16)}, "prompt_embeds: expected shape [seq_len, 64]"),
    "empty ids": ({"input_ids": np.zeros((0,), np.int64)}, "input_ids: the prompt is empty"),
    "empty embeds": ({"prompt_embeds": np.zeros((0, 64), np.float16)}, "prompt_embeds: the prompt is empty"),
    "nan embeds": ({"prompt_embeds": np.full((2, 64), np.nan, np.float16)}, "prompt_embeds: contains NaN or Inf"),
    "inf embeds": ({"prompt_embeds": np.full((2, 64), np.inf, np.float16)}, "prompt_embeds: contains NaN or Inf"),
    "id outside vocab": ({"input_ids": np.array([5, 100000], np.int64)}, "input_ids: token id 100000"),
    "negative id": ({"input_ids": np.array([-3], np.int64)}, "input_ids: token id -3"),
    "too long": ({"input_ids": np.full((600,), 5, np.int64)}, "input_ids: the prompt has 600 tokens"),
    "max_tokens 0": ({**GOOD, "max_tokens": np.array([0], np.int32)}, "max_tokens"),
    "max_tokens absurd": ({**GOOD, "max_tokens": np.array([10**9], np.int32)}, "max_tokens"),
    "temperature": ({**GOOD, "temperature": np.array([-1], np.float32)}, "temperature"),
    "temperature nan": ({**GOOD, "temperature": np.array([np.nan], np.float32)}, "temperature"),
    "top_p": ({**GOOD, "top_p": np.array([1.5], np.float32)}, "top_p"),
    "top_k": ({**GOOD, "top_k": np.array([-7], np.int32)}, "top_k"),
    "stop ids": ({**GOOD, "stop_token_ids": np.array([10**7], np.int64)}, "stop_token_ids"),
    "fp32 ragged": ({"prompt_embeds_fp32": np.zeros((100,), np.float32)}, "prompt_embeds_fp32: 100 values"),
    "fp32 nan": ({"prompt_embeds_fp32": np.full((64,), np.nan, np.float32)}, "prompt_embeds_fp32: contains NaN"),
    "base64 junk": ({"prompt_embeds_base64": np.array(["%%%"])}, "prompt_embeds_base64: not valid base64"),
    "base64 huge": ({"prompt_embeds_base64": np.array(["A" * 200000])}, "prompt_embeds_base64: 200000 characters"),
    "text too long": ({"text_input": np.array(["word " * 2000])}, "text_input: the prompt has"),
    "text not utf-8": ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "text_input: not valid UTF-8"),
    "sampling json": ({**GOOD, "sampling_parameters": np.array(["{not json"])}, "sampling_parameters: not valid JSON"),
    "sampling value": ({**GOOD, "sampling_parameters": np.array(['{"temperature": "hot"}'])},
                       "sampling_parameters.temperature"),
    "sampling key": ({**GOOD, "sampling_parameters": np.array(['{"best_of": 2}'])}, "sampling_parameters"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_fails_alone_and_the_server_goes_on(srv, model_dir, case):
    values, message = BAD_REQUESTS[case]
    res = stream_one(srv.grpc_url, values)
    assert res.error is not None, f"{case}: no error"
    assert message in res.error, res.error
    good = stream_one(srv.grpc_url, GOOD)
    assert good.error is None
    assert good.token_ids == hf_greedy(model_dir, ids=[5, 6, 7], max_new_tokens=MAX_TOKENS)
    total = metric(srv.metrics_url, "pagedllm_kv_blocks_total")
    assert wait_for_metric(srv.metrics_url, "pagedllm_kv_blocks_free", total) == total


def test_bad_request_does_not_disturb_one_in_flight(srv, model_dir):
    s = GrpcStream(srv.grpc_url)
    ids = ids_of(5, 20)
    try:
        s.send("good", {"input_ids": np.array(ids, np.int64), **STREAM,
                        "max_tokens": np.array([40], np.int32), "ignore_eos": np.array([True])})
        bad = stream_one(srv.grpc_url, {"input_ids": np.array([5, 100000], np.int64)})
        s.wait(1)
    finally:
        s.close()
    assert "input_ids" in bad.error
    assert s.results["good"].error is None
    assert len(s.results["good"].token_ids) == 40


def test_http_bad_input_gets_a_clear_error(srv):
    code, body = http_generate(srv.http_url, {"input_ids": [1, 100000], "max_tokens": 4})
    assert code == 400, body
    assert "input_ids: token id 100000" in body["error"]
    # A field of /generate that is no input becomes a request parameter: a misspelt one is refused by name,
    # not ignored (this one would have given 16 tokens instead of 3).
    code, body = http_generate(srv.http_url, {"input_ids": [1, 2], "max_token": 3})
    assert code == 400 and "parameter 'max_token': not a parameter of this model" in body["error"], body


def test_cancelled_stream_returns_its_kv_blocks(srv):
    total = metric(srv.metrics_url, "pagedllm_kv_blocks_total")
    s = GrpcStream(srv.grpc_url)
    s.send("long", {"input_ids": np.array(ids_of(6, 50), np.int64), "stream": np.array([True]),
                    "max_tokens": np.array([400], np.int32), "ignore_eos": np.array([True])})
    deadline = time.monotonic() + 60
    while len(s.results["long"].token_ids) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(srv.metrics_url, "pagedllm_kv_blocks_free") < total  # it holds blocks while running
    s.close(cancel=True)
    assert wait_for_metric(srv.metrics_url, "pagedllm_kv_blocks_free", total) == total
    assert len(s.results["long"].token_ids) < 400
    assert stream_one(srv.grpc_url, GOOD).error is None


def test_metrics_count_tokens_and_latencies(srv):
    before = metric(srv.metrics_url, "pagedllm_generation_tokens_total")
    res = stream_one(srv.grpc_url, {"input_ids": np.array(ids_of(8, 10), np.int64), **STREAM,
                                    "ignore_eos": np.array([True])})
    assert res.error is None
    assert wait_for_metric(srv.metrics_url, "pagedllm_generation_tokens_total", before + MAX_TOKENS) == \
        before + MAX_TOKENS
    assert metric(srv.metrics_url, "pagedllm_time_to_first_token_seconds_count") >= 1
    assert metric(srv.metrics_url, "pagedllm_inter_token_latency_seconds_count") >= MAX_TOKENS - 1
    assert wait_for_metric(srv.metrics_url, "pagedllm_num_requests_running", 0) == 0


def test_prefix_cache_hits_are_counted(srv, model_dir):
    ids = ids_of(9, 40)  # two full blocks of 16 shared by both requests
    before = metric(srv.metrics_url, "pagedllm_prefix_cache_hit_tokens_total")
    first = stream_one(srv.grpc_url, {"input_ids": np.array(ids, np.int64), **GREEDY})
    second = stream_one(srv.grpc_url, {"input_ids": np.array(ids[:36] + [7, 8, 9], np.int64), **GREEDY})
    assert first.error is None and second.error is None
    assert first.token_ids == hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS)
    assert second.token_ids == hf_greedy(model_dir, ids=ids[:36] + [7, 8, 9], max_new_tokens=MAX_TOKENS)
    assert wait_for_metric(srv.metrics_url, "pagedllm_prefix_cache_hit_tokens_total", before + 32) == before + 32
