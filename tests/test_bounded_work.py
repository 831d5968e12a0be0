"""Work proportional to a request's size is refused before it is done, and one big request holds up no other:
a 10 MB text, 100k rows of embeddings, a million stop token ids or input ids are refused by their size, fast,
while a small request sent beside them is answered at once; a JSON integer too long for Python is a bad
request, not an internal error. Through a real tritonserver (the `llm_server` fixture)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from server_utils import cli_env
from triton_helpers import stream_one

PROBE = {"input_ids": np.array([5, 6, 7, 8], np.int64), "max_tokens": np.array([2], np.int32)}


def refused_fast_and_probe_unhindered(url: str, big: dict, words: str, model: str = "llm") -> None:
    """Send `big` and, while it is being handled, a 4-token probe: the big one is refused naming its input,
    within a second; the probe is answered within a second."""
    result = {}

    def send_big():
        start = time.monotonic()
        result["big"] = stream_one(url, big, model=model)
        result["big_s"] = time.monotonic() - start

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.05)
    start = time.monotonic()
    probe = stream_one(url, PROBE)
    probe_s = time.monotonic() - start
    thread.join(60)
    assert result["big"].error is not None and words in result["big"].error, result["big"].error
    assert probe.error is None and len(probe.token_ids) == 2
    assert probe_s < 1.0, f"the probe waited {probe_s:.2f} s behind the big request"
    assert result["big_s"] < 3.0, f"refusing the big request took {result['big_s']:.2f} s"


def test_a_10_mb_text_is_refused_untokenized(llm_server):
    refused_fast_and_probe_unhindered(llm_server.grpc_url, {"text_input": np.array(["word " * 2_000_000])},
                                      "text_input: the prompt has 10000000")


def test_embeddings_too_long_are_refused_before_they_are_copied(llm_server):
    rows = np.zeros((100_000, 64), np.float16)  # 12.8 MB; the model length is 512
    refused_fast_and_probe_unhindered(llm_server.grpc_url, {"prompt_embeds": rows},
                                      "prompt_embeds: the prompt has 100000 tokens")


def test_a_million_input_ids_are_refused_before_they_are_converted(llm_server):
    refused_fast_and_probe_unhindered(llm_server.grpc_url, {"input_ids": np.full(1_000_000, 5, np.int64)},
                                      "input_ids: the prompt has 1000000 tokens")


@pytest.mark.parametrize("where", ["tensor", "sampling_parameters"])
def test_stop_token_ids_are_capped(llm_server, where):
    ids = np.arange(1_000_000, dtype=np.int64) % 500
    big = {**PROBE, "stop_token_ids": ids} if where == "tensor" else {
        **PROBE, "sampling_parameters": np.array([json.dumps({"stop_token_ids": ids.tolist()}).encode()])}
    words = "stop_token_ids: 1000000 values is more than the limit of 1024" if where == "tensor" else \
        "sampling_parameters: larger than 64 KiB"
    refused_fast_and_probe_unhindered(llm_server.grpc_url, big, words)
    allowed = stream_one(llm_server.grpc_url, {**PROBE, "stop_token_ids": np.arange(1024, dtype=np.int64) % 500})
    assert allowed.error is None


def test_a_huge_json_integer_is_a_bad_request(llm_server):
    digits = "9" * 5000  # more digits than Python converts (4300)
    res = stream_one(llm_server.grpc_url, {**PROBE, "sampling_parameters": np.array(
        [f'{{"seed": {digits}}}'.encode()])})
    assert res.error is not None and res.error.startswith("sampling_parameters: not valid JSON"), res.error
    # As a request parameter: a string (gRPC's typed parameters cannot hold such a number, and Triton's HTTP
    # front end turns keys named like inputs into tensors itself).
    res = stream_one(llm_server.grpc_url, PROBE, parameters={"seed": digits})
    assert res.error is not None and res.error.startswith("parameter seed: expected an integer"), res.error


def test_request_parameters_with_a_huge_integer_are_invalid():
    """What the model reads from request.parameters() is JSON; an integer past Python's conversion limit made
    json.loads raise a ValueError that escaped as an internal error."""
    from pagedllm.errors import InvalidRequest
    from pagedllm.serving.request_parser import parse_parameters

    with pytest.raises(InvalidRequest, match="parameters: not valid JSON"):
        parse_parameters('{"seed": ' + "9" * 5000 + "}")


def test_the_embed_model_refuses_long_prompts_by_size(llm_server):
    refused_fast_and_probe_unhindered(llm_server.grpc_url, {"input_ids": np.full(1_000_000, 5, np.int64)},
                                      "input_ids: the prompt has 1000000 tokens", model="embed")
    refused_fast_and_probe_unhindered(llm_server.grpc_url, {"text_input": np.array(["word " * 200_000])},
                                      "text_input: the prompt has 1000000 characters", model="embed")


def test_a_config_that_is_not_a_json_object_is_refused_in_one_line(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, d)
    (d / "config.json").write_text("[1, 2, 3]")
    r = subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", "--model", str(d)], capture_output=True,
                       text=True, env=cli_env(tmp_path), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"pagedllm serve: error: {d / 'config.json'} must hold a JSON object, not list"]
