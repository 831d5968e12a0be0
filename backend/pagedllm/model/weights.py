"""Loading a checkpoint's safetensors weights as torch tensors (one file or sharded), each checked against the
shape its config gives it, and, with tensor parallelism, only the slice this rank holds.

Every tensor's shape is read from the file's header and compared with the config before any data is read, so
a checkpoint whose config and weights disagree is refused by name at load (not with an internal error on
every request). Tensors the decoder would not use are refused too: serving without them would be serving a
different model. Under tensor parallelism (Megatron-style) each rank reads only its part of each file:

- q/k/v and gate/up are split by output rows (column-parallel): a rank holds num_heads / N query heads, and
  num_kv_heads / N KV heads, or, with fewer KV heads than ranks, one KV head shared by N / num_kv_heads ranks
  (replicated: each rank's query heads all use that one);
- o and down are split by input columns (row-parallel): their partial outputs are summed (all-reduce);
- the embedding and the norms are replicated (every rank embeds its inputs); the LM head is read only by rank
  0, which alone computes logits and samples (tied heads reuse the embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .spec import EMBEDDING_NAMES, ModelSpec, find_tensor, safetensors_files

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old conversions carry RoPE's buffers: recomputed, not loaded


@dataclass(frozen=True)
class Shard:
    """This process's part of the model under tensor parallelism (rank of world)."""
    rank: int = 0
    world: int = 1

    def check(self, spec: ModelSpec) -> None:
        """The splits must be whole: heads and FFN rows per rank, KV heads divided or replicated evenly."""
        w = self.world
        problems = []
        if spec.num_heads % w:
            problems.append(f"num_attention_heads ({spec.num_heads})")
        if spec.intermediate_size % w:
            problems.append(f"intermediate_size ({spec.intermediate_size})")
        if spec.num_kv_heads % w and w % spec.num_kv_heads:
            problems.append(f"num_key_value_heads ({spec.num_kv_heads}; or a divisor of it)")
        if problems:
            raise CheckpointError(f"tensor_parallel_size {w} does not divide {', '.join(problems)}")

    def local_heads(self, spec: ModelSpec) -> tuple[int, int]:
        """(query heads, KV heads) on this rank."""
        return spec.num_heads // self.world, max(1, spec.num_kv_heads // self.world)

    def kv_head_range(self, spec: ModelSpec) -> tuple[int, int]:
        """The KV heads this rank holds: its own share, or the one it shares with its neighbours."""
        if spec.num_kv_heads >= self.world:
            n = spec.num_kv_heads // self.world
            return self.rank * n, (self.rank + 1) * n
        head = self.rank // (self.world // spec.num_kv_heads)
        return head, head + 1


FULL = Shard()


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder uses, by its name without `model.`, with the shape the config implies. Biases
    and q/k norms are optional (Qwen2 has q/k/v biases, Qwen3 the norms); the rest is required."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"embed_tokens.weight": (spec.vocab_size, h), "norm.weight": (h,),
              "lm_head.weight": (spec.vocab_size, h)}
    for n in range(spec.num_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


OPTIONAL_SUFFIXES = ("_proj.bias", "q_norm.weight", "k_norm.weight")


def _slices(key: str, spec: ModelSpec, shard: Shard) -> tuple[slice, ...] | None:
    """The part of tensor `key` this rank reads (None: all of it)."""
    if shard.world == 1:
        return None
    d = spec.head_dim
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        n = spec.num_heads // shard.world * d
        return (slice(shard.rank * n, (shard.rank + 1) * n),)
    if key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        lo, hi = shard.kv_head_range(spec)
        return (slice(lo * d, hi * d),)
    if key.endswith(("gate_proj.weight", "up_proj.weight")):
        n = spec.intermediate_size // shard.world
        return (slice(shard.rank * n, (shard.rank + 1) * n),)
    if key.endswith("o_proj.weight"):
        n = spec.num_heads // shard.world * d
        return (slice(None), slice(shard.rank * n, (shard.rank + 1) * n))
    if key.endswith("down_proj.weight"):
        n = spec.intermediate_size // shard.world
        return (slice(None), slice(shard.rank * n, (shard.rank + 1) * n))
    return None  # replicated: embedding, norms, q/k norms


def load_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 shard: Shard = FULL, on_file=lambda path, n: None) -> dict[str, torch.Tensor]:
    """The decoder's tensors by name (without `model.`), this rank's part of each, cast to dtype, on device.
    Raises CheckpointError naming a tensor whose shape disagrees with the config, one the decoder would not
    use, or one that is missing. `on_file(path, tensors)` is called after each file (progress)."""
    shard.check(spec)
    expected = expected_shapes(spec)
    weights: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("model.")
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                part = f.get_slice(name)
                _check_shape(name, key, part.get_shape(), expected, spec)
                if key == "lm_head.weight" and (shard.rank != 0 or spec.tie_word_embeddings):
                    continue  # only rank 0 computes logits; a tied head is the embedding
                slices = _slices(key, spec, shard)
                tensor = part[slices] if slices is not None else part[:]
                weights[key] = tensor.to(device=device, dtype=dtype)
        on_file(path, len(weights))
    _check_complete(weights, expected)
    return weights


def _check_shape(name: str, key: str, shape: list[int], expected: dict, spec: ModelSpec) -> None:
    want = expected.get(key)
    if want is None:  # an o_proj / MLP bias, quantization scales: the decoder would ignore it
        raise CheckpointError(f"the checkpoint has weights pagedllm does not use: {key} (an unsupported variant "
                              f"of {spec.model_type}, or a quantized checkpoint)")
    if tuple(shape) != want:
        raise CheckpointError(f"{name}: shape {list(shape)} does not match the config, which makes it {list(want)}")


def _check_complete(weights: dict, expected: dict) -> None:
    """Biases and q/k norms belong to some architectures only; without an LM head the embedding serves (as
    transformers does for tied checkpoints). Everything else must be there."""
    optional = [k for k in expected if k.endswith(OPTIONAL_SUFFIXES)] + ["lm_head.weight"]
    missing = [k for k in expected if k not in weights and k not in optional]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"the checkpoint lacks {missing[0]}{more}")


def load_tensor(model_dir: str | Path, names: tuple[str, ...] = EMBEDDING_NAMES) -> torch.Tensor:
    """One tensor, by the first of `names` the checkpoint has, without loading the rest."""
    path, name = find_tensor(model_dir, names)
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)
