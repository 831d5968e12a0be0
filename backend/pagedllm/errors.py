"""The two errors pagedllm raises on purpose. Free of heavy imports: the launcher, the embed model and the
OpenAI front end use them without loading torch or the kernels."""


class InvalidRequest(ValueError):
    """A request refused. The message starts with the offending input's name, e.g. `input_ids: ...`."""


class CheckpointError(ValueError):
    """A checkpoint directory pagedllm cannot serve: missing, incomplete, or an unsupported architecture."""


# How the `llm` model words the errors that are not the request's fault. Over a gRPC stream only an error's
# message reaches the client (no status code), so clients such as the OpenAI front end tell these apart by their
# first word; every other error message is the request's fault and starts with the name of the input at fault.
INTERNAL = "internal error"  # a bug or a failure inside the server (HTTP 500)
UNAVAILABLE = "unavailable"  # shutting down, unloading, the engine gone (HTTP 503)
CANCELLED = "cancelled"  # the client cancelled it


def server_error(kind: str, detail: str) -> str:
    return f"{kind}: {detail}"


def error_kind(message: str) -> str | None:
    """INTERNAL, UNAVAILABLE or CANCELLED for the model's own errors; None for a request's fault."""
    return next((k for k in (INTERNAL, UNAVAILABLE, CANCELLED) if message.startswith(k + ":")), None)
