"""The OpenAI-compatible API, driven with the official `openai` package against a real tritonserver (the
`openai_server` fixture: the front end as `pagedllm serve` starts it, in front of `llm_server`).

Greedy text equals transformers' `generate` for text, token ids, vLLM-style torch.save prompt embeddings (fp32
and bf16), batches and mixed prompts, and chat; streaming equals non-streaming; usage is right; bad requests
get OpenAI-shaped 4xx errors naming the field; hostile embedding payloads are refused without harm."""
from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import torch
from transformers import AutoTokenizer

from hf_reference import hf_greedy, hf_model
from triton_helpers import metric, wait_for_metric

MAX_TOKENS = 12
TEXT = "Once upon a time there was a little town by the river."


@pytest.fixture(scope="module")
def tok(llm_server):
    return AutoTokenizer.from_pretrained(llm_server.model_dir)


@pytest.fixture(scope="module")
def client(openai_server):
    return openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(llm_server) -> str:
    return llm_server.model_dir.name  # --served-model-name defaults to the checkpoint folder's name


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def greedy_text(llm_server, tok, ids=None, embeds=None, max_new_tokens=MAX_TOKENS) -> str:
    return decode(tok, hf_greedy(str(llm_server.model_dir), ids=ids, embeds=embeds, max_new_tokens=max_new_tokens))


def torch_save_b64(t: torch.Tensor) -> str:
    """What vLLM's prompt-embeds clients send."""
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode()


def embeddings(llm_server, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(str(llm_server.model_dir)).get_input_embeddings()(torch.tensor(ids))


def blocks_all_free(llm_server) -> bool:
    total = metric(llm_server.metrics_url, "pagedllm_kv_blocks_total")
    return wait_for_metric(llm_server.metrics_url, "pagedllm_kv_blocks_free", total) == total


def finished(llm_server, reason: str) -> float:
    """Requests the model has finished with this finish_reason (`abort`: cancelled), all instances together."""
    text = requests.get(llm_server.metrics_url, timeout=10).text
    pattern = rf'^pagedllm_request_success_total\{{[^}}]*finish_reason="{reason}"[^}}]*\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}


# ------------------------------------------------------------------------------------------ parity
def test_models_lists_the_served_model(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]


def test_text_prompt_equals_transformers(client, model_name, llm_server, tok):
    r = client.completions.create(model=model_name, prompt=TEXT, **GREEDY)
    assert r.choices[0].text == greedy_text(llm_server, tok, ids=tok(TEXT)["input_ids"])
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok(TEXT)["input_ids"])
    assert r.usage.completion_tokens == MAX_TOKENS and r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS


def test_token_id_prompts_and_several_prompts(client, model_name, llm_server, tok):
    ids = [tok(TEXT)["input_ids"], tok("The river")["input_ids"]]
    r = client.completions.create(model=model_name, prompt=ids, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, ids):
        assert c.text == greedy_text(llm_server, tok, ids=p)
    assert r.usage.prompt_tokens == sum(map(len, ids))
    single = client.completions.create(model=model_name, prompt=ids[0], **GREEDY)
    assert single.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_seeds_torch_save_prompt_embeds(client, model_name, llm_server, tok, dtype):
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a story"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    t = embeddings(llm_server, ids).to(dtype)
    r = client.completions.create(model=model_name, prompt="", extra_body={"prompt_embeds": torch_save_b64(t)},
                                  **GREEDY)
    assert len(r.choices) == 1  # the empty prompt beside prompt_embeds adds no choice
    assert r.choices[0].text == greedy_text(llm_server, tok, embeds=t.to(torch.float16))
    assert r.usage.prompt_tokens == len(ids)


def test_a_batch_of_three_embeds_and_a_mixed_request(client, model_name, llm_server, tok):
    prompts = ["The quick brown fox", "A river", "Hello there, friend"]
    tensors = [embeddings(llm_server, tok(p)["input_ids"]) for p in prompts]
    want = [greedy_text(llm_server, tok, embeds=t.to(torch.float16)) for t in tensors]
    r = client.completions.create(model=model_name, prompt="",
                                  extra_body={"prompt_embeds": [torch_save_b64(t) for t in tensors]}, **GREEDY)
    assert [c.text for c in r.choices] == want and [c.index for c in r.choices] == [0, 1, 2]
    mixed = client.completions.create(model=model_name, prompt=TEXT,
                                      extra_body={"prompt_embeds": torch_save_b64(tensors[0])}, **GREEDY)
    assert [c.text for c in mixed.choices] == [want[0], greedy_text(llm_server, tok, ids=tok(TEXT)["input_ids"])]


