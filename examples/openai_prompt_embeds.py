"""The seed's online flow, as vLLM's prompt-embeds users write it, against pagedllm's OpenAI-compatible API:
chat template -> token ids -> the checkpoint's embedding layer -> torch.save -> base64 ->
`client.completions.create(prompt="", extra_body={"prompt_embeds": ...})`.

pagedllm reads that payload without unpickling it (no torch.load on the server: see the README).

    python examples/openai_prompt_embeds.py --model-dir ~/.cache/pagedllm/default-tiny-llama
    python examples/openai_prompt_embeds.py --model-dir DIR --base-url http://localhost:9000/v1 --stream
"""
from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def chat_embeddings(tokenizer, embedding_layer, question: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    with torch.no_grad():
        return embedding_layer(torch.tensor(ids))  # [seq_len, hidden_size], the checkpoint's dtype


def encode(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="the checkpoint the server serves (tokenizer, embeddings)")
    ap.add_argument("--base-url", default="http://localhost:9000/v1")
    ap.add_argument("--model", default=None, help="the served model name (default: the checkpoint folder's name)")
    ap.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    ap.add_argument("--question", default="Tell me about the sea.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    embedding_layer = AutoModelForCausalLM.from_pretrained(args.model_dir).get_input_embeddings()
    prompt_embeds = encode(chat_embeddings(tokenizer, embedding_layer, args.question))

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    request = dict(model=args.model or Path(args.model_dir).name, prompt="", max_tokens=args.max_tokens,
                   temperature=0, extra_body={"prompt_embeds": prompt_embeds})
    if args.stream:
        for chunk in client.completions.create(stream=True, **request):
            print(chunk.choices[0].text, end="", flush=True)
        print()
    else:
        print(client.completions.create(**request).choices[0].text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
