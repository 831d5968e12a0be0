"""Reading a Hugging Face checkpoint directory without torch: its config (as plain JSON, so any transformers
version's layout works), the rules a checkpoint must follow to be served, and where its tensors are.

The launcher checks a checkpoint with this before it starts anything; the engine, the embed model and the
client read the same facts from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# The checkpoints pagedllm serves: config.json `model_type` -> Hugging Face architecture.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# Where checkpoints keep the token embedding matrix (bare exports drop `model.`; multimodal ones nest it).
EMBEDDING_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight",
                   "model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight")


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

    def model_length(self, max_model_len: int = 0) -> int:
        """The longest sequence served (before the KV cache bounds it too): the configured max_model_len
        (0: the checkpoint's), within the sliding window, since we attend to the whole context."""
        length = max_model_len if max_model_len > 0 else self.max_position_embeddings
        return min(length, self.sliding_window) if self.sliding_window else length


def _read_json_object(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def resolve_model(name: str | Path, relative_to: str | Path | None = None) -> Path:
    """A checkpoint directory: a path (a relative one is taken from `relative_to` when given, as Triton model
    parameters are), or a Hugging Face repo id ("org/name") resolved through huggingface_hub's cache
    (downloaded unless HF_HUB_OFFLINE=1, which serves it from the local cache only)."""
    path = Path(name).expanduser()
    if not path.is_absolute() and relative_to is not None and (Path(relative_to) / path).exists():
        return (Path(relative_to) / path).absolute()
    if path.exists() or not _looks_like_repo_id(str(name)):
        return path.absolute()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                                 "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline without a cached copy, unknown repo, no network, ...
        raise CheckpointError(f"{name!r} is neither a directory nor a Hugging Face model that could be found "
                              f"({type(e).__name__}: {e})") from None


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def checkpoint_dir(model_dir: str | Path) -> Path:
    """The absolute checkpoint directory, if it looks like a Hugging Face checkpoint at all."""
    path = Path(model_dir).expanduser().absolute()
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (not a Hugging Face checkpoint)")
    return path


def check_checkpoint(model_dir: str | Path) -> Path:
    """Everything about a checkpoint that can be checked without loading it: its config, and that it has
    safetensors weights. Returns the absolute path; raises CheckpointError with a one-line reason."""
    path = checkpoint_dir(model_dir)
    load_model_spec(path)
    safetensors_files(path)
    return path


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    path = checkpoint_dir(model_dir)
    cfg = _read_json_object(path / "config.json")
    _check_architecture(path, cfg)
    quant = cfg.get("quantization_config")
    if quant:  # its weights are packed or scaled: loading them as plain tensors would serve a different model
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(f"quantized checkpoints ({method}) are not supported; use an unquantized one")
    try:
        return _spec_from_config(path, cfg)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path / 'config.json'}: missing or malformed field ({e!r})") from None


def _check_architecture(path: Path, cfg: dict) -> None:
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [str(architectures)]
    if model_type not in SUPPORTED_ARCHITECTURES or (
            architectures and not set(SUPPORTED_ARCHITECTURES.values()).intersection(architectures)):
        found = ", ".join(map(str, architectures)) or "none"
        raise CheckpointError(f"unsupported model in {path}: model_type={model_type!r}, architectures={found}; "
                              f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES.values()))}")


def _spec_from_config(path: Path, cfg: dict) -> ModelSpec:
    model_type = cfg["model_type"]
    # transformers 5 nests rope settings in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
    rope_scaling = cfg.get("rope_scaling") or rope_params or None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"unsupported rope scaling type {rope_type!r}")
    num_heads = int(cfg["num_attention_heads"])
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    return ModelSpec(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        eos_token_ids=_eos_token_ids(path, cfg),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def _eos_token_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what HF generate stops on), else from config.json."""
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = _read_json_object(gen).get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


# ------------------------------------------------------------------------------------------- weight files
def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files: those its shard index names, else model.safetensors (what transformers
    loads; not e.g. consolidated.safetensors), else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_weight_map_of(index).values()))
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no weights (*.safetensors)")
    return files


def _weight_map_of(index: Path) -> dict[str, str]:
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map object")
    return weight_map


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the shard index when there is one (no file is opened), else
    from the safetensors headers."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / f for name, f in _weight_map_of(index).items()}
    from safetensors import safe_open

    names = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), "np") as st:  # reads the header only
            names.update(dict.fromkeys(st.keys(), f))
    return names


def find_tensor(model_dir: str | Path, names: tuple[str, ...] = EMBEDDING_NAMES) -> tuple[Path, str]:
    """(file, name) of the first of `names` the checkpoint has (default: the token embedding matrix)."""
    files = tensor_files(model_dir)
    for name in names:
        if name in files:
            return files[name], name
    raise CheckpointError(f"{model_dir} has none of the tensors {', '.join(names)}")
