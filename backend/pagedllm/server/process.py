"""One tritonserver process for pagedllm: a runtime directory (backend directory, model repository copy with
the engine's settings, the server log), the command line, start, readiness, supervision, and an orderly stop.

Starting: readiness is polled until the start-up timeout. Past it the launcher does not wait on in silence: it
names each model still loading and the instances whose stubs run, asks those stubs for their Python stacks
(SIGUSR1: serving/triton_logging.py registers the dump) and puts the stacks and the models' last log lines in
the error.

Stopping: the `llm` model is told to drain (lifeline.py: it refuses new requests, gives those in flight the
grace period, then ends the rest with an error) and an unload of every model is started through Triton's
repository API, which makes the server report not ready at once while the model's responses still flow (once
tritonserver itself shuts down it delivers none). The server runs with explicit model control for this, its
repository API restricted to a key only the launcher knows. Once the model says every request had its final
response, the launcher waits until the repository index shows every model unloaded (their `finalize` and
stub exits can take seconds on a busy machine, more than tritonserver's exit timeout), then SIGINT stops
tritonserver, which then finds nothing live to wait for (a client that keeps an idle stream open can hold an
unload: that wait is bounded, then the exit timeout applies). Whatever is left of the process group (stubs) is
then killed, and the shared-memory regions under this server's prefix removed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.lifeline import DEFAULT_GRACE_S, SHM_PREFIX_ENV, LauncherEnd
from pagedllm.model.spec import check_checkpoint

from .locate import LauncherError, cache_root, prepare_backend_directory, project_model_repository, server_environment
from .repository import prepare_model_repository

_ERROR_LINE = re.compile(rb"E\d{4} |error: ")  # glog error lines and "error: creating server"
_STUB_NAME = b"triton_python_backend_stub"
_INSTANCE_BEGUN = re.compile(rb"TRITONBACKEND_ModelInstanceInitialize: (\S+) \(")
_LOADING = re.compile(rb'"loading: (.+?):\d+"')  # model_lifecycle's lines, at every --log-verbose
_LOAD_ENDED = re.compile(rb"\"(?:successfully loaded|failed to load) '(.+?)'")
_CONTROL_HEADER = "pagedllm-launcher-key"  # the repository API's key header (its value is per server)
KILL_AFTER_S = 2.0  # a server that cannot serve: time to deliver the errors it holds, then SIGKILL
EXIT_TIMEOUT_S = 5  # after the drain and the unloads, how long tritonserver waits for what is still open
FINALIZE_START_S = 5.0  # after the drain: for Triton to begin unloading llm (about 1 s), unless a stream holds it
UNLOAD_WAIT_S = 30.0  # then: for every model's finalize and stub exit (seconds on a busy machine)
DEFAULT_STARTUP_TIMEOUT_S = 600.0  # big checkpoints load for minutes; past this the launcher says who is stuck
LOADING_NOTICE_S = 60.0  # while models load, a line this often says which ones are still loading
STACK_DUMP_WAIT_S = 3.0  # for the stuck stubs to write their Python stacks into the log


class ServerError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the last lines of its log."""


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



