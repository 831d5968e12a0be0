"""The runtime copy of a model repository: every model folder copied, and the engine's settings written into
the `parameters` of each config.pbtxt that declares `model_dir`. config.pbtxt is read and written as Triton's
ModelConfig protobuf message (text format), so any valid file is handled and values are escaped correctly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from pagedllm.model.spec import resolve_model


class RepositoryError(ValueError):
    """A config.pbtxt that is not a valid Triton model configuration."""


def set_parameters(text: str, values: dict[str, str]) -> str:
    """config.pbtxt text with these `parameters` string values set (added when not declared)."""
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    for key, value in values.items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(config)


def declares_model_dir(text: str) -> bool:
    return "model_dir" in text_format.Parse(text, model_config_pb2.ModelConfig()).parameters


def prepare_model_repository(source: Path, dest: Path, parameters: dict[str, str]) -> Path:
    """Copy every model folder of `source` to `dest`; every config.pbtxt that declares a `model_dir` parameter
    gets `parameters` (the engine's settings) written in."""
    shutil.rmtree(dest, ignore_errors=True)  # a runtime directory used again starts clean
    dest.mkdir(parents=True)
    for model in sorted(p for p in Path(source).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if dest.resolve().is_relative_to(model.resolve()):
            continue  # the runtime directory itself sits inside the source repository
        target = dest / model.name
        shutil.copytree(model, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        config = target / "config.pbtxt"
        if config.is_file():
            text = config.read_text()
            try:
                if declares_model_dir(text):
                    config.write_text(set_parameters(text, parameters))
            except text_format.ParseError as e:
                raise RepositoryError(f"{model / 'config.pbtxt'}: {e}") from None
    return dest


def repository_parameter(repository: str | Path, name: str, model: str = "llm") -> str:
    """A string parameter of a repository's model ("" when the model, its config.pbtxt or the parameter is
    not there)."""
    config = Path(repository) / model / "config.pbtxt"
    if not config.is_file():
        return ""
    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    return parsed.parameters[name].string_value if name in parsed.parameters else ""


def repository_model_dir(repository: str | Path, model: str = "llm") -> Path | None:
    """The checkpoint a repository's `llm` model serves, resolved as the model resolves its model_dir parameter
    (a path relative to the model's folder, or a Hugging Face repo id), or None when it has no such model or
    parameter. Raises CheckpointError for a repo id that cannot be found."""
    value = repository_parameter(repository, "model_dir", model)
    return resolve_model(value, relative_to=Path(repository) / model) if value else None
