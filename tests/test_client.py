"""pagedllm_client against a real tritonserver (the `llm_server` fixture of conftest.py: started once, fails
rather than skips when it cannot start): gRPC and HTTP, whole and streamed, text / ids / embeddings, every
generate option, logprobs, errors, cancellation freeing KV blocks, the asyncio client, and the
`pagedllm-client` CLI in a subprocess."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pagedllm_client import AsyncClient, Client, GenerateOptions, PagedLLMError, Result
from pagedllm_client.request import build_inputs
from triton_helpers import stream_one

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("grpc", "http")
TEXT = "Once upon a time there was a little town by the river."
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


# ------------------------------------------------------------------------------------------------ helpers
def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def metric(server, name: str) -> float:
    """Sum of a metric's samples on the server's /metrics page."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        page = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, f"metric {name} not on {server.metrics_url}"
    return sum(values)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def blocks_all_free(server) -> bool:
    return metric(server, "pagedllm_kv_blocks_free") == metric(server, "pagedllm_kv_blocks_total")


def embedding_rows(model_dir: Path, ids: list[int]) -> np.ndarray:
    from safetensors.numpy import load_file

    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    return weights["model.embed_tokens.weight"][ids].astype(np.float32)


def check_stream(chunks, expected: Result) -> None:
    """Streamed chunks add up to the whole result: same tokens, same text, finish only on the last."""
    assert chunks, "no chunks"
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == expected.finish_reason
    assert chunks[-1].num_output_tokens == expected.num_output_tokens


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prompt_ids(llm_server) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llm_server.model_dir))(TEXT)["input_ids"]


@pytest.fixture(scope="module")
def reference(llm_server, prompt_ids) -> Result:
    """Greedy whole result for TEXT's token ids over gRPC: every other way of asking must match it."""
    with Client(llm_server.grpc_url, "grpc") as c:
        r = c.generate(input_ids=prompt_ids, **GREEDY)
    assert len(r.token_ids) == GREEDY["max_tokens"] == r.num_output_tokens
    assert r.num_input_tokens == len(prompt_ids)
    assert r.finish_reason == "length"
    assert r.text
    return r


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, llm_server):
    with Client(url_of(llm_server, request.param), request.param) as c:
        yield c


# ------------------------------------------------------------------------------- generate, both protocols
@pytest.mark.parametrize("kind", ["text", "ids", "embeds", "positional"])
def test_greedy_whole_and_stream_agree(client, kind, llm_server, prompt_ids, reference):
    prompt = {"text": {"text": TEXT}, "ids": {"input_ids": np.array(prompt_ids)},
              "embeds": {"prompt_embeds": embedding_rows(llm_server.model_dir, prompt_ids)},
              "positional": {"prompt": prompt_ids}}[kind]
    result = client.generate(**prompt, **GREEDY)
    assert result == reference
    chunks = list(client.generate(**prompt, **GREEDY, stream=True))
    assert len(chunks) > 1
    check_stream(chunks, reference)


def test_embeddings_as_torch_tensor(client, llm_server, prompt_ids, reference):
    import torch

    # FP16 values: exactly what the gRPC path sends for the numpy FP32 rows, which gave the reference.
    embeds = torch.from_numpy(embedding_rows(llm_server.model_dir, prompt_ids)).to(torch.float16)
    assert client.generate(embeds, **GREEDY) == reference


@pytest.mark.parametrize("encoding", ["fp16", "fp32", "base64"])
def test_every_embeddings_encoding(client, encoding, llm_server, prompt_ids, reference):
    embeds = embedding_rows(llm_server.model_dir, prompt_ids)
    with Client(client.url, client.protocol, embeds_encoding=encoding) as c:
        if client.protocol == "http" and encoding == "fp16":
            with pytest.raises(PagedLLMError):  # Triton's JSON has no FP16
                c.generate(embeds, **GREEDY)
            return
        assert c.generate(embeds, **GREEDY) == reference
        check_stream(list(c.generate(embeds, **GREEDY, stream=True)), reference)


