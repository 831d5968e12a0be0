"""The `llm` model's interface, once: every input and output, its Triton dtype and dims, how a value is read,
the SamplingParams field it sets, its default, and one line of meaning.

Torch- and numpy-free, so that the client imports it too. Read from here: request_parser.py (which inputs it
takes, how each is converted), the client's GenerateOptions and CLI flags (options.py, cli.py), and the copies
Triton and readers need, config.pbtxt and the README's tables, which tests/test_interface.py checks against
this file (and rewrites, run as a script). A sampling option's default is SamplingParams' (one place, used by
the offline API too): the server applies it to an option that is not sent, and the client sends none of its
own. A new sampling option: one `_option` line here, its SamplingParams field, its use, its test.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams


class _NoDefault:
    """The default of an input that has none: a prompt (exactly one is sent), an input that changes nothing."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = _NoDefault()

# How a value is read, whether it comes as a tensor, a sampling_parameters key or a request parameter
# (request_parser.py converts each kind): a prompt (each its own way), one int / float / bool, a list of ints
# or strings, or a JSON object.
KINDS = ("prompt", "int", "float", "bool", "ints", "strings", "json")


@dataclass(frozen=True)
class Input:
    name: str
    dtype: str  # Triton's: INT64, FP16, BYTES, ...
    dims: tuple[int, ...]  # as config.pbtxt declares them; -1: any length
    kind: str  # one of KINDS
    doc: str  # what it means, in one line (the README's table, CLI help, GenerateOptions' doc)
    field: str | None = None  # the SamplingParams field it sets; inputs with one are the sampling options
    default: Any = NO_DEFAULT  # what applies when it is not sent
    max_len: int | None = None  # a list's most values, refused before its values are converted

    @property
    def default_text(self) -> str:
        """The default as JSON (as the HTTP generate endpoint takes it); empty when there is none."""
        value = self.default
        return "" if value is NO_DEFAULT else json.dumps(list(value) if isinstance(value, tuple) else value)


@dataclass(frozen=True)
class Output:
    name: str
    dtype: str
    dims: tuple[int, ...]
    doc: str


def _sampling_default(name: str) -> Any:
    f = next(f for f in fields(SamplingParams) if f.name == name)
    value = f.default if f.default is not MISSING else f.default_factory()
    return tuple(value) if isinstance(value, list) else value  # a tuple: entries stay immutable


def _option(name: str, dtype: str, kind: str, doc: str, max_len: int | None = None) -> Input:
    """A sampling option: sets the SamplingParams field of its name, whose default is its default."""
    dims = (-1,) if kind in ("ints", "strings") else (1,)
    return Input(name, dtype, dims, kind, doc, name, _sampling_default(name), max_len)


INPUTS = (
    Input("input_ids", "INT64", (-1,), "prompt", "prompt token ids, each in `[0, vocab_size)`"),
    Input("prompt_embeds", "FP16", (-1, -1), "prompt", "`[seq_len, hidden_size]` of the served model, finite"),
    Input("prompt_embeds_fp32", "FP32", (-1,), "prompt", "the same, flattened row-major, for JSON"),
    Input("prompt_embeds_base64", "BYTES", (1,), "prompt", "the same, base64 of raw little-endian FP16, row-major"),
    Input("text_input", "BYTES", (1,), "prompt", "UTF-8 text (needs the checkpoint's tokenizer)"),
    _option("max_tokens", "INT32", "int", "tokens to generate at most; -1: up to the model length"),
    _option("min_tokens", "INT32", "int", "EOS, stop tokens and stop strings cannot end generation before this "
            "many tokens"),
    _option("temperature", "FP32", "float", "0 = greedy (below 1e-5 counts as 0, as in vLLM); at most 100"),
    _option("top_p", "FP32", "float", "nucleus sampling, in (0, 1]; 1 = off"),
    _option("top_k", "INT32", "int", "sample among the k most likely tokens; 0 or -1 = off"),
    _option("seed", "UINT64", "int", "same seed, same prompt -> same tokens, whatever else is batched (null: a "
            "fresh seed per request)"),
    _option("stop_token_ids", "INT64", "ints", "extra token ids that end generation (included in the output), "
            f"at most {MAX_STOP_TOKEN_IDS}", MAX_STOP_TOKEN_IDS),
    _option("ignore_eos", "BOOL", "bool", "keep going past EOS"),
    _option("stop", "BYTES", "strings", "stop strings: the text ends before the first one generated (streamed "
            f"text holds back a possible partial match), at most {MAX_STOP_STRINGS}", MAX_STOP_STRINGS),
    _option("include_stop_str_in_output", "BOOL", "bool", "keep the stop string in the text"),
    _option("repetition_penalty", "FP32", "float", "in (0, 10]; 1 = off: divides positive (multiplies negative) "
            "logits of tokens already in the prompt or output"),
    _option("presence_penalty", "FP32", "float", "in [-2, 2]; 0 = off: subtracted once from the logit of each "
            "token already generated"),
    _option("frequency_penalty", "FP32", "float", "in [-2, 2]; 0 = off: subtracted from a generated token's "
            "logit once per occurrence"),
    _option("return_logprobs", "BOOL", "bool", "also return each generated token's log-probability (of the "
            "model's raw distribution, before temperature, top-p/k and penalties)"),
    Input("stream", "BOOL", (1,), "bool", "one response per engine step (true) or exactly one response (false)",
          default=False),
    Input("sampling_parameters", "BYTES", (1,), "json", "JSON object with the sampling options above as keys; "
          "values may be strings"),
    Input("exclude_input_in_output", "BOOL", (1,), "bool", "don't prepend the prompt text to a non-streamed "
          "`text_output`", default=False),
    Input("return_finish_reason", "BOOL", (1,), "bool", "accepted for vllm_backend compatibility; "
          "`finish_reason` is always sent"),
    Input("return_num_input_tokens", "BOOL", (1,), "bool", "accepted for vllm_backend compatibility; "
          "`num_input_tokens` is always sent"),
    Input("return_num_output_tokens", "BOOL", (1,), "bool", "accepted for vllm_backend compatibility; "
          "`num_output_tokens` is always sent"),
)

OUTPUTS = (
    Output("token_ids", "INT64", (-1,), "the tokens this response adds (all of them when not streaming)"),
    Output("logprobs", "FP32", (-1,), "their log-probabilities with `return_logprobs`, else empty"),
    Output("text_output", "BYTES", (-1,), "the text this response adds; pieces concatenate to the full text"),
    Output("finish_reason", "BYTES", (1,), "`length` or `stop` on the last response, empty before"),
    Output("num_input_tokens", "UINT32", (1,), "prompt length"),
    Output("num_output_tokens", "UINT32", (1,), "tokens generated so far"),
    Output("num_cached_tokens", "UINT32", (1,), "prompt tokens whose KV came from the prefix cache when the "
           "request was first scheduled (a multiple of `block_size`)"),
)

PROMPTS = tuple(i for i in INPUTS if i.kind == "prompt")  # exactly one per request
OPTIONS = tuple(i for i in INPUTS if i.field is not None)  # sampling options
FLAGS = tuple(i for i in INPUTS if i.kind == "bool" and i.field is None)  # how the request is answered
