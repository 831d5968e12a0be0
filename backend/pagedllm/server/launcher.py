"""Start tritonserver with the Python backend on the project's model repository.

Two installations are supported:
- the NGC image: `tritonserver` on PATH, backends in /opt/tritonserver/backends (the stub there matches the
  image's Python);
- the `nvidia-pytriton` wheel (`pip install '.[server]'`): it ships tritonserver 2.51, the python backend and one
  stub per Python minor. The stub must sit beside libtriton_python.so, so we build a backend directory per run.

Each run gets a runtime directory with that backend directory, a copy of the model repository whose
config.pbtxt parameters come from an EngineConfig, and the server log.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.errors import CheckpointError  # noqa: F401  (re-exported: what check_checkpoint raises)
from pagedllm.model.spec import check_checkpoint

_STUB = "triton_python_backend_stub"
_ERROR_LINE = re.compile(rb"E\d{4} |error: ")  # glog error lines and "error: creating server"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../pagedllm (not pagedllm.__file__: None in some installs)


class LauncherError(RuntimeError):
    """The server cannot be set up (no tritonserver, no libpython, port taken, ...)."""


class ServerError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the last lines of its log."""


# --------------------------------------------------------------------------------------------- locations
def cache_root() -> Path:
    return Path(os.environ.get("PAGEDLLM_CACHE") or "~/.cache/pagedllm").expanduser()


def project_model_repository() -> Path:
    """The repository shipped with the project: $PAGEDLLM_MODEL_REPOSITORY, else next to a source checkout."""
    env = os.environ.get("PAGEDLLM_MODEL_REPOSITORY")
    if env:
        if not Path(env).is_dir():
            raise LauncherError(f"PAGEDLLM_MODEL_REPOSITORY={env} is not a directory")
        return Path(env)
    checkout = _PACKAGE_DIR.parents[1] / "model_repository"  # repo/backend/pagedllm -> repo/model_repository
    if (checkout / "llm" / "config.pbtxt").is_file():
        return checkout
    raise LauncherError(f"model repository not found (looked in {checkout}); set PAGEDLLM_MODEL_REPOSITORY")


