"""Prompt embeddings computed on the client from a checkpoint directory: its tokenizer and the rows of its
embedding matrix, read straight from the safetensors files (no model is built)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pagedllm.model.spec import find_tensor


def tokenize(model_dir, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text` with the checkpoint's tokenizer; with chat=True, of a one-message user turn in the
    checkpoint's chat template, ready for the assistant's answer."""
    from pagedllm.tokenizer import load_tokenizer, prompt_token_ids

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise FileNotFoundError(f"{model_dir} has no tokenizer")
    return prompt_token_ids(tok, text, chat)


def embedding_rows(model_dir, ids: list[int]) -> np.ndarray:
    """The embedding matrix's rows for `ids`, as float32 [len(ids), hidden_size]. Only those rows are read."""
    from safetensors import safe_open

    path, key = find_tensor(model_dir)  # the token embedding matrix
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
