"""Prompt embeddings computed on the client, streamed back as text over gRPC.

The flow people use with encoders of their own: chat template -> token ids -> the checkpoint's embedding
layer -> `prompt_embeds` FP16 -> pagedllm, which streams tokens back. No pickles: the tensor travels as raw
FP16 through Triton's protocol.

    python examples/chat_embeds_grpc.py --model-dir ~/.cache/pagedllm/default-tiny-llama
    python examples/chat_embeds_grpc.py --model-dir DIR --batch   # three chats at once
"""
from __future__ import annotations

import argparse
import queue
import sys

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATS = [
    "Tell me about the sea.",
    "Write a line about mountains.",
    "What do foxes eat?",
]


def chat_embeddings(tokenizer, embedding_layer, question: str) -> np.ndarray:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    with torch.no_grad():
        return embedding_layer(ids[0]).to(torch.float16).numpy()


def request_inputs(embeds: np.ndarray, max_tokens: int) -> list[grpcclient.InferInput]:
    values = {"prompt_embeds": (embeds, "FP16"), "max_tokens": (np.array([max_tokens], np.int32), "INT32"),
              "temperature": (np.array([0.0], np.float32), "FP32"), "stream": (np.array([True]), "BOOL")}
    inputs = []
    for name, (arr, dtype) in values.items():
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="the checkpoint the server serves (for tokenizer+embeddings)")
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", action="store_true", help="send three chats concurrently on one stream")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    embedding_layer = AutoModelForCausalLM.from_pretrained(args.model_dir).get_input_embeddings()
    chats = CHATS if args.batch else CHATS[:1]

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for i, question in enumerate(chats):
        client.async_stream_infer("llm", request_inputs(chat_embeddings(tokenizer, embedding_layer, question),
                                                        args.max_tokens),
                                  request_id=str(i), enable_empty_final_response=True)
    texts = {str(i): "" for i in range(len(chats))}
    pending, failed = set(texts), False
    while pending:
        result, error = responses.get(timeout=300)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            failed = True
            break
        response = result.get_response()
        piece = "".join(t.decode() for t in result.as_numpy("text_output").reshape(-1))
        texts[response.id] += piece
        if not args.batch:
            print(piece, end="", flush=True)  # tokens as they arrive
        if response.parameters["triton_final_response"].bool_param:
            pending.discard(response.id)
    client.stop_stream()
    if args.batch:
        for i, question in enumerate(chats):
            print(f"[{i}] {question}\n    -> {texts[str(i)]!r}")
    else:
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
