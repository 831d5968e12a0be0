"""What the OpenAI-compatible front end costs: the same streaming workload sent to one tritonserver through
Triton's gRPC protocol (pagedllm_client's AsyncClient, the baseline) and through the OpenAI API (pagedllm's
front end, which relays to the same gRPC endpoint), in one run, alternating the two paths so that drift hits
both. Prints TTFT, inter-token latency and output tok/s per path and the ratio; writes JSON and a PNG to --out.

The OpenAI side is read with aiohttp, as serving benchmarks do (vLLM's benchmark_serving, for one): the client,
the server and the engine share this machine's cores, and the `openai` package's per-chunk parsing would be
billed to the front end.

    python bench/openai_frontend.py                  # the default tiny model on CPU, concurrency 32
    python bench/openai_frontend.py --model DIR --concurrency 64 --requests 256 --max-tokens 128
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT / "client"), str(ROOT / "tests")]
from pagedllm.cli import default_model_dir  # noqa: E402
from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm_client import AsyncClient  # noqa: E402


async def grpc_request(client: AsyncClient, ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """(arrival time, tokens) of each streamed response."""
    events = []
    async for chunk in client.generate_stream(input_ids=ids, max_tokens=max_tokens, temperature=0,
                                              ignore_eos=True):
        events.append((time.perf_counter(), len(chunk.token_ids)))
    return events


async def grpc_whole(client: AsyncClient, ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """A non-streamed request (stream=false: one whole response): [(its arrival time, its tokens)]."""
    result = await client.generate(input_ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [(time.perf_counter(), len(result.token_ids))]


async def openai_whole(session, url: str, model: str, ids: list[int], max_tokens: int
                       ) -> list[tuple[float, int]]:
    """A non-streamed /v1/completions: [(its arrival time, its completion tokens)]."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        tokens = (await r.json())["usage"]["completion_tokens"]
    return [(time.perf_counter(), tokens)]


async def openai_request(session, url: str, model: str, ids: list[int], max_tokens: int
                         ) -> list[tuple[float, int]]:
    """A streamed /v1/completions. An event carries one engine step's text (a token whose text is still
    incomplete, such as part of a multi-byte character, sends none): the token count comes from the usage
    that `stream_options.include_usage` adds at the end, and is put on the last event."""
    events = []
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b'data: {"id"') and b'"choices":[]' not in line:
                events.append((time.perf_counter(), 0))
            elif b'"usage"' in line:
                tokens = json.loads(line[len(b"data: "):])["usage"]["completion_tokens"]
    events[-1] = (events[-1][0], tokens)
    return events


async def run_load(send, prompts: list[list[int]], concurrency: int) -> dict:
    """Send every prompt, `concurrency` at a time; latency statistics over all of them."""
    gate = asyncio.Semaphore(concurrency)
    ttft, itl, tokens = [], [], 0

    async def one(ids):
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            events = await send(ids)
        ttft.append(events[0][0] - start)
        itl.extend(b[0] - a[0] for a, b in zip(events, events[1:]))
        tokens += sum(n for _, n in events)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - t0
    return {"tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens,
            "ttft_ms_p50": 1e3 * float(np.percentile(ttft, 50)), "ttft_ms_p99": 1e3 * float(np.percentile(ttft, 99)),
            "itl_ms_p50": 1e3 * float(np.percentile(itl, 50)) if itl else float("nan"),  # none when not streamed
            "itl_ms_p99": 1e3 * float(np.percentile(itl, 99)) if itl else float("nan")}


async def measure(grpc_url: str, openai_url: str, model: str, prompts, args) -> dict[str, list[dict]]:
    import aiohttp

    grpc_client = AsyncClient(grpc_url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                    connector=aiohttp.TCPConnector(limit=args.concurrency))
    grpc_send, openai_send = (grpc_whole, openai_whole) if args.no_stream else (grpc_request, openai_request)
    paths = {"grpc": lambda ids: grpc_send(grpc_client, ids, args.max_tokens),
             "openai": lambda ids: openai_send(session, openai_url, model, ids, args.max_tokens)}
    try:
        for send in paths.values():  # warm-up: connections, first compiles
            await run_load(send, prompts[:args.concurrency], args.concurrency)
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, send in paths.items():
                runs[name].append(await run_load(send, prompts, args.concurrency))
                print(f"  {name:6s} {runs[name][-1]['tok_s']:8.1f} tok/s", flush=True)
        return runs
    finally:
        await grpc_client.close()
        await session.close()


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per path: the median over rounds of each statistic."""
    return {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}


def main() -> int:
    from server_utils import start_openai, start_server

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: pagedllm serve's default tiny Llama)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-stream", action="store_true",
                    help="non-streamed requests on both paths (TTFT is then the whole request's latency)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()

    model_dir = Path(args.model) if args.model else default_model_dir()
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    run_dir = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    print(f"server: {model_dir}, concurrency {args.concurrency}, {args.requests} requests, prompt "
          f"{args.prompt_len}, {args.max_tokens} new tokens, {args.rounds} rounds", flush=True)
    # pagedllm serve's engine defaults, with a cache that holds the whole load (no preemption in the numbers).
    with start_server(model_dir, runtime_dir=run_dir / "triton", num_kv_blocks=4096,
                      max_num_seqs=max(EngineConfig().max_num_seqs, args.concurrency)) as srv, \
            start_openai(srv, run_dir / "openai.log") as frontend:
        runs = asyncio.run(measure(srv.grpc_url, frontend.url, model_dir.name, prompts, args))
    stats = summarize(runs)
    ratio = stats["openai"]["tok_s"] / stats["grpc"]["tok_s"]
    print(f"\n{'path':8s} {'tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s}  (ms)")
    for name, s in stats.items():
        print(f"{name:8s} {s['tok_s']:9.1f} {s['ttft_ms_p50']:9.1f} {s['ttft_ms_p99']:9.1f} "
              f"{s['itl_ms_p50']:8.2f} {s['itl_ms_p99']:8.2f}")
    print(f"OpenAI / gRPC throughput: {ratio:.3f} ({(1 - ratio) * 100:+.1f} % cost)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "processor": platform.processor(), "model": str(model_dir),
              "args": vars(args), "runs": runs, "median": stats, "openai_over_grpc_tok_s": ratio}
    (out / "openai_frontend.json").write_text(json.dumps(result, indent=2))
    _plot(stats, out / "openai_frontend.png")
    print(f"wrote {out / 'openai_frontend.json'}")
    return 0


def _plot(stats: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = list(stats)
    for ax, (key, label) in zip(axes, [("tok_s", "output tok/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
                                       ("itl_ms_p50", "ITL p50 (ms)")]):
        ax.bar(names, [stats[n][key] for n in names], color=["tab:blue", "tab:orange"])
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