def test_sampling_options_reach_the_server(client, prompt_ids):
    sampled = dict(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = client.generate(input_ids=prompt_ids, **sampled)
    b = client.generate(input_ids=prompt_ids, **sampled)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8  # same seed, same tokens
    # A stop token ends generation at its first occurrence.
    stop = a.token_ids[2]
    s = client.generate(input_ids=prompt_ids, **sampled, stop_token_ids=[stop])
    assert s.finish_reason == "stop"
    assert s.token_ids == a.token_ids[:a.token_ids.index(stop) + 1]


def direct_greedy(grpc_url: str, prompt_ids: list[int], **tensors) -> list[int]:
    """GREEDY's token ids for the same inputs sent as hand-made tensors, not through the client."""
    values = {"input_ids": np.array(prompt_ids, np.int64), "max_tokens": np.array([GREEDY["max_tokens"]], np.int32),
              "temperature": np.array([0.0], np.float32), "ignore_eos": np.array([True]), **tensors}
    res = stream_one(grpc_url, values)
    assert res.error is None, res.error
    return res.token_ids


PENALTIES = {"repetition_penalty": 1.5, "presence_penalty": 1.5, "frequency_penalty": 1.5}


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
def test_penalties_reach_the_server(client, penalty, llm_server, prompt_ids, reference):
    value = PENALTIES[penalty]
    direct = direct_greedy(llm_server.grpc_url, prompt_ids, **{penalty: np.array([value], np.float32)})
    assert direct != reference.token_ids, "the penalty changes nothing here: the test would prove nothing"
    assert client.generate(input_ids=prompt_ids, **GREEDY, **{penalty: value}).token_ids == direct
    chunks = list(client.generate(input_ids=prompt_ids, **GREEDY, **{penalty: value}, stream=True))
    assert [t for c in chunks for t in c.token_ids] == direct


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_and_include_stop_str_in_output(client, stream, prompt_ids, reference):
    stop = reference.text[6:9]
    assert stop.strip(), f"no usable stop string in {reference.text!r}"
    cut = reference.text.find(stop)

    def text_of(**options) -> tuple[str, str]:
        out = client.generate(input_ids=prompt_ids, **GREEDY, stop=stop, stream=stream, **options)
        if stream:
            chunks = list(out)
            return "".join(c.text for c in chunks), chunks[-1].finish_reason
        return out.text, out.finish_reason

    assert text_of() == (reference.text[:cut], "stop")
    assert text_of(include_stop_str_in_output=False) == (reference.text[:cut], "stop")
    assert text_of(include_stop_str_in_output=True) == (reference.text[:cut + len(stop)], "stop")


def test_logprobs_whole_and_streamed_grpc_and_http(llm_server, prompt_ids, reference):
    options = GenerateOptions(**GREEDY, return_logprobs=True)
    got = {}
    for protocol in PROTOCOLS:
        with Client(url_of(llm_server, protocol), protocol) as c:
            whole = c.generate(input_ids=prompt_ids, options=options)
            assert whole.token_ids == reference.token_ids and reference.logprobs is None
            got[protocol, "whole"] = whole.logprobs
            chunks = list(c.generate(input_ids=prompt_ids, options=options, stream=True))
            assert all(len(ch.logprobs) == len(ch.token_ids) for ch in chunks)
            got[protocol, "stream"] = [x for ch in chunks for x in ch.logprobs]
            plain = list(c.generate(input_ids=prompt_ids, **GREEDY, stream=True))
            assert all(ch.logprobs is None for ch in plain)

        async def asynchronous():
            async with AsyncClient(url_of(llm_server, protocol), protocol) as ac:
                got[protocol, "async whole"] = (await ac.generate(input_ids=prompt_ids, options=options)).logprobs
                got[protocol, "async stream"] = [x async for ch in ac.generate_stream(input_ids=prompt_ids,
                                                                                      options=options)
                                                 for x in ch.logprobs]

        asyncio.run(asynchronous())
    first = got["grpc", "whole"]
    assert len(first) == len(reference.token_ids)
    assert all(math.isfinite(x) and x <= 0 for x in first), first
    for key, logprobs in got.items():
        assert logprobs == first, key


def test_unknown_option_raises_type_error():
    c = Client("127.0.0.1:1")  # nothing is sent: the arguments are checked first
    ac = AsyncClient("127.0.0.1:1", "http")
    calls = {
        "max_token": lambda: c.generate("hi", max_token=3),
        "topp": lambda: c.generate("hi", stream=True, topp=0.5),
        "logprobs": lambda: c.generate_stream("hi", logprobs=True),
        "stream": lambda: asyncio.run(ac.generate("hi", stream=True)),  # AsyncClient streams with generate_stream
        "temp": lambda: ac.generate_stream("hi", temp=0),
    }
    for key, call in calls.items():
        with pytest.raises(TypeError, match=f"argument '{key}'"):
            call()
    c.close()


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("stream", [False, True])
def test_bad_inputs_raise_with_the_input_name(client, stream, prompt_ids):
    cases = [
        ({"input_ids": [1, 600]}, "input_ids", "600"),
        ({"prompt_embeds": np.zeros((3, 48), np.float32)}, "prompt_embeds", ""),
        ({"input_ids": prompt_ids, "temperature": -1.0}, "temperature", ""),
        ({"input_ids": prompt_ids, "max_tokens": 0}, "max_tokens", ""),
    ]
    for kwargs, name, detail in cases:
        with pytest.raises(PagedLLMError) as info:
            out = client.generate(**kwargs, stream=stream)
            if stream:
                list(out)
        message = info.value.message
        assert name in message and detail in message, message
        if client.protocol == "http":
            assert info.value.status == 400
    # The server goes on serving.
    assert client.generate(input_ids=prompt_ids, max_tokens=2).num_output_tokens == 2


def test_client_side_argument_checks():
    with pytest.raises(ValueError, match="exactly one prompt"):
        build_inputs(text="a", input_ids=[1])
    with pytest.raises(ValueError, match="exactly one prompt"):
        build_inputs()
    with pytest.raises(ValueError, match="prompt_embeds"):
        build_inputs(prompt_embeds=np.zeros(4, np.float32))
    fp16 = build_inputs(prompt_embeds=np.ones((2, 3)))
    assert fp16["prompt_embeds"].dtype == np.float16 and fp16["prompt_embeds"].shape == (2, 3)
    fp32 = build_inputs(np.ones((2, 3)), embeds_encoding="fp32")
    assert fp32["prompt_embeds_fp32"].dtype == np.float32 and fp32["prompt_embeds_fp32"].shape == (6,)
    b64 = build_inputs(np.ones((2, 3)), embeds_encoding="base64")["prompt_embeds_base64"]
    assert b64.shape == (1,) and len(b64[0]) == 16  # 12 bytes of FP16
    # No option is sent unless set: the server's defaults apply (written once, in SamplingParams).
    assert set(build_inputs("hi")) == {"text_input", "stream", "exclude_input_in_output"}
    with pytest.raises(ValueError):
        Client("localhost:1", protocol="websocket")


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": 2**32}, "max_tokens: 4294967296 is out of range for int32"),
    ({"seed": -1}, "seed: -1 is out of range for uint64"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids: 9223372036854775808 is out of range for int64"),
    ({"max_tokens": 2.5}, "max_tokens: expected an integer, got float"),
])
def test_an_option_its_tensor_cannot_hold_is_refused_not_wrapped(options, message):
    """numpy would send 2**32 as INT32 0: the client names the option instead."""
    with pytest.raises((ValueError, TypeError), match=message):
        build_inputs("hi", options=GenerateOptions(**options))
    with pytest.raises(ValueError, match="input_ids: 9223372036854775813 is out of range"):
        build_inputs(input_ids=np.array([2**63 + 5], dtype=np.uint64))