def _wheel_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> tuple[Path, Path | None, Path | None]:
    """(binary, ready-made backend directory or None, extra library directory or None).

    $PAGEDLLM_TRITONSERVER, then PATH (an NGC image), then the nvidia-pytriton wheel.
    """
    explicit = os.environ.get("PAGEDLLM_TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        binary = Path(explicit).resolve()
        for backends in (binary.parent.parent / "backends", Path("/opt/tritonserver/backends")):
            if (backends / "python" / _STUB).is_file():
                return binary, backends, None
        raise LauncherError(f"{binary}: no python backend with its stub next to it (looked in ../backends)")
    root = _wheel_root()
    if root is None:
        raise LauncherError("tritonserver not found: use the NGC image or `pip install 'pagedllm[server]'`")
    libs = root.parent.parent / "nvidia_pytriton.libs"  # auditwheel's folder beside the package
    return root / "bin" / "tritonserver", None, libs if libs.is_dir() else None


def _libpython_dir() -> Path | None:
    """Where the stub finds libpython3.X.so.1.0: this interpreter's own, else the system's (None = system)."""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent")
    if (libdir / name).is_file():
        return libdir  # same build as this venv: stdlib and extension modules agree exactly
    if ctypes.util.find_library(f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return None
    raise LauncherError(
        f"the Python backend stub needs {name}, which this Python lacks: install the shared library "
        f"(Debian/Ubuntu: apt-get install libpython{sys.version_info[0]}.{sys.version_info[1]})"
    )


def prepare_backend_directory(runtime_dir: Path) -> tuple[Path, Path, list[Path]]:
    """(tritonserver binary, backend directory, library directories for LD_LIBRARY_PATH)."""
    binary, backends, libs = find_tritonserver()
    if backends is not None:
        return binary, backends, []
    root = binary.parent.parent
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise LauncherError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = runtime_dir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / f, python_dir / f)
    # A copy, not a link: the backend looks for the stub beside libtriton_python.so. Its RPATH ($ORIGIN/...)
    # no longer resolves from here, so LD_LIBRARY_PATH carries nvidia_pytriton.libs instead.
    shutil.copy2(stub, python_dir / _STUB)
    lib_dirs = [d for d in (_libpython_dir(), libs) if d is not None]
    return binary, backends, lib_dirs


# ------------------------------------------------------------------------------------- model repository
def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite_parameters(text: str, values: dict[str, str]) -> str:
    """Set `parameters` string values in config.pbtxt text; keys it does not declare are appended."""
    for key, value in values.items():
        pattern = re.compile(
            r'(key\s*:\s*"' + re.escape(key) + r'"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*)"(?:[^"\\]|\\.)*"'
        )
        text, n = pattern.subn(lambda m: m.group(1) + _pbtxt_string(value), text)
        if n == 0:  # protobuf text format accepts a map entry given on its own after a list
            text += f'\nparameters {{ key: "{key}" value: {{ string_value: {_pbtxt_string(value)} }} }}\n'
    return text


def prepare_model_repository(source: Path, dest: Path, parameters: dict[str, str]) -> Path:
    """Copy every model folder of `source` to `dest`; every config.pbtxt that declares a `model_dir` parameter
    gets `parameters` (the engine's settings) written in."""
    shutil.rmtree(dest, ignore_errors=True)  # a runtime directory used again starts clean
    dest.mkdir(parents=True)
    for model in sorted(p for p in Path(source).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if dest.resolve().is_relative_to(model.resolve()):
            continue  # the runtime directory itself sits inside the source repository
        target = dest / model.name
        shutil.copytree(model, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        config = target / "config.pbtxt"
        if config.is_file():
            text = config.read_text()
            if re.search(r'key\s*:\s*"model_dir"', text):
                config.write_text(rewrite_parameters(text, parameters))
    return dest


def server_environment(lib_dirs: list[Path]) -> dict[str, str]:
    """The server's environment; the stub inherits it. PAGEDLLM_* and everything else pass through."""
    env = dict(os.environ)

    def prepend(var: str, paths) -> None:
        parts = [str(p) for p in paths] + [p for p in env.get(var, "").split(os.pathsep) if p]
        env[var] = os.pathsep.join(dict.fromkeys(parts))  # keep order, drop duplicates

    # The stub embeds libpython, whose sys.prefix is not this venv: give it this interpreter's site-packages
    # and the directory holding `pagedllm` (a source checkout works without installing).
    site_dirs = [p for p in site.getsitepackages() if Path(p).is_dir()]
    prepend("PYTHONPATH", [_PACKAGE_DIR.parent, *site_dirs])
    prepend("LD_LIBRARY_PATH", lib_dirs)
    # With the venv's bin/ first on PATH the embedded interpreter finds `python3` there and its pyvenv.cfg,
    # so sys.prefix becomes the venv and its .pth files (editable installs) are processed too.
    prepend("PATH", [Path(sys.executable).parent])
    env["PYTHONUNBUFFERED"] = "1"  # model.py's prints reach the log as they happen
    return env


def _prune_stale_runs(root: Path) -> None:
    """Remove run-<pid>-* directories left by processes that no longer exist (killed runs)."""
    for d in root.glob("run-*-*"):
        try:
            pid = int(d.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching thread dies, so no server is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ server
class TritonServer:
    """One tritonserver process. `with TritonServer(cfg) as s:` starts it and waits until it is ready.

    `model_repository` replaces the project's repository (tests use a throwaway one); `parameters` are extra
    config.pbtxt string parameters on top of the EngineConfig's. `echo` copies the server log to stdout.
    """

    def __init__(self, engine_config: EngineConfig, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_repository=None, parameters: dict[str, str] | None = None,
                 runtime_dir=None, log_verbose: int = 0, exit_timeout_s: int = 5, echo: bool = False,
                 extra_args: list[str] | tuple[str, ...] = (), check_model: bool = True):
        self.engine_config = engine_config
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.source_repository = Path(model_repository) if model_repository else None
        self.parameters = dict(parameters or {})
        self.log_verbose, self.exit_timeout_s, self.echo = log_verbose, exit_timeout_s, echo
        self.extra_args = list(extra_args)
        self.check_model = check_model
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self._log_handle = None
        self._tee: threading.Thread | None = None

    # paths and urls
    @property
    def model_repository(self) -> Path:
        return self.runtime_dir / "models"

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def prepare(self) -> list[str]:
        """Build the runtime directory and the command line (no process yet); return the command."""
        if self.command:
            return self.command
        cfg = self.engine_config
        if self.check_model:
            cfg.model_dir = str(check_checkpoint(cfg.model_dir))
        elif cfg.model_dir:
            cfg.model_dir = str(Path(cfg.model_dir).expanduser().absolute())
        if self.runtime_dir is None:
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            _prune_stale_runs(root)
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=root))
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        binary, backends, lib_dirs = prepare_backend_directory(self.runtime_dir)
        source = self.source_repository or project_model_repository()
        prepare_model_repository(source, self.model_repository, {**cfg.to_strings(), **self.parameters})
        self.env = server_environment(lib_dirs)
        # Each server its own shared-memory names, so servers side by side (tests) never collide.
        shm_prefix = f"pagedllm{os.getpid()}-{secrets.token_hex(4)}"
        self.command = [
            str(binary), "--model-repository", str(self.model_repository), "--backend-directory", str(backends),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--log-verbose", str(self.log_verbose),
            "--exit-timeout-secs", str(self.exit_timeout_s),
            "--backend-config", f"python,shm-region-prefix-name={shm_prefix}", *self.extra_args,
        ]
        return self.command

    def start(self) -> "TritonServer":
        command = self.prepare()
        taken = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if not port_is_free(p)]
        if taken:  # else a server already there could answer our readiness probe
            raise LauncherError(f"port(s) {', '.join(map(str, taken))} already in use")
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo else self._log_handle, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server in order
            preexec_fn=_die_with_parent,
        )
        if self.echo:
            self._tee = threading.Thread(target=self._copy_output, daemon=True)
            self._tee.start()
        return self

    def _copy_output(self) -> None:
        for line in iter(self.process.stdout.readline, b""):
            self._log_handle.write(line)
            self._log_handle.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(deque(f, maxlen=lines)).decode("utf-8", "replace")
        except OSError:
            return ""

    def log_errors(self, lines: int = 10) -> str:
        """The log's last error lines (`E1127 ...`): a model's load failure is there, not at the very end."""
        try:
            with open(self.log_path, "rb") as f:
                errors = deque((ln for ln in f if _ERROR_LINE.match(ln)), maxlen=lines)
        except OSError:
            return ""
        return b"".join(errors).decode("utf-8", "replace")

    def _failure(self, what: str) -> ServerError:
        if self._tee:
            self._tee.join(timeout=2)
        return ServerError(f"{what}; errors in {self.log_path}:\n{self.log_errors()}\nlast lines:\n"
                           + self.log_tail(20))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> "TritonServer":
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                raise self._failure(f"tritonserver exited with code {rc} before it was ready")
            if self.is_ready():
                return self
            if time.monotonic() > deadline:
                raise self._failure(f"tritonserver not ready after {timeout:.0f}s")
            time.sleep(0.25)

    def stop(self) -> int | None:
        """SIGINT (graceful unload), then SIGTERM, then SIGKILL to the whole group; returns the exit code."""
        proc, rc = self.process, None
        if proc is not None:
            steps = ((signal.SIGINT, self.exit_timeout_s + 30), (signal.SIGTERM, 10))
            for sig, wait_s in steps:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the stubs too (same process group)
                except ProcessLookupError:
                    pass
                proc.wait()
            rc = proc.returncode
            if self._tee:
                self._tee.join(timeout=5)
            self.process = None
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        if self._own_runtime_dir and self.runtime_dir and rc == 0:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)  # kept after a failure, for its log
        return rc

    def __enter__(self) -> "TritonServer":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
