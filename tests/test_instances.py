"""Triton's placement: each `llm` instance runs on the device Triton gave it, so that one config serves a
node's GPUs as independent replicas; on CPU, an instance_group of two instances serves from both."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from hf_reference import hf_greedy
from pagedllm.config import instance_device
from triton_helpers import stream_one


def test_an_instance_runs_on_the_gpu_triton_gave_it():
    assert instance_device("auto", "GPU", "3") == "cuda:3"  # instance_group { kind: KIND_GPU gpus: [...] }
    assert instance_device("cuda", "GPU", "1") == "cuda:1"
    assert instance_device("cuda:5", "GPU", "1") == "cuda:5"  # the device parameter names one: it wins
    assert instance_device("auto", "CPU", "0") == "auto"
    assert instance_device("cpu", "MODEL", "0") == "cpu"


def instance_tokens(metrics_url: str) -> dict[str, float]:
    tokens = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("pagedllm_generation_tokens_total{"):
            instance = line.split('instance="', 1)[1].split('"', 1)[0]
            tokens[instance] = float(line.rsplit(" ", 1)[1])
    return tokens


def test_two_cpu_instances_both_serve_correctly(start_server, tiny_llama_dir, tmp_path):
    from pagedllm.server import project_model_repository

    repo = tmp_path / "repo"
    shutil.copytree(project_model_repository(), repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / "llm" / "config.pbtxt"
    config.write_text(config.read_text().replace("instance_group [ { count: 1 kind: KIND_MODEL } ]",
                                                 "instance_group [ { count: 2 kind: KIND_CPU } ]"))
    prompts = [list(range(5 + i, 25 + i)) for i in range(16)]
    with start_server(tiny_llama_dir, model_repository=repo, num_kv_blocks=64) as srv:
        def one(p):
            return stream_one(srv.grpc_url, {"input_ids": np.array(p, np.int64), "max_tokens": np.array([24], np.int32),
                                             "temperature": np.array([0.0], np.float32), "stream": np.array([True])})

        deadline = time.monotonic() + 60
        while len(instance_tokens(srv.metrics_url)) < 2 or min(instance_tokens(srv.metrics_url).values()) == 0:
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, prompts))
            for p, r in zip(prompts, results):
                assert r.error is None and r.token_ids == hf_greedy(str(tiny_llama_dir), ids=p, max_new_tokens=24)
            assert time.monotonic() < deadline, instance_tokens(srv.metrics_url)
        assert set(instance_tokens(srv.metrics_url)) == {"llm_0_0", "llm_0_1"}
