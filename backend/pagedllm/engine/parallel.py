"""Tensor parallelism over torch.distributed (NCCL on CUDA, gloo on CPU): one process per rank.

Rank 0 is the engine's own process: it alone schedules, samples and detokenizes. Ranks 1..N-1 are worker
processes (engine/worker.py) that the engine starts and owns: each holds its shard of the weights and of the
KV cache (model/weights.py says how the model is split), and runs the same forward pass as rank 0 on each step's
message, broadcast once a step (step_message.py); the row-parallel projections' partial outputs are summed with
an all-reduce (two a layer). Ranks use consecutive devices from the engine's: cuda:k .. cuda:k+N-1.

Workers are started with `subprocess` and an explicit Python interpreter rather than `multiprocessing`: inside
Triton's Python backend stub, `sys.executable` is the stub binary, which cannot start Python workers. The
interpreter is $PAGEDLLM_PYTHON (the launcher sets it), else the `python3` the stub's PATH finds (the launcher
puts the virtual environment's first). The rendezvous port is a free one, found when the workers start.
A worker's stdin is a pipe from the engine that is never written: it reaches end-of-file when the engine's
process ends, however it ends, and the worker then exits (a parent-death signal would fire when the *thread*
that started the workers ends, and setting one between fork and exec is not safe in a threaded process).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import EngineConfig

log = logging.getLogger("pagedllm")
PYTHON_ENV = "PAGEDLLM_PYTHON"
RENDEZVOUS_TIMEOUT = timedelta(seconds=300)  # workers load their weights before they join


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_executable() -> str:
    """A Python interpreter for worker processes (not the Triton stub's own binary)."""
    explicit = os.environ.get(PYTHON_ENV)
    if explicit:
        return explicit
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3") or shutil.which("python")
    if found is None:
        raise RuntimeError(f"no Python interpreter for tensor-parallel workers: set ${PYTHON_ENV}")
    return found


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th after the engine's own (cuda:k+r), or the CPU."""
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(device: torch.device, init_method: str, rank: int, world: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=RENDEZVOUS_TIMEOUT)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def agree_on_blocks(num_blocks: int, device: torch.device) -> int:
    """Every rank's cache must have as many blocks: the fewest any rank can hold."""
    t = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class Workers:
    """Rank 0's handle on ranks 1..N-1: starts them, broadcasts each step's message, says if one died, stops
    them."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.world = config.tensor_parallel_size
        self.device = device
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        python = python_executable()
        worker_config = json.dumps({**config.to_strings(), "tensor_parallel_size": str(self.world)})
        self.procs = [subprocess.Popen(
            [python, "-m", "pagedllm.engine.worker", "--rank", str(rank), "--init", self.init_method,
             "--config", worker_config],
            stdin=subprocess.PIPE) for rank in range(1, self.world)]  # the pipe: see the module's docstring
        log.info("pagedllm: started tensor-parallel ranks 1..%d (pids %s) with %s", self.world - 1,
                 [p.pid for p in self.procs], python)
        self._stopped = False

    def join(self) -> None:
        """Rank 0 joins the group (waits until every worker has too)."""
        init_group(self.device, self.init_method, 0, self.world)

    def broadcast(self, message: torch.Tensor, host_message: torch.Tensor, embed_rows: torch.Tensor | None):
        """One step to every rank: the message (NCCL sends the device copy, gloo the host one), then the
        prompt-embedding rows when the step has any."""
        dist.broadcast(message if self.device.type == "cuda" else host_message, src=0)
        if embed_rows is not None:
            dist.broadcast(embed_rows.contiguous(), src=0)

    def failure(self) -> str | None:
        """Which rank died and how, if one did."""
        for rank, proc in enumerate(self.procs, start=1):
            rc = proc.poll()
            if rc is not None and not self._stopped:
                how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"
        return None

    def stop(self, send_stop=None, timeout: float = 10.0) -> None:
        """`send_stop()` broadcasts the stop message (the model runner knows its layout); then the workers exit,
        or are killed. Without send_stop (the engine thread may still be inside a step's collectives, where a
        message of ours would interleave with its own) they are killed at once."""
        if self._stopped:
            return
        self._stopped = True
        if send_stop is not None and all(p.poll() is None for p in self.procs):
            try:
                send_stop()
            except Exception:  # a broken group: they are killed below
                log.exception("pagedllm: telling the tensor-parallel ranks to stop failed")
        for proc in self.procs:
            try:
                proc.wait(timeout if send_stop is not None else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        if send_stop is not None and dist.is_initialized():
            dist.destroy_process_group()


def exit_when_parent_exits() -> None:
    """In a worker: end this process when the engine's ends (its stdin, our pipe, reaches end-of-file)."""
    def watch() -> None:
        try:
            # The file descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader holds its
            # lock, and the interpreter aborts on it when the worker exits normally.
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent", daemon=True).start()
