"""The engine thread that the Triton model drives: requests in from other threads, outputs out through a
callback, and a failing step fails the requests in flight without stopping the thread."""
from __future__ import annotations

import queue

import pytest

from engine_utils import make_engine
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams
from pagedllm.serving.engine_thread import EngineThread

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, num_kv_blocks=32)


def collect(events: queue.Queue, n_finished: int) -> tuple[dict, dict]:
    tokens, errors = {}, {}
    while n_finished:
        kind, payload = events.get(timeout=60)
        if kind == "error":
            errors[payload[0]] = payload[1]
            n_finished -= 1
            continue
        for out in payload:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            n_finished -= out.finished
    return tokens, errors


def test_requests_from_another_thread_are_served(engine):
    events: queue.Queue = queue.Queue()
    thread = EngineThread(engine, on_outputs=lambda outs: events.put(("out", outs)),
                          on_error=lambda rid, msg: events.put(("error", (rid, msg))))
    try:
        for rid in ("a", "b"):
            thread.submit(engine.make_request(rid, GREEDY, prompt_token_ids=[5, 6, 7]))
        tokens, errors = collect(events, 2)
    finally:
        thread.stop()
    assert not errors and tokens["a"] == tokens["b"] and len(tokens["a"]) == 4
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_a_failing_step_fails_its_requests_and_the_thread_goes_on(engine, monkeypatch):
    events: queue.Queue = queue.Queue()
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky_run(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated CUDA error")
        return real_run(batch)

    monkeypatch.setattr(engine.runner, "run", flaky_run)
    thread = EngineThread(engine, on_outputs=lambda outs: events.put(("out", outs)),
                          on_error=lambda rid, msg: events.put(("error", (rid, msg))))
    try:
        thread.submit(engine.make_request("doomed", GREEDY, prompt_token_ids=[5, 6, 7]))
        tokens, errors = collect(events, 1)
        assert "simulated CUDA error" in errors["doomed"]
        assert engine.num_free_blocks == engine.block_manager.num_blocks
        thread.submit(engine.make_request("next", GREEDY, prompt_token_ids=[5, 6, 7]))
        tokens, errors = collect(events, 1)
    finally:
        thread.stop()
    assert not errors and len(tokens["next"]) == 4


def test_abort_from_another_thread(engine):
    events: queue.Queue = queue.Queue()
    thread = EngineThread(engine, on_outputs=lambda outs: events.put(("out", outs)),
                          on_error=lambda rid, msg: events.put(("error", (rid, msg))))
    try:
        thread.submit(engine.make_request("long", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
                                           prompt_token_ids=[5, 6, 7]))
        thread.abort("long")
        finished = None
        while finished is None:
            kind, outs = events.get(timeout=60)
            finished = next((o for o in outs if o.finished), None)
    finally:
        thread.stop()
    assert finished.finish_reason == "abort" and finished.num_output_tokens < 400
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_a_step_failing_after_a_request_finished_in_it_still_ends_that_request(engine, monkeypatch):
    """The step finishes "short" (its last token) and then fails on "other": "short" left the engine inside the
    failing step, so it was not among the unfinished requests that get an error, and its output was lost."""
    events: queue.Queue = queue.Queue()
    real_on_token = Request.on_token

    def failing_on_token(request, token, logprob):
        if request.request_id == "other" and request.seq.num_output_tokens == 1:
            raise RuntimeError("simulated detokenizer failure")
        return real_on_token(request, token, logprob)

    monkeypatch.setattr(Request, "on_token", failing_on_token)
    thread = EngineThread(engine, on_outputs=lambda outs: events.put(("out", outs)),
                          on_error=lambda rid, msg: events.put(("error", (rid, msg))))
    try:
        thread.submit(engine.make_request("short", SamplingParams(max_tokens=1, temperature=0),
                                           prompt_token_ids=[5, 6, 7]))
        thread.submit(engine.make_request("other", GREEDY, prompt_token_ids=[5, 6, 8]))
        tokens, errors = collect(events, 2)
    finally:
        thread.stop()
    assert set(tokens) | set(errors) == {"short", "other"}
    assert "simulated detokenizer failure" in errors["other"]
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_an_unexpected_error_adding_a_request_fails_it_alone(engine, monkeypatch):
    """_handle caught only ValueError from engine.add: anything else escaped the loop and ended the thread."""
    events: queue.Queue = queue.Queue()
    real_add = engine.add

    def add(seq):
        if seq.request_id == "poison":
            raise TypeError("unexpected")
        real_add(seq)

    monkeypatch.setattr(engine, "add", add)
    thread = EngineThread(engine, on_outputs=lambda outs: events.put(("out", outs)),
                          on_error=lambda rid, msg: events.put(("error", (rid, msg))))
    try:
        thread.submit(engine.make_request("poison", GREEDY, prompt_token_ids=[5, 6, 7]))
        thread.submit(engine.make_request("fine", GREEDY, prompt_token_ids=[5, 6, 7]))
        tokens, errors = collect(events, 2)
    finally:
        thread.stop()
    assert "unexpected" in errors["poison"] and len(tokens["fine"]) == 4
