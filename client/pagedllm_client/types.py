"""What the client hands back: a Result, streamed Chunks, and PagedLLMError."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


class PagedLLMError(Exception):
    """The server (or the connection to it) failed the request.

    `message` is the server's own message (e.g. "input_ids: token id 600 is outside the vocabulary [0, 512)");
    `status` is the HTTP status code (int) over HTTP, the gRPC status name (str, e.g. "UNAVAILABLE") over
    gRPC, or None when the server gave none (an error inside a stream).
    """

    def __init__(self, message: str, status: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.message} (status {self.status})"


@dataclass
class Result:
    """A whole generation: the generated tokens and their text (the prompt is never included)."""
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" or "stop"
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list[float] | None = None  # one per token id with return_logprobs, else None
    # prompt tokens whose K/V came from the server's prefix cache: how the server got there, not what it
    # generated, so results that differ only in it are equal
    num_cached_tokens: int = field(default=0, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chunk:
    """One streamed response: the tokens it adds and their text. The last chunk has a finish_reason."""
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None until the request finishes
    num_output_tokens: int  # generated so far
    logprobs: list[float] | None = None  # one per token id with return_logprobs, else None
    num_input_tokens: int = 0  # the prompt's length
    # prompt tokens whose K/V came from the server's prefix cache: how the server got there, not what it
    # generated, so results that differ only in it are equal
    num_cached_tokens: int = field(default=0, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)
