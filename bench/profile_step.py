"""torch.profiler tables of decode steps, to see where a step's time goes (the batch-32 cliff: on the H200 a
batch-32 step of the ~0.5B model took 3.4x a batch-8 one). The 8B-shaped random model of bench/decode.py,
CUDA graphs off (so each kernel shows on its own), a few decode steps per batch size after warm-up; prints
the top kernels and ops by device time per batch size and writes the tables to OUT/profile.txt.

    python bench/profile_step.py --batch 8 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (bench/decode.py: the random-weight model)
from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm.engine import rank as rank_module  # noqa: E402
from pagedllm.engine.engine import LLMEngine  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402


def profile_batch(engine: LLMEngine, batch: int, prompt_len: int, steps: int) -> str:
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add(engine.make_request(f"p{batch}-{i}", params, prompt_token_ids=[(i + j) % 900 + 1
                                                                                  for j in range(prompt_len)]))
    while engine.num_waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
    for rid in list(engine._requests):
        engine.abort(rid)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="llama3-8b", choices=list(decode.MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    rank_module.load_weights = decode.random_weights
    model_dir = decode.write_config(Path(tempfile.mkdtemp()) / args.model, decode.MODELS[args.model])
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device=args.device, dtype=dtype, cuda_graphs=False,
                                    max_num_seqs=max(args.batch), enable_prefix_caching=False,
                                    num_kv_blocks=max(args.batch) * (args.prompt_len + args.steps + 16) // 16 + 64))
    tables = []
    for batch in args.batch:
        table = profile_batch(engine, batch, args.prompt_len, args.steps)
        tables.append(f"== {args.model}, batch {batch}, {args.steps} decode steps, CUDA graphs off ==\n{table}")
        print(tables[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
