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
LONG = 3000  # tokens: a stream that outlasts every bound here


@pytest.fixture(scope="module")
def long_model(make_tiny) -> Path:
    return make_tiny("llama", seed=5, max_position=4096)


@pytest.fixture(scope="module")
def slower_model(make_tiny) -> Path:
    """Wider and deeper (about 60 tokens/s a stream on 2 cores): streams outlast the test by far, even seen
    from a client that lags behind the server."""
    return make_tiny("llama", seed=5, max_position=4096, hidden_size=512, num_layers=8, intermediate_size=1536)


class Serve:
    """`pagedllm serve` in a subprocess, and what a test checks about it."""

    def __init__(self, model_dir: Path, cache: Path, env: dict | None = None):
        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        self.cache = cache
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.cli", "serve", "--model", str(model_dir), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--openai-port", str(self.openai),
             "--shutdown-grace-secs", str(GRACE_S), "--num-kv-blocks", "512", "--max-model-len", "4000"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**cli_env(cache), **(env or {})})
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        assert self.ready(), "".join(self.lines[-40:])
        self.stubs = self.our_processes("triton_python_backend_stub")
        assert self.stubs, "no stub found"

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
    started = []

    def start(env: dict | None = None, model_dir: Path = long_model) -> Serve:
        started.append(Serve(model_dir, tmp_path / "cache", env))
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
def test_sigterm_ends_every_stream_with_an_error_and_leaves_nothing(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not srv.ready()  # draining: not ready any more, while the streams still run
        outcome = streams.wait_for_outcomes(GRACE_S + 10)
    finally:
        streams.close()
    assert outcome == {0: outcome.get(0), 1: outcome.get(1)} and all(
        "unavailable: the server is shutting down" in o for o in outcome.values()), outcome
    assert time.monotonic() - start < GRACE_S + 5  # ended at the grace period, not later
    assert exit_code(srv, 30) == 0
    assert not srv.ready()
    srv.assert_nothing_left()


def test_a_request_that_finishes_within_the_grace_period_gets_its_answer(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 1, max_tokens=300)  # done well inside the grace period
    try:
        streams.wait_for_tokens()
        srv.proc.send_signal(signal.SIGTERM)
        outcome = streams.wait_for_outcomes(GRACE_S + 10)
    finally:
        streams.close()
    assert outcome == {0: "finished: length"} and streams.tokens == [300]
    assert exit_code(srv, 30) == 0
    srv.assert_nothing_left()


def test_sigkill_of_serve_still_answers_every_stream_and_leaves_nothing(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        srv.proc.kill()  # no cleanup of its own: the model sees its lifeline break, drains, stops tritonserver
        outcome = streams.wait_for_outcomes(GRACE_S + 15)
    finally:
        streams.close()
    assert len(outcome) == 2 and all("unavailable: the server is shutting down" in o for o in outcome.values()), \
        outcome
    srv.assert_nothing_left(within=20)
    assert not srv.ready()


def two_instance_repository(tmp_path: Path) -> Path:
    from pagedllm.server import project_model_repository

    repo = tmp_path / "repo"
    shutil.copytree(project_model_repository(), repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / "llm" / "config.pbtxt"
    config.write_text(config.read_text().replace("instance_group [ { count: 1 kind: KIND_MODEL } ]",
                                                 "instance_group [ { count: 2 kind: KIND_CPU } ]"))
    return repo


def streams_on_both_instances(srv: Serve) -> Streams:
    """Long streams until both instances serve some (Triton picks the instance); batches of several, so that
    each step takes long enough for the streams to outlast the test."""
    from test_instances import instance_tokens

    streams = Streams(f"127.0.0.1:{srv.grpc}", 6)
    for _ in range(3):
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
def test_every_instance_drains(serve, slower_model, tmp_path, how):
    """Each instance of the model holds its own streams: a stop (or the launcher's death) must drain them all,
    not just the one that happened to read a message."""
    srv = serve({"PAGEDLLM_MODEL_REPOSITORY": str(two_instance_repository(tmp_path))}, slower_model)
    streams = streams_on_both_instances(srv)
    try:
        at_signal = list(streams.tokens)
        start = time.monotonic()
        srv.proc.send_signal(how)
        outcome = streams.wait_for_outcomes(GRACE_S + 15)
        took = time.monotonic() - start
    finally:
        streams.close()
    # Every instance ends its streams at the grace period: one that missed the drain would run on until the
    # launcher gave up waiting and stopped Triton.
    assert len(outcome) == len(streams.clients) and all(
        "unavailable: the server is shutting down" in o for o in outcome.values()), (
        outcome, at_signal, streams.tokens)
    assert took < GRACE_S + 2.5, took
    if how == signal.SIGTERM:
        assert exit_code(srv, 30) == 0
    srv.assert_nothing_left(within=20)
    assert not srv.ready()


# ------------------------------------------------------------------------------------------------ crashes
def test_a_killed_stub_ends_its_requests_and_serve_exits_for_a_restart(serve):
    srv = serve()
    streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
    try:
        streams.wait_for_tokens()
        llm_stub = next(pid for pid in srv.stubs if b"/llm/" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(llm_stub, signal.SIGKILL)
        outcome = streams.wait_for_outcomes(10)
    finally:
        streams.close()
    assert len(outcome) == 2 and all(o.startswith("error") for o in outcome.values()), outcome
    assert exit_code(srv, 15) == 3  # non-zero: an orchestrator restarts it
    assert not srv.ready()
    srv.assert_nothing_left()


# A model.py that breaks the engine on purpose, as the test says through PAGEDLLM_TEST_FAULT.
FAULTY_MODEL = '''
import os
from pagedllm.serving.triton_model import TritonPythonModel as Base


class TritonPythonModel(Base):
    def initialize(self, args):
        super().initialize(args)
        if os.environ.get("PAGEDLLM_TEST_FAULT_INSTANCE", args["model_instance_name"]) != args["model_instance_name"]:
            return
        real_step, steps, reported = self.engine.step, [0], []
        when = os.environ.get("PAGEDLLM_TEST_FAULT_WHEN")  # a file the test creates; else after 20 steps
        fault = os.environ["PAGEDLLM_TEST_FAULT"]

        def step():
            steps[0] += 1
            if not (os.path.exists(when) if when else steps[0] > 20):
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


@pytest.mark.parametrize("fault, words", [("thread", "engine thread died"), ("steps", "failed in a row")])
def test_an_engine_that_cannot_serve_ends_requests_and_serve_exits(serve, tmp_path, fault, words):
    from pagedllm.server import project_model_repository

    repo = tmp_path / "repo"
    shutil.copytree(project_model_repository(), repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "llm" / "1" / "model.py").write_text(textwrap.dedent(FAULTY_MODEL))
    srv = serve({"PAGEDLLM_MODEL_REPOSITORY": str(repo), "PAGEDLLM_TEST_FAULT": fault})
    outcomes = []
    while srv.proc.poll() is None and len(outcomes) < 6:  # clients keep coming, as they would
        try:
            streams = Streams(f"127.0.0.1:{srv.grpc}", 2)
        except InferenceServerException:  # the server is going away: no stream to open any more
            break
        try:
            outcomes += streams.wait_for_outcomes(20).values()
        finally:
            streams.close()
        time.sleep(0.5)
    assert outcomes and all(o.startswith("error") for o in outcomes), outcomes
    assert exit_code(srv, 15) == 3  # non-zero: an orchestrator restarts it
    assert words in "".join(srv.lines)  # the log says why
    assert not srv.ready()
    srv.assert_nothing_left()


def test_when_one_instance_fails_the_others_drain(serve, slower_model, tmp_path):
    """One instance of two cannot serve any more: its requests get its error, the other instance's requests
    get the grace period and a final answer (not a cut connection), and serve exits for a restart."""
    repo = two_instance_repository(tmp_path)
    (repo / "llm" / "1" / "model.py").write_text(textwrap.dedent(FAULTY_MODEL))
    fault_now = tmp_path / "fault-now"
    srv = serve({"PAGEDLLM_MODEL_REPOSITORY": str(repo), "PAGEDLLM_TEST_FAULT": "fatal",
                 "PAGEDLLM_TEST_FAULT_INSTANCE": "llm_0_0", "PAGEDLLM_TEST_FAULT_WHEN": str(fault_now)},
                slower_model)
    streams = streams_on_both_instances(srv)
    try:
        fault_now.touch()
        outcome = streams.wait_for_outcomes(GRACE_S + 15)
    finally:
        streams.close()
    assert len(outcome) == len(streams.clients) and all(o.startswith("error") for o in outcome.values()), outcome
    drained = [o for o in outcome.values() if "the server is shutting down" in o]
    failed = [o for o in outcome.values() if "the engine cannot serve (simulated)" in o]
    assert drained and failed and len(drained) + len(failed) == len(outcome), outcome
    assert exit_code(srv, 30) == 3
    assert not srv.ready()
    srv.assert_nothing_left(within=20)