def test_unreachable_server_raises(client):
    other = Client("127.0.0.1:1", client.protocol)
    with pytest.raises(PagedLLMError) as info:
        other.generate(input_ids=[1, 2], max_tokens=1, timeout=10)
    assert info.value.status == "UNAVAILABLE"
    other.close()


# ---------------------------------------------------------------------------- cancellation frees KV blocks
@pytest.mark.parametrize("how", ["break", "close", "with"])
def test_leaving_a_stream_cancels_it(client, llm_server, how):
    # A long request (most of the model length) that is left after two chunks. 40 prompt tokens use 3 blocks.
    max_tokens = 400
    assert wait_for(lambda: blocks_all_free(llm_server)), "KV blocks in use before the test"
    generated_before = metric(llm_server, "pagedllm_generation_tokens_total")
    total = metric(llm_server, "pagedllm_kv_blocks_total")
    kwargs = dict(input_ids=list(range(10, 50)), max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                  stream=True)

    def consume(chunks) -> None:
        for i, chunk in enumerate(chunks):
            assert chunk.finish_reason is None
            if i == 1:
                assert wait_for(lambda: metric(llm_server, "pagedllm_kv_blocks_free") < total, 2.0)
                return

    if how == "break":
        for i, _ in enumerate(client.generate(**kwargs)):  # nothing keeps the iterator alive after the loop
            if i == 1:
                assert wait_for(lambda: metric(llm_server, "pagedllm_kv_blocks_free") < total, 2.0)
                break
    elif how == "close":
        chunks = client.generate(**kwargs)
        consume(chunks)
        chunks.close()
        assert list(chunks) == []
    else:
        with client.generate(**kwargs) as chunks:
            consume(chunks)

    assert wait_for(lambda: blocks_all_free(llm_server), 5.0), "KV blocks not freed after leaving the stream"
    assert wait_for(lambda: metric(llm_server, "pagedllm_num_requests_running") == 0, 5.0)
    generated = metric(llm_server, "pagedllm_generation_tokens_total") - generated_before
    assert generated < max_tokens, f"the request ran to the end ({generated} tokens): it was not cancelled"


