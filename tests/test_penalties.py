"""Repetition, presence and frequency penalties: the engine equals transformers' repetition_penalty, and the
penalty op equals a direct computation of vLLM's definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.engine.sampler import apply_penalties
from pagedllm.engine.sequence import Sequence
from triton_helpers import stream_one


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(model=str(tiny_llama_dir), num_kv_blocks=64)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(llm, tiny_llama_dir, penalty):
    ids = [5, 9, 200, 31, 31, 77, 5, 140]
    (out,) = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                   repetition_penalty=penalty))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=20, min_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                          pad_token_id=3)
    # min_new_tokens only masks EOS (id 2), which random weights rarely pick; ignore_eos matches it.
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
    (plain,) = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert plain.outputs[0].token_ids != out.outputs[0].token_ids  # the penalty changed something


def test_penalty_op_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, generator=g) * 3
    seqs = []
    params = [SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=1.0, presence_penalty=-1.0, frequency_penalty=1.5)]
    for i, p in enumerate(params):
        prompt = torch.randint(0, vocab, (7,), generator=g).tolist()
        output = torch.randint(0, vocab, (9,), generator=g).tolist()
        seqs.append(Sequence(f"s{i}", prompt + output, len(prompt), p, seed=0))
    rows = torch.tensor([0, 2])  # row 1 has no penalties and must stay as it is
    want = logits.clone().numpy()
    for row, seq in zip(rows.tolist(), seqs):
        p, out = seq.params, seq.output_token_ids
        for t in set(seq.token_ids):
            want[row, t] = want[row, t] / p.repetition_penalty if want[row, t] > 0 else \
                want[row, t] * p.repetition_penalty
        for t in set(out):
            want[row, t] -= p.presence_penalty + p.frequency_penalty * out.count(t)
    got = logits.clone()
    apply_penalties(got, seqs, rows)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_embedding_prompts_penalise_only_their_output():
    logits = torch.ones(1, 10)
    seq = Sequence("e", [0, 0, 0, 4, 4], 3, SamplingParams(repetition_penalty=2.0), seed=0,
                   prompt_embeds=torch.zeros(3, 8))
    apply_penalties(logits, [seq], torch.tensor([0]))
    assert logits[0, 4] == 0.5 and logits[0, 0] == 1.0  # placeholder id 0 of the embeddings is not "seen"


@pytest.mark.parametrize("key, value", [("repetition_penalty", 0.0), ("presence_penalty", 3.0),
                                        ("frequency_penalty", float("nan"))])
def test_bad_penalties_are_refused(llm, key, value):
    with pytest.raises(ValueError, match=key):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(**{key: value}))


def test_penalties_through_the_server(llm_server, llm):
    ids = [5, 9, 200, 31, 31, 77, 5, 140]
    (want,) = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                    repetition_penalty=1.3, frequency_penalty=0.5))
    res = stream_one(llm_server.grpc_url, {
        "input_ids": np.array(ids, np.int64), "ignore_eos": np.array([True]),
        "sampling_parameters": np.array(['{"temperature": "0", "max_tokens": "12", "repetition_penalty": "1.3", '
                                         '"frequency_penalty": 0.5}'])})
    assert res.error is None and res.token_ids == want.outputs[0].token_ids
    bad = stream_one(llm_server.grpc_url, {"input_ids": np.array(ids, np.int64),
                                           "presence_penalty": np.array([5.0], np.float32)})
    assert bad.error is not None and "presence_penalty" in bad.error
