"""The examples in examples/ run as a user would run them, against a real server."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from triton_helpers import stream_one

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "chat_embeds_grpc.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def expected_text(srv, question: str, max_tokens: int) -> str:
    """The same chat sent as token ids: equal greedy output (embeddings are the checkpoint's own rows)."""
    tok = AutoTokenizer.from_pretrained(srv.model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    emb = AutoModelForCausalLM.from_pretrained(srv.model_dir).get_input_embeddings()
    with torch.no_grad():
        embeds = emb(torch.tensor(ids)).to(torch.float16).numpy()
    res = stream_one(srv.grpc_url, {"prompt_embeds": embeds, "max_tokens": np.array([max_tokens], np.int32),
                                    "temperature": np.array([0.0], np.float32)})
    assert res.error is None
    return res.text


def test_chat_embeddings_streamed_over_grpc(llm_server):
    out = run_example("--model-dir", str(llm_server.model_dir), "--url", llm_server.grpc_url, "--max-tokens", "10")
    assert out == expected_text(llm_server, "Tell me about the sea.", 10) + "\n"


def test_three_chats_at_once(llm_server):
    out = run_example("--model-dir", str(llm_server.model_dir), "--url", llm_server.grpc_url, "--max-tokens", "8",
                      "--batch")
    lines = out.strip().splitlines()
    assert len(lines) == 6
    for i, question in enumerate(["Tell me about the sea.", "Write a line about mountains.", "What do foxes eat?"]):
        assert lines[2 * i] == f"[{i}] {question}"
        assert lines[2 * i + 1] == f"    -> {expected_text(llm_server, question, 8)!r}"


def test_the_seeds_online_client_over_the_openai_api(llm_server, openai_server):
    for stream in ([], ["--stream"]):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_prompt_embeds.py"), "--model-dir",
                               str(llm_server.model_dir), "--base-url", f"{openai_server.url}/v1", "--max-tokens",
                               "10", *stream], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected_text(llm_server, "Tell me about the sea.", 10) + "\n"
