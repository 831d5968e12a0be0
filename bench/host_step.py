"""The engine's host time per decode step: what the step costs besides the model's forward pass (scheduling,
the step's metadata, sampling and its bookkeeping, detokenization, stop checks, building the outputs). On CPU
with a tiny model (hidden 64, 2 layers) the forward pass is short and the host work is most of the step: this
measures the step and the forward pass inside it, and reports the difference per decode step, at several batch
sizes (target: <= 0.5 ms at batch 1, <= 2 ms at batch 64). Writes JSON to --out.

    python bench/host_step.py                     # batch 1, 8, 32, 64; cuda_graphs on (the padded path)
    python bench/host_step.py --no-cuda-graphs    # unpadded eager steps
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm.engine.engine import LLMEngine  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.tiny_model import make_tiny_model  # noqa: E402


class Timed:
    """Wraps a method, recording the wall time of each call in `times`."""

    def __init__(self, obj, name: str):
        self.times: list[float] = []
        real = getattr(obj, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                self.times.append(time.perf_counter() - start)

        setattr(obj, name, timed)


def measure(engine: LLMEngine, batch: int, steps: int) -> dict:
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add(engine.make_request(f"r{batch}-{i}", params, prompt_token_ids=[5 + i % 100, 6, 7, 8]))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.num_waiting:
        engine.step()  # prefills done: what follows is decode only
    forward = Timed(engine.runner, "_forward")
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    for rid in list(engine._requests):
        engine.abort(rid)
    del engine.runner._forward  # the instance attribute Timed set: the class's method again
    step, fwd = np.asarray(step_times), np.asarray(forward.times)  # one forward pass a step
    return {"batch": batch, "step_ms": 1e3 * float(np.median(step)), "model_ms": 1e3 * float(np.median(fwd)),
            "host_ms": 1e3 * float(np.median(step - fwd))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "host-step", hidden_size=64, num_layers=2,
                                max_position=4096)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", num_kv_blocks=4096,
                                    max_num_seqs=max(args.batch), cuda_graphs=args.cuda_graphs))
    print(f"CPU, tiny model (hidden 64, 2 layers), cuda_graphs={args.cuda_graphs} "
          f"({'padded' if args.cuda_graphs else 'unpadded'} eager decode steps), median of {args.steps} steps")
    print(f"{'batch':>5s} {'step ms':>8s} {'forward ms':>10s} {'host ms':>8s}  (host: step - forward)")
    results = []
    for batch in args.batch:
        r = measure(engine, batch, args.steps)
        results.append(r)
        print(f"{batch:5d} {r['step_ms']:8.3f} {r['model_ms']:10.3f} {r['host_ms']:8.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_step.json").write_text(json.dumps({"machine": platform.platform(), "args": vars(args),
                                                    "results": results}, indent=2))
    print(f"wrote {out / 'host_step.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
