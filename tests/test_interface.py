"""The `llm` model's interface table (backend/pagedllm/interface.py) against every copy of it: config.pbtxt
(what Triton enforces), the README's input and output tables (written from the table), the README's metrics
table (against serving/metrics.py), the request parser, the client's options and flags, the responder.

Run as a script, it rewrites the copies from the table: config.pbtxt's input and output blocks and the
README's input and output tables (`.venv/bin/python tests/test_interface.py`, or `make interface`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "backend", ROOT / "client"):  # as a script too
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from pagedllm import interface  # noqa: E402
from pagedllm.interface import INPUTS, KINDS, NO_DEFAULT, OPTIONS, OUTPUTS  # noqa: E402

CONFIG = ROOT / "model_repository" / "llm" / "config.pbtxt"
ENSEMBLE = ROOT / "model_repository" / "embed_llm" / "config.pbtxt"
README = ROOT / "README.md"
SAMPLE_VALUES = {"int": 1, "float": 0.5, "bool": True, "ints": [1, 2], "strings": ["x"]}  # one per option kind
INPUT_HEADER = "| input | dtype | shape | default | meaning |"
OUTPUT_HEADER = "| output | dtype | shape | meaning |"


# ----------------------------------------------------------------------------------- the copies, written
def _dims(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _config_type(dtype: str) -> str:
    return "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"  # config.pbtxt calls BYTES STRING


def config_block(kind: str) -> str:
    """config.pbtxt's `input [...]` or `output [...]` block: every input is optional (one prompt of several)."""
    entries = INPUTS if kind == "input" else OUTPUTS
    lines = [f'  {{ name: "{e.name}" data_type: {_config_type(e.dtype)} dims: [ {", ".join(map(str, e.dims))} ]'
             + (" optional: true }" if kind == "input" else " }") for e in entries]
    return f"{kind} [\n" + ",\n".join(lines) + "\n]\n"


def readme_table(kind: str) -> str:
    if kind == "input":
        rows = [f"| `{i.name}` | {i.dtype} | `{_dims(i.dims)}` | "
                + (f"`{i.default_text}`" if i.default is not NO_DEFAULT else "") + f" | {i.doc} |" for i in INPUTS]
        return "\n".join([INPUT_HEADER, "|---|---|---|---|---|", *rows]) + "\n"
    rows = [f"| `{o.name}` | {o.dtype} | `{_dims(o.dims)}` | {o.doc} |" for o in OUTPUTS]
    return "\n".join([OUTPUT_HEADER, "|---|---|---|---|", *rows]) + "\n"


def _readme_table_span(text: str, header: str) -> tuple[int, int]:
    """Where the README's table with this header starts and ends (its last row's newline included)."""
    m = re.search(rf"^{re.escape(header.split(' dtype')[0])} .*\n(\|.*\n)+", text, re.M)
    assert m, f"README.md has no table starting {header.split(' dtype')[0]!r}"
    return m.start(), m.end()


def rewrite() -> None:
    config = CONFIG.read_text()
    for kind in ("input", "output"):
        config = re.sub(rf"^{kind} \[\n.*?^\]\n", lambda _: config_block(kind), config, count=1, flags=re.M | re.S)
    CONFIG.write_text(config)
    readme = README.read_text()
    for kind, header in (("input", INPUT_HEADER), ("output", OUTPUT_HEADER)):
        start, end = _readme_table_span(readme, header)
        readme = readme[:start] + readme_table(kind) + readme[end:]
    README.write_text(readme)


# ------------------------------------------------------------------------------------------------ the table
def test_the_table_is_well_formed():
    from dataclasses import fields

    from pagedllm.sampling_params import SamplingParams

    names = [e.name for e in INPUTS + OUTPUTS]
    assert len(names) == len(set(names)), "a name twice"
    sampling_fields = {f.name for f in fields(SamplingParams)}
    for i in INPUTS:
        assert i.kind in KINDS, i
        assert i.doc and "|" not in i.doc and "\n" not in i.doc, i  # one line, fit for a Markdown table
        assert i.field is None or i.field in sampling_fields, i
        assert (i.kind in ("ints", "strings")) == (i.dims == (-1,) and i.kind != "prompt"), i
    defaults = SamplingParams()
    for o in OPTIONS:  # the default is SamplingParams' own: written once
        value = getattr(defaults, o.field)
        assert o.default == (tuple(value) if isinstance(value, list) else value), o


