"""Tensor parallelism on CPU: two ranks over torch.distributed's gloo backend, one worker process beside the
engine. Greedy output equals transformers for a GQA checkpoint whose KV heads divide between the ranks and for
one with a single KV head (replicated on both), for token ids and prompt embeddings, batched, with preemption
and prefix-cache hits; through a real tritonserver too. A killed rank gives errors, not a hang, and nothing is
left running."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from engine_utils import make_engine, run_to_completion, token_ids
from hf_reference import embeds_fp16, hf_greedy
from pagedllm.sampling_params import SamplingParams

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 500, (n,), generator=g).tolist() for n in (1, 15, 16, 17, 53)]


@pytest.fixture(scope="module", params=[2, 1], ids=["kv-heads-split", "kv-head-replicated"])
def checkpoint(request, make_tiny) -> str:
    return str(make_tiny("llama", seed=7, num_heads=4, num_kv_heads=request.param, hidden_size=64))


@pytest.fixture(scope="module")
def tp_engine(checkpoint):
    engine = make_engine(checkpoint, tensor_parallel_size=2, num_kv_blocks=12)  # too few: preemption
    yield engine
    engine.close()


def run(engine, requests: dict) -> dict[str, list[int]]:
    for rid, kw in requests.items():
        kw = dict(kw)
        engine.add(engine.make_request(rid, kw.pop("params", GREEDY), **kw))
    outputs = run_to_completion(engine)
    return {rid: token_ids(outputs[rid]) for rid in requests}


def test_two_ranks_match_transformers_batched_with_preemption_and_prefix_hits(tp_engine, checkpoint):
    ps = prompts(seed=1)
    shared = prompts(seed=2)[4]
    requests = {f"ids{i}": {"prompt_token_ids": p} for i, p in enumerate(ps)}
    requests.update({f"emb{i}": {"prompt_embeds": embeds_fp16(checkpoint, p)} for i, p in enumerate(ps[2:4])})
    requests.update({"s1": {"prompt_token_ids": shared + [7]}, "s2": {"prompt_token_ids": shared + [9]}})
    got = run(tp_engine, requests)
    assert tp_engine.scheduler.num_preemptions > 0 and tp_engine.block_manager.num_cached_tokens_hit > 0
    for i, p in enumerate(ps):
        assert got[f"ids{i}"] == hf_greedy(checkpoint, ids=p, max_new_tokens=MAX_TOKENS), f"len {len(p)}"
    for i, p in enumerate(ps[2:4]):
        assert got[f"emb{i}"] == hf_greedy(checkpoint, embeds=embeds_fp16(checkpoint, p), max_new_tokens=MAX_TOKENS)
    assert got["s2"] == hf_greedy(checkpoint, ids=shared + [9], max_new_tokens=MAX_TOKENS)


def test_each_rank_holds_its_share(tp_engine):
    model = tp_engine.model
    spec = tp_engine.spec
    assert model.num_heads == spec.num_heads // 2
    assert model.num_kv_heads == max(1, spec.num_kv_heads // 2)
    assert tp_engine.runner.kv_caches[0][0].shape[2] == model.num_kv_heads
    assert model.layers[0].gate_up_weight.shape[0] == 2 * spec.intermediate_size // 2
    assert model.layers[0].o_weight.shape[1] == spec.num_heads // 2 * spec.head_dim


def test_one_failed_step_is_fatal_with_tensor_parallelism(make_tiny):
    """A step that fails on rank 0 may leave the other ranks inside its collectives, where the next step's
    would not line up: the first failure ends the engine (one rank alone goes on after a failure)."""
    from pagedllm.serving.engine_thread import EngineThread

    def failing_step():
        raise RuntimeError("this step fails (simulated)")

    engine = make_engine(str(make_tiny("llama", seed=7, num_heads=4, num_kv_heads=2, hidden_size=64)),
                         tensor_parallel_size=2, num_kv_blocks=12)
    engine.step = failing_step
    errors, fatal = [], []
    thread = EngineThread(engine, on_outputs=lambda outputs: None, on_error=lambda rid, msg: errors.append(rid),
                          on_fatal=fatal.append)
    try:
        thread.submit(engine.make_request("r", GREEDY, prompt_token_ids=[5, 6, 7]))
        deadline = time.monotonic() + 10
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread.stop(timeout=5)  # closes the engine
    assert errors == ["r"]
    assert fatal and "tensor-parallel engine step failed" in fatal[0], fatal


def test_ranks_exit_cleanly_when_the_engine_closes(make_tiny):
    """Told to stop, a worker exits 0 (its watch on the engine's process must not abort the interpreter's
    shutdown)."""
    engine = make_engine(str(make_tiny("llama", seed=7, num_heads=4, num_kv_heads=2, hidden_size=64)),
                         tensor_parallel_size=2, num_kv_blocks=12)
    procs = list(engine.workers.procs)
    engine.close()
    assert [p.returncode for p in procs] == [0]


def test_a_killed_rank_gives_errors_not_a_hang(tp_engine):
    """(Last of the module's tests for an engine: it kills the engine's worker.)"""
    from pagedllm.serving.engine_thread import EngineThread

    engine = tp_engine
    events, fatal = [], []
    thread = EngineThread(engine, on_outputs=events.append, on_error=lambda rid, msg: events.append((rid, msg)),
                          on_fatal=fatal.append)
    try:
        thread.submit(engine.make_request("long", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                                          prompt_token_ids=[5, 6, 7]))
        time.sleep(0.2)
        worker = engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fatal and "tensor-parallel rank 1" in fatal[0] and "signal 9" in fatal[0], fatal
        deadline = time.monotonic() + 15  # the step blocked on the dead rank fails: the request gets an error
        while not any(isinstance(e, tuple) and e[0] == "long" for e in events) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(isinstance(e, tuple) and e[0] == "long" for e in events), events[-3:]
    finally:
        thread.stop(timeout=5)
    assert all(p.poll() is not None for p in engine.workers.procs)  # nothing left running


def test_through_tritonserver_with_two_ranks(start_server, make_tiny):
    from triton_helpers import stream_one

    model_dir = make_tiny("llama", seed=7, num_heads=4, num_kv_heads=2, hidden_size=64)
    p = prompts(seed=3)[4]
    with start_server(model_dir, tensor_parallel_size=2) as srv:
        res = stream_one(srv.grpc_url, {"input_ids": np.array(p, np.int64), "max_tokens": np.array([MAX_TOKENS],
                                         np.int32), "temperature": np.array([0.0], np.float32),
                                        "stream": np.array([True])})
        assert res.error is None and res.token_ids == hf_greedy(str(model_dir), ids=p, max_new_tokens=MAX_TOKENS)
        stub_children = srv.server.stub_pids()
        assert stub_children
    # stopped: the worker (a child of the stub) is gone with it
    time.sleep(0.5)
    leftover = [pid for pid in os.listdir("/proc") if pid.isdigit()
                and b"pagedllm.engine.worker" in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert not leftover


ENGINE_THEN_WAIT = """
import sys, time
sys.path[:0] = sys.argv[2:]
from engine_utils import make_engine
engine = make_engine(sys.argv[1], tensor_parallel_size=2, num_kv_blocks=12)
print(engine.workers.procs[0].pid, flush=True)
time.sleep(600)
"""


def test_a_worker_exits_when_the_engines_process_dies(make_tiny):
    """SIGKILL of the process that holds the engine (a Triton stub, say) leaves no worker rank behind. (Over
    gloo the worker's broadcast fails as its peer goes; NCCL may wait on: the next test pins what ends it then.)"""
    import subprocess
    import sys
    from pathlib import Path

    tests, backend = Path(__file__).parent, Path(__file__).parents[1] / "backend"
    model = make_tiny("llama", seed=7, num_heads=4, num_kv_heads=2, hidden_size=64)
    holder = subprocess.Popen([sys.executable, "-c", ENGINE_THEN_WAIT, str(model), str(tests), str(backend)],
                              stdout=subprocess.PIPE, text=True)
    try:
        worker = int(holder.stdout.readline())
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), f"worker {worker} outlived the engine's process"
    finally:
        holder.kill()


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_watches_its_stdin_for_the_engines_end():
    """What ends a worker whose collectives would not notice the engine's death: its stdin reaching end."""
    import subprocess
    import sys
    from pathlib import Path

    backend = Path(__file__).parents[1] / "backend"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                              "from pagedllm.engine import parallel; parallel.exit_when_parent_exits(); "
                              "print('watching', flush=True); time.sleep(60)", str(backend)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "watching"
        child.stdin.close()  # as when the engine's process dies
        assert child.wait(timeout=10) == 1
    finally:
        child.kill()
