"""One forward pass's inputs as one int32 message: a fixed header, then the step's metadata. Rank 0 fills it on
the host from the scheduled batch; the same message (one broadcast a step) drives every tensor-parallel rank,
and one copy moves it to the device, where its pieces are read as views.

Layout: header [kind, T, B, M, S, max_query_len, max_seq_len, padded, n_segments, (row, rows) per embedding
segment ...], then ids[T], positions[T], slots[T], query_start_loc[B+1], seq_lens[B], block_tables[B*M],
sample_rows[S]. `padded`: a decode-only step padded to a captured batch size (CUDA graphs), whose layout is the
same for every step of that size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STEP, STOP = 1, 0
FIXED_HEADER = 9


@dataclass(frozen=True)
class MessageLayout:
    """The message's capacity, the same on every rank (from the engine's settings)."""
    max_tokens: int  # max_num_batched_tokens (or the largest padded batch, if larger)
    max_seqs: int
    max_blocks: int  # block table width: blocks of the longest sequence

    @property
    def header_len(self) -> int:
        return FIXED_HEADER + 2 * self.max_seqs

    @property
    def capacity(self) -> int:
        t, b = self.max_tokens, self.max_seqs
        return self.header_len + 3 * t + (b + 1) + b + b * self.max_blocks + b


@dataclass
class Header:
    kind: int
    num_tokens: int = 0
    num_seqs: int = 0
    table_width: int = 0
    num_sampled: int = 0
    max_query_len: int = 0
    max_seq_len: int = 0
    padded: bool = False
    segments: tuple[tuple[int, int], ...] = ()  # (first row, rows) of prompt-embedding segments

    def write(self, out: np.ndarray) -> None:
        fixed = [self.kind, self.num_tokens, self.num_seqs, self.table_width, self.num_sampled,
                 self.max_query_len, self.max_seq_len, int(self.padded), len(self.segments)]
        out[:FIXED_HEADER] = fixed
        for i, (row, rows) in enumerate(self.segments):
            out[FIXED_HEADER + 2 * i:FIXED_HEADER + 2 * i + 2] = (row, rows)

    @classmethod
    def read(cls, message: np.ndarray) -> "Header":
        kind, t, b, m, s, mq, ms, padded, n_seg = (int(x) for x in message[:FIXED_HEADER])
        segs = message[FIXED_HEADER:FIXED_HEADER + 2 * n_seg].reshape(-1, 2)
        return cls(kind, t, b, m, s, mq, ms, bool(padded), tuple((int(r), int(n)) for r, n in segs))

    @property
    def embed_rows(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass
class StepViews:
    """The pieces of a message on the device (views of it: no copies)."""
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    sample_rows: torch.Tensor


def views(message: torch.Tensor, header: Header, layout: MessageLayout) -> StepViews:
    t, b, m, s = header.num_tokens, header.num_seqs, header.table_width, header.num_sampled
    sizes = (t, t, t, b + 1, b, b * m, s)
    parts, offset = [], layout.header_len
    for n in sizes:
        parts.append(message[offset:offset + n])
        offset += n
    ids, positions, slots, qsl, seq_lens, tables, rows = parts
    return StepViews(ids, positions, slots, qsl, seq_lens, tables.view(b, m), rows)


def fill(out: np.ndarray, header: Header, layout: MessageLayout, pieces: list[np.ndarray]) -> int:
    """Write the header and the pieces (in the layout's order) into the host buffer; returns the length used."""
    header.write(out)
    offset = layout.header_len
    for piece in pieces:
        n = piece.size
        out[offset:offset + n] = piece.reshape(-1)
        offset += n
    return offset
