"""Stop strings: the text ends before the first one, pieces never leak part of one, and the engine stops."""
from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.stop_strings import StopStringFilter
from triton_helpers import stream_one


def feed_all(f: StopStringFilter, pieces: list[str]) -> tuple[list[str], bool]:
    sent = []
    for k, p in enumerate(pieces):
        out, hit = f.feed(p, finished=k == len(pieces) - 1)
        sent.append(out)
        if hit:
            return sent, True
    return sent, False


def test_text_is_cut_before_the_first_stop_string():
    sent, hit = feed_all(StopStringFilter(["END", "\n\n"]), ["Hello wor", "ld E", "ND and more"])
    assert hit and "".join(sent) == "Hello world "


def test_stop_string_kept_when_asked():
    sent, hit = feed_all(StopStringFilter(["END"], include_stop_str_in_output=True), ["abc E", "ND!"])
    assert hit and "".join(sent) == "abc END"


def test_a_possible_start_of_a_stop_string_is_held_back_then_released():
    f = StopStringFilter(["STOP"])
    assert f.feed("go ST", finished=False) == ("go ", False)  # "ST" might begin "STOP"
    assert f.feed("ay S", finished=False) == ("STay ", False)  # it did not; the new "S" might
    assert f.feed("", finished=True) == ("S", False)


def test_the_earliest_of_several_stop_strings_wins():
    sent, hit = feed_all(StopStringFilter(["zz", "b"]), ["a b c zz"])
    assert hit and "".join(sent) == "a "


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(model=str(tiny_llama_dir), num_kv_blocks=64)


def test_engine_stops_at_a_stop_string(llm):
    prompt = "Once upon a time"
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    (full,) = llm.generate(prompt, params)
    text = full.outputs[0].text
    stop = text[5:8]  # three characters from the middle of the greedy text
    assert stop and text.find(stop) == 5
    (cut,) = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))
    assert cut.outputs[0].text == text[:5]
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids[:len(cut.outputs[0].token_ids)]
    assert len(cut.outputs[0].token_ids) < 24
    (kept,) = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True))
    assert kept.outputs[0].text == text[:8]


def test_server_stop_strings_streamed_and_whole(llm_server, llm):
    prompt = "Once upon a time"
    (full,) = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    stop = full.outputs[0].text[6:9]
    values = {"text_input": np.array([prompt]), "max_tokens": np.array([24], np.int32),
              "temperature": np.array([0.0], np.float32), "ignore_eos": np.array([True]),
              "exclude_input_in_output": np.array([True])}
    whole = stream_one(llm_server.grpc_url, {**values, "stop": np.array([stop.encode()], dtype=np.object_)})
    streamed = stream_one(llm_server.grpc_url, {**values, "stream": np.array([True]),
                                                "sampling_parameters": np.array([f'{{"stop": ["{stop}"]}}'])})
    assert whole.error is None and streamed.error is None
    assert whole.text == streamed.text == full.outputs[0].text[:full.outputs[0].text.find(stop)]
    assert whole.finish_reason == streamed.finish_reason == "stop"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_passes_stop_strings(llm_server, llm, protocol):
    from pagedllm_client import Client

    (full,) = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    stop = full.outputs[0].text[6:9]
    url = llm_server.grpc_url if protocol == "grpc" else llm_server.http_url
    with Client(url, protocol) as c:
        r = c.generate("Once upon a time", max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
        chunks = list(c.generate("Once upon a time", max_tokens=24, temperature=0, ignore_eos=True, stop=stop,
                                 stream=True))
    want = full.outputs[0].text[:full.outputs[0].text.find(stop)]
    assert r.text == "".join(ch.text for ch in chunks) == want
    assert r.finish_reason == "stop"
