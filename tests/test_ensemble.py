"""The `embed` model and the `embed_llm` ensemble (text -> embed -> prompt_embeds -> llm -> streamed text)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from hf_reference import embeds_fp16, hf_greedy
from triton_helpers import infer_inputs, stream_one

import tritonclient.grpc as grpcclient

PROMPT = "Once upon a time there was a small model"
GREEDY = {"max_tokens": np.array([12], np.int32), "temperature": np.array([0.0], np.float32)}


def ensemble(url: str, values: dict):
    return stream_one(url, values, model="embed_llm")


def embed(url: str, values: dict) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    return client.infer("embed", infer_inputs(values)).as_numpy("prompt_embeds")


@pytest.fixture(scope="module")
def tokenizer(llm_server):
    return AutoTokenizer.from_pretrained(llm_server.model_dir)


def test_embed_model_returns_the_checkpoints_embedding_rows(llm_server, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    got = embed(llm_server.grpc_url, {"text_input": np.array([PROMPT])})
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, embeds_fp16(str(llm_server.model_dir), ids).numpy())
    np.testing.assert_array_equal(embed(llm_server.grpc_url, {"input_ids": np.array(ids, np.int64)}), got)


@pytest.mark.parametrize("stream", [True, False])
def test_ensemble_text_equals_llm_on_the_same_embeddings(llm_server, tokenizer, stream):
    ids = tokenizer(PROMPT)["input_ids"]
    values = {**GREEDY, "stream": np.array([stream])}
    via_ensemble = ensemble(llm_server.grpc_url, {"text_input": np.array([PROMPT]), **values})
    direct = stream_one(llm_server.grpc_url, {"prompt_embeds": embeds_fp16(str(llm_server.model_dir), ids).numpy(),
                                              **values})
    assert via_ensemble.error is None, via_ensemble.error
    assert via_ensemble.token_ids == direct.token_ids
    assert via_ensemble.text == direct.text
    ref = hf_greedy(str(llm_server.model_dir), embeds=embeds_fp16(str(llm_server.model_dir), ids), max_new_tokens=12)
    assert via_ensemble.token_ids == ref
    if stream:
        assert via_ensemble.num_responses == len(ref)


def test_ensemble_stream_concatenates_to_the_non_streamed_text(llm_server, tokenizer):
    streamed = ensemble(llm_server.grpc_url, {"text_input": np.array([PROMPT]), **GREEDY,
                                             "stream": np.array([True])})
    whole = ensemble(llm_server.grpc_url, {"text_input": np.array([PROMPT]), **GREEDY})
    assert whole.num_responses == 1
    assert streamed.text == whole.text
    assert whole.text == tokenizer.decode(whole.token_ids, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
    assert " " in whole.text or len(whole.token_ids) < 3  # spaces survive streaming


def test_ensemble_chat_template(llm_server, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    res = ensemble(llm_server.grpc_url, {"text_input": np.array([PROMPT]), "apply_chat_template": np.array([True]),
                                         **GREEDY})
    assert res.error is None
    assert res.token_ids == hf_greedy(str(llm_server.model_dir), embeds=embeds_fp16(str(llm_server.model_dir), ids),
                                      max_new_tokens=12)


def test_ensemble_bad_input_is_invalid_arg(llm_server):
    res = ensemble(llm_server.grpc_url, {"text_input": np.array([""]), **GREEDY})
    assert res.error is not None and "text_input: the prompt is empty" in res.error
    res = ensemble(llm_server.grpc_url, {"text_input": np.array(["ok"]), "top_p": np.array([7.0], np.float32)})
    assert res.error is not None and "top_p" in res.error
    assert ensemble(llm_server.grpc_url, {"text_input": np.array(["ok"]), **GREEDY}).error is None


def test_soft_prompt_is_prepended(make_tiny, start_server, tmp_path):
    model_dir = make_tiny("llama", rope_scaling="llama3")
    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    save_file({"soft_prompt": soft.to(torch.float16)}, str(tmp_path / "soft.safetensors"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT)["input_ids"]
    with start_server(model_dir, parameters={"soft_prompt": str(tmp_path / "soft.safetensors")}) as srv:
        got = embed(srv.grpc_url, {"text_input": np.array([PROMPT])})
        want = torch.cat((soft.to(torch.float16), embeds_fp16(str(model_dir), ids)))
        np.testing.assert_array_equal(got, want.numpy())
        res = ensemble(srv.grpc_url, {"text_input": np.array([PROMPT]), **GREEDY})
        assert res.error is None
        assert res.token_ids == hf_greedy(str(model_dir), embeds=want, max_new_tokens=12)


def test_ensemble_over_http_generate_stream(llm_server):
    from triton_helpers import http_generate

    grpc = ensemble(llm_server.grpc_url, {"text_input": np.array([PROMPT]), **GREEDY, "stream": np.array([True])})
    body = {"text_input": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    code, events = http_generate(llm_server.http_url, body, stream=True, model="embed_llm")
    assert code == 200, events
    assert "".join(e["text_output"] for e in events) == grpc.text
    code, whole = http_generate(llm_server.http_url, {**body, "stream": False}, model="embed_llm")
    assert code == 200, whole
    assert whole["text_output"] == grpc.text
