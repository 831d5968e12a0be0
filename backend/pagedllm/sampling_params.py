"""How one request wants its tokens chosen and when it stops."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = 32
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_STRING_CHARS = 512
MAX_SEED = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until the model length (vLLM's OpenAI default); it ends there anyway
    min_tokens: int = 0  # EOS and stop tokens cannot be sampled, nor stop strings end it, before this many
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut before the first one found
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (HF, vLLM)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    return_logprobs: bool = False  # report each sampled token's log-probability (raw model distribution)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        """Raise ValueError('<name>: <problem>') for the first bad value."""
        def bad(name, msg):
            raise ValueError(f"{name}: {msg}")

        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
                bad("max_tokens", f"must be an integer >= 1 (or -1: up to the model length), got {self.max_tokens!r}")
            if self.max_tokens > max_model_len:  # within it, generation ends at the model length ("length")
                bad("max_tokens", f"{self.max_tokens} is more than the model length ({max_model_len})")
        most = max_model_len if self.max_tokens is None else self.max_tokens
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= most:
            bad("min_tokens", f"must be an integer in [0, max_tokens={most}], got {self.min_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0 or self.temperature > 100:
            bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1 \
                or self.top_k > MAX_TOP_K:
            bad("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            bad("seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"{len(self.stop_token_ids)} ids is more than the limit of {MAX_STOP_TOKEN_IDS}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                bad("stop_token_ids", f"{t!r} is outside the vocabulary [0, {vocab_size})")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        if not _finite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                bad(name, f"must be in [-2, 2], got {value!r}")
        if not isinstance(self.return_logprobs, bool):
            bad("return_logprobs", f"must be a boolean, got {self.return_logprobs!r}")
        if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"must be a list of at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                bad("stop", f"each stop string must be 1 to {MAX_STOP_STRING_CHARS} characters, got {s!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
