"""A small load generator: random-id prompts streamed concurrently from threads, with latency statistics."""
from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .types import PagedLLMError


@dataclass
class RequestStats:
    ttft: float | None = None  # seconds from sending to the first token
    itl: list[float] = field(default_factory=list)  # seconds between tokens (a chunk's gap split evenly)
    output_tokens: int = 0
    error: str | None = None


def measure(client, ids: list[int], max_tokens: int, sampling: dict) -> RequestStats:
    stats = RequestStats()
    start = last = time.perf_counter()
    try:
        for chunk in client.generate(input_ids=ids, max_tokens=max_tokens, stream=True, **sampling):
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n:
                if stats.ttft is None:
                    stats.ttft = now - start
                else:
                    stats.itl += [(now - last) / n] * n
                last = now
            stats.output_tokens = chunk.num_output_tokens
    except PagedLLMError as e:
        stats.error = e.message
    except OSError as e:
        stats.error = str(e)
    return stats


class Progress:
    """tqdm when installed, else a plain bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._lock = threading.Lock()
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, file=sys.stderr, unit="req", leave=False)
            except ImportError:
                self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        sys.stderr.flush()

    def update(self) -> None:
        with self._lock:
            self.done += 1
            if self._tqdm is not None:
                self._tqdm.update(1)
            elif self.enabled:
                self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _percentiles_ms(values: list[float], qs) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values) * 1000.0
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in qs}


def run(client, *, requests: int, concurrency: int, max_tokens: int, prompt_len: int, vocab_size: int,
        seed: int = 0, sampling: dict | None = None, progress: bool = True) -> dict:
    """Send `requests` random prompts of `prompt_len` ids from [4, vocab_size), `concurrency` at a time;
    return the summary (rates, TTFT and inter-token latency percentiles in milliseconds, errors)."""
    if requests < 1 or concurrency < 1 or prompt_len < 1:
        raise ValueError("requests, concurrency and prompt_len must be at least 1")
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(prompt_len)] for _ in range(requests)]
    bar = Progress(requests, progress)

    def one(ids):
        s = measure(client, ids, max_tokens, sampling or {})
        bar.update()
        return s

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, prompts))
    finally:
        bar.close()
    duration = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "protocol": client.protocol,
        "url": client.url,
        "requests": requests,
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(ok) / duration, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration, 3),
        "ttft_ms": _percentiles_ms([r.ttft for r in ok if r.ttft is not None], (50, 90, 99)),
        "itl_ms": _percentiles_ms([x for r in ok for x in r.itl], (50, 90)),
    }


def format_summary(s: dict) -> str:
    def ms(d):
        return "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in d.items())

    lines = [
        f"{s['completed']}/{s['requests']} requests in {s['duration_s']:.2f} s "
        f"({s['protocol']} {s['url']}, concurrency {s['concurrency']}, prompt {s['prompt_len']}, "
        f"max_tokens {s['max_tokens']})",
        f"requests/s         {s['requests_per_s']:.2f}",
        f"output tokens/s    {s['output_tokens_per_s']:.1f}  ({s['output_tokens']} tokens)",
        f"TTFT ms            {ms(s['ttft_ms'])}",
        f"inter-token ms     {ms(s['itl_ms'])}",
        f"errors             {s['errors']}" + (f"  (first: {s['first_error']})" if s["errors"] else ""),
    ]
    return "\n".join(lines)
