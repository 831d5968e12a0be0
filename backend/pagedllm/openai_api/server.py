"""`pagedllm openai`: the OpenAI-compatible API on its own, against any tritonserver that serves the `llm` model
(`pagedllm serve` starts one beside its tritonserver). Runs on uvicorn.

    pagedllm openai --triton-url HOST:8001 --model-dir DIR [--port 9000] [--served-model-name NAME]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..model.spec import load_model_spec, resolve_model
from ..tokenizer import load_tokenizer, max_token_chars
from .embeds_payload import max_base64_chars
from .prompts import ModelFacts

API_KEY_ENV = "PAGEDLLM_API_KEY"
PARENT_PID_ENV = "PAGEDLLM_PARENT_PID"  # set by the process that starts us as its child (server/frontend.py)
_PR_SET_PDEATHSIG = 1
DEFAULT_PORT = 9000
# Starlette reads a whole body into memory and parses its JSON on the one event loop, while every other request
# waits: the default body limit never goes above this (--max-request-bytes can).
MAX_DEFAULT_REQUEST_BYTES = 256 << 20
MIN_DEFAULT_REQUEST_BYTES = 16 << 20  # long texts and token-id prompts, many of them
_BODY_SLACK_BYTES = 1 << 20  # the rest of a body beside one prompt_embeds payload


def add_arguments(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    """The front end's flags; `pagedllm serve` takes the same ones except those it sets itself."""
    if standalone:
        p.add_argument("--triton-url", default="localhost:8001", help="tritonserver's gRPC address (host:port)")
        p.add_argument("--model-dir", required=True,
                       help="the served checkpoint's directory or Hugging Face repo id (its tokenizer, chat "
                            "template and sizes)")
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument("--metrics-url", default=None, help="Triton's metrics page, served again on /metrics")
        p.add_argument("--max-model-len", type=int, default=0,
                       help="the served model length, as the engine's max_model_len is configured (default 0: "
                            "the checkpoint's max_position_embeddings): the longest prompt_embeds accepted, and "
                            "what the default body limit is sized for")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the checkpoint folder's name)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body in bytes (default: room for one fp16 prompt_embeds payload of the "
                        f"served model length, from {MIN_DEFAULT_REQUEST_BYTES >> 20} to "
                        f"{MAX_DEFAULT_REQUEST_BYTES >> 20} MiB)")


def model_facts(model_dir: str | Path, max_model_len: int = 0) -> ModelFacts:
    """The served model's facts; its length as the engine takes it."""
    spec = load_model_spec(model_dir)
    tokenizer = load_tokenizer(model_dir)
    return ModelFacts(hidden_size=spec.hidden_size, max_rows=spec.model_length(max_model_len), tokenizer=tokenizer,
                      max_token_chars=max_token_chars(tokenizer) if tokenizer is not None else 1)


def default_max_request_bytes(facts: ModelFacts) -> int:
    """Room for one prompt_embeds payload of the served model length in fp16 (vLLM's clients send fp16, bf16
    or fp32: wider ones at full length need --max-request-bytes), within the bounds above."""
    one_payload = max_base64_chars(facts.max_rows, facts.hidden_size, value_bytes=2) + _BODY_SLACK_BYTES
    return min(MAX_DEFAULT_REQUEST_BYTES, max(MIN_DEFAULT_REQUEST_BYTES, one_payload))


def build(args):
    """The app for parsed arguments (tests build it the same way)."""
    from .app import Settings, build_app

    model_dir = resolve_model(args.model_dir)  # a directory, or a Hugging Face repo id
    facts = model_facts(model_dir, args.max_model_len)
    name = args.served_model_name or (Path(args.model_dir).name if Path(args.model_dir).exists() else args.model_dir)
    max_bytes = args.max_request_bytes or default_max_request_bytes(facts)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return build_app(Settings(triton_url=args.triton_url, served_model_name=name, facts=facts, api_key=api_key,
                              metrics_url=args.metrics_url, max_request_bytes=max_bytes))


def die_with_parent() -> None:
    """Started as a child (PAGEDLLM_PARENT_PID): get SIGTERM when the parent dies, so that no front end outlives
    `pagedllm serve`. Asked for here, after exec, rather than in a preexec_fn between fork and exec, which is
    not safe in a threaded parent. The parent may have died before this ran: then we leave now."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise SystemExit(f"pagedllm openai: the process that started it ({parent}) is gone; exiting")


def main(argv=None) -> int:
    import uvicorn

    die_with_parent()
    parser = argparse.ArgumentParser(prog="pagedllm openai", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = build(args)
    # One event loop serves every request: the work is Triton's, this process only relays it.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
