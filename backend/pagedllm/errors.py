"""The two errors pagedllm raises on purpose. Free of heavy imports: the launcher, the embed model and the
OpenAI front end use them without loading torch or the kernels."""


class InvalidRequest(ValueError):
    """A request refused. The message starts with the offending input's name, e.g. `input_ids: ...`."""


class CheckpointError(ValueError):
    """A checkpoint directory pagedllm cannot serve: missing, incomplete, or an unsupported architecture."""
