"""Loading a checkpoint's safetensors weights as torch tensors (one file or sharded)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .spec import EMBEDDING_NAMES, find_tensor, safetensors_files


def load_weights(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by name, cast to dtype, on device (loaded file by file)."""
    weights = {}
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return weights


def load_tensor(model_dir: str | Path, names: tuple[str, ...] = EMBEDDING_NAMES) -> torch.Tensor:
    """One tensor, by the first of `names` the checkpoint has, without loading the rest."""
    path, name = find_tensor(model_dir, names)
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)
