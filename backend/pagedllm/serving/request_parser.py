"""Turn one Triton request's tensors and parameters into a prompt and SamplingParams, or a clear error.

Which inputs there are, which of them are sampling options and how each kind of value is read come from the
interface table (interface.py). Kept free of `triton_python_backend_utils` so it is tested directly. Every
error is an InvalidRequest whose message starts with the name of the input at fault. Work that grows with an
input's size (tokenizing a text, copying embeddings, converting a list) is only done once its size is known
to be within the limits.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InvalidRequest
from ..interface import FLAGS, INPUTS, OPTIONS, PROMPTS
from ..sampling_params import SamplingParams

# The key lists, from the interface table (interface.py).
PROMPT_INPUTS = tuple(i.name for i in PROMPTS)
# Sampling keys accepted as input tensors, inside `sampling_parameters` JSON, or as request parameters.
SAMPLING_KEYS = tuple(i.name for i in OPTIONS)
FLAG_KEYS = tuple(i.name for i in FLAGS)
MAX_SAMPLING_JSON_BYTES = 64 * 1024
LIST_KEYS = tuple(i.name for i in OPTIONS if i.kind in ("ints", "strings"))  # their tensors are [-1]
MAX_LIST_LENGTHS = {i.name: i.max_len for i in INPUTS if i.max_len is not None}
# Keys that OpenAI-style clients (Triton's OpenAI frontend, benchmark tools) put in sampling_parameters with
# values that change nothing here; accepted with exactly those values, refused with any other (n=2, a logit
# bias, top-k logprobs would all change the result). Values may come as strings, as vllm_backend clients send.
NEUTRAL_KEYS = {
    "n": ("1",), "best_of": ("1",), "logprobs": ("none", "null", "0", "false"), "top_logprobs": ("none", "null", "0"),
    "prompt_logprobs": ("none", "null"), "logit_bias": ("none", "null", "{}"), "use_beam_search": ("false", "0"),
    "skip_special_tokens": ("true", "1"), "spaces_between_special_tokens": ("true", "1"), "user": None,
}


# Request parameters that Triton and its clients themselves set (the KServe protocol's, Triton's own `triton_*`
# ones): passed over. Any other unknown parameter is refused by name, as a misspelt `max_token` would otherwise
# be ignored without a word.
PROTOCOL_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size", "classification",
                       "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "sequence_id",
                       "sequence_start", "sequence_end", "priority", "timeout", "headers")


@dataclass(frozen=True)
class Limits:
    """What bounds a request's inputs: a prompt must fit in max_model_len tokens."""
    hidden_size: int
    max_model_len: int
    max_prompt_chars: int | None = None  # the longest text that could fit (None: no tokenizer)


INPUT_NAMES = tuple(i.name for i in INPUTS)


def take_inputs(get: Callable[[str], np.ndarray | None], limits: Limits) -> dict[str, np.ndarray]:
    """A request's inputs, copied out of the request (its memory belongs to the server and goes away with
    it), each one only once its size is known to be within the limits: a prompt that cannot fit, or a list
    longer than allowed, is refused before anything proportional to its size is done. (Copying a BYTES input
    copies references only; texts are measured before they are decoded or tokenized, in parse_request.)"""
    out = {}
    for name in INPUT_NAMES:
        arr = get(name)
        if arr is not None:
            _check_size(name, arr, limits)
            out[name] = np.array(arr, copy=True)
    return out


