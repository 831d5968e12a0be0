"""Owns the model and its paged KV cache; turns a scheduled batch into one forward pass and sampled tokens."""
from __future__ import annotations

import numpy as np
import torch

from ..model.llama import LlamaForCausalLM
from ..model.metadata import AttentionMetadata
from .sampler import Sampler
from .scheduler import ScheduledSequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        spec = model.spec
        self.model = model
        self.device = model.device
        self.block_size = block_size
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=self.device),
                           torch.zeros(shape, dtype=model.dtype, device=self.device))
                          for _ in range(spec.num_layers)]
        self.sampler = Sampler(model.ops, self.device)

    @staticmethod
    def kv_bytes_per_block(model_spec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_spec.num_layers * block_size * model_spec.num_kv_heads * model_spec.head_dim * elem

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> list[int]:
        """Forward the batch; return the sampled token of each sequence whose step reaches its end, in order."""
        bs = self.block_size
        ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        embeds: list[tuple[int, torch.Tensor]] = []  # (first row, rows) from prompt embeddings
        max_blocks = max(len(s.seq.block_table) for s in batch)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        for b, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[b, :len(table)] = table
            pos = np.arange(start, end)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            ids.extend(seq.token_ids[start:end])
            if seq.prompt_embeds is not None and start < seq.num_prompt_tokens:
                embeds.append((starts[-1], seq.prompt_embeds[start:min(end, seq.num_prompt_tokens)]))
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(end)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            max_query_len=max(s.num_new_tokens for s in batch),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model.embed(torch.tensor(ids, dtype=torch.int64).to(dev))
        for row, rows in embeds:
            hidden[row:row + rows.shape[0]] = rows
        positions_t = torch.from_numpy(np.concatenate(positions)).to(dev)
        hidden = self.model.forward(hidden, positions_t, meta, self.kv_caches)

        sampling = [b for b, item in enumerate(batch) if item.samples]
        if not sampling:
            return []
        last_rows = torch.tensor([starts[b + 1] - 1 for b in sampling], dtype=torch.int64).to(dev)
        logits = self.model.logits(hidden[last_rows])
        return self.sampler(logits, [batch[b].seq for b in sampling]).tolist()  # the step's one host sync
