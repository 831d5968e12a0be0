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
        shape = (num_blocks, block_size, model.num_kv_heads, spec.head_dim)  # this rank's KV heads
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=self.device),
                           torch.zeros(shape, dtype=model.dtype, device=self.device))
                          for _ in range(spec.num_layers)]
        self.sampler = Sampler(model.ops, self.device)
        self._host: torch.Tensor | None = None  # reusable host buffer for each step's metadata
        self._host_read: torch.cuda.Event | None = None  # recorded after the last copy out of _host (CUDA)

    @staticmethod
    def kv_bytes_per_block(model_spec, block_size: int, dtype: torch.dtype, num_kv_heads: int) -> int:
        """K and V of every layer for one block, for num_kv_heads heads (a rank's share under tensor
        parallelism)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_spec.num_layers * block_size * num_kv_heads * model_spec.head_dim * elem

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Move the step's int32 metadata to the device in one copy: packed into one (pinned, on CUDA) host
        buffer that is reused every step, then split into device views."""
        total = sum(a.size for a in arrays)
        # The last step's copy is asynchronous and only queued behind that step's forward pass; a step that
        # sampled nothing (a prefill chunk) did not wait for it. Writing the buffer before the copy has read it
        # would hand that step this step's slots and positions.
        if self._host_read is not None:
            self._host_read.synchronize()
        if self._host is None or self._host.numel() < total:
            self._host = torch.empty(max(total, 2 * (0 if self._host is None else self._host.numel())),
                                     dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host = self._host[:total]
        np.concatenate([a.ravel() for a in arrays], out=host.numpy())
        if self.device.type == "cuda":
            flat = host.to(self.device, non_blocking=True)
            if self._host_read is None:
                self._host_read = torch.cuda.Event()
            self._host_read.record()
        else:
            flat = host
        views, offset = [], 0
        for a in arrays:
            views.append(flat[offset:offset + a.size].view(a.shape))
            offset += a.size
        return views

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> tuple[list[int], list[float | None]]:
        """Forward the batch. For each sequence whose step reaches its end, in order: the sampled token, and its
        log-probability under the model (None unless the request asked for it)."""
        bs = self.block_size
        ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        embeds: list[tuple[int, torch.Tensor]] = []  # (first row, rows) from prompt embeddings
        max_blocks = max(len(s.seq.block_table) for s in batch)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        for b, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = np.asarray(seq.block_table, dtype=np.int32)
            block_tables[b, :len(table)] = table
            pos = np.arange(start, end, dtype=np.int32)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            ids.append(seq.token_ids[start:end])
            if seq.prompt_embeds is not None and start < seq.num_prompt_tokens:
                embeds.append((starts[-1], seq.prompt_embeds[start:min(end, seq.num_prompt_tokens)]))
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(end)
        sampling = [b for b, item in enumerate(batch) if item.samples]

        ids_t, positions_t, slots_t, starts_t, seq_lens_t, tables_t, last_rows = self._upload([
            np.fromiter((t for chunk in ids for t in chunk), dtype=np.int32, count=starts[-1]),
            np.concatenate(positions), np.concatenate(slots), np.asarray(starts, dtype=np.int32),
            np.asarray(seq_lens, dtype=np.int32), block_tables,
            np.asarray([starts[b + 1] - 1 for b in sampling], dtype=np.int32)])
        meta = AttentionMetadata(slot_mapping=slots_t, query_start_loc=starts_t, seq_lens=seq_lens_t,
                                 block_tables=tables_t, max_query_len=max(s.num_new_tokens for s in batch),
                                 max_seq_len=max(seq_lens))
        hidden = self.model.embed(ids_t)
        for row, rows in embeds:
            hidden[row:row + rows.shape[0]] = rows
        hidden = self.model.forward(hidden, positions_t, meta, self.kv_caches)
        if not sampling:
            return [], []
        logits = self.model.logits(hidden[last_rows])
        seqs = [batch[b].seq for b in sampling]
        asked = [i for i, s in enumerate(seqs) if s.params.return_logprobs]
        if asked:  # from the raw logits: the sampler may apply penalties in place
            asked_rows = torch.tensor(asked, device=self.device)
            log_probs = torch.log_softmax(logits[asked_rows], dim=-1)
        tokens = self.sampler(logits, seqs)
        token_list = tokens.tolist()  # the step's one host sync
        logprobs: list[float | None] = [None] * len(seqs)
        if asked:
            picked = log_probs.gather(1, tokens[asked_rows][:, None]).squeeze(1).tolist()
            for i, lp in zip(asked, picked):
                logprobs[i] = lp
        return token_list, logprobs
