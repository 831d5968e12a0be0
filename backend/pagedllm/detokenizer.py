"""Incremental detokenization: the text each new token adds, such that the pieces concatenate to exactly
`tokenizer.decode(all_output_ids)`.

Decoding token by token loses information (sentencepiece's leading spaces, multi-byte characters split
across tokens), which is why stateless per-response detokenizers drop spaces. Here each step decodes a short
window that starts a few tokens back and emits only what the window's text gained; a piece ending in an
incomplete character (U+FFFD) waits for the next token. On finish the remainder of the full decode is flushed.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens before this are already emitted
        self.emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int], finished: bool) -> str:
        self.ids.extend(new_ids)
        if finished:
            full = self._decode(self.ids)
            piece = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        else:
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            window = self._decode(self.ids[self.prefix_offset:])
            if len(window) <= len(prefix) or window.endswith("\ufffd"):
                return ""
            piece = window[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.emitted += piece
        return piece
