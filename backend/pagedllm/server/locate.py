"""Where tritonserver and its Python backend are, and the environment the server and its stubs run in.

Two installations are supported:
- the NGC image: `tritonserver` on PATH, backends in /opt/tritonserver/backends (the stub there matches the
  image's Python);
- the `nvidia-pytriton` wheel (`pip install '.[server]'`): it ships tritonserver 2.51, the python backend and one
  stub per Python minor. The stub must sit beside libtriton_python.so, so a backend directory is built per run.
"""
from __future__ import annotations

import ctypes.util
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path

_STUB = "triton_python_backend_stub"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../pagedllm (not pagedllm.__file__: None in some installs)


class LauncherError(RuntimeError):
    """The server cannot be set up (no tritonserver, no libpython, port taken, ...)."""


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


def _prepend(env: dict[str, str], var: str, paths) -> None:
    parts = [str(p) for p in paths] + [p for p in env.get(var, "").split(os.pathsep) if p]
    env[var] = os.pathsep.join(dict.fromkeys(parts))  # keep order, drop duplicates


def python_environment(extra_paths=()) -> dict[str, str]:
    """The environment for our child processes (tritonserver's stubs, the OpenAI front end): PYTHONPATH starts
    with the directories of `pagedllm` and, in a source checkout, `pagedllm_client` (a checkout works without
    installing), then `extra_paths`. PAGEDLLM_* and everything else pass through."""
    env = dict(os.environ)
    client_dir = _PACKAGE_DIR.parents[1] / "client"
    packages = [_PACKAGE_DIR.parent] + ([client_dir] if client_dir.is_dir() else [])
    _prepend(env, "PYTHONPATH", [*packages, *extra_paths])
    env["PYTHONUNBUFFERED"] = "1"  # prints reach the logs as they happen
    env.setdefault("PAGEDLLM_PYTHON", sys.executable)  # tensor-parallel workers: the stub's sys.executable is the stub
    return env


def server_environment(lib_dirs: list[Path]) -> dict[str, str]:
    """tritonserver's environment; the stub inherits it."""
    # The stub embeds libpython, whose sys.prefix is not this venv: give it this interpreter's site-packages.
    env = python_environment([p for p in site.getsitepackages() if Path(p).is_dir()])
    _prepend(env, "LD_LIBRARY_PATH", lib_dirs)
    # With the venv's bin/ first on PATH the embedded interpreter finds `python3` there and its pyvenv.cfg,
    # so sys.prefix becomes the venv and its .pth files (editable installs) are processed too.
    _prepend(env, "PATH", [Path(sys.executable).parent])
    return env
