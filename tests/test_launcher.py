"""`pagedllm serve` checks the checkpoint; the launcher prepares the runtime and really runs tritonserver
with the Python backend (proved with a throwaway echo model written by the test, independent of the engine)."""
from __future__ import annotations

import contextlib
import json
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

from pagedllm.config import EngineConfig
from pagedllm.server import CheckpointError, ServerError, TritonServer, check_checkpoint, project_model_repository
from pagedllm.server.repository import set_parameters
from server_utils import cli_env


def pbtxt_parameters(text: str) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def serve_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", *args], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)


# ------------------------------------------------------------------------------------ checkpoint errors
def test_serve_missing_directory(tmp_path):
    r = serve_cli(tmp_path, "--model", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"pagedllm serve: error: model directory not found: {tmp_path / 'nope'}"]


def test_serve_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    r = serve_cli(tmp_path, "--model", str(tmp_path / "empty"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "has no config.json" in r.stderr


def test_serve_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = serve_cli(tmp_path, "--model", str(model))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "unsupported model" in r.stderr and "GPT2LMHeadModel" in r.stderr and "LlamaForCausalLM" in r.stderr


def test_check_checkpoint(tiny_llama_dir, tmp_path):
    assert check_checkpoint(tiny_llama_dir) == tiny_llama_dir
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        check_checkpoint(tmp_path)
    # The engine loads safetensors only: a pytorch_model.bin checkpoint is refused before anything starts.
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no weights"):
        check_checkpoint(tmp_path)


def test_the_checkpoint_checks_and_the_embed_side_load_no_engine(tmp_path):
    """The launcher and the embed model read checkpoints with the torch-free reader; the embedder loads no
    kernels (nor triton)."""
    code = ("import sys; import pagedllm.server, pagedllm.model.spec, pagedllm.tokenizer; "
            "assert 'torch' not in sys.modules, 'torch'; import pagedllm.serving.embedder; "
            "assert 'triton' not in sys.modules and 'pagedllm.engine.engine' not in sys.modules, 'engine'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------- prepared runtime
def test_prepared_repository_and_backend(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_SOMETHING", "passed")
    cfg = EngineConfig(model_dir=str(tiny_llama_dir), device="cpu", block_size=32, num_kv_blocks=99,
                       kv_cache_memory_fraction=0.5, max_model_len=300)
    server = TritonServer(cfg, runtime_dir=tmp_path / "run", http_port=1, grpc_port=2, metrics_port=3)
    command = server.prepare()

    source = project_model_repository()
    copied = sorted(p.name for p in server.model_repository.iterdir())
    assert copied == sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    params = pbtxt_parameters((server.model_repository / "llm" / "config.pbtxt").read_text())
    assert EngineConfig.from_strings(params) == cfg
    assert params["model_dir"] == str(tiny_llama_dir) and Path(params["model_dir"]).is_absolute()

    backends = Path(command[command.index("--backend-directory") + 1])
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert command[command.index("--http-port") + 1] == "1"
    assert server.env["PAGEDLLM_SOMETHING"] == "passed"
    assert str(Path(__file__).resolve().parents[1] / "backend") in server.env["PYTHONPATH"].split(":")


def test_prepare_leaves_the_callers_config_as_it_was(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    cfg = EngineConfig(model_dir=tiny_llama_dir.name, device="cpu")
    server = TritonServer(cfg, runtime_dir=tmp_path / "run")
    server.prepare()
    assert cfg == EngineConfig(model_dir=tiny_llama_dir.name, device="cpu")
    params = pbtxt_parameters((server.model_repository / "llm" / "config.pbtxt").read_text())
    assert params["model_dir"] == str(tiny_llama_dir)


def test_set_parameters_escapes_and_appends():
    text = 'parameters [ { key: "model_dir" value: { string_value: "" } }, { key: "b" value: { string_value: "1" } } ]'
    out = set_parameters(text, {"model_dir": '/a "b"\\c', "new": "x"})
    assert pbtxt_parameters(out) == {"model_dir": '/a "b"\\c', "b": "1", "new": "x"}


# ------------------------------------------------------------------------------- a real server (echo)
ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [
  { name: "token_ids" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "info" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters [ { key: "model_dir" value: { string_value: "" } } ]
"""

# Streams each input id back as its own response; the first response also reports what the stub sees.
ECHO_MODEL = """
import json, sys
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from pagedllm.config import EngineConfig

class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        if params.get("fail_on_load", {}).get("string_value"):
            raise RuntimeError("echo model refused to load")
        cfg = EngineConfig.from_strings({k: v["string_value"] for k, v in params.items()})
        self.info = json.dumps({"engine": cfg.to_strings(), "version": list(sys.version_info[:2]),
                                "torch": torch.__file__})

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            for i, t in enumerate(ids):
                info = self.info if i == 0 else ""
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("token_ids", np.array([t], np.int64)),
                    pb_utils.Tensor("info", np.array([info.encode()], np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


@pytest.fixture
def echo_repository(tmp_path) -> Path:
    repo = tmp_path / "echo-repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(textwrap.dedent(ECHO_MODEL))
    return repo


def test_server_runs_python_model(start_server, tiny_llama_dir, echo_repository):
    import tritonclient.grpc as grpcclient

    with start_server(tiny_llama_dir, model_repository=echo_repository, max_num_seqs=3) as srv:
        # gRPC streaming: one response per input id, then the final flag
        results = queue.Queue()
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inp = grpcclient.InferInput("input_ids", [3], "INT64")
        inp.set_data_from_numpy(np.array([5, 6, 7], np.int64))
        client.async_stream_infer("echo", [inp], request_id="r1")
        got, info = [], None
        for _ in range(3):
            result, error = results.get(timeout=30)
            assert error is None, error
            got.extend(result.as_numpy("token_ids").tolist())
            info = info or result.as_numpy("info")[0].decode()
        client.stop_stream()
        client.close()
        assert got == [5, 6, 7]

        info = json.loads(info)
        assert info["engine"]["model_dir"] == str(tiny_llama_dir)
        assert info["engine"]["max_num_seqs"] == "3"
        assert info["version"] == list(sys.version_info[:2])
        import torch  # the stub imports the very torch this interpreter has

        assert Path(info["torch"]).resolve() == Path(torch.__file__).resolve()

        # HTTP generate and metrics
        with requests.Session() as http:
            r = http.post(f"{srv.http_url}/v2/models/echo/generate", json={"input_ids": [9]}, timeout=30)
            assert r.status_code == 200 and r.json()["token_ids"] in (9, [9])  # one element comes back a scalar
            assert "nv_inference_request_success" in http.get(srv.metrics_url, timeout=30).text
        server = srv.server
    assert server.poll() is None and server.process is None  # stopped and reaped
    assert srv.server.is_ready() is False


def test_server_load_failure_raises_with_log(start_server, tiny_llama_dir, echo_repository):
    with pytest.raises(ServerError, match="echo model refused to load"):
        with start_server(tiny_llama_dir, model_repository=echo_repository, parameters={"fail_on_load": "1"}):
            pass


class Foreground:
    """A `pagedllm` command run in the foreground, read until it says it is ready; `stop()` sends SIGTERM and
    returns the rest of what it printed once it has exited."""

    def __init__(self, args: list[str], env: dict, new_session: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-m", "pagedllm.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=new_session)
        self.lines: list[str] = []
        self.read_until("Ctrl-C stops the server")

    def read_until(self, text: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                break

    def printed(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        self.proc.terminate()
        return self.proc.communicate(timeout=60)[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def foreground(args: list[str], env: dict, new_session: bool = False):
    run = Foreground(args, env, new_session)
    try:
        yield run
    finally:
        run.kill()


def test_serve_cli_foreground(tmp_path, tiny_llama_dir, echo_repository):
    """`pagedllm serve` prints the URLs (the OpenAI API's too) when ready, passes the front end its flags, and
    stops the server cleanly on SIGTERM."""
    from server_utils import free_ports

    http, grpc, metrics, openai_port = free_ports(4)
    env = {**cli_env(tmp_path), "PAGEDLLM_MODEL_REPOSITORY": str(echo_repository)}
    with foreground(["serve", "--model", str(tiny_llama_dir), "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics), "--num-kv-blocks", "8", "--openai-port", str(openai_port),
                     "--max-request-bytes", "4096", "--max-model-len", "256"], env) as serve:
        assert f"http://0.0.0.0:{http}" in serve.printed(), serve.printed()
        assert f"http://0.0.0.0:{openai_port}/v1" in serve.printed(), serve.printed()
        assert requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10).status_code == 200
        too_big = requests.post(f"http://127.0.0.1:{openai_port}/v1/completions", data=b" " * 4097, timeout=10)
        assert too_big.status_code == 413 and "4096" in too_big.json()["error"]["message"]
        models = requests.get(f"http://127.0.0.1:{openai_port}/v1/models", timeout=10).json()["data"]
        assert models[0]["max_model_len"] == 256  # the served length, not the checkpoint's 512
        rest = serve.stop()
    assert serve.proc.returncode == 0, rest
    assert "successfully unloaded 'echo'" in rest
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5)


def test_the_front_end_is_told_the_served_model_length(tmp_path, tiny_llama_dir):
    """From the engine flags, or from the llm config.pbtxt of a repository served as it is."""
    from pagedllm.cli import _served_max_model_len, _server, build_parser

    args = build_parser().parse_args(["serve", "--model", str(tiny_llama_dir), "--max-model-len", "200"])
    assert _served_max_model_len(args, _server(args, [])[0]) == 200
    (tmp_path / "repo" / "llm").mkdir(parents=True)
    config = tmp_path / "repo" / "llm" / "config.pbtxt"
    config.write_text(f'parameters [ {{ key: "model_dir" value: {{ string_value: "{tiny_llama_dir}" }} }} ]')
    args = build_parser().parse_args(["serve", "--model-repository", str(tmp_path / "repo")])
    assert _served_max_model_len(args, _server(args, [])[0]) == 0  # not set: the checkpoint's
    config.write_text(set_parameters(config.read_text(), {"max_model_len": "300"}))
    assert _served_max_model_len(args, _server(args, [])[0]) == 300


def processes_under(path: Path) -> list[int]:
    """pids of live processes whose command line names `path` (a test's cache: runtime directories, logs)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in cmd and state != "Z":
            found.append(int(pid))
    return found


def test_a_second_ctrl_c_does_not_cut_the_stop_short(tmp_path, tiny_llama_dir, echo_repository):
    """Ctrl-C again while the server stops (a model slow to unload holds it up) is ignored: tritonserver and
    the front end are still stopped, the shared memory removed, and serve exits 0."""
    from server_utils import free_ports

    model = echo_repository / "echo" / "1" / "model.py"
    model.write_text("import time\n" + model.read_text()
                     + "\n    def finalize(self):\n        time.sleep(3)\n")
    http, grpc, metrics, openai_port = free_ports(4)
    env = {**cli_env(tmp_path), "PAGEDLLM_MODEL_REPOSITORY": str(echo_repository)}
    with foreground(["serve", "--model", str(tiny_llama_dir), "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics), "--openai-port", str(openai_port)], env,
                    new_session=True) as serve:
        shm_prefix = f"pagedllm{serve.proc.pid}-"
        assert [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix)], serve.printed()
        os.killpg(serve.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: serve and the front end get it
        serve.read_until("stopping the server")
        time.sleep(0.5)  # into the stop: tritonserver is unloading the slow model
        os.killpg(serve.proc.pid, signal.SIGINT)
        rest = serve.proc.communicate(timeout=60)[0]
    assert serve.proc.returncode == 0, rest
    assert "successfully unloaded 'echo'" in rest and "Traceback" not in rest, rest
    assert not processes_under(tmp_path), processes_under(tmp_path)  # tritonserver and its stub
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix)]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{openai_port}/health", timeout=5)


def test_tritonserver_style_arguments_become_pagedllm_serve():
    from pagedllm.cli import tritonserver_style

    assert tritonserver_style(["--model-repository=/models", "--http-port", "8080", "--log-format=ISO8601",
                               "--strict-readiness", "true"]) == [
        "serve", "--started-as-tritonserver", "--model-repository", "/models", "--http-port", "8080", "--",
        "--log-format=ISO8601", "--strict-readiness", "true"]
    assert tritonserver_style(["--model-store", "/m"]) == [
        "serve", "--started-as-tritonserver", "--model-repository", "/m"]


def test_colliding_ports_are_refused_before_anything_starts(tmp_path, tiny_llama_dir):
    """Else tritonserver takes the port, and the OpenAI front end fails once the model has loaded."""
    for flags, words in ((["--openai-port", "8001"], "--openai-port and --grpc-port are both 8001"),
                         (["--http-port", "8002"], "--metrics-port and --http-port are both 8002"),
                         (["--grpc-port", "9000"], "--grpc-port is 9000, the OpenAI API's default port")):
        r = serve_cli(tmp_path, "--model", str(tiny_llama_dir), *flags)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
        assert "tritonserver" not in r.stdout


def test_kserves_grpc_port_9000_leaves_the_openai_api_off(monkeypatch, capsys):
    """KServe's Triton runtime starts `tritonserver --grpc-port=9000 --http-port=8080`: the OpenAI API, not
    asked for there, stays off rather than collide; PAGEDLLM_OPENAI_PORT turns it on."""
    from pagedllm.cli import build_parser, openai_port, tritonserver_style
    from pagedllm.server import LauncherError

    kserve = tritonserver_style(["--model-repository=/mnt/models", "--grpc-port=9000", "--http-port=8080"])
    assert openai_port(build_parser().parse_args(kserve)) == 0
    assert "PAGEDLLM_OPENAI_PORT" in capsys.readouterr().err
    helm = tritonserver_style(["--model-repository=/models"])  # Triton's default ports: no collision
    assert openai_port(build_parser().parse_args(helm)) == 9000
    monkeypatch.setenv("PAGEDLLM_OPENAI_PORT", "9100")
    assert openai_port(build_parser().parse_args(kserve)) == 9100
    monkeypatch.setenv("PAGEDLLM_OPENAI_PORT", "9000")  # asked for, and taken: refused
    with pytest.raises(LauncherError, match="--openai-port and --grpc-port are both 9000"):
        openai_port(build_parser().parse_args(kserve))


def test_started_the_way_tritons_helm_chart_starts_a_container(tmp_path, tiny_llama_dir, echo_repository):
    """`tritonserver --model-repository=DIR [flags]` as the container's arguments (Helm chart, KServe): the
    repository is served as it is, extra tritonserver flags pass through, SIGTERM stops it cleanly."""
    from server_utils import free_ports

    http, grpc, metrics = free_ports(3)
    with foreground(["tritonserver", f"--model-repository={echo_repository}", f"--http-port={http}",
                     "--grpc-port", str(grpc), f"--metrics-port={metrics}", "--log-info=true"],
                    cli_env(tmp_path)) as serve:
        assert requests.get(f"http://127.0.0.1:{http}/v2/models/echo/ready", timeout=10).status_code == 200, \
            serve.printed()
        rest = serve.stop()
    assert serve.proc.returncode == 0, rest
    assert "successfully unloaded 'echo'" in rest


def offline_hub(tmp_path, checkpoint) -> tuple[dict[str, str], Path]:
    """(an environment in which `example/tiny-llama` is `checkpoint` in the Hugging Face cache, offline; the
    snapshot's path). For fresh processes only: huggingface_hub reads these variables when it is imported."""
    hub = tmp_path / "hf"
    snapshot = hub / "hub" / "models--example--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**cli_env(tmp_path), "HF_HOME": str(hub), "HF_HUB_CACHE": str(hub / "hub"), "HF_HUB_OFFLINE": "1"}
    return env, snapshot


def test_a_hugging_face_repo_id_is_served_from_the_local_cache_offline(tmp_path, tiny_llama_dir):
    """--model org/name resolves through huggingface_hub's cache; with HF_HUB_OFFLINE=1 nothing is fetched (a
    fresh process, as `pagedllm serve` is)."""
    env, snapshot = offline_hub(tmp_path, tiny_llama_dir)
    code = ("import sys; from pagedllm.model.spec import resolve_model, check_checkpoint; "
            "print(check_checkpoint(resolve_model(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, "example/tiny-llama"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == str(snapshot), r.stderr
    r = subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", "--model", "example/missing"],
                       capture_output=True, text=True, env=env, timeout=120)  # not cached, and offline: refused
    assert r.returncode == 2 and "example/missing" in r.stderr and "Hugging Face" in r.stderr, r.stderr


def test_a_repo_id_is_the_served_model_name(tiny_llama_dir):
    """Not its snapshot folder's name (a commit hash); a directory is named after its folder, by the front end."""
    from pagedllm.cli import _served_model_name, build_parser

    snapshot = Path("/hf/hub/models--example--tiny-llama/snapshots") / ("0" * 40)
    args = build_parser().parse_args(["serve", "--model", "example/tiny-llama"])
    assert _served_model_name(args, snapshot) == "example/tiny-llama"
    args = build_parser().parse_args(["serve", "--model", "example/tiny-llama", "--served-model-name", "mine"])
    assert _served_model_name(args, snapshot) == "mine"
    args = build_parser().parse_args(["serve", "--model", str(tiny_llama_dir)])
    assert _served_model_name(args, tiny_llama_dir) is None


def test_a_repository_whose_model_dir_is_a_repo_id_gets_its_openai_front_end(tmp_path, tiny_llama_dir):
    """`pagedllm serve --model-repository DIR` where the llm config.pbtxt's model_dir is a Hugging Face repo
    id: the launcher resolves it as the model does, and the OpenAI front end serves the checkpoint."""
    from server_utils import free_ports

    env, snapshot = offline_hub(tmp_path, tiny_llama_dir)
    repo = tmp_path / "repo"
    shutil.copytree(project_model_repository() / "llm", repo / "llm")
    config = repo / "llm" / "config.pbtxt"
    config.write_text(set_parameters(config.read_text(), {"model_dir": "example/tiny-llama", "device": "cpu",
                                                          "num_kv_blocks": "64"}))
    http, grpc, metrics, openai_port = free_ports(4)
    with foreground(["serve", "--model-repository", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics), "--openai-port", str(openai_port)], env) as serve:
        assert f"serving {snapshot}" in serve.printed(), serve.printed()
        r = requests.post(f"http://127.0.0.1:{openai_port}/v1/completions", timeout=60, json={
            "model": "example/tiny-llama", "prompt": "Hello", "max_tokens": 3})  # named as given
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        rest = serve.stop()
    assert serve.proc.returncode == 0, rest