def test_chat_equals_generate_on_the_chat_template(client, model_name, llm_server, tok):
    messages = [{"role": "user", "content": "Where does the river go?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(llm_server, tok, ids=ids)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == MAX_TOKENS


def test_streamed_text_equals_the_whole_text_and_usage_comes_last(client, model_name):
    whole = client.completions.create(model=model_name, prompt=TEXT, **GREEDY)
    chunks = list(client.completions.create(model=model_name, prompt=TEXT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage == whole.usage

    messages = [{"role": "user", "content": "Hi"}]
    chat_whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS,
                                                temperature=0)
    chat_chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole.choices[0].message.content


def test_32_concurrent_async_requests(openai_server, model_name, llm_server, tok):
    prompts = [f"Story number {i}: once upon a time" for i in range(32)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{openai_server.url}/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(aclient.completions.create(model=model_name, prompt=p, **GREEDY)
                                          for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    for p, r in zip(prompts, results):
        assert r.choices[0].text == greedy_text(llm_server, tok, ids=tok(p)["input_ids"]), p
    assert blocks_all_free(llm_server)


def test_sampling_options_n_seed_echo_and_logprobs(client, model_name, llm_server, tok):
    r = client.completions.create(model=model_name, prompt=TEXT, n=3, seed=7, temperature=1.0, max_tokens=8)
    again = client.completions.create(model=model_name, prompt=TEXT, n=3, seed=7, temperature=1.0, max_tokens=8)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) > 1  # derived seeds: the n choices differ
    assert r.usage.prompt_tokens == len(tok(TEXT)["input_ids"])  # the prompt counted once for its n choices

    echo = client.completions.create(model=model_name, prompt=TEXT, echo=True, logprobs=0, **GREEDY)
    plain = client.completions.create(model=model_name, prompt=TEXT, **GREEDY)
    assert echo.choices[0].text == TEXT + plain.choices[0].text
    lp = echo.choices[0].logprobs
    assert len(lp.token_logprobs) == MAX_TOKENS and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                          logprobs=True, **GREEDY)
    assert len(chat.choices[0].logprobs.content) == MAX_TOKENS

    stopped = client.completions.create(model=model_name, prompt=TEXT, stop=[plain.choices[0].text[3:6]],
                                        **GREEDY)
    assert stopped.choices[0].text == plain.choices[0].text[:3] and stopped.choices[0].finish_reason == "stop"
    extra = client.completions.create(model=model_name, prompt=TEXT, extra_body={
        "top_k": 1, "min_tokens": 2, "repetition_penalty": 1.0, "ignore_eos": True, "stop_token_ids": [],
        "include_stop_str_in_output": False}, **GREEDY)
    assert extra.choices[0].text == plain.choices[0].text


def test_streamed_echo_and_logprobs_offsets_equal_the_whole_answers(client, model_name):
    """text_offset counts from the start of the choice's text, the echoed prompt included, streamed or not."""
    whole = client.completions.create(model=model_name, prompt=TEXT, echo=True, logprobs=0, **GREEDY)
    chunks = list(client.completions.create(model=model_name, prompt=TEXT, echo=True, logprobs=0, stream=True,
                                            **GREEDY))
    assert chunks[0].choices[0].logprobs.text_offset[0] == len(TEXT)
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


# ------------------------------------------------------------------------------------------ errors
def status_and_message(fn) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)


@pytest.mark.parametrize("kwargs, status, words", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": "x", "extra_body": {"min_p": 0.1}}, 400, "min_p"),
    ({"prompt": "x", "logit_bias": {"5": 3}}, 400, "logit_bias"),
    ({"prompt": "x", "n": 1000}, 400, "n"),
    # integers beyond the model's input dtypes, which would wrap (2**32 + 16 -> 16) or fail to convert
    ({"prompt": "x", "max_tokens": 2**32 + 16}, 400, "max_tokens"),
    ({"prompt": "x", "extra_body": {"top_k": 2**32 + 1}}, 400, "top_k"),
    ({"prompt": "x", "extra_body": {"min_tokens": 2**32}}, 400, "min_tokens"),
    ({"prompt": "x", "extra_body": {"stop_token_ids": [2**64 + 1]}}, 400, "stop_token_ids"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),
    ({"prompt": [[1, 2], [3, 2**63]]}, 400, "prompt[1]: token id 9223372036854775808"),
    ({"prompt": [3, 2**64 + 5]}, 400, "prompt: token id"),
    # a prompt and max_tokens beyond the model length (512): refused as vLLM does, not answered short
    ({"prompt": [5] * 500, "max_tokens": 20}, 400, "max_tokens: 20 after the 500 tokens of prompt is more than"),
    ({"prompt": [[5, 6], [5] * 600]}, 400, "prompt[1]: the prompt has 600 tokens"),
    ({"prompt": "river " * 100000}, 400, "prompt: 600000 characters cannot fit"),
])
def test_bad_requests_get_400_naming_the_field(client, model_name, kwargs, status, words, llm_server):
    kwargs = {"model": model_name, "max_tokens": 4, **kwargs}
    got, message = status_and_message(lambda: client.completions.create(**kwargs))
    assert got == status and words in message, message
    assert blocks_all_free(llm_server)


def test_a_stream_refused_before_its_first_token_gets_its_http_status(client, model_name, llm_server, tok):
    """As vLLM does, so that clients and load balancers see it: not a 200 with an error event inside (the
    chat's role delta first). The openai package raises BadRequestError."""
    too_long = [5] * (hf_model(str(llm_server.model_dir)).config.max_position_embeddings + 10)
    for prompt in (too_long, [tok(TEXT)["input_ids"], too_long]):  # alone, or beside a prompt that is fine
        with pytest.raises(openai.BadRequestError, match="model length"):
            for _ in client.completions.create(model=model_name, prompt=prompt, max_tokens=4, stream=True):
                pass
    with pytest.raises(openai.BadRequestError, match="model length"):
        for _ in client.chat.completions.create(model=model_name, max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "river " * 600}]):
            pass
    assert blocks_all_free(llm_server)
    chunks = list(client.completions.create(model=model_name, prompt=TEXT, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == greedy_text(llm_server, tok, ids=tok(TEXT)["input_ids"])


def test_a_chat_too_long_is_refused_naming_messages(client, model_name):
    for messages, max_tokens, words in (
            ([{"role": "user", "content": "river " * 600}], 4, "messages: the prompt has"),
            ([{"role": "user", "content": "river"}], 511, "max_tokens: 511 after the"),
            ([{"role": "user", "content": "river " * 100000}], 4, "messages: 600000 characters cannot fit")):
        got, message = status_and_message(lambda: client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=max_tokens))
        assert got == 400 and words in message, message


def test_the_model_gone_from_triton_is_a_503_not_the_requests_fault():
    """While the server stops, Triton answers for the unloaded llm model itself ("unknown model"): the front
    end, which only ever asks for llm, makes that the 503 a retrying client or a load balancer expects."""
    from pagedllm_client import PagedLLMError

    from pagedllm.openai_api.service import api_error

    gone = api_error(PagedLLMError("Request for unknown model: 'llm' has no available versions", None))
    assert gone.status == 503 and "not available" in gone.message
    assert api_error(PagedLLMError("prompt: the prompt is empty", None)).status == 400


def test_a_client_gone_before_the_first_token_cancels_the_stream():
    """While a stream waits for its first token (queued behind others), the client leaving cancels it."""
    from pagedllm_client import GenerateOptions

    from pagedllm.openai_api.prompts import Generation, Prompt
    from pagedllm.openai_api.service import APIError, Runner

    closed = []

    class Silent:  # a request that has not been scheduled yet
        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(3600)

        def close(self):
            closed.append(True)

    class Client:
        def generate_stream(self, **kwargs):
            return Silent()

    async def run():
        gone = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        gens = [Generation(i, Prompt(text="x"), GenerateOptions()) for i in range(2)]
        await Runner(Client()).open_stream(gens, gone)

    with pytest.raises(APIError) as e:
        asyncio.run(run())
    assert e.value.status == 499 and closed == [True, True]


@pytest.mark.parametrize("field, value", [("max_completion_tokens", 2**32 + 16), ("max_tokens", 2**31),
                                          ("top_k", 2**32 + 1), ("min_tokens", -1)])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_integers_out_of_range_get_400(client, model_name, field, value, stream):
    got, message = status_and_message(lambda: client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], stream=stream, extra_body={field: value}))
    assert got == 400 and message.startswith(field), message