def test_the_table_imports_without_torch_or_numpy():
    code = "import sys, pagedllm.interface; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "backend")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------------------- config.pbtxt
def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()), model_config_pb2.DataType.Name


def test_config_pbtxt_declares_the_table():
    config, type_name = _parse(CONFIG)
    got = [(t.name, type_name(t.data_type), tuple(t.dims), t.optional) for t in config.input]
    assert got == [(i.name, _config_type(i.dtype), i.dims, True) for i in INPUTS], \
        f"{CONFIG} differs from interface.INPUTS; run tests/test_interface.py to rewrite it"
    got = [(t.name, type_name(t.data_type), tuple(t.dims)) for t in config.output]
    assert got == [(o.name, _config_type(o.dtype), o.dims) for o in OUTPUTS], \
        f"{CONFIG} differs from interface.OUTPUTS; run tests/test_interface.py to rewrite it"


def test_the_ensemble_passes_llm_inputs_and_outputs_as_declared():
    config, type_name = _parse(ENSEMBLE)
    declared = {t.name: (type_name(t.data_type), tuple(t.dims)) for t in [*config.input, *config.output]}
    table = {e.name: (_config_type(e.dtype), e.dims) for e in INPUTS + OUTPUTS}
    llm_step = next(s for s in config.ensemble_scheduling.step if s.model_name == "llm")
    passed = {**{k: v for k, v in llm_step.input_map.items()}, **{k: v for k, v in llm_step.output_map.items()}}
    for llm_name, ensemble_name in passed.items():
        assert llm_name in table, llm_name
        if ensemble_name in declared:  # not the internal `_prompt_embeds`
            assert declared[ensemble_name] == table[llm_name], ensemble_name


# ------------------------------------------------------------------------------------------------- README
def test_readme_interface_tables_are_the_table():
    text = README.read_text()
    for kind, header in (("input", INPUT_HEADER), ("output", OUTPUT_HEADER)):
        start, end = _readme_table_span(text, header)
        assert text[start:end] == readme_table(kind), \
            f"README.md's {kind} table differs from interface.py; run tests/test_interface.py to rewrite it"


def _stub_pb_utils():
    """Just enough of triton_python_backend_utils to import the serving modules that need it."""
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = lambda name, array: (name, array)
    m.InferenceResponse = lambda output_tensors=None, error=None: output_tensors
    m.MetricFamily = types.SimpleNamespace(GAUGE="gauge", COUNTER="counter", HISTOGRAM="histogram")
    return m


# The serving modules imported against the stub below, and forgotten again (other tests import them afresh).
_STUBBED = ("triton_python_backend_utils", "pagedllm.serving.metrics", "pagedllm.serving.responder")


def _import_with_stub(module: str):
    import importlib

    import pagedllm.serving as serving

    saved = {k: sys.modules.pop(k, None) for k in _STUBBED}
    attrs = {k: getattr(serving, k, None) for k in ("metrics", "responder")}
    sys.modules["triton_python_backend_utils"] = _stub_pb_utils()
    try:
        return importlib.import_module(module)
    finally:
        for k in _STUBBED:
            sys.modules.pop(k, None)
            if saved[k] is not None:
                sys.modules[k] = saved[k]
        for k, v in attrs.items():  # `from pagedllm.serving import metrics` reads the package's attribute
            if v is None:
                serving.__dict__.pop(k, None)
            else:
                setattr(serving, k, v)


def test_readme_metrics_table_lists_metrics_py():
    metrics = _import_with_stub("pagedllm.serving.metrics")
    expected = {(f"pagedllm_{n}", kind) for kind, names in (("gauge", metrics.GAUGES), ("counter", metrics.COUNTERS),
                                                            ("histogram", metrics.HISTOGRAMS)) for n in names}
    text = README.read_text()
    start = text.index("| metric | kind | meaning |")
    rows = re.match(r"(\|.*\n)+", text[start:]).group(0).splitlines()[2:]
    got = set()
    for row in rows:
        names, kind = [c.strip() for c in row.strip("|").split("|")][:2]
        got |= {(re.sub(r"\{.*\}", "", n.strip(" `")), kind) for n in names.split(",")}
    assert got == expected


