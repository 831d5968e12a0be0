"""Reading a Hugging Face checkpoint directory: its config (as plain JSON, so any transformers version's
layout works) and its safetensors weights, one file or sharded."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import SUPPORTED_ARCHITECTURES

SUPPORTED_MODEL_TYPES = tuple(SUPPORTED_ARCHITECTURES)


class CheckpointError(ValueError):
    """The directory is missing, incomplete or holds an architecture pagedllm does not serve."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3 normalises q and k per head before RoPE
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(model_dir)!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no config.json: not a Hugging Face checkpoint")
    cfg = _read_json(model_dir / "config.json")
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ",".join(cfg.get("architectures") or []) or "?"
        raise CheckpointError(f"unsupported architecture {model_type!r} ({archs}); pagedllm serves "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    quant = cfg.get("quantization_config")
    if quant:  # its weights are packed or scaled: loading them as plain tensors would serve a different model
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(f"quantized checkpoints ({method}) are not supported; use an unquantized one")
    # transformers 5 nests rope settings in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
    rope_scaling = cfg.get("rope_scaling") or rope_params or None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise CheckpointError(f"unsupported rope scaling type {rope_type!r}")
    num_heads = cfg["num_attention_heads"]
    eos = _eos_token_ids(model_dir, cfg)
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    return ModelSpec(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        eos_token_ids=eos,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def _eos_token_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what HF generate stops on), else from config.json."""
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = _read_json(gen).get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies of RoPE, float32, as transformers computes them (default, linear, llama3)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(spec: ModelSpec, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency in the first half, sin in the second."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(spec)[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():  # what transformers loads; not e.g. consolidated.safetensors
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(model_dir)!r} has no *.safetensors weights")
    return files


def load_weights(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by name, cast to dtype, on device (loaded file by file)."""
    weights = {}
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return weights


def load_tensor(model_dir: str | Path, names: tuple[str, ...]) -> torch.Tensor:
    """One tensor, by the first of `names` the checkpoint has, without loading the rest."""
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    return f.get_tensor(name)
    raise CheckpointError(f"{str(model_dir)!r} has none of the tensors {', '.join(names)}")


EMBEDDING_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight")
