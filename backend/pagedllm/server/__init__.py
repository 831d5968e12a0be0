"""Running tritonserver for pagedllm: `locate` finds the server and its Python backend, `repository` renders
the runtime model repository, `process` runs and supervises the server."""
from pagedllm.errors import CheckpointError
from pagedllm.model.spec import check_checkpoint
from pagedllm.server.locate import LauncherError, cache_root, project_model_repository
from pagedllm.server.process import ServerError, TritonServer

__all__ = [
    "CheckpointError",
    "LauncherError",
    "ServerError",
    "TritonServer",
    "cache_root",
    "check_checkpoint",
    "project_model_repository",
]
