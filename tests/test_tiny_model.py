"""The tiny checkpoints load in transformers like real ones, and are reproducible."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

from pagedllm.tiny_model import ARCHS, BOS_ID, EOS_ID, make_tiny_model
from server_utils import cli_env

TEXTS = [
    "Hello, world!",
    "  two leading spaces,\ttabs and\nnew lines  ",
    "Numbers 1234 and unicode: café, 東京, emoji 🙂.",
    " a leading space",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_model_and_tokenizer(make_tiny, arch):
    path = make_tiny(arch)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok) == tok.backend_tokenizer.get_vocab_size()
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    # Greedy decoding is varied, not one token repeated (and never the specials <unk> <s> <pad>).
    x = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    new = out[0, x.input_ids.shape[1]:].tolist()
    assert len(set(new)) >= 4, new
    assert not {0, 1, 3} & set(new)


def test_tokenizer_round_trip_and_chat_template(tiny_llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("The quick brown fox").input_ids[1:]) == "The quick brown fox"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<s>user: hi there</s>\nassistant:"


def test_config_files(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (BOS_ID, EOS_ID)
    loaded = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    assert loaded.rope_parameters["rope_type"] == "llama3"


def test_sharded_checkpoint_loads_same_weights(make_tiny):
    single = transformers.AutoModelForCausalLM.from_pretrained(make_tiny("qwen2"))
    path = make_tiny("qwen2", shards=3)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    sharded = transformers.AutoModelForCausalLM.from_pretrained(path)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_have_no_lm_head(make_tiny):
    path = make_tiny("llama", tie_embeddings=True)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_bytes(tmp_path):
    a = make_tiny_model(tmp_path / "a", arch="mistral", seed=7)
    b = make_tiny_model(tmp_path / "b", arch="mistral", seed=7)
    c = make_tiny_model(tmp_path / "c", arch="mistral", seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_cli_make_tiny_model(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "pagedllm.cli", "make-tiny-model", "--out", str(out), "--arch", "qwen3",
         "--hidden-size", "32", "--num-heads", "2", "--num-kv-heads", "1", "--vocab-size", "300", "--seed", "1"],
        check=True, capture_output=True, env=cli_env(tmp_path),
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["vocab_size"]) == ("qwen3", 32, 300)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1
