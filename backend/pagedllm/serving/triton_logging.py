"""pagedllm's log records through Triton's own logger (`pb_utils.Logger`), so that tritonserver's
`--log-verbose`, `--log-format` and `--log-file` apply to them as to the server's own lines."""
from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils


class TritonLogHandler(logging.Handler):
    """Each line is an IPC call to the server; logging.Handler's own lock keeps them one at a time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            logger = pb_utils.Logger
            if record.levelno >= logging.ERROR:
                logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                logger.log_warn(message)
            elif record.levelno >= logging.INFO:
                logger.log_info(message)
            else:
                logger.log_verbose(message)  # shown with tritonserver --log-verbose 1
        except Exception:  # a log line must never break serving
            self.handleError(record)


def install_triton_log_handler() -> None:
    """Route the `pagedllm` logger (and its children) to Triton's log, once."""
    log = logging.getLogger("pagedllm")
    if not any(isinstance(h, TritonLogHandler) for h in log.handlers):
        handler = TritonLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # Triton decides what is shown (verbose lines need --log-verbose)
    log.propagate = False


def dump_stacks_on_sigusr1() -> None:
    """SIGUSR1 writes every thread's Python stack to stderr, which the stub shares with tritonserver (its log):
    `pagedllm serve` asks a stub that is still initializing past the start-up timeout where it stands. Called
    when a model module is imported, so it is in place before `initialize` runs."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
