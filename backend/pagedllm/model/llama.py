"""The Llama-family decoder over a paged KV cache.

One class covers Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm): they differ only
in which weights exist. The forward pass takes the tokens of every scheduled sequence flattened into one
[T, hidden] batch (prefill chunks and decode tokens mixed); attention finds each sequence's context through
the block tables. The hot ops come from `ops` (Triton kernels or their PyTorch references); matmuls are
torch's. q/k/v and gate/up projections are fused into one matmul each at load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rope import rope_cos_sin
from .spec import ModelSpec
from .weights import FULL, Shard
from .metadata import AttentionMetadata


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


class LlamaForCausalLM:
    """`weights` as model/weights.load_weights gives them (checked, and this rank's part under tensor
    parallelism); `all_reduce` sums a row-parallel projection's partial outputs across ranks (None: one rank)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops, max_positions: int,
                 shard: Shard = FULL, all_reduce=None):
        self.spec = spec
        self.ops = ops
        self.num_heads, self.num_kv_heads = shard.local_heads(spec)
        self._all_reduce = all_reduce or (lambda t: t)
        w = dict(weights)
        self.embed_weight = w.pop("embed_tokens.weight")
        self.final_norm = w.pop("norm.weight")
        self.lm_head = w.pop("lm_head.weight", self.embed_weight)  # absent when tied (or not rank 0)
        self.layers = [self._take_layer(w, i) for i in range(spec.num_layers)]
        self.cos_sin = rope_cos_sin(spec, max_positions).to(self.embed_weight.device)
        self.scale = spec.head_dim ** -0.5
        self.dtype = self.embed_weight.dtype
        self.device = self.embed_weight.device

    @staticmethod
    def _take_layer(w: dict[str, torch.Tensor], i: int) -> _Layer:
        p = f"layers.{i}."
        q, k, v = (w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        biases = [w.pop(p + f"self_attn.{n}_proj.bias", None) for n in "qkv"]
        gate, up = w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")
        return _Layer(
            input_norm=w.pop(p + "input_layernorm.weight"),
            qkv_weight=torch.cat((q, k, v)),
            qkv_bias=torch.cat(biases) if biases[0] is not None else None,
            q_norm=w.pop(p + "self_attn.q_norm.weight", None),
            k_norm=w.pop(p + "self_attn.k_norm.weight", None),
            o_weight=w.pop(p + "self_attn.o_proj.weight"),
            post_norm=w.pop(p + "post_attention_layernorm.weight"),
            gate_up_weight=torch.cat((gate, up)),
            down_weight=w.pop(p + "mlp.down_proj.weight"),
        )

    @property
    def vocab_size(self) -> int:
        return self.embed_weight.shape[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_weight)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """hidden: [T, hidden] input embeddings -> [T, hidden] final-normed hidden states."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual = hidden
                hidden = ops.rms_norm(hidden, layer.input_norm, eps)
            else:
                hidden = ops.rms_norm(hidden, layer.input_norm, eps, residual)
            hidden = self._attention(layer, hidden, positions, meta, k_cache, v_cache)
            hidden = ops.rms_norm(hidden, layer.post_norm, eps, residual)
            hidden = F.linear(ops.silu_and_mul(F.linear(hidden, layer.gate_up_weight)), layer.down_weight)
            hidden = self._all_reduce(hidden)  # down is row-parallel: sum the ranks' partial outputs
        return ops.rms_norm(hidden, self.final_norm, eps, residual)

    def _attention(self, layer: _Layer, hidden: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        s, num_tokens = self.spec, hidden.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads  # this rank's
        qkv = F.linear(hidden, layer.qkv_weight, layer.qkv_bias)
        q, k, v = qkv.split((heads * s.head_dim, kv_heads * s.head_dim, kv_heads * s.head_dim), dim=-1)
        q = q.reshape(num_tokens, heads, s.head_dim)
        k = k.reshape(num_tokens, kv_heads, s.head_dim)
        v = v.reshape(num_tokens, kv_heads, s.head_dim)
        if layer.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q = self.ops.rms_norm(q.reshape(-1, s.head_dim), layer.q_norm, s.rms_norm_eps).view_as(q)
            k = self.ops.rms_norm(k.reshape(-1, s.head_dim), layer.k_norm, s.rms_norm_eps).view_as(k)
        self.ops.rope_and_write_kv(q, k, v, positions, self.cos_sin, k_cache, v_cache, meta.slot_mapping)
        out = self.ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                       meta.seq_lens, self.scale, max_query_len=meta.max_query_len,
                                       max_seq_len=meta.max_seq_len, **meta.attention_options)
        return self._all_reduce(F.linear(out.reshape(num_tokens, -1), layer.o_weight))  # o is row-parallel

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return F.linear(hidden, self.lm_head).float()
