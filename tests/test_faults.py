"""Faults are part of the spec: `pagedllm serve` stopped (SIGTERM) with long streams in flight, killed
(SIGKILL), its Python stub killed, its engine thread dying or its steps failing. Each time every request gets
a final response or an error within a bound, nothing of ours is left running, no shared-memory region is left
in /dev/shm, and readiness says the truth (not ready once the server stops or can no longer serve).

Each test runs `pagedllm serve` in a subprocess, as an operator or an orchestrator would."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server_utils import cli_env, free_ports
from triton_helpers import infer_inputs

GRACE_S = 1.5
LONG = 3000  # tokens: with STEP_S a step, a stream that outlasts every bound here on any machine
STEP_S = 0.02  # the test model's pause before each step: at most 50 tokens/s a stream, however fast the machine
STARTUP_TIMEOUT_S = 180  # a server that does not load fails the test with the launcher's report, not a hang

# The llm model with the tests' knobs, as environment variables of `pagedllm serve`:
# - PAGEDLLM_TEST_STEP_S: a pause before every engine step (streams run no faster than the test needs);
# - PAGEDLLM_TEST_HOLD: a file; while it exists, steps after the third wait (a request is still running at a
#   moment the test chooses);
# - PAGEDLLM_TEST_FAULT ("thread", "steps", "fatal"), on the instance PAGEDLLM_TEST_FAULT_INSTANCE (default: all),
#   once the file PAGEDLLM_TEST_FAULT_WHEN exists (default: after 20 steps): the engine breaks in that way.
TEST_MODEL = '''
import os
import time

from pagedllm.serving.triton_model import TritonPythonModel as Base


class TritonPythonModel(Base):
    def initialize(self, args):
        super().initialize(args)
        real_step, steps, reported = self.engine.step, [0], []
        pause = float(os.environ.get("PAGEDLLM_TEST_STEP_S", "0"))
        hold = os.environ.get("PAGEDLLM_TEST_HOLD")
        fault = os.environ.get("PAGEDLLM_TEST_FAULT")
        if os.environ.get("PAGEDLLM_TEST_FAULT_INSTANCE", args["model_instance_name"]) != args["model_instance_name"]:
            fault = None
        when = os.environ.get("PAGEDLLM_TEST_FAULT_WHEN")

        def step():
            steps[0] += 1
            time.sleep(pause)
            while hold and steps[0] > 3 and os.path.exists(hold):
                time.sleep(0.01)
            if not fault or not (os.path.exists(when) if when else steps[0] > 20):
                return real_step()
            if fault == "thread":
                raise SystemExit("the engine thread dies (simulated)")
            if fault == "fatal":  # what the engine thread reports when it cannot serve, once
                if not reported:
                    reported.append(True)
                    self._on_fatal("the engine cannot serve (simulated)")
                return real_step()
            raise RuntimeError("this step fails (simulated)")

        self.engine.step = step
'''


@pytest.fixture(scope="module")
def long_model(make_tiny) -> Path:
    return make_tiny("llama", seed=5, max_position=4096)


def repository_with_test_model(tmp_path: Path, llm_instances: int = 1, models=("llm",)) -> Path:
    """The project's `models` (only `llm` by default: one stub less to start) with the test model as `llm`, and
    `llm_instances` CPU instances of it."""
    from pagedllm.server import project_model_repository

    repo = tmp_path / "repo"
    for model in models:
        shutil.copytree(project_model_repository() / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "llm" / "1" / "model.py").write_text(textwrap.dedent(TEST_MODEL))
    if llm_instances > 1:
        config = repo / "llm" / "config.pbtxt"
        config.write_text(config.read_text().replace("instance_group [ { count: 1 kind: KIND_MODEL } ]",
                                                     f"instance_group [ {{ count: {llm_instances} kind: KIND_CPU }} ]"))
    return repo


class Serve:
    """`pagedllm serve` in a subprocess, and what a test checks about it."""

    def __init__(self, model_dir: Path, cache: Path, env: dict | None = None, grace_s: float = GRACE_S,
                 args: tuple[str, ...] = (), wait_ready: bool = True):
        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        self.cache = cache
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.cli", "serve", "--model", str(model_dir), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--openai-port", str(self.openai),
             "--shutdown-grace-secs", str(grace_s), "--num-kv-blocks", "512", "--max-model-len", "4000",
             "--startup-timeout", str(STARTUP_TIMEOUT_S), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**cli_env(cache), **(env or {})})
        self.lines: list[str] = []
        if not wait_ready:
            return
        for line in self.proc.stdout:  # ends by itself: serve exits past its start-up timeout
            self.lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        assert self.ready(), "".join(self.lines[-40:])
        self.stubs = self.our_processes("triton_python_backend_stub")
        assert self.stubs, "no stub found"

    def log(self) -> str:
        return "".join(self.lines)

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def our_processes(self, name: str = "") -> list[int]:
        """pids of processes started for this server: tritonserver and its stubs (their command lines name
        the runtime directory under our cache) and the OpenAI front end (its port)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            ours = str(self.cache) in cmd or ("openai_api.server" in cmd and f"--port {self.openai}" in cmd)
            if ours and name in cmd and state != "Z" and int(pid) != self.proc.pid:
                found.append(int(pid))
        return found

    def shm_regions(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"pagedllm{self.proc.pid}-")]

    def assert_nothing_left(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while (self.our_processes() or self.shm_regions()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not self.our_processes(), f"processes left: {self.our_processes()}"
        assert not self.shm_regions(), f"shared memory left: {self.shm_regions()}"

    def kill_everything(self) -> None:
        for pid in self.our_processes() + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in self.shm_regions():
            os.unlink(f"/dev/shm/{name}")


@pytest.fixture
def serve(long_model, tmp_path):
    """start(env=None, repository="test", **kwargs) -> Serve: `pagedllm serve` on the test model (the project's
    repository as it is with repository=None, or a repository given), streams slowed by STEP_S."""
    started = []

    def start(env: dict | None = None, repository="test", **kwargs) -> Serve:
        env = dict(env or {})
        if repository == "test":
            repository = repository_with_test_model(tmp_path)
        if repository is not None:
            env = {"PAGEDLLM_MODEL_REPOSITORY": str(repository), "PAGEDLLM_TEST_STEP_S": str(STEP_S), **env}
        started.append(Serve(long_model, tmp_path / "cache", env, **kwargs))
        return started[-1]

    yield start
    for s in started:  # whatever a failing test left behind
        s.kill_everything()


class Streams:
    """Long streamed requests, one gRPC stream each (a client per request, as most clients do)."""

    def __init__(self, url: str, n: int, max_tokens: int = LONG):
        self.url, self.max_tokens = url, max_tokens
        self.events: queue.Queue = queue.Queue()
        self.clients = []
        self.tokens: list[int] = []
        self.outcome: dict[int, str] = {}
        self.open(n)

    def open(self, n: int) -> None:
        """n more streams."""
        for i in range(len(self.clients), len(self.clients) + n):
            client = grpcclient.InferenceServerClient(self.url)
            client.start_stream(callback=lambda result, error, i=i: self.events.put((i, result, error)))
            client.async_stream_infer("llm", infer_inputs({
                "input_ids": np.arange(5, 25, dtype=np.int64) + i,
                "max_tokens": np.array([self.max_tokens], np.int32),
                "ignore_eos": np.array([True]), "stream": np.array([True]),
                "temperature": np.array([0.0], np.float32)}), enable_empty_final_response=True)
            self.clients.append(client)
            self.tokens.append(0)

    def wait_for_tokens(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.tokens) and time.monotonic() < deadline:
            self.collect(0.1)
        assert all(self.tokens), "the streams did not start"

    def collect(self, timeout: float) -> None:
        try:
            i, result, error = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        if i in self.outcome:
            return  # after its final answer only the stream's own end can follow
        if error is not None:
            self.outcome[i] = f"error: {error}"
            return
        self.tokens[i] += len(result.as_numpy("token_ids"))
        if result.get_response().parameters["triton_final_response"].bool_param:
            reason = result.as_numpy("finish_reason")
            self.outcome[i] = "finished: " + (reason[0].decode() if reason is not None else "")

    def wait_for_outcomes(self, timeout: float) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while len(self.outcome) < len(self.clients) and time.monotonic() < deadline:
            self.collect(0.1)
        return self.outcome

    def close(self) -> None:
        for c in self.clients:
            try:
                c.stop_stream()
                c.close()
            except Exception:
                pass


def exit_code(srv: Serve, timeout: float) -> int:
    try:
        srv.lines.append(srv.proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise AssertionError(f"pagedllm serve did not exit within {timeout:.0f} s")
    return srv.proc.returncode


# ---------------------------------------------------------------------------------------------- stopping
def wait_not_ready(srv: Serve, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.ready():
        assert time.monotonic() < deadline, "still ready long after the stop signal"
        time.sleep(0.05)


def drained_instances(srv: Serve) -> set[str]:
    """The llm instances whose log says the launcher's drain reached them (not an unload that came later)."""
    return {line.split("pagedllm: ", 1)[1].split()[0] for line in srv.log().splitlines()
            if "pagedllm: llm_" in line and " draining: " in line}


def test_sigterm_ends_every_stream_with_an_error_and_leaves_nothing(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        srv.proc.send_signal(signal.SIGTERM)
        wait_not_ready(srv)  # draining: not ready any more, while the streams still run
        assert not streams.outcome
        outcome = streams.wait_for_outcomes(GRACE_S + 60)
    finally:
        streams.close()
    assert outcome == {0: outcome.get(0), 1: outcome.get(1)} and all(
        "unavailable: the server is shutting down" in o for o in outcome.values()), outcome
    assert exit_code(srv, 60) == 0
    assert drained_instances(srv) == {"llm_0_0"}  # ended by the drain at the grace period, not by an unload
    assert not srv.ready()
    srv.assert_nothing_left()
    assert not list(srv.cache.glob("run-*")), "the run folder was left"


def test_a_request_that_finishes_within_the_grace_period_gets_its_answer(serve, tmp_path):
    """The request is held on purpose until the stop has begun, then let go: it ends with its whole answer."""
    hold = tmp_path / "hold"
    hold.touch()
    srv = serve({"PAGEDLLM_TEST_HOLD": str(hold)}, grace_s=300)  # the grace only bounds the test: it never ends it
    streams = Streams(f"127.0.0.1:{srv.grpc}", 1, max_tokens=40)
    try:
        streams.wait_for_tokens()
        srv.proc.send_signal(signal.SIGTERM)
        wait_not_ready(srv)
        assert not streams.outcome  # still running when the stop began
        hold.unlink()
        outcome = streams.wait_for_outcomes(120)
    finally:
        streams.close()
    assert outcome == {0: "finished: length"} and streams.tokens == [40]
    assert exit_code(srv, 60) == 0
    srv.assert_nothing_left()


def test_sigkill_of_serve_still_answers_every_stream_and_leaves_nothing(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        srv.proc.kill()  # no cleanup of its own: the model sees its lifeline break, drains, stops tritonserver
        outcome = streams.wait_for_outcomes(GRACE_S + 60)
    finally:
        streams.close()
    assert len(outcome) == 2 and all("unavailable: the server is shutting down" in o for o in outcome.values()), \
        outcome
    srv.assert_nothing_left(within=60)
    assert not srv.ready()


def test_an_idle_server_stops_cleanly_every_time(serve):
    """SIGTERM to an idle `pagedllm serve` (the project's repository as it is): out within the grace period and
    a few seconds, with no exit timeout spent waiting on a model, nothing left running, no run folder. Five
    times: a stop that is clean only sometimes is the worst kind."""
    for attempt in range(5):
        srv = serve(repository=None)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert exit_code(srv, 60) == 0, srv.log()[-3000:]
        took = time.monotonic() - start
        assert took < GRACE_S + 5, (attempt, took, srv.log()[-3000:])
        assert "Exit timeout expired" not in srv.log() and "live models" not in srv.log().split("stopping")[-1] \
            .replace("Found 0 live models", ""), srv.log()[-3000:]
        srv.assert_nothing_left()
        assert not list(srv.cache.glob("run-*")), (attempt, list(srv.cache.glob("run-*")))


def streams_on_both_instances(srv: Serve) -> Streams:
    """Long streams until both instances serve some (Triton picks the instance)."""
    from test_instances import instance_tokens

    streams = Streams(f"127.0.0.1:{srv.grpc}", 4)
    for _ in range(5):
        streams.wait_for_tokens()
        busy = instance_tokens(f"http://127.0.0.1:{srv.metrics}/metrics")
        if len(busy) == 2 and min(busy.values()) > 0:
            while not streams.events.empty():
                streams.collect(0)
            assert not streams.outcome, f"streams ended before the test stopped the server: {streams.outcome}"
            return streams
        streams.open(4)
    streams.close()
    raise AssertionError(f"the streams all went to one instance: {busy}")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_every_instance_drains(serve, tmp_path, how):
    """Each instance of the model holds its own streams: a stop (or the launcher's death) must drain them all,
    not just the one that happened to read a message."""
    srv = serve(repository=repository_with_test_model(tmp_path, llm_instances=2))
    streams = streams_on_both_instances(srv)
    try:
        at_signal = list(streams.tokens)
        srv.proc.send_signal(how)
        outcome = streams.wait_for_outcomes(GRACE_S + 60)
    finally:
        streams.close()
    assert len(outcome) == len(streams.clients) and all(
        "unavailable: the server is shutting down" in o for o in outcome.values()), (
        outcome, at_signal, streams.tokens)
    if how == signal.SIGTERM:
        assert exit_code(srv, 60) == 0
    srv.assert_nothing_left(within=60)
    if how == signal.SIGTERM:
        # Every instance heard the drain (one that missed it would run on until the unload ended its streams).
        assert drained_instances(srv) == {"llm_0_0", "llm_0_1"}, srv.log()[-3000:]
    assert not srv.ready()


# ------------------------------------------------------------------------------------------------ crashes
def test_a_killed_stub_ends_its_requests_and_serve_exits_for_a_restart(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        llm_stub = next(pid for pid in srv.stubs if b"/llm/" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(llm_stub, signal.SIGKILL)
        outcome = streams.wait_for_outcomes(60)
    finally:
        streams.close()
    assert len(outcome) == 2 and all(o.startswith("error") for o in outcome.values()), outcome
    assert exit_code(srv, 60) == 3  # non-zero: an orchestrator restarts it
    assert not srv.ready()
    srv.assert_nothing_left()


@pytest.mark.parametrize("fault, words", [("thread", "engine thread died"), ("steps", "failed in a row")])
def test_an_engine_that_cannot_serve_ends_requests_and_serve_exits(serve, fault, words):
    srv = serve({"PAGEDLLM_TEST_FAULT": fault})
    outcomes = []
    while srv.proc.poll() is None and len(outcomes) < 6:  # clients keep coming, as they would
        try:
            streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
        except InferenceServerException:  # the server is going away: no stream to open any more
            break
        try:
            outcomes += streams.wait_for_outcomes(60).values()
        finally:
            streams.close()
    assert outcomes and all(o.startswith("error") for o in outcomes), outcomes
    assert exit_code(srv, 60) == 3  # non-zero: an orchestrator restarts it
    assert words in srv.log()  # the log says why
    assert not srv.ready()
    srv.assert_nothing_left()


def test_when_one_instance_fails_the_others_drain(serve, tmp_path):
    """One instance of two cannot serve any more: its requests get its error, the other instance's requests
    get the grace period and a final answer (not a cut connection), and serve exits for a restart."""
    fault_now = tmp_path / "fault-now"
    srv = serve({"PAGEDLLM_TEST_FAULT": "fatal", "PAGEDLLM_TEST_FAULT_INSTANCE": "llm_0_0",
                 "PAGEDLLM_TEST_FAULT_WHEN": str(fault_now)},
                repository=repository_with_test_model(tmp_path, llm_instances=2))
    streams = streams_on_both_instances(srv)
    try:
        fault_now.touch()
        outcome = streams.wait_for_outcomes(GRACE_S + 60)
    finally:
        streams.close()
    assert len(outcome) == len(streams.clients) and all(o.startswith("error") for o in outcome.values()), outcome
    drained = [o for o in outcome.values() if "the server is shutting down" in o]
    failed = [o for o in outcome.values() if "the engine cannot serve (simulated)" in o]
    assert drained and failed and len(drained) + len(failed) == len(outcome), outcome
    assert exit_code(srv, 60) == 3
    assert not srv.ready()
    srv.assert_nothing_left(within=60)


# ---------------------------------------------------------------------------------------------- starting
HANGING_EMBED = '''
import threading

from pagedllm.serving.embed_model import TritonPythonModel as Base


class TritonPythonModel(Base):
    def initialize(self, args):
        threading.Event().wait()  # never returns: an instance that never finishes initializing
'''


def test_a_model_that_hangs_in_initialize_is_named_and_serve_exits(serve, tmp_path):
    """The launcher never waits in silence: past --startup-timeout it names the model and the instance still
    loading, shows where its Python stands and what it last logged, exits non-zero and leaves nothing."""
    repo = repository_with_test_model(tmp_path, models=("llm", "embed"))
    (repo / "embed" / "1" / "model.py").write_text(textwrap.dedent(HANGING_EMBED))
    srv = serve(repository=repo, args=("--startup-timeout", "30"), wait_ready=False)
    rc = exit_code(srv, 30 + 60)
    message = srv.log()
    assert rc == 1, message[-3000:]
    assert "not ready after 30s (--startup-timeout)" in message, message[-3000:]
    assert "still loading: embed" in message and "embed_0_0 (stub pid" in message, message[-3000:]
    assert "in initialize" in message and "model.py" in message, message[-3000:]  # its stack: where it hangs
    srv.assert_nothing_left()


# The start-up stall seen in CI: an `embed` instance began initializing and never finished. In tritonserver 2.51
# the Python backend waits without a timeout for the first message of a stub it started, so a stub that dies
# before that message (a crash at its start) leaves the load waiting forever. A model folder's own
# `triton_python_backend_stub` replaces the backend's: this one answers the backend's check (run without
# arguments, it must exit 1), runs the real stub for the model's auto-complete, and crashes when started for an
# instance (its 8th argument, <model>_<group>_<index>; the 6th is the backend's folder).
CRASHING_STUB = """#!/bin/sh
[ $# -eq 0 ] && exit 1
case "$8" in *_[0-9]*_[0-9]*) kill -SEGV $$ ;; esac
exec "$6/triton_python_backend_stub" "$@"
"""


def test_a_stub_that_dies_while_starting_is_named_at_once(serve, tmp_path):
    repo = repository_with_test_model(tmp_path, models=("llm", "embed"))
    stub = repo / "embed" / "triton_python_backend_stub"
    stub.write_text(CRASHING_STUB)
    stub.chmod(0o755)
    srv = serve(repository=repo, wait_ready=False)  # the default start-up timeout: the death is seen long before
    rc = exit_code(srv, STARTUP_TIMEOUT_S - 30)
    message = srv.log()
    assert rc == 1, message[-3000:]
    assert "the Python backend stub of embed_0_0" in message and "exited while the instance was starting" in message, \
        message[-3000:]
    srv.assert_nothing_left()
