"""One request from arrival to its final output: the Sequence the scheduler runs, the text side (incremental
detokenizer, stop strings) and everything generated so far.

The engine applies each sampled token through `Request.on_token`, which decides whether the request stops and
returns the step's delta (a StepOutput). Callers that stream send the delta; callers that want the whole
output read it off the request (`output_token_ids`, `text`, `logprobs`, `finish_reason`) once it finished.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..detokenizer import IncrementalDetokenizer
from ..stop_strings import StopStringFilter
from .sequence import Sequence


@dataclass(frozen=True)
class StepOutput:
    """What one step added to one request. A snapshot: it is read on other threads (the Triton model's sender)
    while the engine goes on with the request; only once finished is the request itself (its whole output)
    safe to read there."""
    request: "Request"
    new_token_ids: list[int]
    new_text: str  # "" when the checkpoint has no tokenizer
    new_logprobs: list[float] | None  # with return_logprobs: one per new token
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    def __init__(self, seq: Sequence, tokenizer, eos_token_ids: frozenset[int], max_model_len: int,
                 prompt_text: str | None = None):
        self.seq = seq
        self.prompt_text = prompt_text  # for text prompts: callers may echo it
        self._eos = frozenset() if seq.params.ignore_eos else eos_token_ids
        self._stop_ids = frozenset(seq.params.stop_token_ids)
        self._max_model_len = max_model_len
        self._detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        stop = seq.params.stop
        self._stop_strings = StopStringFilter(stop, seq.params.include_stop_str_in_output) \
            if stop and tokenizer is not None else None
        self.text = ""  # the generated text so far, as sent (cut at a stop string)
        self.logprobs: list[float] | None = [] if seq.params.return_logprobs else None

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def params(self):
        return self.seq.params

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids

    @property
    def finish_reason(self) -> str | None:  # kept on the sequence, which the scheduler finishes
        return self.seq.finish_reason

    @property
    def finished(self) -> bool:
        return self.seq.finish_reason is not None

    def on_token(self, token: int, logprob: float | None) -> StepOutput:
        """Apply a token the scheduler just appended: decide whether the request stops, and return the delta."""
        reason = self._stop_reason(token)
        text, stop_string_found = self._new_text(token, finished=reason is not None)
        if stop_string_found:
            reason = "stop"
        self.seq.finish_reason = reason
        self.text += text
        new_logprobs = None
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            new_logprobs = [logprob]
        return self._output([token], text, new_logprobs)

    def on_abort(self) -> StepOutput:
        self.seq.finish_reason = "abort"
        return self._output([], "", None)

    def _output(self, token_ids: list[int], text: str, logprobs: list[float] | None) -> StepOutput:
        seq = self.seq
        return StepOutput(self, token_ids, text, logprobs, seq.finish_reason, seq.num_prompt_tokens,
                          seq.num_output_tokens, seq.num_cached_tokens)

    @property
    def _may_stop(self) -> bool:
        """min_tokens: before that many tokens, neither EOS, a stop token nor a stop string ends it."""
        return self.seq.num_output_tokens >= self.seq.params.min_tokens

    def _stop_reason(self, token: int) -> str | None:
        seq = self.seq
        if self._may_stop and (token in self._eos or token in self._stop_ids):
            return "stop"
        max_tokens = seq.params.max_tokens
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or seq.num_tokens >= self._max_model_len:
            return "length"
        return None

    def _new_text(self, token: int, finished: bool) -> tuple[str, bool]:
        """The text this token adds (after stop-string handling), and whether a stop string was found."""
        if self._detokenizer is None:
            return "", False
        piece = self._detokenizer.add([token], finished)
        if self._stop_strings is None:
            return piece, False
        return self._stop_strings.feed(piece, finished, search=self._may_stop)
