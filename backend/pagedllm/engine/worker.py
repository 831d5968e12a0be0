"""A tensor-parallel worker: rank r of N, started by the engine (parallel.Workers). It joins the process group,
builds its shard of the model and cache (rank.build_rank, as rank 0 does), then runs the forward pass of every
step rank 0 broadcasts, until rank 0 says stop. It exits when the engine's process does (its stdin ends).

    python -m pagedllm.engine.worker --rank R --init tcp://127.0.0.1:PORT --config '{...EngineConfig...}'
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.distributed as dist

from ..config import EngineConfig
from ..model.spec import load_model_spec
from . import parallel
from .model_runner import ModelRunner
from .rank import build_rank, resolve_device
from .step_message import STOP, Header

log = logging.getLogger("pagedllm")


def serve_steps(runner: ModelRunner, hidden_size: int) -> None:
    """Receive each step's message (one broadcast; then the embedding rows, if the step has any) and run it."""
    device = runner.device if runner.device.type == "cuda" else torch.device("cpu")
    message = runner.message_buffer  # the buffer this rank's CUDA graphs read
    header_len = runner.layout.header_len
    while True:
        dist.broadcast(message, src=0)
        header = Header.read(message[:header_len].cpu().numpy())
        if header.kind == STOP:
            return
        embed_rows = None
        if header.segments:
            embed_rows = torch.empty(header.embed_rows, hidden_size, dtype=runner.model.dtype, device=device)
            dist.broadcast(embed_rows, src=0)
        runner.forward_message(message, header, embed_rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--init", required=True, help="the process group's rendezvous (tcp://host:port)")
    ap.add_argument("--config", required=True, help="the engine's settings (EngineConfig as JSON strings)")
    args = ap.parse_args(argv)
    parallel.exit_when_parent_exits()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s pagedllm rank {args.rank}: %(message)s")
    config = EngineConfig.from_strings(json.loads(args.config))
    spec = load_model_spec(config.model_dir)
    device = parallel.rank_device(resolve_device(config.device), args.rank)
    parallel.init_group(device, args.init, args.rank, config.tensor_parallel_size)
    rank = build_rank(config, spec, args.rank)
    with torch.inference_mode():
        serve_steps(rank.runner, spec.hidden_size)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
