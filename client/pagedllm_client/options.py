"""GenerateOptions: the `llm` model's sampling options, for Client and AsyncClient, whole and streamed.

Its fields are made from the interface table (pagedllm.interface.OPTIONS): one per option, of the same name,
sent as the input tensor of that name with the table's dtype (request.py turns them into tensors). A field
left None is not sent, so the server applies its default: the client has no defaults of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field, fields, make_dataclass, replace
from typing import Any, Optional, Union

from pagedllm.interface import OPTIONS
from tritonclient.utils import triton_to_np_dtype

# The Python values each kind of option takes (a single string is one stop string).
_TYPES = {"int": int, "float": float, "bool": bool, "ints": Sequence[int], "strings": Union[str, Sequence[str]]}


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _merge(cls, options, overrides: dict[str, Any]):
    """`options` (all unset when None) with the keyword `overrides`; a keyword that is no option raises
    TypeError naming it."""
    unknown = [k for k in overrides if k not in cls.names()]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} "
                        f"(generate options are: {', '.join(cls.names())})")
    return replace(options or cls(), **overrides)


def _doc() -> str:
    lines = ["How to generate. Pass one as `options=`, or its fields as keywords, to Client.generate,",
             "AsyncClient.generate or AsyncClient.generate_stream; keywords override `options`' fields. Each",
             "field left None is not sent, and the server's default applies:", ""]
    return "\n".join(lines + [f"- {o.name} (default {o.default_text}): {o.doc}" for o in OPTIONS])


GenerateOptions = make_dataclass(
    "GenerateOptions",
    [(o.name, Optional[_TYPES[o.kind]],
      field(default=None, metadata={"dtype": triton_to_np_dtype(o.dtype), "many": o.dims == (-1,)}))
     for o in OPTIONS],
    namespace={"names": classmethod(_names), "merge": classmethod(_merge), "__doc__": _doc()},
    frozen=True)
GenerateOptions.__module__ = __name__  # made here, not in dataclasses: for repr, pickling, help()