def _check_size(name: str, arr: np.ndarray, limits: Limits) -> None:
    rows = {"input_ids": arr.size, "prompt_embeds": arr.shape[0] if arr.ndim else 0,
            "prompt_embeds_fp32": arr.size // max(limits.hidden_size, 1)}.get(name)
    if rows is not None and rows >= limits.max_model_len:
        raise _too_long(name, rows, limits.max_model_len)
    if name in MAX_LIST_LENGTHS:
        _check_length(name, arr.reshape(-1))


@dataclass
class ParsedRequest:
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    prompt_token_ids: list[int] | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_text: str | None = None  # set for text_input prompts (prepended to text_output when asked)
    prompt_name: str = ""  # which input carried the prompt, for error messages


def _to_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise InvalidRequest(f"{name}: expected an integer, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise InvalidRequest(f"{name}: expected an integer, got {v!r}")


def _to_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise InvalidRequest(f"{name}: expected a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float's range
        raise InvalidRequest(f"{name}: expected a number, got {v!r}") from None
    if not math.isfinite(f):
        raise InvalidRequest(f"{name}: expected a finite number, got {v!r}")
    return f


def _to_bool(name: str, v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise InvalidRequest(f"{name}: expected a boolean, got {v!r}")


def _to_int_list(name: str, v: Any) -> list[int]:
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip().startswith("[") else [x for x in v.split(",") if x.strip()]
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
            raise InvalidRequest(f"{name}: expected a list of integers, got {_clip(v)}") from None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise InvalidRequest(f"{name}: expected a list of integers, got {_clip(v)}")
    _check_length(name, v)
    return [_to_int(name, x) for x in v]


def _check_length(name: str, values) -> None:
    """A list input's length, checked before its elements are converted one by one."""
    key = name.rsplit(".", 1)[-1].removeprefix("parameter ")
    limit = MAX_LIST_LENGTHS.get(key)
    if limit is not None and len(values) > limit:
        raise InvalidRequest(f"{name}: {len(values)} values is more than the limit of {limit}")


def _clip(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _to_str_list(name: str, v: Any) -> list[str]:
    """A string, a list of strings, or (as vllm_backend clients send values) a JSON list in a string."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            pass
    if isinstance(v, (str, bytes)):
        v = [v]
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise InvalidRequest(f"{name}: expected a string or a list of strings, got {_clip(v)}")
    _check_length(name, v)
    out = []
    for x in v:
        if isinstance(x, bytes):
            x = _utf8(name, x)
        if not isinstance(x, str):
            raise InvalidRequest(f"{name}: expected strings, got {x!r}")
        out.append(x)
    return out


# How each kind of value (interface.KINDS) is converted; the key's name labels its errors.
_BY_KIND: dict[str, Callable[[str, Any], Any]] = {
    "int": _to_int, "float": _to_float, "bool": _to_bool, "ints": _to_int_list, "strings": _to_str_list,
}
_CONVERT = {i.name: _BY_KIND[i.kind] for i in OPTIONS + FLAGS}


def _utf8(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{name}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def _convert(label: str, key: str, value: Any) -> Any:
    return _CONVERT[key](label, value)


def _scalar(name: str, arr: np.ndarray) -> Any:
    if arr.size != 1:
        raise InvalidRequest(f"{name}: expected one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    return _utf8(name, v) if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


def _sampling_json(arr: np.ndarray) -> dict:
    raw = _scalar("sampling_parameters", arr)
    if len(raw) > MAX_SAMPLING_JSON_BYTES:
        raise InvalidRequest("sampling_parameters: larger than 64 KiB")
    obj = _json_object("sampling_parameters", raw)
    unknown = sorted(set(obj) - set(SAMPLING_KEYS) - set(NEUTRAL_KEYS))
    if unknown:
        raise InvalidRequest(f"sampling_parameters: unsupported key {unknown[0]!r} (supported: "
                             f"{', '.join(SAMPLING_KEYS)})")
    for key in set(obj) & set(NEUTRAL_KEYS):
        _check_neutral(f"sampling_parameters.{key}", key, obj.pop(key))
    return obj


def _json_object(name: str, raw: str) -> dict:
    try:
        obj = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{name}: not valid JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:
        raise InvalidRequest(f"{name}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise InvalidRequest(f"{name}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{name}: expected a JSON object")
    return obj


def parse_parameters(raw: str | bytes | None) -> dict:
    """A Triton request's parameters (the JSON text the Python backend gives), bounded like
    sampling_parameters."""
    if not raw:
        return {}
    if len(raw) > MAX_SAMPLING_JSON_BYTES:
        raise InvalidRequest("parameters: larger than 64 KiB")
    return _json_object("parameters", _utf8("parameters", raw) if isinstance(raw, bytes) else raw)


def _check_parameter_names(parameters: dict) -> None:
    known = set(SAMPLING_KEYS) | set(FLAG_KEYS) | set(NEUTRAL_KEYS) | set(PROTOCOL_PARAMETERS)
    unknown = sorted(k for k in parameters if k not in known and not k.startswith("triton_"))
    if unknown:
        raise InvalidRequest(f"parameter {_clip(unknown[0])}: not a parameter of this model (supported: "
                             f"{', '.join(SAMPLING_KEYS + FLAG_KEYS)})")


def _check_neutral(label: str, key: str, value: Any) -> None:
    allowed = NEUTRAL_KEYS[key]
    if allowed is None:  # any value (e.g. `user`, an end-user id for the client's own bookkeeping)
        return
    text = "null" if value is None else json.dumps(value) if isinstance(value, (bool, dict)) else str(value)
    if text.strip().lower() not in allowed:
        raise InvalidRequest(f"{label}: {value!r} is not supported (accepted: {' or '.join(allowed)}, which "
                             "change nothing)")


def _flat_embeds(name: str, flat: np.ndarray, hidden_size: int) -> torch.Tensor:
    """A row-major flat vector -> [seq_len, hidden_size]; the length must be a multiple of hidden_size."""
    if flat.size % hidden_size:
        raise InvalidRequest(f"{name}: {flat.size} values is not a whole number of rows of hidden_size "
                             f"{hidden_size}")
    return torch.from_numpy(np.array(flat, copy=True).reshape(-1, hidden_size))


def _base64_embeds(arr: np.ndarray, hidden_size: int, max_len: int) -> torch.Tensor:
    raw = arr.reshape(-1)[0] if arr.size == 1 else None
    if not isinstance(raw, (bytes, str)):
        raise InvalidRequest("prompt_embeds_base64: expected one base64 string")
    limit = (max_len * hidden_size * 2 * 4) // 3 + 8  # base64 of the longest allowed prompt
    if len(raw) > limit:
        raise InvalidRequest(f"prompt_embeds_base64: {len(raw)} characters is more than the longest prompt "
                             f"({max_len} rows of {hidden_size}) needs")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("prompt_embeds_base64: not valid base64") from None
    if len(data) % 2:
        raise InvalidRequest("prompt_embeds_base64: odd number of bytes (expected little-endian FP16)")
    return _flat_embeds("prompt_embeds_base64", np.frombuffer(data, dtype="<f2"), hidden_size)


def parse_request(get: Callable[[str], np.ndarray | None], parameters: dict, tokenize,
                  limits: Limits) -> ParsedRequest:
    """get(name) returns the input as numpy or None; parameters are the request's parameters;
    tokenize(text) -> ids (raises InvalidRequest when there is no tokenizer); a text longer than
    limits.max_prompt_chars cannot fit in max_model_len tokens and is refused before it is tokenized."""
    present = [n for n in PROMPT_INPUTS if get(n) is not None]
    if len(present) != 1:
        what = "none was given" if not present else f"got {', '.join(present)}"
        raise InvalidRequest(f"prompt: send exactly one of {', '.join(PROMPT_INPUTS)}; {what}")

    # Every source is converted (and so validated) even where a higher-precedence one overrides it.
    values: dict[str, Any] = {}
    _check_parameter_names(parameters)
    for key in SAMPLING_KEYS + FLAG_KEYS:  # lowest precedence: request parameters
        if key in parameters:
            values[key] = _convert(f"parameter {key}", key, parameters[key])
    for key in set(parameters) & set(NEUTRAL_KEYS):
        _check_neutral(f"parameter {key}", key, parameters[key])
    sp = get("sampling_parameters")
    if sp is not None:
        for key, v in _sampling_json(sp).items():
            values[key] = _convert(f"sampling_parameters.{key}", key, v)
    for key in SAMPLING_KEYS + FLAG_KEYS:  # highest precedence: input tensors
        arr = get(key)
        if arr is not None:
            if key in LIST_KEYS:
                _check_length(key, arr.reshape(-1))
            values[key] = _convert(key, key, arr.reshape(-1).tolist() if key in LIST_KEYS else _scalar(key, arr))

    # An option not sent keeps SamplingParams' default; so does a flag its default (interface.py).
    params = SamplingParams(**{i.field: values[i.name] for i in OPTIONS if i.name in values})
    flags = {i.name: values.get(i.name, i.default) for i in FLAGS}
    if params.top_k == -1:
        params.top_k = 0
    if params.max_tokens == -1:  # up to the model length
        params.max_tokens = None

    out = ParsedRequest(params, flags["stream"], flags["exclude_input_in_output"])
    name = present[0]
    arr = get(name)
    _check_size(name, arr, limits)
    _parse_prompt(out, name, arr, tokenize, limits)
    out.prompt_name = name
    return out


def _too_long(name: str, n: int, max_model_len: int) -> InvalidRequest:
    return InvalidRequest(f"{name}: the prompt has {n} tokens but the model length is {max_model_len} "
                          "(prompt plus at least one generated token)")


def _parse_prompt(out: ParsedRequest, name: str, arr: np.ndarray, tokenize, limits: Limits) -> None:
    """The prompt input, its size already checked (_check_size)."""
    if name == "input_ids":
        if arr.ndim != 1:
            raise InvalidRequest(f"input_ids: expected shape [seq_len], got {list(arr.shape)}")
        out.prompt_token_ids = arr.astype(np.int64).tolist()
    elif name == "text_input":
        out.prompt_text = _text_prompt(arr, limits.max_prompt_chars, limits.max_model_len)
        out.prompt_token_ids = tokenize(out.prompt_text)
    elif name == "prompt_embeds_fp32":
        out.prompt_embeds = _flat_embeds(name, arr.reshape(-1), limits.hidden_size)
    elif name == "prompt_embeds_base64":
        out.prompt_embeds = _base64_embeds(arr, limits.hidden_size, limits.max_model_len)
    else:
        if arr.ndim != 2:
            raise InvalidRequest(f"{name}: expected shape [seq_len, hidden_size], got {list(arr.shape)}")
        out.prompt_embeds = torch.from_numpy(np.array(arr, copy=True))  # copy: the request's memory goes away


def _text_prompt(arr: np.ndarray, max_chars: int | None, max_model_len: int) -> str:
    """The text of a text_input, refused by its size before it is decoded or tokenized when it could not fit:
    no token covers more than the tokenizer's longest token, so a longer text has too many tokens."""
    if arr.size != 1:
        raise InvalidRequest(f"text_input: expected one value, got shape {list(arr.shape)}")
    raw = arr.reshape(-1)[0]
    if max_chars is not None and len(raw) > 4 * max_chars:  # bytes: at most 4 per character
        raise _text_too_long(len(raw), "bytes", max_chars, max_model_len)
    text = _utf8("text_input", raw) if isinstance(raw, bytes) else str(raw)
    if max_chars is not None and len(text) > max_chars:
        raise _text_too_long(len(text), "characters", max_chars, max_model_len)
    if not text:
        raise InvalidRequest("text_input: the prompt is empty")
    return text


def _text_too_long(n: int, unit: str, max_chars: int, max_model_len: int) -> InvalidRequest:
    return InvalidRequest(f"text_input: the prompt has {n} {unit}, more than the model length of {max_model_len} "
                          f"tokens can hold (at most {max_chars} characters)")