def test_a_value_the_models_inputs_cannot_hold_is_a_400_whole_or_streamed():
    """Whatever gets past the bounds and still cannot become the model's input tensors (numpy raises
    OverflowError or ValueError) is the request's fault: a 400, not a 500 or a stream cut short."""
    from pagedllm_client import GenerateOptions

    from pagedllm.openai_api.prompts import Generation, Prompt
    from pagedllm.openai_api.service import APIError, Runner

    class Client:
        def generate_stream(self, **kwargs):
            raise OverflowError("Python integer 4294967312 out of bounds for int32")

        async def generate(self, **kwargs):  # the non-streamed path: one whole response
            raise OverflowError("Python integer 4294967312 out of bounds for int32")

    async def run(stream: bool):
        runner, never = Runner(Client()), asyncio.get_running_loop().create_future()
        gens = [Generation(0, Prompt(text="x"), GenerateOptions(max_tokens=2**32 + 16))]
        if stream:
            return [item async for item in runner.stream(gens)]
        return await runner.collect(gens, never)

    for stream in (False, True):
        with pytest.raises(APIError) as e:
            asyncio.run(run(stream))
        assert e.value.status == 400 and "out of bounds" in e.value.message


def test_a_failing_choice_cancels_the_other_choices(client, model_name, llm_server, tok):
    """One prompt of several is refused by the model: the request gets its 400, and the generation of the other
    prompt is cancelled rather than left running to its end for nobody."""
    length, aborted = finished(llm_server, "length"), finished(llm_server, "abort")
    vocab = hf_model(str(llm_server.model_dir)).config.vocab_size
    got, message = status_and_message(lambda: client.completions.create(
        model=model_name, prompt=[tok(TEXT)["input_ids"], [vocab + 7]], max_tokens=480, temperature=0,
        extra_body={"ignore_eos": True}))
    assert got == 400 and "vocabulary" in message, message
    # Left running, it would end by length within a second; cancelled, it ends as an abort (or, cancelled
    # before the model took it, never shows at all).
    deadline = time.monotonic() + 10
    while finished(llm_server, "length") + finished(llm_server, "abort") == length + aborted \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert finished(llm_server, "length") == length
    assert metric(llm_server.metrics_url, "pagedllm_num_requests_running") == 0 and blocks_all_free(llm_server)


ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_a_chat_the_template_refuses_gets_400_saying_why(llm_server, tmp_path):
    """A checkpoint whose chat template calls raise_exception (roles must alternate, as Llama 2's and Mistral's
    do): that is the request's fault, a 400 with the template's words, whole or streamed."""
    import json
    import shutil

    from server_utils import start_openai

    model = tmp_path / "alternating"
    shutil.copytree(llm_server.model_dir, model)
    (model / "chat_template.jinja").write_text(ALTERNATING_TEMPLATE)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ALTERNATING_TEMPLATE}))

    with start_openai(llm_server, tmp_path / "openai.log", model_dir=str(model)) as frontend:
        chat = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0).chat.completions
        twice = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}]
        for stream in (False, True):
            got, message = status_and_message(lambda: chat.create(model=model.name, messages=twice, stream=stream,
                                                                   max_tokens=2))
            assert got == 400 and message.startswith("messages:") and "must alternate" in message, message
        ok = chat.create(model=model.name, messages=twice[:1], max_tokens=2)
        assert ok.choices[0].finish_reason


