"""Owns the model and its paged KV cache; turns a scheduled batch into one forward pass and sampled tokens.

A step's inputs travel as one int32 message (step_message.py), built on the host by rank 0 from the batch and
copied to the device in one copy; with tensor parallelism the same message is broadcast to the other ranks,
which run the same forward pass on their shard (`forward_message`), without logits or sampling.

Decode-only steps can take the padded path (`static_decode`): the batch is padded to the next size of a
ladder (1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs), with every step of a size laid out alike in one
device buffer made once; the padding rows decode a dummy token into a dummy KV block that no sequence owns.
On CUDA each size's forward pass (embedding through logits) is captured once as a CUDA graph and replayed;
on CPU the same path runs eagerly, so that CI covers the padding and the buffers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..model.llama import LlamaForCausalLM
from ..model.metadata import AttentionMetadata
from .sampler import Sampler
from .scheduler import ScheduledSequence
from .step_message import STEP, STOP, Header, MessageLayout, StepViews, fill, views

log = logging.getLogger("pagedllm")


def graphs_capturable(device: torch.device, kernels: str) -> bool:
    """Whether decode steps can be captured as CUDA graphs: on CUDA, with the Triton kernels (the torch
    reference attention syncs with the host, with .tolist(), which capture forbids)."""
    return device.type == "cuda" and kernels == "triton"


def padded_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes that are captured: 1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's ladder)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


@dataclass
class Distributed:
    """How rank 0 hands each step to the other tensor-parallel ranks (parallel.Workers), or nothing."""
    broadcast: Callable | None = None  # (message on the device, its host copy, embedding rows or None) -> None

    @property
    def active(self) -> bool:
        return self.broadcast is not None


@dataclass
class _Graph:
    graph: object
    logits: torch.Tensor | None  # [padded size, vocab], written by every replay (None on ranks that do not sample)


@dataclass
class _StaticDecode:
    """The padded path's state: the sizes, and on CUDA the captured graphs (one memory pool)."""
    sizes: list[int]
    graphs: dict[int, _Graph] = field(default_factory=dict)
    attention: dict = field(default_factory=dict)  # fixed launch options for the captured attention
    pool: object = None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, static_decode: bool = False,
                 cuda_graphs: bool = False, distributed: Distributed | None = None, samples: bool = True):
        spec = model.spec
        self.model = model
        self.device = model.device
        self.samples = samples  # rank 0 computes logits and samples; the other ranks only their shard's layers
        self._bind_device()
        self.block_size = block_size
        # One block more than the block manager knows of: the padding rows of a padded step write there.
        self.dummy_block = num_blocks
        shape = (num_blocks + 1, block_size, model.num_kv_heads, spec.head_dim)  # this rank's KV heads
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=self.device),
                           torch.zeros(shape, dtype=model.dtype, device=self.device))
                          for _ in range(spec.num_layers)]
        self.sampler = Sampler(model.ops, self.device)
        self.max_model_len = max_model_len
        self.layout = MessageLayout(max(max_num_batched_tokens, max_num_seqs), max_num_seqs,
                                    -(-max_model_len // block_size))
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(self.layout.capacity, dtype=torch.int32, pin_memory=pinned)
        self._message = torch.zeros(self.layout.capacity, dtype=torch.int32, device=self.device)
        self._host_read: torch.cuda.Event | None = None  # recorded after the last copy out of _host (CUDA)
        self.distributed = distributed or Distributed()
        self.static = _StaticDecode(padded_sizes(max_num_seqs)) if static_decode else None
        if self.static is not None and cuda_graphs and self.device.type == "cuda":
            if graphs_capturable(self.device, model.ops.name):
                self._capture_graphs()
            else:
                log.info("pagedllm: no CUDA graphs with kernels=%s; padded decode steps run eagerly", model.ops.name)

    def _bind_device(self) -> None:
        """Make this runner's GPU the calling thread's current one. Triton launches kernels, and CUDA graphs and
        events use streams, on the current device, which is cuda:0 on a thread that never chose one; an engine on
        cuda:1 stepped from such a thread would launch its kernels on the wrong GPU. Cheap when already bound."""
        if self.device.type == "cuda" and self.device.index is not None \
                and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)

    @staticmethod
    def kv_bytes_per_block(model_spec, block_size: int, dtype: torch.dtype, num_kv_heads: int) -> int:
        """K and V of every layer for one block, for num_kv_heads heads (a rank's share under tensor
        parallelism)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_spec.num_layers * block_size * num_kv_heads * model_spec.head_dim * elem

    # ---- rank 0: a batch in, tokens out ----------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> tuple[list[int], list[float | None]]:
        """Forward the batch. For each sequence whose step reaches its end, in order: the sampled token, and its
        log-probability under the model (None unless the request asked for it)."""
        self._bind_device()
        header, pieces, embeds = self._prepare(batch)
        message = self._upload(header, pieces)
        embed_rows = torch.cat([rows for _, rows in embeds]) if embeds else None
        if self.distributed.active:
            self.distributed.broadcast(message, self._host, embed_rows)
        logits = self._forward(message, header, embed_rows)
        seqs = [item.seq for item in batch if item.samples]
        if not seqs:
            return [], []
        return self._sample(logits[:len(seqs)], seqs)

    def _prepare(self, batch: list[ScheduledSequence]):
        """The step's header and metadata pieces on the host, and its prompt-embedding segments."""
        if self.static is not None and _decode_only(batch) and len(batch) <= self.static.sizes[-1]:
            return self._prepare_padded(batch)
        bs = self.block_size
        lens = np.fromiter((item.num_new_tokens for item in batch), dtype=np.int32, count=len(batch))
        starts = np.zeros(len(batch) + 1, dtype=np.int32)
        np.cumsum(lens, out=starts[1:])
        computed = np.fromiter((item.seq.num_computed_tokens for item in batch), dtype=np.int32, count=len(batch))
        seq_lens = computed + lens
        width = max(len(item.seq.block_table) for item in batch)
        tables = np.zeros((len(batch), width), dtype=np.int32)
        ids = np.empty(starts[-1], dtype=np.int32)
        embeds: list[tuple[int, torch.Tensor]] = []
        for b, item in enumerate(batch):
            seq, start, end = item.seq, computed[b], seq_lens[b]
            tables[b, :len(seq.block_table)] = seq.block_table
            ids[starts[b]:starts[b + 1]] = seq.token_ids[start:end]
            if seq.prompt_embeds is not None and start < seq.num_prompt_tokens:
                embeds.append((int(starts[b]), seq.prompt_embeds[start:min(end, seq.num_prompt_tokens)]))
        # positions and slots of every token, vectorised: each token's sequence, then its offset within it
        owner = np.repeat(np.arange(len(batch)), lens)
        positions = (np.arange(starts[-1], dtype=np.int32) - starts[owner] + computed[owner]).astype(np.int32)
        slots = tables[owner, positions // bs] * bs + positions % bs
        samples = np.fromiter((item.samples for item in batch), dtype=bool, count=len(batch))
        sample_rows = (starts[1:] - 1)[samples]
        header = Header(STEP, int(starts[-1]), len(batch), width, int(samples.sum()), int(lens.max()),
                        int(seq_lens.max()), False, tuple((row, rows.shape[0]) for row, rows in embeds))
        return header, [ids, positions, slots, starts, seq_lens, tables, sample_rows], embeds

    def _prepare_padded(self, batch: list[ScheduledSequence]):
        """A decode-only batch padded to the next captured size, laid out as every step of that size is."""
        n = len(batch)
        size = next(s for s in self.static.sizes if s >= n)
        bs, width = self.block_size, self.layout.max_blocks
        tables = np.zeros((size, width), dtype=np.int32)
        tables[n:, 0] = self.dummy_block
        positions = np.zeros(size, dtype=np.int32)
        ids = np.zeros(size, dtype=np.int32)
        for b, item in enumerate(batch):
            seq = item.seq
            tables[b, :len(seq.block_table)] = seq.block_table
            positions[b] = seq.num_computed_tokens
            ids[b] = seq.token_ids[-1]
        slots = tables[np.arange(size), positions // bs] * bs + positions % bs
        starts = np.arange(size + 1, dtype=np.int32)
        seq_lens = positions + 1
        header = Header(STEP, size, size, width, size, 1, self.max_model_len, True)
        return header, [ids, positions, slots, starts, seq_lens, tables, np.arange(size, dtype=np.int32)], []

    def _upload(self, header: Header, pieces: list[np.ndarray]) -> torch.Tensor:
        """The message into the host buffer (reused every step) and to the device in one copy."""
        # The last step's copy is asynchronous and only queued behind that step's forward pass; a step that
        # sampled nothing (a prefill chunk) did not wait for it. Writing the buffer before the copy has read it
        # would hand that step this step's slots and positions.
        if self._host_read is not None:
            self._host_read.synchronize()
        used = fill(self._host.numpy(), header, self.layout, pieces)
        if self.device.type != "cuda":
            return self._host
        self._message[:used].copy_(self._host[:used], non_blocking=True)
        if self._host_read is None:
            self._host_read = torch.cuda.Event()
        self._host_read.record()
        return self._message

    # ---- every rank: the forward pass --------------------------------------------------------------------
    @torch.inference_mode()
    def forward_message(self, message: torch.Tensor, header: Header, embed_rows: torch.Tensor | None) -> None:
        """The other ranks' side of a step: the same forward pass on the message rank 0 sent (no logits)."""
        self._bind_device()
        self._forward(message, header, embed_rows, logits=False)

    @property
    def message_buffer(self) -> torch.Tensor:
        """Where a step's message lives on this rank (the device buffer on CUDA, which captured graphs read;
        the host buffer on CPU): the other ranks receive rank 0's broadcast into it."""
        return self._message if self.device.type == "cuda" else self._host

    def stop_message(self) -> torch.Tensor:
        """The message that tells the other ranks to stop (the device copy on CUDA, as every message)."""
        self._bind_device()
        return self._upload(Header(STOP), [])

    def _forward(self, message: torch.Tensor, header: Header, embed_rows: torch.Tensor | None,
                 logits: bool = True) -> torch.Tensor | None:
        if header.padded and self.static is not None and header.num_seqs in self.static.graphs:
            graph = self.static.graphs[header.num_seqs]
            graph.graph.replay()
            return graph.logits
        v = views(message, header, self.layout)
        hidden = self._hidden(v, header, embed_rows)
        if not logits or not self.samples or header.num_sampled == 0:
            return None
        return self.model.logits(hidden[v.sample_rows])

    def _hidden(self, v: StepViews, header: Header, embed_rows: torch.Tensor | None) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=v.slots, query_start_loc=v.query_start_loc, seq_lens=v.seq_lens,
                                 block_tables=v.block_tables, max_query_len=header.max_query_len,
                                 max_seq_len=header.max_seq_len,
                                 attention_options=self.static.attention if header.padded and self.static else {})
        hidden = self.model.embed(v.ids)
        offset = 0
        for row, rows in header.segments:
            hidden[row:row + rows] = embed_rows[offset:offset + rows]
            offset += rows
        return self.model.forward(hidden, v.positions, meta, self.kv_caches)

    def _sample(self, logits: torch.Tensor, seqs) -> tuple[list[int], list[float | None]]:
        asked = [i for i, s in enumerate(seqs) if s.params.return_logprobs]
        if asked:  # from the raw logits: the sampler may apply penalties in place
            asked_rows = torch.tensor(asked, device=self.device)
            log_probs = torch.log_softmax(logits[asked_rows].float(), dim=-1)
        tokens = self.sampler(logits, seqs)
        token_list = tokens.tolist()  # the step's one host sync
        logprobs: list[float | None] = [None] * len(seqs)
        if asked:
            picked = log_probs.gather(1, tokens[asked_rows][:, None]).squeeze(1).tolist()
            for i, lp in zip(asked, picked):
                logprobs[i] = lp
        return token_list, logprobs

    # ---- CUDA graphs ------------------------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        """One graph per padded size, largest first, sharing one memory pool; the attention's split-KV scratch
        comes from a workspace made once and its split count is fixed (results never depend on it)."""
        from ..kernels.paged_attention import make_split_kv_workspace

        spec, largest = self.model.spec, self.static.sizes[-1]
        splits = 8
        self.static.attention = {"split_kv": True, "num_splits": splits,
                                 "workspace": make_split_kv_workspace(largest, self.model.num_heads, spec.head_dim,
                                                                      splits, self.device)}
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.monotonic()
        for size in reversed(self.static.sizes):
            self.static.graphs[size] = self._capture(size)
        torch.cuda.synchronize(self.device)
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("pagedllm: captured CUDA graphs for decode batches %s in %.1f s, %.0f MiB",
                 self.static.sizes, time.monotonic() - start, used)

    def _capture(self, size: int) -> _Graph:
        """Capture the forward pass of a padded decode step of `size` rows (all of them padding: the dummy
        block), reading the message buffer where every step of that size puts its pieces."""
        batch_start = time.monotonic()
        header = Header(STEP, size, size, self.layout.max_blocks, size, 1, self.max_model_len, True)
        pieces = _padding_pieces(size, self.layout.max_blocks, self.dummy_block, self.block_size)
        message = self._upload(header, pieces)
        for _ in range(2):  # warm up outside the graph: kernels compiled, cuBLAS handles made
            self._captured_step(message, header)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.static.pool):
            out = self._captured_step(message, header)
        if self.static.pool is None:
            self.static.pool = graph.pool()
        log.info("pagedllm: CUDA graph for decode batch %d captured in %.2f s", size, time.monotonic() - batch_start)
        return _Graph(graph, out)

    def _captured_step(self, message: torch.Tensor, header: Header) -> torch.Tensor | None:
        """What a graph replays: the layers, and on rank 0 the logits."""
        v = views(message, header, self.layout)
        hidden = self._hidden(v, header, None)
        return self.model.logits(hidden) if self.samples else None


def _decode_only(batch: list[ScheduledSequence]) -> bool:
    """Every sequence feeds its one newest token, a generated one (no prefill chunk, no embedding row), and
    samples the next. A preempted sequence recomputing its generated tokens can be scheduled one token that is
    not its newest (and samples nothing): that is a prefill chunk, whatever its length."""
    return all(item.num_new_tokens == 1 and item.samples
               and item.seq.num_computed_tokens >= item.seq.num_prompt_tokens for item in batch)


def _padding_pieces(size: int, width: int, dummy_block: int, block_size: int) -> list[np.ndarray]:
    """A padded step of nothing but padding rows (what graphs are captured on)."""
    tables = np.zeros((size, width), dtype=np.int32)
    tables[:, 0] = dummy_block
    zeros = np.zeros(size, dtype=np.int32)
    return [zeros, zeros, np.full(size, dummy_block * block_size, dtype=np.int32),
            np.arange(size + 1, dtype=np.int32), np.ones(size, dtype=np.int32), tables,
            np.arange(size, dtype=np.int32)]