# ------------------------------------------------------------------------------------------- AsyncClient
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client(protocol, llm_server, prompt_ids, reference):
    async def main():
        async with AsyncClient(url_of(llm_server, protocol), protocol) as ac:
            whole, text_whole = await asyncio.gather(ac.generate(input_ids=prompt_ids, **GREEDY),
                                                     ac.generate(text=TEXT, **GREEDY))
            assert whole == reference and text_whole == reference
            embeds = embedding_rows(llm_server.model_dir, prompt_ids)
            chunks = [c async for c in ac.generate_stream(prompt_embeds=embeds, **GREEDY)]
            check_stream(chunks, reference)
            with pytest.raises(PagedLLMError, match="input_ids"):
                await ac.generate(input_ids=[1, 600])
            with pytest.raises(PagedLLMError, match="input_ids"):
                async for _ in ac.generate_stream(input_ids=[1, 600]):
                    pass
            # Leaving an async stream early (a `with` block's end, or a bare break) cancels the request.
            long = dict(input_ids=list(range(10, 50)), max_tokens=400, temperature=0.0, ignore_eos=True)
            for how in ("with", "break"):
                before = await asyncio.to_thread(metric, llm_server, "pagedllm_generation_tokens_total")
                if how == "with":
                    async with ac.generate_stream(**long) as stream:
                        async for _ in stream:
                            break
                else:
                    async for _ in ac.generate_stream(**long):
                        break
                assert await asyncio.to_thread(wait_for, lambda: blocks_all_free(llm_server), 5.0), how
                generated = await asyncio.to_thread(metric, llm_server, "pagedllm_generation_tokens_total")
                assert generated - before < 400, how

    asyncio.run(main())