# ----------------------------------------------------------------------------------- what derives from it
def test_the_server_applies_the_defaults():
    """A request with a prompt only gets SamplingParams' defaults, the flags the table's."""
    import numpy as np
    from pagedllm.sampling_params import SamplingParams
    from pagedllm.serving.request_parser import Limits, parse_request

    inputs = {"input_ids": np.array([1, 2, 3], dtype=np.int64)}
    parsed = parse_request(inputs.get, {}, None, Limits(hidden_size=8, max_model_len=64))
    assert parsed.params == SamplingParams()
    flags = {i.name: i.default for i in interface.FLAGS}
    assert (parsed.stream, parsed.exclude_input_in_output) == (flags["stream"], flags["exclude_input_in_output"])


def test_the_client_sends_only_what_is_set():
    from dataclasses import fields

    from pagedllm_client import GenerateOptions
    from pagedllm_client.request import build_inputs
    from tritonclient.utils import triton_to_np_dtype

    assert [(f.name, f.metadata["dtype"], f.metadata["many"]) for f in fields(GenerateOptions)] == \
        [(o.name, triton_to_np_dtype(o.dtype), o.dims == (-1,)) for o in OPTIONS]
    assert GenerateOptions() == GenerateOptions(**{o.name: None for o in OPTIONS})
    assert set(build_inputs("hi")) == {"text_input", "stream", "exclude_input_in_output"}
    sent = build_inputs("hi", options=GenerateOptions(**{o.name: SAMPLE_VALUES[o.kind] for o in OPTIONS}))
    for o in OPTIONS:  # each as the tensor config.pbtxt declares
        assert sent[o.name].dtype == triton_to_np_dtype(o.dtype) and sent[o.name].ndim == len(o.dims), o.name


def test_the_cli_has_a_flag_per_option_and_sends_none_unset():
    from pagedllm_client.cli import build_parser

    parser = build_parser()
    for command in ("generate", "bench"):
        args = vars(parser.parse_args([command] + (["--text", "x"] if command == "generate" else [])))
        assert {o.name for o in OPTIONS} <= set(args)
        unset = {o.name for o in OPTIONS if args[o.name] is None}
        assert unset == {o.name for o in OPTIONS} - ({"max_tokens", "ignore_eos"} if command == "bench" else set())
    args = parser.parse_args(["generate", "--text", "x", "--top-k", "3", "--stop", "a", "--stop", "b",
                              "--stop-token-ids", "1,2", "--no-ignore-eos", "--logprobs"])
    assert (args.top_k, args.stop, args.stop_token_ids, args.ignore_eos, args.return_logprobs) == \
        (3, ["a", "b"], [1, 2], False, True)


def test_client_and_responder_know_every_output():
    import numpy as np
    from pagedllm_client.request import _outputs
    from tritonclient.utils import triton_to_np_dtype

    from pagedllm.openai_api.service import LOGPROB_OUTPUTS, TEXT_OUTPUTS

    read = []
    _outputs(lambda name: read.append(name) or [])
    assert sorted(read) == sorted(o.name for o in OUTPUTS)
    assert set(TEXT_OUTPUTS) <= set(LOGPROB_OUTPUTS) <= set(read)  # what the OpenAI front end asks for

    responder = _import_with_stub("pagedllm.serving.responder")
    state = types.SimpleNamespace(stream=True, requested=set())
    out = types.SimpleNamespace(new_token_ids=[1], new_text="a", new_logprobs=[-0.5], finish_reason="stop",
                                num_prompt_tokens=3, num_output_tokens=1, num_cached_tokens=0)
    built = dict(responder.build_response(state, out))
    assert sorted(built) == sorted(o.name for o in OUTPUTS)
    for o in OUTPUTS:
        assert built[o.name].dtype == np.dtype(triton_to_np_dtype(o.dtype)), o.name


if __name__ == "__main__":
    rewrite()
    print(f"rewrote {CONFIG.relative_to(ROOT)} (inputs, outputs) and {README.relative_to(ROOT)} (their tables)")
