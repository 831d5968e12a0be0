"""The shipped server path with the Triton kernels: `kernels=triton` in the llm model's config. On a CPU they
run in Triton's interpreter inside the Python backend's stub (slow, so small requests)."""
from __future__ import annotations

import numpy as np

from hf_reference import embeds_fp16, hf_greedy
from triton_helpers import GrpcStream, metric, wait_for_metric

MAX_TOKENS = 5


def test_streams_with_triton_kernels_equal_transformers(tiny_llama_dir, start_server):
    model_dir = str(tiny_llama_dir)
    prompts = {"a": [5, 9, 200, 31], "b": list(range(40, 57)), "c": list(range(100, 133))}
    values = {"max_tokens": np.array([MAX_TOKENS], np.int32), "temperature": np.array([0.0], np.float32),
              "stream": np.array([True])}
    with start_server(tiny_llama_dir, kernels="triton", num_kv_blocks=32) as srv:
        s = GrpcStream(srv.grpc_url)
        try:
            for rid, ids in prompts.items():
                s.send(rid, {"input_ids": np.array(ids, np.int64), **values})
            s.send("emb", {"prompt_embeds": embeds_fp16(model_dir, prompts["b"]).numpy(), **values})
            s.wait(4, timeout=300)
        finally:
            s.close()
        assert not s.errors
        for rid, ids in prompts.items():
            assert s.results[rid].token_ids == hf_greedy(model_dir, ids=ids, max_new_tokens=MAX_TOKENS), rid
        assert s.results["emb"].token_ids == hf_greedy(model_dir, embeds=embeds_fp16(model_dir, prompts["b"]),
                                                       max_new_tokens=MAX_TOKENS)
        assert "kernels=triton" in srv.log_path.read_text()  # the engine's start-up line
        total = metric(srv.metrics_url, "pagedllm_kv_blocks_total")
        assert wait_for_metric(srv.metrics_url, "pagedllm_kv_blocks_free", total) == total
