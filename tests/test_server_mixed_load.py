"""A bounded burst of mixed traffic against one server — good streams, whole responses, bad inputs and
cancellations, all at once from several threads. Each good request still equals transformers, each bad one
gets its own error, and afterwards no request is running and every KV block is free."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hf_reference import hf_greedy
from triton_helpers import GrpcStream, metric, stream_one, wait_for_metric

MAX_TOKENS = 10
ROUNDS = 24  # requests in the burst
WORKERS = 6


def good(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(rng.randrange(1, 60))]


def one_request(srv, kind: str, seed: int, refs: dict) -> str:
    values = {"max_tokens": np.array([MAX_TOKENS], np.int32), "temperature": np.array([0.0], np.float32)}
    if kind in ("stream", "whole"):
        ids = good(seed)
        res = stream_one(srv.grpc_url, {"input_ids": np.array(ids, np.int64), **values,
                                        "stream": np.array([kind == "stream"])})
        assert res.error is None, res.error
        assert res.token_ids == refs[seed], f"{kind} seed {seed}"
        return kind
    if kind == "bad":
        res = stream_one(srv.grpc_url, {"input_ids": np.array([5, 10**6], np.int64), **values})
        assert res.error is not None and "input_ids: token id 1000000" in res.error
        return kind
    # cancel: a long request left after its first tokens
    s = GrpcStream(srv.grpc_url)
    s.send("long", {"input_ids": np.array(good(seed), np.int64), "stream": np.array([True]),
                    "max_tokens": np.array([300], np.int32), "ignore_eos": np.array([True])})
    deadline = time.monotonic() + 60
    while not s.results["long"].token_ids and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close(cancel=True)
    assert len(s.results["long"].token_ids) < 300
    return kind


def test_mixed_burst_leaves_nothing_behind(llm_server):
    srv = llm_server
    rng = random.Random(0)
    plan = [(rng.choice(["stream", "stream", "whole", "bad", "cancel"]), 1000 + i) for i in range(ROUNDS)]
    refs = {seed: hf_greedy(str(srv.model_dir), ids=good(seed), max_new_tokens=MAX_TOKENS)
            for kind, seed in plan if kind in ("stream", "whole")}
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda job: one_request(srv, job[0], job[1], refs), plan))
    assert sorted(done) == sorted(kind for kind, _ in plan)
    total = metric(srv.metrics_url, "pagedllm_kv_blocks_total")
    assert wait_for_metric(srv.metrics_url, "pagedllm_kv_blocks_free", total) == total
    assert wait_for_metric(srv.metrics_url, "pagedllm_num_requests_running", 0) == 0
    assert metric(srv.metrics_url, "pagedllm_num_requests_waiting") == 0
    assert srv.is_alive()