# -------------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT / "client"), str(ROOT / "backend"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}
    return subprocess.run([sys.executable, "-m", "pagedllm_client", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


GREEDY_FLAGS = ("--max-tokens", "12", "--temperature", "0", "--ignore-eos")


def test_cli_generate_text_stream_json(llm_server, reference):
    p = run_cli("generate", "--url", llm_server.grpc_url, "--text", TEXT, *GREEDY_FLAGS, "--json")
    assert p.returncode == 0, p.stderr
    chunks = json_lines(p.stdout)
    assert len(chunks) > 1
    assert [t for c in chunks for t in c["token_ids"]] == reference.token_ids
    assert "".join(c["text"] for c in chunks) == reference.text
    assert chunks[-1]["finish_reason"] == "length" and chunks[0]["finish_reason"] is None


def test_cli_generate_plain_text_output(llm_server, reference):
    p = run_cli("generate", "--protocol", "http", "--url", llm_server.http_url, "--text", TEXT, *GREEDY_FLAGS)
    assert p.returncode == 0, p.stderr
    assert p.stdout == reference.text + "\n"


def test_cli_generate_embed_with(llm_server, reference):
    p = run_cli("generate", "--protocol", "http", "--url", llm_server.http_url, "--text", TEXT,
                "--embed-with", str(llm_server.model_dir), *GREEDY_FLAGS, "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    (result,) = json_lines(p.stdout)
    assert result["token_ids"] == reference.token_ids
    assert result["num_input_tokens"] == reference.num_input_tokens


def test_cli_generate_embed_with_chat(llm_server, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm_server.model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with Client(llm_server.grpc_url) as c:
        expected = c.generate(input_ids=ids, **GREEDY)
    p = run_cli("generate", "--url", llm_server.grpc_url, "--text", "Hello", "--embed-with",
                str(llm_server.model_dir), "--chat", *GREEDY_FLAGS, "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    assert json_lines(p.stdout)[0]["token_ids"] == expected.token_ids
    # The same embeddings from a file.
    np.save(tmp_path / "e.npy", embedding_rows(llm_server.model_dir, ids))
    p = run_cli("generate", "--url", llm_server.grpc_url, "--embeds", str(tmp_path / "e.npy"), *GREEDY_FLAGS,
                "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    assert json_lines(p.stdout)[0]["token_ids"] == expected.token_ids


def test_cli_generate_every_option(llm_server, prompt_ids, reference):
    stop = reference.text[6:9]
    options = dict(GREEDY, stop=[stop], include_stop_str_in_output=True, repetition_penalty=1.5,
                   presence_penalty=0.5, frequency_penalty=0.25, return_logprobs=True)
    with Client(llm_server.grpc_url) as c:
        expected = c.generate(input_ids=prompt_ids, **options)
    p = run_cli("generate", "--protocol", "http", "--url", llm_server.http_url,
                "--ids", ",".join(map(str, prompt_ids)), *GREEDY_FLAGS, "--stop", stop, "--stop", "never seen",
                "--include-stop-str-in-output", "--repetition-penalty", "1.5", "--presence-penalty", "0.5",
                "--frequency-penalty", "0.25", "--logprobs", "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    (result,) = json_lines(p.stdout)
    assert result == expected.to_dict()
    assert result["finish_reason"] == "stop" and result["text"].endswith(stop)
    p = run_cli("generate", "--url", llm_server.grpc_url, "--text", TEXT, "--logprobs")
    assert p.returncode == 2 and "--logprobs needs --json" in p.stderr


def test_cli_generate_error(llm_server):
    p = run_cli("generate", "--url", llm_server.grpc_url, "--ids", "1,600")
    assert p.returncode == 1
    assert "input_ids" in p.stderr and "600" in p.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_bench_json(llm_server, protocol):
    p = run_cli("bench", "--protocol", protocol, "--url", url_of(llm_server, protocol), "--requests", "4",
                "--concurrency", "2", "--max-tokens", "8", "--prompt-len", "16", "--json")
    assert p.returncode == 0, p.stderr
    (summary,) = json_lines(p.stdout)
    assert summary["completed"] == 4 and summary["errors"] == 0
    assert summary["output_tokens"] == 4 * 8  # --ignore-eos is the bench default
    assert summary["requests_per_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p90"] <= summary["ttft_ms"]["p99"]
    assert 0 < summary["itl_ms"]["p50"] <= summary["itl_ms"]["p90"]
