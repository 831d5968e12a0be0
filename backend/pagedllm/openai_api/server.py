"""`pagedllm openai`: the OpenAI-compatible API on its own, against any tritonserver that serves the `llm` model
(`pagedllm serve` starts one beside its tritonserver). Runs on uvicorn.

    pagedllm openai --triton-url HOST:8001 --model-dir DIR [--port 9000] [--served-model-name NAME]
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..model.spec import load_model_spec, resolve_model
from ..tokenizer import load_tokenizer
from .embeds_payload import max_base64_chars
from .prompts import ModelFacts

API_KEY_ENV = "PAGEDLLM_API_KEY"
DEFAULT_PORT = 9000


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
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the checkpoint folder's name)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body (default: room for two of the largest prompt_embeds payloads)")


def model_facts(model_dir: str | Path) -> ModelFacts:
    spec = load_model_spec(model_dir)
    max_rows = spec.max_position_embeddings
    if spec.sliding_window:
        max_rows = min(max_rows, spec.sliding_window)
    return ModelFacts(hidden_size=spec.hidden_size, max_rows=max_rows, tokenizer=load_tokenizer(model_dir))


def build(args):
    """The app for parsed arguments (tests build it the same way)."""
    from .app import Settings, build_app

    model_dir = resolve_model(args.model_dir)  # a directory, or a Hugging Face repo id
    facts = model_facts(model_dir)
    name = args.served_model_name or (Path(args.model_dir).name if Path(args.model_dir).exists() else args.model_dir)
    max_bytes = args.max_request_bytes or max(64 << 20, 2 * max_base64_chars(facts.max_rows, facts.hidden_size)
                                              + (1 << 20))
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return build_app(Settings(triton_url=args.triton_url, served_model_name=name, facts=facts, api_key=api_key,
                              metrics_url=args.metrics_url, max_request_bytes=max_bytes))


def main(argv=None) -> int:
    import uvicorn

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
