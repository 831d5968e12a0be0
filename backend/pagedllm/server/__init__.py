"""Running tritonserver for pagedllm: see launcher.py."""
from pagedllm.server.launcher import (
    CheckpointError,
    LauncherError,
    ServerError,
    TritonServer,
    check_checkpoint,
    project_model_repository,
)

__all__ = [
    "CheckpointError",
    "LauncherError",
    "ServerError",
    "TritonServer",
    "check_checkpoint",
    "project_model_repository",
]
