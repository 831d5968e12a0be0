"""`pagedllm` command line: `serve` runs tritonserver with the llm model (and the OpenAI-compatible API beside
it); `openai` runs that API alone against a tritonserver; `make-tiny-model` writes a test checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.lifeline import DEFAULT_GRACE_S

# The checkpoint `pagedllm serve` builds when no --model is given: random weights, but every part of a
# Llama-3 style model (GQA, llama3 rope scaling) at a size that runs quickly on a CPU.
DEFAULT_TINY = dict(arch="llama", seed=0, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=512, max_position=2048, rope_scaling="llama3")
_DEFAULT_TINY_VERSION = "1"  # bump when DEFAULT_TINY changes, so old caches are rebuilt
OPENAI_PORT_ENV = "PAGEDLLM_OPENAI_PORT"  # --openai-port where the command line is not ours (KServe)
_STARTED_AS_TRITONSERVER = "--started-as-tritonserver"  # a hidden serve flag: see tritonserver_style


def default_model_dir() -> Path:
    """The default tiny checkpoint, built on first use (in a temp folder, renamed when complete)."""
    from pagedllm.server import cache_root

    path = cache_root() / "default-tiny-llama"
    stamp = path / ".pagedllm-tiny-version"
    if stamp.is_file() and stamp.read_text() == _DEFAULT_TINY_VERSION:
        return path
    import shutil
    import tempfile

    from pagedllm.tiny_model import make_tiny_model

    print(f"pagedllm: building the default tiny checkpoint in {path} (random weights)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-tiny-", dir=path.parent))
    make_tiny_model(tmp, **DEFAULT_TINY)
    (tmp / stamp.name).write_text(_DEFAULT_TINY_VERSION)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


_CHOICES = {"dtype": ("auto", "float32", "float16", "bfloat16"), "kernels": ("auto", "triton", "torch")}


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (except model_dir); None = keep the EngineConfig default."""
    for f in dataclasses.fields(EngineConfig):
        if f.name in ("model_dir", "device"):
            continue
        flag, doc = "--" + f.name.replace("_", "-"), f"engine {f.name} (default {f.default})"
        if isinstance(f.default, bool):  # --name / --no-name: type=bool would read "False" as True
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=None, choices=_CHOICES.get(f.name),
                           help=doc)


def build_parser() -> argparse.ArgumentParser:
    from pagedllm.server.process import DEFAULT_STARTUP_TIMEOUT_S

    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run tritonserver with the llm model in the foreground",
                           usage="pagedllm serve [options] [-- tritonserver options]",
                           description="Arguments after `--` go to tritonserver as they are (after ours).")
    serve.add_argument("--model", default=os.environ.get("PAGEDLLM_MODEL") or None,
                       help="Hugging Face checkpoint directory or repo id (org/name: from the Hugging Face cache; "
                            "HF_HUB_OFFLINE=1 serves it from the local cache only) (default: $PAGEDLLM_MODEL, "
                            "else a tiny random Llama)")
    serve.add_argument("--model-repository", default=None,
                       help="serve this Triton model repository as it is, instead of the project's with the "
                            "engine flags written in (its `llm` config.pbtxt must set model_dir)")
    serve.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    serve.add_argument("--startup-timeout", "--ready-timeout", dest="startup_timeout", type=float,
                       default=DEFAULT_STARTUP_TIMEOUT_S,
                       help="seconds the models get to load; past it serve names the models still loading, with "
                            "where their Python stands and their last log lines, stops everything and exits 1 "
                            f"(default {DEFAULT_STARTUP_TIMEOUT_S:g})")
    serve.add_argument("--shutdown-grace-secs", type=float, default=DEFAULT_GRACE_S,
                       help="on SIGTERM / Ctrl-C, what requests in flight get to finish before they are ended "
                            f"with an error (default {DEFAULT_GRACE_S:g})")
    from pagedllm.openai_api.server import DEFAULT_PORT as DEFAULT_OPENAI_PORT
    from pagedllm.openai_api.server import add_arguments as openai_arguments

    serve.add_argument("--openai-port", type=int, default=os.environ.get(OPENAI_PORT_ENV) or None,
                       help=f"port of the OpenAI-compatible API (default: ${OPENAI_PORT_ENV}, else "
                            f"{DEFAULT_OPENAI_PORT}; 0: do not start it)")
    serve.add_argument(_STARTED_AS_TRITONSERVER, action="store_true", help=argparse.SUPPRESS)

    openai_arguments(serve, standalone=False)
    _engine_flags(serve)

    openai = sub.add_parser("openai", help="the OpenAI-compatible API alone, against a running tritonserver")
    openai_arguments(openai)

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight HF checkpoint with a tokenizer")
    from pagedllm.tiny_model import add_cli_arguments

    add_cli_arguments(tiny)
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"pagedllm serve: error: {message}", file=sys.stderr, flush=True)
    return code


