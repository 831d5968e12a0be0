"""Stop strings (vLLM's `stop`): end a request when its generated text contains one of them.

Fed the text pieces the detokenizer emits, it returns what may be sent on: the text is cut at the first
stop string (kept when `include_stop_str_in_output`), and while streaming, an ending of the text that is the
start of a stop string is held back until the next pieces show whether the stop string completes.
"""
from __future__ import annotations


class StopStringFilter:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        self.stop = stop
        self.include = include_stop_str_in_output
        self.hold = max(len(s) for s in stop) - 1
        self.text = ""  # all generated text so far
        self.sent = 0  # characters of it already passed on

    def feed(self, piece: str, finished: bool, search: bool = True) -> tuple[str, bool]:
        """Returns (text to send now, whether a stop string was found). After a hit, feed no more.
        search=False (before min_tokens) passes the piece on without looking for stop strings."""
        self.text += piece
        if not search:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        # A new match must end inside the new piece: search from where it could start.
        start = max(0, len(self.text) - len(piece) - self.hold)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) != -1]
        if hits:
            i, s = min(hits)
            end = i + len(s) if self.include else i
            out = self.text[self.sent:end]
            self.sent = end
            return out, True
        end = len(self.text) if finished else max(self.sent, len(self.text) - self._partial_match())
        out = self.text[self.sent:end]
        self.sent = end
        return out, False

    def _partial_match(self) -> int:
        """Length of the longest ending of the text that begins some stop string (0 if none)."""
        for n in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