def zip_with_data_pkl(pkl: bytes) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


class _CreatesAFile:
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_payloads(tmp_path, hidden: int) -> dict[str, tuple[str, str]]:
    import pickle
    import zipfile

    _CreatesAFile.path = str(tmp_path / "pwned")
    evil = base64.b64encode(zip_with_data_pkl(pickle.dumps(_CreatesAFile(), protocol=2))).decode()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (50 << 20))
    return {
        "a pickle that would create a file": (evil, "not allowed"),
        "a sparse tensor": (torch_save_b64(torch.eye(3, hidden).to_sparse()), "sparse"),
        "a dict of tensors": (torch_save_b64({"x": torch.zeros(2, hidden)}), "dict"),
        "the wrong hidden size": (torch_save_b64(torch.zeros(3, hidden // 2)), f"[seq_len, {hidden}]"),
        "not base64": ("this is not base64!!", "base64"),
        "a zip bomb": (base64.b64encode(bomb.getvalue()).decode(), "more than the whole"),
    }


def test_hostile_prompt_embeds_are_refused_and_harm_nothing(client, model_name, llm_server, tmp_path, tok):
    hidden = hf_model(str(llm_server.model_dir)).config.hidden_size
    for what, (payload, words) in hostile_payloads(tmp_path, hidden).items():
        got, message = status_and_message(lambda: client.completions.create(
            model=model_name, prompt="", extra_body={"prompt_embeds": payload}, max_tokens=4))
        assert got == 400 and "prompt_embeds" in message and words in message, (what, message)
    assert not (tmp_path / "pwned").exists()
    assert blocks_all_free(llm_server)
    r = client.completions.create(model=model_name, prompt=TEXT, **GREEDY)  # the server is unharmed
    assert r.choices[0].text == greedy_text(llm_server, tok, ids=tok(TEXT)["input_ids"])


def test_an_oversized_body_is_refused_before_it_is_read(openai_server):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", openai_server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 << 30))  # 10 GiB announced; not one byte of it is sent
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_a_body_without_a_length_gets_411_as_an_invalid_request(openai_server):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", openai_server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "x"}']),  # an iterator: sent chunked
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    error = json.loads(r.read())["error"]
    assert r.status == 411 and error["type"] == "invalid_request_error" and "Content-Length" in error["message"]
    conn.close()


def test_an_oversized_payload_in_a_small_body_is_refused_by_length(client, model_name, llm_server):
    rows = hf_model(str(llm_server.model_dir)).config.max_position_embeddings + 1
    payload = torch_save_b64(torch.zeros(rows, hf_model(str(llm_server.model_dir)).config.hidden_size))
    got, message = status_and_message(lambda: client.completions.create(
        model=model_name, prompt="", extra_body={"prompt_embeds": payload}, max_tokens=4))
    assert got == 400 and "prompt_embeds" in message and "limit" in message, message


def test_the_default_body_limit_fits_one_fp16_payload_of_the_served_length(tiny_llama_dir):
    """Sized from the served model length (not max_position_embeddings, not fp32), and capped: Starlette reads
    and parses a whole body on the event loop."""
    from pagedllm.openai_api.prompts import ModelFacts
    from pagedllm.openai_api.server import default_max_request_bytes, model_facts

    fp16_base64 = 8192 * 4096 * 2 * 4 / 3
    served_8k = default_max_request_bytes(ModelFacts(hidden_size=4096, max_rows=8192, tokenizer=None))
    assert fp16_base64 < served_8k < fp16_base64 + (2 << 20)
    llama_31_8b = ModelFacts(hidden_size=4096, max_rows=131072, tokenizer=None)  # 5.3 GiB before
    assert default_max_request_bytes(llama_31_8b) == 256 << 20
    assert default_max_request_bytes(ModelFacts(hidden_size=64, max_rows=512, tokenizer=None)) == 16 << 20

    assert model_facts(tiny_llama_dir).max_rows == 512  # the checkpoint's max_position_embeddings
    assert model_facts(tiny_llama_dir, max_model_len=100).max_rows == 100


def test_api_key(llm_server, tmp_path, model_name):
    from server_utils import start_openai

    with start_openai(llm_server, tmp_path / "openai.log", api_key="s3cret") as frontend:
        for key in (None, "wrong"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = requests.post(f"{frontend.url}/v1/completions", json={"model": model_name, "prompt": "x"},
                              headers=headers, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert requests.get(f"{frontend.url}/v1/models", timeout=30).status_code == 401
        ok = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=model_name, prompt="x", max_tokens=2).choices[0].finish_reason


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_front_end_dies_with_the_process_that_started_it(tiny_llama_dir, tmp_path):
    """Its parent killed (SIGKILL: no stop), the front end gets SIGTERM and exits; started with a parent pid
    that is not its parent's (that parent died before the child could ask for the signal), it exits at once."""
    import subprocess
    import sys

    from server_utils import cli_env, free_ports

    starter = ("import sys, time\n"
               "from pagedllm.server.frontend import OpenAIFrontend\n"
               "f = OpenAIFrontend(triton_grpc_url='127.0.0.1:1', model_dir=sys.argv[1], port=int(sys.argv[2]))\n"
               "print(f.start().wait_ready(healthy=False).process.pid, flush=True)\n"
               "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter, str(tiny_llama_dir), str(free_ports(1)[0])],
                              stdout=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 15
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)

    orphan = subprocess.run(
        [sys.executable, "-m", "pagedllm.openai_api.server", "--model-dir", str(tiny_llama_dir), "--port",
         str(free_ports(1)[0])], capture_output=True, text=True, timeout=60,
        env={**cli_env(tmp_path), "PAGEDLLM_PARENT_PID": "1"})
    assert orphan.returncode == 1 and "is gone" in orphan.stderr, orphan.stderr


def test_503_while_tritonserver_is_not_there(llm_server, tmp_path, model_name):
    from server_utils import free_ports, start_openai

    dead = f"127.0.0.1:{free_ports(1)[0]}"
    with start_openai(llm_server, tmp_path / "openai.log", triton_grpc_url=dead) as frontend:
        frontend.wait_ready(healthy=False)
        assert requests.get(f"{frontend.url}/health", timeout=30).status_code == 503
        for stream in (False, True):
            r = requests.post(f"{frontend.url}/v1/completions", json={"model": model_name, "prompt": "x",
                                                                       "stream": stream}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["message"]


def test_disconnecting_mid_stream_frees_the_blocks(openai_server, model_name, llm_server):
    total = metric(llm_server.metrics_url, "pagedllm_kv_blocks_total")
    with requests.post(f"{openai_server.url}/v1/completions", stream=True, timeout=60, json={
            "model": model_name, "prompt": TEXT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))
        assert metric(llm_server.metrics_url, "pagedllm_kv_blocks_free") < total  # it holds blocks now
    # the connection is closed: the front end cancels the Triton request, which frees its blocks
    assert wait_for_metric(llm_server.metrics_url, "pagedllm_kv_blocks_free", total, timeout=15) == total
    assert metric(llm_server.metrics_url, "pagedllm_num_requests_running") == 0


def test_metrics_and_health_on_the_api_port(openai_server):
    assert requests.get(f"{openai_server.url}/health", timeout=30).status_code == 200
    assert "pagedllm_kv_blocks_total" in requests.get(f"{openai_server.url}/metrics", timeout=30).text


def test_numpy_fp16_safetensors_payload(client, model_name, llm_server, tok):
    from safetensors.torch import save

    t = embeddings(llm_server, tok(TEXT)["input_ids"])
    payload = base64.b64encode(save({"embeds": t})).decode()
    r = client.completions.create(model=model_name, prompt="", extra_body={"prompt_embeds": payload}, **GREEDY)
    assert r.choices[0].text == greedy_text(llm_server, tok, embeds=t.to(torch.float16))
    assert np.isfinite(r.usage.prompt_tokens)


def _counts(openai_server) -> tuple[float, float]:
    """(responses the front end read from llm, llm requests Triton finished successfully), from our /metrics."""
    text = requests.get(f"{openai_server.url}/metrics", timeout=10).text
    responses = float(re.search(r"^pagedllm_openai_llm_responses_total (\S+)$", text, re.M).group(1))
    done = sum(float(m.group(1)) for m in re.finditer(
        r'^nv_inference_request_success\{[^}]*model="llm"[^}]*\} (\S+)$', text, re.M))
    return responses, done


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_non_streamed_request_is_one_llm_response_per_choice(client, model_name, openai_server, route):
    """Not streamed, each choice is one Triton request with stream=false, answered by one whole response;
    streamed, a response per step (so the count tells the two paths apart)."""
    ask = dict(model=model_name, max_tokens=8, temperature=0, n=2, extra_body={"ignore_eos": True})
    before = _counts(openai_server)
    if route == "completions":
        out = client.completions.create(prompt="The capital of France is", logprobs=0, **ask)
        assert all(len(c.logprobs.tokens) == 8 for c in out.choices)
    else:
        out = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], logprobs=True, **ask)
        assert all(len(c.logprobs.content) == 8 for c in out.choices)
    assert out.usage.completion_tokens == 16
    after = _counts(openai_server)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)

    streamed = client.completions.create(prompt="The capital of France is", stream=True, **ask)
    assert sum(1 for _ in streamed) > 2
    assert _counts(openai_server)[0] - after[0] > 2