def _signal_and_wait(proc: subprocess.Popen, steps) -> None:
    for sig, wait_s in steps:
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group: tritonserver itself if still there, and the stubs, which are
    not always gone with it (a crashed tritonserver leaves them running)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_members(pgid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the live processes in a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == b"Z":  # the 5th field is the group; Z: a zombie
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                members.append((int(entry), f.read()))
        except (OSError, IndexError, ValueError):
            continue
    return members


def _stub_instance(cmdline: bytes) -> str:
    """The instance a stub serves (`llm_0_0`): the Python backend passes it as the 8th argument after the stub's
    path (a model's own stub may be a script, run by its interpreter)."""
    args = cmdline.split(b"\0")
    at = next((i for i, a in enumerate(args) if _STUB_NAME in a), 0)
    return args[at + 8].decode(errors="replace") if len(args) > at + 8 else "?"


class _StartingStubs:
    """Stub deaths while the server starts. An instance whose `initialize` began (the log says so) while its
    model is still loading and that has had no running stub for longer than a failed `initialize` takes to be
    logged is dead: the Python backend of tritonserver 2.51 waits without a timeout for the first message of a
    stub it started, so a stub that died before sending it (a crash at its start) leaves the load waiting
    forever."""

    GONE_FOR_S = 5.0

    def __init__(self):
        self.gone_since: dict[str, float] = {}
        self.pids: dict[str, int] = {}

    def dead(self, begun: list[str], loading: list[str], running: dict[str, int]) -> str | None:
        now = time.monotonic()
        self.pids.update(running)
        for name in begun:
            if name in running or name.rsplit("_", 2)[0] not in loading:  # <model>_<group>_<index>
                self.gone_since.pop(name, None)
            elif now - self.gone_since.setdefault(name, now) > self.GONE_FOR_S:
                return name
        return None


class TritonServer:
    """One tritonserver process. `with TritonServer(cfg) as s:` starts it and waits until it is ready.

    `model_repository` replaces the project's repository (tests use a throwaway one); `parameters` are extra
    config.pbtxt string parameters on top of the EngineConfig's. With `repository_as_is`, tritonserver serves
    `model_repository` itself, untouched (a repository set up by hand, as Triton's Helm chart passes it).
    `shutdown_grace_s`: what requests in flight get to finish when the server is stopped. `echo` copies the
    server log to stdout; `extra_args` go to tritonserver after ours.
    """

    def __init__(self, engine_config: EngineConfig, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_repository=None, parameters: dict[str, str] | None = None,
                 runtime_dir=None, log_verbose: int = 0, shutdown_grace_s: float = DEFAULT_GRACE_S,
                 echo: bool = False, extra_args: list[str] | tuple[str, ...] = (), check_model: bool = True,
                 repository_as_is: bool = False):
        self.engine_config = engine_config
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.source_repository = Path(model_repository) if model_repository else None
        self.repository_as_is = repository_as_is
        self.parameters = dict(parameters or {})
        self.log_verbose, self.shutdown_grace_s, self.echo = log_verbose, shutdown_grace_s, echo
        self.extra_args = list(extra_args)
        self.check_model = check_model
        self.shm_prefix = ""
        self._control_key = secrets.token_hex(16)
        # Explicit model control lets the launcher unload `llm` first when it stops; not when the caller sets
        # a model control mode of its own (then stopping drains for the grace period, then signals).
        self._controls_models = not any(a.startswith("--model-control-mode") for a in self.extra_args)
        self._lifeline: LauncherEnd | None = None
        self._stub_pids: set[int] = set()
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self._log_handle = None
        self._log_start = 0
        self._tee: threading.Thread | None = None

    # paths and urls
    @property
    def model_repository(self) -> Path:
        if self.repository_as_is:
            return self.source_repository.absolute()
        return self.runtime_dir / "models"

    @property
    def exit_timeout_s(self) -> int:
        return EXIT_TIMEOUT_S

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

    def _absolute_model_dir(self) -> str:
        model_dir = self.engine_config.model_dir
        if self.check_model:
            return str(check_checkpoint(model_dir))
        return str(Path(model_dir).expanduser().absolute()) if model_dir else ""

    def prepare(self) -> list[str]:
        """Build the runtime directory and the command line (no process yet); return the command."""
        if self.command:
            return self.command
        # A copy with the checkpoint's absolute path: the caller's config stays as it was.
        cfg = dataclasses.replace(self.engine_config, model_dir=self._absolute_model_dir())
        if self.runtime_dir is None:
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            _prune_stale_runs(root)
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=root))
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        binary, backends, lib_dirs = prepare_backend_directory(self.runtime_dir)
        if not self.repository_as_is:
            source = self.source_repository or project_model_repository()
            prepare_model_repository(source, self.model_repository, {**cfg.to_strings(), **self.parameters})
        self.env = server_environment(lib_dirs)
        # Each server its own shared-memory names, so servers side by side (tests) never collide, and what a
        # crash leaves behind can be found and removed.
        self.shm_prefix = shm_prefix = f"pagedllm{os.getpid()}-{secrets.token_hex(4)}"
        self.env[SHM_PREFIX_ENV] = shm_prefix
        self.command = [
            str(binary), "--model-repository", str(self.model_repository), "--backend-directory", str(backends),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--log-verbose", str(self.log_verbose),
            "--exit-timeout-secs", str(self.exit_timeout_s),
            "--backend-config", f"python,shm-region-prefix-name={shm_prefix}",
        ]
        if self._controls_models:
            key = f"model-repository:{_CONTROL_HEADER}={self._control_key}"
            self.command += ["--model-control-mode=explicit", "--load-model=*",
                             f"--http-restricted-api={key}", f"--grpc-restricted-protocol={key}"]
        self.command += self.extra_args
        return self.command

    def start(self) -> "TritonServer":
        command = self.prepare()
        taken = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if not port_is_free(p)]
        if taken:  # else a server already there could answer our readiness probe
            raise LauncherError(f"port(s) {', '.join(map(str, taken))} already in use")
        self._log_handle = open(self.log_path, "ab")
        echo_from = self._log_start = self._log_handle.tell()  # a runtime directory used again appends
        self._lifeline = LauncherEnd(self.runtime_dir)
        self.process = subprocess.Popen(
            command, env={**self.env, **self._lifeline.child_env(self.shutdown_grace_s)},
            # Straight to the log file, echo or not: if the launcher dies, tritonserver's output (the drain it
            # then goes through) is still written somewhere, and no write of it fails on a pipe nobody reads.
            stdin=subprocess.DEVNULL, stdout=self._log_handle, stderr=subprocess.STDOUT,
            pass_fds=self._lifeline.child_fds,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server in order
            # No parent-death signal: if the launcher dies, the llm model drains and then stops tritonserver
            # (lifeline.py); a signalled tritonserver would deliver no more responses.
        )
        self._lifeline.after_start()
        if self.echo:
            self._tee = threading.Thread(target=self._copy_output, args=(echo_from,), daemon=True)
            self._tee.start()
        return self

    def _copy_output(self, offset: int) -> None:
        """Echo the log from `offset` on, as tritonserver writes it, until it has exited."""
        proc = self.process
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            while True:
                exited = proc.poll() is not None  # before reading: what it wrote before exiting is read below
                chunk = log.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif exited:
                    return
                else:
                    time.sleep(0.05)

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

    def wait_ready(self, timeout: float = DEFAULT_STARTUP_TIMEOUT_S, notice=None) -> "TritonServer":
        """Until the server is ready. Past `timeout`, a ServerError names the models still loading, with their
        stubs' Python stacks and last log lines. `notice(text)`, if given, hears every LOADING_NOTICE_S which
        models are still loading."""
        start = time.monotonic()
        next_notice = start + LOADING_NOTICE_S
        stubs = _StartingStubs()
        while True:
            rc = self.poll()
            if rc is not None:
                raise self._failure(f"tritonserver exited with code {rc} before it was ready")
            if self.is_ready():
                self._stub_pids = set(self.stub_pids())
                return self
            begun, loading = self._load_progress()
            dead = stubs.dead(begun, loading, self._instance_stubs())
            if dead:
                pid = f" (pid {stubs.pids[dead]})" if dead in stubs.pids else ""
                raise ServerError(
                    f"the Python backend stub of {dead}{pid} exited while the instance was starting, before it "
                    f"reported to tritonserver, which then waits for it forever (Python backend r24.10); its "
                    f"last log lines ({self.log_path}):\n{self._log_lines_naming([dead], 12)}")
            now = time.monotonic()
            if now - start > timeout:
                raise ServerError(f"tritonserver not ready after {timeout:.0f}s (--startup-timeout); "
                                  + self.loading_report())
            if notice is not None and now >= next_notice:
                next_notice = now + LOADING_NOTICE_S
                loading = ", ".join(self.models_still_loading()) or "none (the server is starting)"
                notice(f"still loading after {now - start:.0f}s: {loading}")
            time.sleep(0.25)

    def _instance_stubs(self) -> dict[str, int]:
        """{instance name: pid} of the stubs running now."""
        return {_stub_instance(cmd): pid for pid, cmd in _group_members(self.process.pid) if _STUB_NAME in cmd}

    def repository_index(self) -> list[dict]:
        """Triton's repository index (name, version, state, reason of each model); [] when it cannot answer."""
        if not self._controls_models:
            return []
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers={_CONTROL_HEADER: self._control_key})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def models_in_state(self, *states: str) -> list[str]:
        return [m["name"] for m in self.repository_index() if m.get("state") in states]

    def models_still_loading(self) -> list[str]:
        return self._load_progress()[1]

    def _load_progress(self) -> tuple[list[str], list[str]]:
        """(the instances whose initialize began, the models whose load began and has not ended), as the log
        tells: Triton's HTTP and gRPC services, and so its repository index, only start once the first loads are
        over."""
        instances, began, ended = [], [], set()
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                for line in f:
                    if m := _LOADING.search(line):
                        began.append(m.group(1).decode(errors="replace"))
                    elif m := _LOAD_ENDED.search(line):
                        ended.add(m.group(1).decode(errors="replace"))
                    elif m := _INSTANCE_BEGUN.search(line):
                        instances.append(m.group(1).decode(errors="replace"))
        except OSError:
            return [], []
        return instances, [m for m in dict.fromkeys(began) if m not in ended]

    def loading_report(self) -> str:
        """Which models are still loading, which of their instances have a stub (and where each stub's Python
        stands: its stack, dumped on SIGUSR1 into the log), and the last log lines that name them."""
        loading = self.models_still_loading()
        if not loading:
            return f"no model is loading; last lines of {self.log_path}:\n{self.log_tail(20)}"
        stuck = {pid: name for name, pid in self._instance_stubs().items() if name.rsplit("_", 2)[0] in loading}
        named = self._log_lines_naming(loading + list(stuck.values()), 12)  # before the stacks join the log
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        for pid in stuck:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        stacks = self._log_since(offset, STACK_DUMP_WAIT_S if stuck else 0, expect=len(stuck)).strip()
        instances = ", ".join(f"{name} (stub pid {pid})" for pid, name in sorted(stuck.items())) or "no stub yet"
        lines = [f"still loading: {', '.join(loading)}; instances: {instances}"]
        if named:
            lines.append(f"their last log lines ({self.log_path}):\n{named}")
        if stacks:
            lines.append(f"where their Python stands:\n{stacks}")
        return "\n".join(lines)

    def _log_since(self, offset: int, wait_s: float, expect: int) -> str:
        """What the log gained after `offset`, waiting up to wait_s for `expect` stack dumps to be complete."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    text = f.read(1 << 20).decode("utf-8", "replace")
            except OSError:
                return ""
            # faulthandler writes "Thread 0x... (most recent call first):" blocks, the current one last.
            if text.count("Current thread") >= expect or time.monotonic() >= deadline:
                return text
            time.sleep(0.1)

    def _log_lines_naming(self, names: list[str], lines: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                found = deque((ln for ln in f if any(n.encode() in ln for n in names)), maxlen=lines)
        except OSError:
            return ""
        return b"".join(found).decode("utf-8", "replace").rstrip()

    # ---- supervision -----------------------------------------------------------------------------------
    def stub_pids(self) -> list[int]:
        """The Python backend stubs of this server (its process group)."""
        if self.process is None:
            return []
        return [pid for pid, cmd in _group_members(self.process.pid) if _STUB_NAME in cmd]

    def trouble(self) -> str | None:
        """Why the server can no longer serve, if it cannot: the `llm` model said so, or a stub died (Triton
        would go on answering ready, and the requests on that stub would wait forever)."""
        if self._lifeline is not None:
            reasons = self._lifeline.fatal_reasons()
            if reasons:
                return f"the llm model cannot serve: {reasons[0]}"
        if self._stub_pids:
            gone = self._stub_pids - set(self.stub_pids())
            if gone:
                return f"Python backend stub(s) {sorted(gone)} died"
        return None

    # ---- stopping --------------------------------------------------------------------------------------
    def stop(self, kill: bool = False) -> int | None:
        """Drain (`llm` gives requests in flight shutdown_grace_s), SIGINT (Triton unloads the models and exits),
        then SIGKILL; whatever is left of the group (stubs) is killed and our shared-memory regions removed.
        kill=True is for a server that cannot serve (a stub is dead, or an instance failed and has answered its
        requests): the instances still alive drain all the same, but the unload is not waited for (a dead stub
        may hold it up) and tritonserver gets only a moment to send the answers it holds before SIGKILL. Returns
        tritonserver's exit code."""
        proc, rc = self.process, None
        # A stop asked of a live server that could serve: its runtime directory goes, whatever tritonserver's
        # exit code (an exit timeout that expired on the way is no failure to keep a log for).
        stopped_in_order = proc is not None and proc.poll() is None and not kill
        if proc is not None:
            if proc.poll() is None and not kill:
                self._drain(unload_timeout=10.0)
                # Every request has had its answer: what may still hold tritonserver up is an idle stream that a
                # client keeps open (it holds the unload to the exit timeout); past that, it is killed.
                _signal_and_wait(proc, ((signal.SIGINT, self.exit_timeout_s + 2),))
            elif proc.poll() is None:
                self._drain(unload_timeout=KILL_AFTER_S, wait_unloaded=False)
                _signal_and_wait(proc, ((signal.SIGINT, KILL_AFTER_S),))
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.wait()
            rc = proc.returncode
            if self._tee:
                self._tee.join(timeout=5)
            self.process = None
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self.remove_shared_memory()
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        if self._own_runtime_dir and self.runtime_dir and (rc == 0 or stopped_in_order):
            shutil.rmtree(self.runtime_dir, ignore_errors=True)  # kept after a failure, for its log
        return rc

    def _drain(self, unload_timeout: float, wait_unloaded: bool = True) -> None:
        """Tell every `llm` instance to drain and start unloading every model (readiness is false from then
        on); wait until every live instance said its requests all had their final response (at most the grace
        period and a little), then, with `wait_unloaded`, until every model is unloaded (bounded)."""
        self._lifeline.drain()
        if self._controls_models:
            self._unload(["llm"] + [m for m in self.models_in_state("READY") if m != "llm"], unload_timeout)
        instances = sum(b"/llm/" in cmd for pid, cmd in _group_members(self.process.pid) if _STUB_NAME in cmd)
        if instances:
            self._lifeline.wait_idle(instances, self.shutdown_grace_s + 3.0)
        if not (wait_unloaded and self._controls_models):
            return
        if instances and not self._lifeline.wait_finalizing(instances, FINALIZE_START_S):
            # Not begun: a client's open stream holds the unload back, and only tritonserver's stop ends it.
            print("pagedllm: an open client stream holds the llm model's unload; tritonserver's exit timeout "
                  f"({self.exit_timeout_s} s) ends it", file=sys.stderr, flush=True)
            return
        self._wait_unloaded(UNLOAD_WAIT_S)

    def _unload(self, models: list[str], timeout: float) -> None:
        """Start unloading these models (in this order: llm first, so that readiness is false at once)."""
        for model in models:
            request = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/unload", data=b"{}",
                                             method="POST", headers={_CONTROL_HEADER: self._control_key})
            try:
                urllib.request.urlopen(request, timeout=timeout).close()
            except (urllib.error.URLError, OSError):  # no such model in this repository, or the server is failing
                pass

    def _wait_unloaded(self, timeout: float) -> None:
        """Until no model is loaded or unloading (their finalize and stubs are done), or timeout. A model still
        READY is asked again (the first asking may have come before the server listened)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            index = self.repository_index()
            self._unload([m["name"] for m in index if m.get("state") == "READY"], 5.0)
            busy = [m["name"] for m in index if m.get("state") in ("READY", "UNLOADING", "LOADING")]
            if not busy:
                return
            time.sleep(0.1)
        if self.process.poll() is None:
            print(f"pagedllm: models still not unloaded after {timeout:.0f}s: {', '.join(busy)}; stopping "
                  f"tritonserver anyway", file=sys.stderr, flush=True)

    def remove_shared_memory(self) -> None:
        """The Python backend's regions are named after our prefix; a server that crashed leaves them."""
        if not self.shm_prefix or not os.path.isdir("/dev/shm"):
            return
        for name in os.listdir("/dev/shm"):
            if name.startswith(self.shm_prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass

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