def openai_port(args) -> int:
    """The OpenAI API's port (0: none). Ports that collide are refused here, before anything starts: else
    tritonserver takes the port and the front end fails only once the model has loaded. That goes for
    Triton's own ports, a port asked for (the flag, or $PAGEDLLM_OPENAI_PORT) and the default one, except
    when started as `tritonserver ...`: KServe's Triton runtime passes --grpc-port=9000 and asks for no
    OpenAI API, so it is left off, with a line saying how to turn it on."""
    from pagedllm.openai_api.server import DEFAULT_PORT
    from pagedllm.server import LauncherError

    flag_of = {}
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        port = getattr(args, flag[2:].replace("-", "_"))
        if port in flag_of:
            raise LauncherError(f"{flag} and {flag_of[port]} are both {port}")
        flag_of[port] = flag
    if args.openai_port is not None:
        if args.openai_port in flag_of:
            raise LauncherError(f"--openai-port and {flag_of[args.openai_port]} are both {args.openai_port}")
        return args.openai_port
    if DEFAULT_PORT not in flag_of:
        return DEFAULT_PORT
    if not args.started_as_tritonserver:
        raise LauncherError(f"{flag_of[DEFAULT_PORT]} is {DEFAULT_PORT}, the OpenAI API's default port: give "
                            f"--openai-port another one (0: no OpenAI API)")
    print(f"pagedllm: no OpenAI API: its default port {DEFAULT_PORT} is tritonserver's {flag_of[DEFAULT_PORT]} "
          f"here; set {OPENAI_PORT_ENV} to a free port to start it", file=sys.stderr, flush=True)
    return 0


def _openai_frontend(args, server, model_dir, port: int):
    """The OpenAI front end to start beside the server, or None (port 0, or no checkpoint known)."""
    if not port or model_dir is None:
        return None
    from pagedllm.server.frontend import OpenAIFrontend

    return OpenAIFrontend(triton_grpc_url=server.grpc_url, model_dir=str(model_dir), port=port,
                          served_model_name=_served_model_name(args, model_dir), api_key=args.api_key,
                          metrics_url=server.metrics_url, max_model_len=_served_max_model_len(args, server),
                          max_request_bytes=args.max_request_bytes)


def _served_model_name(args, model_dir: Path) -> str | None:
    """--served-model-name; else a Hugging Face repo id as it was given, since its checkpoint is a snapshot
    folder named by a commit hash; else None: the front end names the model after its folder."""
    from pagedllm.server.repository import repository_parameter

    given = repository_parameter(args.model_repository, "model_dir") if args.model_repository else args.model
    if args.served_model_name or not given or Path(given).expanduser().exists():
        return args.served_model_name
    return given if Path(model_dir).name != Path(given).name else None


def _served_max_model_len(args, server) -> int:
    """The engine's max_model_len as configured (0: the checkpoint's): a repository served as it is says it in
    its config.pbtxt, else the flags do."""
    if args.model_repository:
        from pagedllm.server.repository import repository_parameter

        value = repository_parameter(args.model_repository, "max_model_len")
        return int(value) if value.isdigit() else 0  # anything else the model itself refuses at load
    return server.engine_config.max_model_len


def _ready_banner(args, model_dir, frontend) -> str:
    lines = [f"\npagedllm: serving {model_dir or args.model_repository}", f"  HTTP    http://0.0.0.0:{args.http_port}",
             f"  gRPC    0.0.0.0:{args.grpc_port}", f"  metrics http://0.0.0.0:{args.metrics_port}/metrics"]
    if frontend is not None:
        lines.append(f"  OpenAI  http://0.0.0.0:{frontend.port}/v1")
    return "\n".join(lines + ["  Ctrl-C stops the server."])


