"""The `llm` model's wire format, both ways, whatever the transport (README.md "The `llm` model's interface").

`build_inputs` turns a prompt and GenerateOptions into numpy arrays named and typed like the model's inputs;
the transports send those as gRPC tensors, or as a JSON body (`json_body`). `grpc_outputs` / `json_outputs`
read one response back into a plain dict (token_ids, logprobs, text, finish_reason, num_input_tokens,
num_output_tokens, num_cached_tokens); `to_chunk` makes a Chunk of one, `to_result` gathers a request's
responses into a Result.
"""
from __future__ import annotations

import base64
from dataclasses import fields
from typing import Any, Callable

import numpy as np
from pagedllm.interface import INPUTS

from .options import GenerateOptions
from .types import Chunk, PagedLLMError, Result

EMBEDS_ENCODINGS = ("fp16", "fp32", "base64")
# Inputs declared with dims [1]: sent as JSON scalars over HTTP.
SCALAR_INPUTS = tuple(i.name for i in INPUTS if i.dims == (1,))


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


def _ids_array(name: str, ids: Any) -> np.ndarray:
    if _is_tensor(ids):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integers, got {arr.dtype}")
    if arr.size:
        _check_range(name, int(arr.min()), np.int64)
        _check_range(name, int(arr.max()), np.int64)
    return arr.astype(np.int64)


def _check_range(name: str, value: int, dtype: type) -> None:
    """numpy would wrap a value its dtype cannot hold (2**32 as INT32 is 0): refuse it instead."""
    bounds = np.iinfo(dtype)
    if not bounds.min <= value <= bounds.max:
        raise ValueError(f"{name}: {value} is out of range for {np.dtype(dtype).name} "
                         f"({bounds.min} to {bounds.max})")


def _embeds_array(embeds: Any) -> np.ndarray:
    if _is_tensor(embeds):
        embeds = embeds.detach().cpu().float().numpy()
    arr = np.asarray(embeds, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"prompt_embeds: expected shape [seq_len, hidden_size], got {list(arr.shape)}")
    return arr


