"""`pagedllm-client`: generate from the command line, or benchmark a server.

    pagedllm-client generate --text "Hello" --max-tokens 32
    pagedllm-client generate --protocol http --ids 1,450,22 --no-stream --json
    pagedllm-client generate --text "Hi" --embed-with ./ckpt --chat      # embeddings computed here
    pagedllm-client generate --text "Hi" --stop "." --repetition-penalty 1.2 --logprobs --json
    pagedllm-client bench --concurrency 8 --requests 64 --max-tokens 64 --prompt-len 128
"""
from __future__ import annotations

import argparse
import json
import sys

from pagedllm.interface import OPTIONS

from .client import DEFAULT_URLS, Client
from .options import GenerateOptions
from .types import PagedLLMError


def _ids(value: str) -> list[int]:
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server address (default localhost:8001 for grpc, localhost:8000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", default="llm", help="model name in the repository (default llm)")
    p.add_argument("--timeout", type=float, default=None, help="seconds a request may take")
    p.add_argument("--json", action="store_true", help="machine-readable output")


# Flags spelt otherwise than `--` and the option's name with dashes (also taken: that spelling).
FLAG_ALIASES = {"return_logprobs": "--logprobs"}


def _option_args(p: argparse.ArgumentParser, **defaults) -> None:
    """A flag per sampling option of the interface table, its dest the option's name. A flag not given is not
    sent (the server's default applies) unless `defaults` (the command's own) sets it."""
    for o in OPTIONS:
        names = ["--" + o.name.replace("_", "-")] + ([FLAG_ALIASES[o.name]] if o.name in FLAG_ALIASES else [])
        kwargs = {"dest": o.name, "help": _help(o, defaults).replace("%", "%%")}  # argparse formats help with %
        if o.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif o.kind == "strings":
            kwargs.update(action="append", metavar="STRING")  # repeated for several
        elif o.kind == "ints":
            kwargs.update(type=_ids, metavar="ID,ID,...")
        else:
            kwargs["type"] = {"int": int, "float": float}[o.kind]
        p.add_argument(*names, **kwargs)
    p.set_defaults(**defaults)


def _help(option, defaults: dict) -> str:
    if option.name in defaults:
        return f"{option.doc} (default here: {json.dumps(defaults[option.name])})"
    if option.default in (None, ()):  # nothing worth showing: the doc says what happens without it
        return option.doc
    return f"{option.doc} (server default: {option.default_text})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one prompt")
    _connection_args(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help="prompt text (tokenized by the server, or here with --embed-with)")
    prompt.add_argument("--ids", type=_ids, help="prompt token ids, e.g. 1,450,22")
    prompt.add_argument("--embeds", metavar="FILE",
                        help="prompt embeddings [seq_len, hidden]: .npy or .safetensors")
    g.add_argument("--embeds-key", help="tensor name in a .safetensors --embeds file holding several")
    g.add_argument("--embed-with", metavar="DIR",
                   help="with --text: tokenize and embed the text here with checkpoint DIR, send embeddings")
    g.add_argument("--chat", action="store_true", help="with --embed-with: apply DIR's chat template")
    g.add_argument("--embeds-encoding", choices=("fp16", "fp32", "base64"),
                   help="how embeddings travel (default fp16 over grpc, fp32 over http)")
    _option_args(g)
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they arrive (default)")

    b = sub.add_parser("bench", help="concurrent random-prompt load with latency statistics")
    _connection_args(b)
    b.add_argument("--concurrency", type=int, default=1)
    b.add_argument("--requests", type=int, default=16)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--vocab-size", type=int, default=256, help="prompt ids are drawn from [4, vocab-size)")
    b.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts")
    _option_args(b, max_tokens=32, ignore_eos=True)  # the bench generates max-tokens every time
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr (default)")
    return parser


def _sampling(args) -> dict:
    """GenerateOptions' fields from the flags (None: not given, not sent)."""
    return {name: getattr(args, name) for name in GenerateOptions.names()}


def _prompt(args, parser) -> dict:
    if args.embed_with and args.text is None:
        parser.error("--embed-with needs --text")
    if args.chat and not args.embed_with:
        parser.error("--chat needs --embed-with (the chat template is applied here)")
    if args.embeds_key and not args.embeds:
        parser.error("--embeds-key needs --embeds")
    if args.embed_with:
        from .embeddings import embed_text

        _, embeds = embed_text(args.embed_with, args.text, chat=args.chat)
        return {"prompt_embeds": embeds}
    if args.embeds:
        from .embeddings import load_embeds_file

        return {"prompt_embeds": load_embeds_file(args.embeds, args.embeds_key)}
    if args.ids is not None:
        return {"input_ids": args.ids}
    return {"text": args.text}


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def cmd_generate(args, parser) -> int:
    if args.return_logprobs and not args.json:
        parser.error("--logprobs needs --json (the plain output is the text alone)")
    try:
        prompt = _prompt(args, parser)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with Client(args.url, args.protocol, args.model, embeds_encoding=args.embeds_encoding) as client:
        if not args.stream:
            result = client.generate(**prompt, **_sampling(args), timeout=args.timeout)
            if args.json:
                _emit(result.to_dict())
            else:
                print(result.text)
            return 0
        with client.generate(**prompt, **_sampling(args), stream=True, timeout=args.timeout) as chunks:
            for chunk in chunks:
                if args.json:
                    _emit(chunk.to_dict())
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        if not args.json:
            sys.stdout.write("\n")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    with Client(args.url, args.protocol, args.model) as client:
        summary = bench.run(client, requests=args.requests, concurrency=args.concurrency,
                            max_tokens=args.max_tokens, prompt_len=args.prompt_len,
                            vocab_size=args.vocab_size,
                            seed=args.prompt_seed, progress=args.progress,
                            sampling={k: v for k, v in _sampling(args).items() if k != "max_tokens"}
                            | {"timeout": args.timeout})
    if args.json:
        _emit(summary)
    else:
        print(bench.format_summary(summary))
    return 1 if summary["errors"] else 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.url = args.url or DEFAULT_URLS[args.protocol]
    try:
        if args.command == "generate":
            return cmd_generate(args, parser)
        return cmd_bench(args)
    except PagedLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad argument value the client rejects before sending
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the open stream was closed on the way out: the server cancels it
        return 130


if __name__ == "__main__":
    sys.exit(main())