def _server(args, triton_args: list[str]):
    """(the TritonServer to run, the checkpoint directory or None)."""
    from pagedllm.model.spec import check_checkpoint, resolve_model
    from pagedllm.server import TritonServer
    from pagedllm.server.repository import repository_model_dir

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
                 if f.name != "model_dir" and getattr(args, f.name) is not None}
    common = dict(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                  log_verbose=args.log_verbose, shutdown_grace_s=args.shutdown_grace_secs, echo=True,
                  extra_args=triton_args)
    if args.model_repository:  # the user's repository as it is: the engine flags are its config.pbtxt's
        model_dir = repository_model_dir(args.model_repository)
        config = EngineConfig(model_dir=str(model_dir or ""), **overrides)
        return TritonServer(config, model_repository=args.model_repository, repository_as_is=True,
                            check_model=False, **common), model_dir
    model_dir = check_checkpoint(resolve_model(args.model)) if args.model else default_model_dir()
    return TritonServer(EngineConfig(model_dir=str(model_dir), **overrides), **common), model_dir


def serve(args, triton_args: list[str] = ()) -> int:
    """Runs until a signal (exit 0), tritonserver or the front end exiting (1), or the model becoming unable
    to serve (3: a dead stub, a dead engine): an orchestrator then restarts it."""
    from pagedllm.server import CheckpointError, LauncherError, ServerError
    from pagedllm.server.process import port_is_free

    try:
        port = openai_port(args)  # before anything starts
        server, model_dir = _server(args, list(triton_args))
    except (CheckpointError, LauncherError) as e:
        return _fail(str(e))
    frontend = _openai_frontend(args, server, model_dir, port)

    def on_stop_signal(signum, frame):  # Ctrl-C, docker stop, kill: one way out, and one only
        # The stop in `finally` is not to be cut short: a second signal would skip killing what is left of the
        # server's processes, removing its shared memory and stopping the front end. It is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    on_sigint = signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    stop = {}
    try:
        if frontend is not None and not port_is_free(frontend.port):  # before anything starts
            raise LauncherError(f"port {frontend.port} (OpenAI API) already in use")
        server.start()
        server.wait_ready(args.startup_timeout, notice=lambda text: print(f"pagedllm: {text}", file=sys.stderr,
                                                                          flush=True))
        if frontend is not None:  # listening; its /health says whether Triton's llm model is ready
            frontend.start().wait_ready(healthy=False)
        print(_ready_banner(args, model_dir, frontend), flush=True)
        return _supervise(server, frontend, stop)
    except KeyboardInterrupt:
        print(f"pagedllm: stopping the server (requests in flight get {args.shutdown_grace_secs:g} s)",
              file=sys.stderr, flush=True)
        return 0
    except LauncherError as e:
        return _fail(str(e))
    except ServerError as e:
        return _fail(str(e), 1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # leaving another way: no signal cuts the stop short either
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop(**stop)
        if frontend is not None:
            frontend.stop()
        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _supervise(server, frontend, stop: dict) -> int:
    while True:
        trouble = server.trouble()
        if trouble:
            # The failed instance's requests were answered already, or never will be (a dead stub); the other
            # instances drain theirs, then the server goes and the orchestrator starts a fresh one.
            stop["kill"] = True
            return _fail(f"{trouble}; stopping (exit 3, to be restarted)", 3)
        if server.poll() is not None:
            return _fail(f"tritonserver exited with code {server.poll()} (log: {server.log_path})", 1)
        if frontend is not None and frontend.poll() is not None:
            return _fail(f"the OpenAI front end exited with code {frontend.poll()}", 1)
        time.sleep(0.5)


# tritonserver's own flags that `pagedllm serve` takes as its own (the rest go to tritonserver as they are).
_SERVE_FLAGS_OF_TRITONSERVER = ("--model-repository", "--model-store", "--http-port", "--grpc-port", "--metrics-port")


def tritonserver_style(argv: list[str]) -> list[str]:
    """`tritonserver --model-repository=DIR [flags]` (how Triton's Helm chart and KServe start a Triton
    container) as `pagedllm serve --model-repository DIR [ports] -- [the other flags]`: the repository is served
    as it is, under pagedllm serve's supervision (drain, crash detection, the OpenAI API). A hidden flag tells
    serve it was started this way (see openai_port)."""
    ours, theirs, i = [], [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in _SERVE_FLAGS_OF_TRITONSERVER:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            ours += ["--model-repository" if name == "--model-store" else name, value]
        else:
            theirs.append(argv[i])
        i += 1
    return ["serve", _STARTED_AS_TRITONSERVER, *ours] + (["--", *theirs] if theirs else [])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tritonserver"]:
        argv = tritonserver_style(argv[1:])
    ours, triton_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(ours)
    if args.command == "serve":
        return serve(args, triton_args)
    if args.command == "openai":
        from pagedllm.openai_api.server import main as openai_main

        return openai_main(argv[1:])
    from pagedllm.tiny_model import from_cli_arguments

    print(from_cli_arguments(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
