"""Protocol-independent request building and response parsing for the `llm` model (docs/interface.md).

`build_inputs` turns generate()'s arguments into numpy arrays named and typed like the model's inputs;
the transports turn those into gRPC tensors or a JSON body. The `*_outputs` functions turn a response back
into one plain dict: token_ids, text, finish_reason, num_input_tokens, num_output_tokens.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .types import Chunk, PagedLLMError, Result

# Inputs declared with dims [1]: sent as JSON scalars over HTTP.
SCALAR_INPUTS = ("text_input", "prompt_embeds_base64", "max_tokens", "temperature", "top_p", "top_k", "seed",
                 "ignore_eos", "stream", "exclude_input_in_output")


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")  # a torch.Tensor, without importing torch


def _classify(prompt: Any) -> str:
    """Which prompt kind a positional `prompt` is: text, input_ids or prompt_embeds."""
    if isinstance(prompt, str):
        return "text"
    if _is_tensor(prompt):
        return "prompt_embeds" if prompt.is_floating_point() else "input_ids"
    if isinstance(prompt, np.ndarray):
        return "prompt_embeds" if np.issubdtype(prompt.dtype, np.floating) else "input_ids"
    if isinstance(prompt, (list, tuple)):
        return "input_ids"
    raise TypeError(f"prompt: expected str, a list of token ids or an embeddings array, "
                    f"got {type(prompt).__name__}")


def _ids_array(ids: Any) -> np.ndarray:
    if _is_tensor(ids):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"input_ids: expected a 1-D sequence of token ids, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"input_ids: expected integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _embeds_array(embeds: Any) -> np.ndarray:
    if _is_tensor(embeds):
        embeds = embeds.detach().cpu().float().numpy()
    arr = np.asarray(embeds, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"prompt_embeds: expected shape [seq_len, hidden_size], got {list(arr.shape)}")
    return arr


EMBEDS_ENCODINGS = ("fp16", "fp32", "base64")


def build_inputs(prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                 prompt_embeds: Any = None, embeds_encoding: str = "fp16", max_tokens: int | None = 16,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop_token_ids: Any = None, ignore_eos: bool | None = None,
                 stop: str | list[str] | None = None, stream: bool = False) -> dict[str, np.ndarray]:
    """The request's input tensors by name. Options left None are not sent. Embeddings go by
    `embeds_encoding`: "fp16" as `prompt_embeds` FP16 [seq_len, hidden] (gRPC's default), "fp32" as
    `prompt_embeds_fp32` flattened row-major (HTTP's default: JSON has no FP16 and only 1-D arrays),
    "base64" as `prompt_embeds_base64`, base64 of the little-endian FP16 bytes (a quarter of FP32 JSON)."""
    if embeds_encoding not in EMBEDS_ENCODINGS:
        raise ValueError(f"embeds_encoding: expected one of {', '.join(EMBEDS_ENCODINGS)}, "
                         f"got {embeds_encoding!r}")
    given = {"text": text, "input_ids": input_ids, "prompt_embeds": prompt_embeds}
    if prompt is not None:
        kind = _classify(prompt)
        if given[kind] is not None:
            raise ValueError(f"prompt given twice: positionally and as {kind}=")
        given[kind] = prompt
    present = [k for k, v in given.items() if v is not None]
    if len(present) != 1:
        raise ValueError("give exactly one prompt: text, input_ids or prompt_embeds"
                         + (f" (got {', '.join(present)})" if present else ""))

    inputs: dict[str, np.ndarray] = {}
    kind = present[0]
    if kind == "text":
        if not isinstance(text := given["text"], str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        inputs["text_input"] = np.array([text.encode("utf-8")], dtype=np.object_)
    elif kind == "input_ids":
        inputs["input_ids"] = _ids_array(given["input_ids"])
    else:
        embeds = _embeds_array(given["prompt_embeds"])
        if embeds_encoding == "fp16":
            inputs["prompt_embeds"] = embeds.astype(np.float16)
        elif embeds_encoding == "fp32":
            inputs["prompt_embeds_fp32"] = embeds.reshape(-1)
        else:
            raw = np.ascontiguousarray(embeds, dtype="<f2").tobytes()
            inputs["prompt_embeds_base64"] = np.array([base64.b64encode(raw)], dtype=np.object_)

    if max_tokens is not None:
        inputs["max_tokens"] = np.array([max_tokens], dtype=np.int32)
    if temperature is not None:
        inputs["temperature"] = np.array([temperature], dtype=np.float32)
    if top_p is not None:
        inputs["top_p"] = np.array([top_p], dtype=np.float32)
    if top_k is not None:
        inputs["top_k"] = np.array([top_k], dtype=np.int32)
    if seed is not None:
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed}")
        inputs["seed"] = np.array([seed], dtype=np.uint64)
    if stop_token_ids is not None:
        inputs["stop_token_ids"] = _ids_array(list(stop_token_ids) if not _is_tensor(stop_token_ids)
                                              else stop_token_ids)
    if ignore_eos is not None:
        inputs["ignore_eos"] = np.array([bool(ignore_eos)], dtype=np.bool_)
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        inputs["stop"] = np.array([s.encode("utf-8") for s in stops], dtype=np.object_)
    inputs["stream"] = np.array([bool(stream)], dtype=np.bool_)
    # Result.text and the streamed chunks then hold the same thing: the generated text only.
    inputs["exclude_input_in_output"] = np.array([True], dtype=np.bool_)
    return inputs


def sse_output(obj: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """One /generate_stream event (None: the stream ended) -> (its outputs or None, whether the stream is done).
    An error event, which the server sends after status 200, raises."""
    if obj is None:
        return None, True
    if "error" in obj:
        raise PagedLLMError(str(obj["error"]))
    out = json_outputs(obj)
    return out, bool(out["finish_reason"])


def json_body(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The HTTP generate extension's body: top-level keys are input names, values scalars or flat lists
    (the server fills the shape in from the model's dims)."""
    body: dict[str, Any] = {}
    for name, arr in inputs.items():
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
        body[name] = values[0] if name in SCALAR_INPUTS else values
    return body


# ------------------------------------------------------------------------------------------- responses
def _text(values) -> str:
    return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)


def grpc_outputs(result) -> dict[str, Any]:
    """Outputs of a tritonclient.grpc InferResult."""
    def get(name):
        arr = result.as_numpy(name)
        return np.zeros(0) if arr is None else arr.reshape(-1)

    return {
        "token_ids": [int(t) for t in get("token_ids")],
        "text": _text(get("text_output")),
        "finish_reason": _text(get("finish_reason")),
        "num_input_tokens": int(next(iter(get("num_input_tokens")), 0)),
        "num_output_tokens": int(next(iter(get("num_output_tokens")), 0)),
    }


def json_outputs(obj: dict) -> dict[str, Any]:
    """Outputs of a generate-extension JSON response (one-element tensors arrive as scalars)."""
    def listed(v):
        return [] if v is None else v if isinstance(v, list) else [v]

    def scalar(v):
        v = listed(v)
        return int(v[0]) if v else 0

    return {
        "token_ids": [int(t) for t in listed(obj.get("token_ids"))],
        "text": _text(listed(obj.get("text_output"))),
        "finish_reason": _text(listed(obj.get("finish_reason"))),
        "num_input_tokens": scalar(obj.get("num_input_tokens")),
        "num_output_tokens": scalar(obj.get("num_output_tokens")),
    }


def to_chunk(out: dict[str, Any]) -> Chunk:
    return Chunk(out["token_ids"], out["text"], out["finish_reason"] or None, out["num_output_tokens"])


def to_result(outputs: list[dict[str, Any]]) -> Result:
    """A Result from a request's responses (one when not streaming; pieces are joined if there are more)."""
    if not outputs:
        raise ValueError("no response")
    last = outputs[-1]
    return Result(token_ids=[t for o in outputs for t in o["token_ids"]],
                  text="".join(o["text"] for o in outputs), finish_reason=last["finish_reason"],
                  num_input_tokens=last["num_input_tokens"], num_output_tokens=last["num_output_tokens"])
