"""Engine, sampler and checkpoint edge cases: settings that could never schedule, embeddings that overflow the
model's dtype, tiny temperatures, stray weight files and weights the decoder would ignore."""
from __future__ import annotations

import pytest

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import LLMEngine
from engine_utils import make_engine, run_to_completion, token_ids
from pagedllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, num_kv_blocks=32)


def run(engine, params, prompt=(5, 6, 7, 8), rid="r"):
    engine.add(engine.make_request(rid, params, prompt_token_ids=list(prompt)))
    return run_to_completion(engine)[rid]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-7])
def test_a_tiny_positive_temperature_is_greedy(engine, temperature):
    """logits / 1e-40 overflow float32: the softmax of top-k/top-p turned to NaN, every token was masked and the
    row returned token 0 each step."""
    greedy = token_ids(run(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    tiny = token_ids(run(engine, SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True, seed=1)))
    assert tiny == greedy


# ---- checkpoints ------------------------------------------------------------------------------------------------

def _copy_checkpoint(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_only_the_checkpoints_own_weight_files_are_loaded(tiny_llama_dir, tmp_path):
    """Without an index every *.safetensors was loaded: Mistral repos ship consolidated.safetensors (the same
    weights under other names) beside model.safetensors, which doubled the weights in (GPU) memory."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pagedllm.model.weights import load_weights

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    save_file({"tok_embeddings.weight": torch.zeros(8, 8), "norm.weight": torch.zeros(64)},
              d / "consolidated.safetensors")
    from pagedllm.model.spec import load_model_spec

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        own = {k.removeprefix("model.") for k in f.keys()}
    assert set(load_weights(d, load_model_spec(d), torch.float32, torch.device("cpu"))) == own


def _add_tensors(model_dir, extra: dict):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = model_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, **extra}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.down_proj.bias",
                                  "model.layers.0.self_attn.q_proj.weight_scale"])
def test_weights_the_model_would_ignore_are_refused(tiny_llama_dir, tmp_path, name):
    """An o_proj / MLP bias (Llama `attention_bias` / `mlp_bias`) or an FP8 scale was silently dropped: the
    server came up and generated from a different model than the checkpoint's."""
    import torch

    from pagedllm.errors import CheckpointError

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    _add_tensors(d, {name: torch.ones(64)})
    with pytest.raises(CheckpointError, match=name.removeprefix("model.")):
        LLMEngine(EngineConfig(model_dir=str(d), num_kv_blocks=8))


def test_rotary_inv_freq_buffers_are_still_accepted(tiny_llama_dir, tmp_path):
    import torch

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    _add_tensors(d, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    LLMEngine(EngineConfig(model_dir=str(d), num_kv_blocks=8))


def test_a_quantized_checkpoint_is_refused_by_name(tiny_llama_dir, tmp_path):
    import json

    from pagedllm.model.spec import CheckpointError, load_model_spec

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gptq"):
        load_model_spec(d)


def test_the_served_length_is_the_configured_one_within_the_sliding_window(tiny_llama_dir):
    """One rule, used by the engine and the OpenAI front end alike."""
    import dataclasses

    from pagedllm.model.spec import load_model_spec

    spec = load_model_spec(tiny_llama_dir)
    assert spec.model_length() == spec.max_position_embeddings == 512
    assert spec.model_length(100) == 100
    windowed = dataclasses.replace(spec, sliding_window=64)
    assert windowed.model_length() == windowed.model_length(100) == 64
    assert windowed.model_length(32) == 32


@pytest.mark.parametrize("setting", [{"max_num_seqs": 0}, {"max_num_batched_tokens": 0},
                                     {"kv_cache_memory_fraction": 0.0}, {"num_kv_blocks": -1}])
def test_settings_that_could_never_schedule_are_refused_at_load(tiny_llama_dir, setting):
    """With max_num_seqs or max_num_batched_tokens 0 the server came up, then the engine thread spun at 100% CPU
    and every request waited forever."""
    with pytest.raises(ValueError, match=next(iter(setting))):
        LLMEngine(EngineConfig(model_dir=str(tiny_llama_dir), **{"num_kv_blocks": 8, **setting}))


def test_embeddings_that_overflow_the_model_dtype_are_refused(tiny_llama_dir):
    """Finite FP32 embeddings (prompt_embeds_fp32) past FP16's range became inf when cast for an FP16 model:
    the request passed the NaN/Inf check, then produced NaN logits."""
    import torch

    from pagedllm.errors import InvalidRequest

    engine = LLMEngine(EngineConfig(model_dir=str(tiny_llama_dir), num_kv_blocks=8, dtype="float16"))
    embeds = torch.zeros(3, engine.spec.hidden_size)
    embeds[1, 5] = 1e6
    with pytest.raises(InvalidRequest, match="prompt_embeds_fp32: .*float16"):
        engine.make_request("r", SamplingParams(), prompt_embeds=embeds, prompt_name="prompt_embeds_fp32")
    engine.make_request("ok", SamplingParams(), prompt_embeds=embeds.clamp(max=1e4))


@pytest.mark.parametrize("name, shape", [("model.embed_tokens.weight", (512, 32)),
                                         ("model.layers.1.self_attn.k_proj.weight", (64, 64)),
                                         ("model.layers.0.mlp.down_proj.weight", (64, 96))])
def test_a_weight_whose_shape_disagrees_with_the_config_is_refused_at_load_by_name(tiny_llama_dir, tmp_path,
                                                                                    name, shape):
    """An embed_tokens of the wrong width loaded, the server reported ready, and every request then failed with
    an internal error. Each tensor's shape is checked against the config before its data is read."""
    import torch

    from pagedllm.errors import CheckpointError

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    _add_tensors(d, {name: torch.zeros(shape)})  # replaces the tensor of that name
    with pytest.raises(CheckpointError, match=rf"{name}: shape \[{shape[0]}, {shape[1]}\] does not match"):
        LLMEngine(EngineConfig(model_dir=str(d), num_kv_blocks=8))


def test_a_missing_weight_is_refused_by_name(tiny_llama_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pagedllm.errors import CheckpointError

    d = _copy_checkpoint(tiny_llama_dir, tmp_path / "ckpt")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks layers.1.mlp.up_proj.weight"):
        LLMEngine(EngineConfig(model_dir=str(d), num_kv_blocks=8))