def _strings(values: Any) -> np.ndarray:
    values = [values] if isinstance(values, str) else list(values)
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def _prompt_inputs(prompt: Any, text: Any, input_ids: Any, prompt_embeds: Any,
                   embeds_encoding: str) -> dict[str, np.ndarray]:
    """The one prompt input: given positionally (its kind picked by type) or by name."""
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
    kind = present[0]
    if kind == "text":
        if not isinstance(text := given["text"], str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return {"text_input": _strings(text)}
    if kind == "input_ids":
        return {"input_ids": _ids_array("input_ids", given["input_ids"])}
    embeds = _embeds_array(given["prompt_embeds"])
    if embeds_encoding == "fp16":
        return {"prompt_embeds": embeds.astype(np.float16)}
    if embeds_encoding == "fp32":
        return {"prompt_embeds_fp32": embeds.reshape(-1)}
    raw = np.ascontiguousarray(embeds, dtype="<f2").tobytes()
    return {"prompt_embeds_base64": np.array([base64.b64encode(raw)], dtype=np.object_)}


def _option_tensor(name: str, value: Any, dtype: type, many: bool) -> np.ndarray:
    if dtype is np.object_:
        return _strings(value)
    if many:
        return _ids_array(name, value)
    if np.issubdtype(dtype, np.integer):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
        _check_range(name, int(value), dtype)
    return np.array([value], dtype=dtype)


def option_inputs(options: GenerateOptions) -> dict[str, np.ndarray]:
    """The options that are set (not None), as the input tensors of the same names; the server applies its
    defaults to the others."""
    inputs = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if value is not None:
            inputs[f.name] = _option_tensor(f.name, value, f.metadata["dtype"], f.metadata["many"])
    return inputs


def build_inputs(prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                 prompt_embeds: Any = None, embeds_encoding: str = "fp16", stream: bool = False,
                 options: GenerateOptions | None = None) -> dict[str, np.ndarray]:
    """The request's input tensors by name, from exactly one prompt and `options` (none set when None).
    Embeddings go by `embeds_encoding`: "fp16" as `prompt_embeds` FP16 [seq_len, hidden] (gRPC's default),
    "fp32" as `prompt_embeds_fp32` flattened row-major (HTTP's default: JSON has no FP16 and only 1-D arrays),
    "base64" as `prompt_embeds_base64`, base64 of the little-endian FP16 bytes (a quarter of FP32 JSON)."""
    if embeds_encoding not in EMBEDS_ENCODINGS:
        raise ValueError(f"embeds_encoding: expected one of {', '.join(EMBEDS_ENCODINGS)}, "
                         f"got {embeds_encoding!r}")
    inputs = _prompt_inputs(prompt, text, input_ids, prompt_embeds, embeds_encoding)
    inputs.update(option_inputs(options or GenerateOptions()))
    inputs["stream"] = np.array([bool(stream)], dtype=np.bool_)
    # Result.text and the streamed chunks then hold the same thing: the generated text only.
    inputs["exclude_input_in_output"] = np.array([True], dtype=np.bool_)
    return inputs


def json_body(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The HTTP generate extension's body: top-level keys are input names, values scalars or flat lists
    (the server fills the shape in from the model's dims)."""
    body: dict[str, Any] = {}
    for name, arr in inputs.items():
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
        body[name] = values[0] if name in SCALAR_INPUTS else values
    return body


# ------------------------------------------------------------------------------------------- responses
def _text(values: list) -> str:
    return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)


def _outputs(values: Callable[[str], list]) -> dict[str, Any]:
    """One response's outputs; `values(name)` is the named output's values as a flat list ([] when absent)."""
    def first_int(name: str) -> int:
        return int(next(iter(values(name)), 0))

    return {
        "token_ids": [int(t) for t in values("token_ids")],
        "logprobs": [float(x) for x in values("logprobs")],  # empty unless return_logprobs
        "text": _text(values("text_output")),
        "finish_reason": _text(values("finish_reason")),
        "num_input_tokens": first_int("num_input_tokens"),
        "num_output_tokens": first_int("num_output_tokens"),
        "num_cached_tokens": first_int("num_cached_tokens"),  # 0 when not asked for (or a model without it)
    }


def grpc_outputs(result) -> dict[str, Any]:
    """Outputs of a tritonclient.grpc InferResult."""
    def values(name: str) -> list:
        arr = result.as_numpy(name)
        return [] if arr is None else arr.reshape(-1).tolist()

    return _outputs(values)


def json_outputs(obj: dict) -> dict[str, Any]:
    """Outputs of a generate-extension JSON response (one-element tensors arrive as scalars)."""
    def values(name: str) -> list:
        v = obj.get(name)
        return [] if v is None else v if isinstance(v, list) else [v]

    return _outputs(values)


def to_chunk(out: dict[str, Any], with_logprobs: bool) -> Chunk:
    """One streamed response as a Chunk; its logprobs are None unless the request asked for them."""
    return Chunk(out["token_ids"], out["text"], out["finish_reason"] or None, out["num_output_tokens"],
                 out["logprobs"] if with_logprobs else None, out["num_input_tokens"], out["num_cached_tokens"])


def to_result(outputs: list[dict[str, Any]], with_logprobs: bool) -> Result:
    """A Result from a request's responses (one when not streaming; their pieces are joined when more)."""
    if not outputs:
        raise PagedLLMError("the server finished the request without a response")
    last = outputs[-1]
    return Result(token_ids=[t for o in outputs for t in o["token_ids"]],
                  text="".join(o["text"] for o in outputs), finish_reason=last["finish_reason"],
                  num_input_tokens=last["num_input_tokens"], num_output_tokens=last["num_output_tokens"],
                  logprobs=[x for o in outputs for x in o["logprobs"]] if with_logprobs else None,
                  num_cached_tokens=last["num_cached_tokens"])
