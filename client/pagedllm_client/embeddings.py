"""Prompt embeddings computed on the client from a checkpoint directory: its tokenizer and the rows of its
embedding matrix, read straight from the safetensors files (no model is built)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight",
                  "model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight")


def tokenize(model_dir, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text` with the checkpoint's tokenizer; with chat=True, of a one-message user turn in the
    checkpoint's chat template, ready for the assistant's answer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok(text)["input_ids"]]


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    from safetensors import safe_open

    names = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            names.update({k: f for k in st.keys()})
    return names


def find_embedding(model_dir) -> tuple[Path, str]:
    """(file, tensor name) of the token embedding matrix."""
    model_dir = Path(model_dir)
    names = _weight_files(model_dir)
    if not names:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    for key in EMBEDDING_KEYS:
        if key in names:
            return names[key], key
    found = sorted(k for k in names if k.endswith("embed_tokens.weight"))
    if found:
        return names[found[0]], found[0]
    raise KeyError(f"no token embedding matrix in {model_dir} (looked for {', '.join(EMBEDDING_KEYS)})")


def embedding_rows(model_dir, ids: list[int]) -> np.ndarray:
    """The embedding matrix's rows for `ids`, as float32 [len(ids), hidden_size]. Only those rows are read."""
    from safetensors import safe_open

    path, key = find_embedding(model_dir)
    try:
        import torch  # noqa: F401  (bf16 checkpoints need torch: numpy has no bfloat16)
        framework = "pt"
    except ImportError:
        framework = "np"
    rows = {}
    with safe_open(str(path), framework) as st:
        matrix = st.get_slice(key)
        vocab = matrix.get_shape()[0]
        for i in dict.fromkeys(ids):
            if not 0 <= i < vocab:
                raise ValueError(f"token id {i} is outside the embedding matrix [0, {vocab})")
            row = matrix[i:i + 1]
            rows[i] = row.float().numpy() if framework == "pt" else np.asarray(row, dtype=np.float32)
    if not ids:
        return np.zeros((0, matrix.get_shape()[1]), dtype=np.float32)
    return np.concatenate([rows[i] for i in ids]).astype(np.float32)


def embed_text(model_dir, text: str, chat: bool = False) -> tuple[list[int], np.ndarray]:
    """(token ids, their embeddings [seq_len, hidden_size]) for `text`."""
    ids = tokenize(model_dir, text, chat)
    return ids, embedding_rows(model_dir, ids)


def load_embeds_file(path, key: str | None = None) -> np.ndarray:
    """Embeddings from a .npy file or a .safetensors file (its only tensor, or `key`), as float32."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    from safetensors import safe_open

    try:
        import torch  # noqa: F401
        framework = "pt"
    except ImportError:
        framework = "np"
    with safe_open(str(path), framework) as st:
        keys = list(st.keys())
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"{path} holds {len(keys)} tensors ({', '.join(keys[:8])}): choose one with "
                                 f"--embeds-key")
            key = keys[0]
        elif key not in keys:
            raise KeyError(f"{path} has no tensor {key!r} (it has {', '.join(keys[:8])})")
        t = st.get_tensor(key)
    return t.float().numpy() if framework == "pt" else np.asarray(t, dtype=np.float32)
