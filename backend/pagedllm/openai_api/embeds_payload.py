"""Decode vLLM-style `prompt_embeds` payloads into FP16 arrays without executing anything.

vLLM's Completions API takes `extra_body={"prompt_embeds": base64(torch.save(tensor))}` (a string, or a list
of them) and hands the bytes to torch's pickle-based loader, so a crafted payload can run code on the server
(CVE-2025-62164 got through the "weights only" mode with a sparse tensor). This module accepts the same bytes,
and also base64 of a one-tensor safetensors file, but nothing in a payload is ever executed:

- The base64 text is measured before it is decoded (`max_base64_chars`).
- torch.save writes a zip archive. It is opened with `zipfile` only after refusing what torch.save never
  writes for one tensor (compressed members, sizes larger than the payload, more than a few members), so
  nothing is inflated.
- The archive's `data.pkl` is a pickle, and no pickle loader ever sees it. `pickletools.genops` only parses
  opcodes; `_SymbolicPickle` below interprets the handful that a single dense tensor uses as plain data
  (tuples, ints, strings) and inert records (`_Global`, `_Call`, `_PersistentId`). It imports no module,
  resolves no name and calls nothing; every other opcode, and every global but five, is refused.
- The values are copied out of the one storage's raw bytes with numpy, after checking that size, stride and
  offset stay inside it, and converted to float16.

Dependencies: the standard library and numpy only; the HTTP front end runs without torch.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import pickletools
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

FP16_MAX = 65504.0

# Room for everything in a payload besides the tensor's values: torch.save's zip headers, central directory,
# 64-byte alignment padding and small records (about 1.5 KiB for one tensor), or a safetensors header.
_FORMAT_OVERHEAD_BYTES = 64 * 1024
_MAX_ZIP_MEMBERS = 32  # torch.save of one tensor writes 7
_MAX_DATA_PKL_BYTES = 16 * 1024  # one tensor's data.pkl is about 160 bytes
_MAX_BYTEORDER_BYTES = 16  # "little" or "big"
_MAX_SAFETENSORS_HEADER_BYTES = 16 * 1024  # one tensor's header is about 100 bytes
_MAX_PICKLE_INT = 2**62  # sizes, strides and offsets; keeps all index arithmetic far from int64 overflow
_MAX_RANK = 8  # accepted tensors have rank 2 or 3; a bound keeps messages and index arithmetic small

_ZIP_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_ZIP_CENTRAL_DIRECTORY_MAGIC = b"PK\x01\x02"
_PICKLE_PROTO_OPCODE = b"\x80"

# Element formats: (numpy dtype of the raw elements without byte order, bytes per element).
# bfloat16 is read as its uint16 bit pattern and widened to float32 by `_bfloat16_bits_to_float32`.
_ELEMENT_FORMATS = {"F16": ("f2", 2), "BF16": ("u2", 2), "F32": ("f4", 4)}
_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


class PayloadError(ValueError):
    """A payload refused; str() is the message for an HTTP 400, starting with the field name."""


def _clip(text: str, limit: int = 80) -> str:
    """Client-chosen text in a message, kept short."""
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------- public


def max_base64_chars(max_rows: int, hidden_size: int, value_bytes: int = 4) -> int:
    """The longest base64 string of max_rows x hidden_size values of `value_bytes` each (by default float32,
    the widest dtype accepted: the longest payload accepted) plus a bounded allowance for the archive or
    header around them, at 4 characters per 3 bytes.

    A view saved with a storage larger than this (torch.save writes the whole storage) is refused by length.
    """
    max_bytes = _positive_int("max_rows", max_rows) * _positive_int("hidden_size", hidden_size) * value_bytes
    return 4 * math.ceil((max_bytes + _FORMAT_OVERHEAD_BYTES) / 3)


def decode_prompt_embeds(payload: str, *, hidden_size: int, max_rows: int, name: str = "prompt_embeds") -> np.ndarray:
    """base64 of torch.save(tensor) or of a safetensors file holding one tensor -> float16 [seq_len, hidden_size].

    The tensor may be float16, bfloat16 or float32, shaped [seq_len, hidden_size] or [1, seq_len, hidden_size],
    any view (offset, strides) of one storage. Raises PayloadError (message starting with `name`) otherwise.
    Big-endian torch.save archives (byteorder "big") are read correctly.
    """
    limit = max_base64_chars(max_rows, hidden_size)
    raw = _decode_base64(payload, limit, max_rows, hidden_size, name)
    if raw.startswith(_ZIP_LOCAL_HEADER_MAGIC):
        tensor = _tensor_from_torch_archive(raw, name)
    elif _looks_like_safetensors(raw):
        tensor = _tensor_from_safetensors(raw, name)
    elif raw.startswith(_PICKLE_PROTO_OPCODE):
        raise PayloadError(f"{name}: a bare pickle (torch.save's legacy format) is not accepted; send torch.save's "
                           f"default zip format or a safetensors file")
    else:
        raise PayloadError(f"{name}: not a torch.save zip archive or a safetensors file")
    return _to_float16_rows(tensor, hidden_size, max_rows, name)


# --------------------------------------------------------------------------------------------------- base64


def _positive_int(what: str, value: Any) -> int:
    # A server configuration error, not the client's: a plain ValueError, not a PayloadError (a 400).
    if type(value) is not int or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _decode_base64(payload: Any, limit: int, max_rows: int, hidden_size: int, name: str) -> bytes:
    if not isinstance(payload, str):
        raise PayloadError(f"{name}: expected a base64 string, got {type(payload).__name__}")
    if not payload:
        raise PayloadError(f"{name}: empty string")
    # Checked before decoding, so an oversized request costs nothing but its length.
    if len(payload) > limit:
        raise PayloadError(f"{name}: {len(payload)} base64 characters is more than the limit of {limit} for at "
                           f"most {max_rows} rows of hidden size {hidden_size}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise PayloadError(f"{name}: not valid base64") from None


# --------------------------------------------------------------------------------------------------- tensor layout


@dataclass(frozen=True)
class _StridedTensor:
    """A tensor as torch describes one: element [i0, i1, ...] is storage element offset + sum(i_d * stride_d)."""
    dtype: str  # a key of _ELEMENT_FORMATS
    big_endian: bool
    storage: bytes  # exactly numel * itemsize bytes
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    negate: bool = False  # torch's "neg" view bit: the logical values are the stored ones negated


def _row_major_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _checked_rows(size: tuple[int, ...], hidden_size: int, max_rows: int, name: str) -> int:
    """seq_len of a [seq_len, H] or [1, seq_len, H] tensor of the model's hidden size, within max_rows."""
    shape = list(size)
    if len(size) == 2 or (len(size) == 3 and size[0] == 1):
        rows, hidden = size[-2], size[-1]
    else:
        raise PayloadError(f"{name}: expected shape [seq_len, {hidden_size}] (or [1, seq_len, {hidden_size}]) "
                           f"but got {shape}")
    if hidden != hidden_size:
        raise PayloadError(f"{name}: expected shape [seq_len, {hidden_size}] but got {shape} (the model's hidden "
                           f"size is {hidden_size})")
    if rows == 0:
        raise PayloadError(f"{name}: shape {shape} has no rows; expected at least one")
    if rows > max_rows:
        raise PayloadError(f"{name}: {rows} rows is more than the limit of {max_rows}")
    return rows


def _check_within_storage(t: _StridedTensor, name: str) -> None:
    # Strides are non-negative and every size is at least 1 here, so the element farthest into the storage
    # is at offset + sum((size_d - 1) * stride_d); everything else lies between offset and it.
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= t.numel:
        raise PayloadError(f"{name}: size {list(t.size)}, stride {list(t.stride)} and storage offset {t.offset} "
                           f"address element {last}, outside a storage of {t.numel} elements")


def _gather(flat: np.ndarray, t: _StridedTensor) -> np.ndarray:
    """The tensor's elements in row-major order, copied out of the flat storage by slicing or by an index array
    (never a strided view over raw memory), so numpy bounds-checks every read as well."""
    count = math.prod(t.size)
    if all(s == r for n, s, r in zip(t.size, t.stride, _row_major_strides(t.size)) if n > 1):
        return flat[t.offset:t.offset + count].reshape(t.size)  # contiguous: a plain slice
    index = np.full((1,) * len(t.size), t.offset, dtype=np.int64)
    for dim, (n, s) in enumerate(zip(t.size, t.stride)):
        steps = np.arange(n, dtype=np.int64) * s
        index = index + steps.reshape([n if d == dim else 1 for d in range(len(t.size))])
    return flat[index]


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the high half of a float32: shift the 16 bits up and reinterpret, exactly.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_float16_rows(t: _StridedTensor, hidden_size: int, max_rows: int, name: str) -> np.ndarray:
    rows = _checked_rows(t.size, hidden_size, max_rows, name)
    _check_within_storage(t, name)
    kind, _ = _ELEMENT_FORMATS[t.dtype]
    flat = np.frombuffer(t.storage, dtype=np.dtype(kind).newbyteorder(">" if t.big_endian else "<"))
    values = _gather(flat, t).reshape(rows, hidden_size)
    if t.dtype == "BF16":
        values = _bfloat16_bits_to_float32(values)
    if not np.isfinite(values).all():
        raise PayloadError(f"{name}: contains NaN or Inf")
    with np.errstate(over="ignore"):  # overflow is detected just below, as inf in the result
        out = values.astype(np.float16, order="C")  # round to nearest even, as torch's .to(torch.float16)
    if np.isinf(out).any():
        raise PayloadError(f"{name}: values outside the range of FP16 (±{FP16_MAX:.0f})")
    return np.negative(out) if t.negate else out


# --------------------------------------------------------------------------------------------------- safetensors


def _looks_like_safetensors(raw: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header, which is an object.
    return len(raw) > 8 and raw[8:9] == b"{"


def _json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _safetensors_header(raw: bytes, name: str) -> tuple[dict, int]:
    """The header as a dict, and where the data section starts."""
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > _MAX_SAFETENSORS_HEADER_BYTES:
        raise PayloadError(f"{name}: safetensors header of {header_len} bytes is larger than "
                           f"{_MAX_SAFETENSORS_HEADER_BYTES}")
    if 8 + header_len > len(raw):
        raise PayloadError(f"{name}: safetensors header of {header_len} bytes runs past the end of the "
                           f"{len(raw)}-byte payload")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"), object_pairs_hook=_json_object_without_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PayloadError(f"{name}: safetensors header is not valid JSON ({_clip(str(e))})") from None
    if not isinstance(header, dict):
        raise PayloadError(f"{name}: safetensors header is not a JSON object")
    return header, 8 + header_len


def _is_size(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_PICKLE_INT


def _is_shape(value: Any, sequence_type: type) -> bool:
    return isinstance(value, sequence_type) and len(value) <= _MAX_RANK and all(_is_size(n) for n in value)


def _tensor_from_safetensors(raw: bytes, name: str) -> _StridedTensor:
    header, data_start = _safetensors_header(raw, name)
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise PayloadError(f"{name}: safetensors __metadata__ must map strings to strings")
    if len(header) != 1:
        names = ", ".join(_clip(repr(k), 40) for k in list(header)[:5])
        raise PayloadError(f"{name}: safetensors file holds {len(header)} tensors ({names}); expected exactly one")
    (tensor_name, entry), = header.items()
    where = f"{name}: safetensors tensor {_clip(repr(tensor_name))}"
    if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
        raise PayloadError(f"{where}: expected exactly the keys dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(dtype, str) and dtype in _ELEMENT_FORMATS):
        raise PayloadError(f"{where} has dtype {_clip(repr(dtype))}; only F16, BF16 and F32 are accepted")
    if not _is_shape(shape, list):
        raise PayloadError(f"{where}: shape must be a list of at most {_MAX_RANK} non-negative integers, got "
                           f"{_clip(repr(shape))}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise PayloadError(f"{where}: data_offsets must be two non-negative integers, got {_clip(repr(offsets))}")
    begin, end = offsets
    data_len = len(raw) - data_start
    if not begin <= end <= data_len:
        raise PayloadError(f"{where}: data_offsets {offsets} reach past the end of the {data_len}-byte data section")
    numel = math.prod(shape)
    needed = numel * _ELEMENT_FORMATS[dtype][1]
    if end - begin != needed:
        raise PayloadError(f"{where}: data_offsets {offsets} hold {end - begin} bytes but shape {shape} of {dtype} "
                           f"needs {needed}")
    if begin != 0 or end != data_len:  # the format requires the data section be exactly the tensors' bytes
        raise PayloadError(f"{where}: data_offsets {offsets} do not cover the {data_len}-byte data section")
    size = tuple(shape)
    return _StridedTensor(dtype=dtype, big_endian=False, storage=raw[data_start:], numel=numel, offset=0,
                          size=size, stride=_row_major_strides(size))


# --------------------------------------------------------------------------------------------------- torch.save zip


def _check_zip_member(info: zipfile.ZipInfo, payload_len: int, name: str) -> None:
    what = f"{name}: zip member {_clip(repr(info.filename))}"
    # A stored member cannot be larger than the payload holding it; a larger declared size is a zip bomb.
    declared = max(info.file_size, info.compress_size)
    if declared > payload_len:
        raise PayloadError(f"{what} declares {declared} bytes, more than the whole {payload_len}-byte payload")
    # torch.save stores every member uncompressed: refusing the rest means nothing is ever inflated.
    if info.compress_type != zipfile.ZIP_STORED:
        raise PayloadError(f"{what} is compressed (method {info.compress_type}); torch.save stores members "
                           f"uncompressed")
    if info.file_size != info.compress_size:
        raise PayloadError(f"{what} is stored but declares {info.compress_size} bytes stored for {info.file_size}")
    if info.flag_bits & 0x1:
        raise PayloadError(f"{what} is encrypted")


def _open_zip(raw: bytes, name: str) -> zipfile.ZipFile:
    # Every central-directory entry starts with this signature, so its count over the whole payload bounds
    # the entries zipfile would parse: a directory of millions of entries is refused before zipfile builds an
    # object for each. (Tensor bytes would need this exact 4-byte pattern dozens of times to be refused.)
    if raw.count(_ZIP_CENTRAL_DIRECTORY_MAGIC) > _MAX_ZIP_MEMBERS:
        raise PayloadError(f"{name}: zip archive has more than {_MAX_ZIP_MEMBERS} members; torch.save of one tensor "
                           f"writes 7")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except Exception as e:  # zipfile only parses here; whatever it raises means a malformed archive
        raise PayloadError(f"{name}: not a valid zip archive ({_clip(str(e))})") from None
    members = archive.infolist()
    if len(members) > _MAX_ZIP_MEMBERS:
        raise PayloadError(f"{name}: zip archive has {len(members)} members; torch.save of one tensor writes 7")
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        raise PayloadError(f"{name}: zip archive has two members with the same name")
    for info in members:
        _check_zip_member(info, len(raw), name)
    return archive


def _archive_prefix(archive: zipfile.ZipFile, name: str) -> str:
    """The folder torch.save put everything in ("archive", or a name derived from the file): the one folder
    holding data.pkl."""
    names = archive.namelist()
    pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise PayloadError(f"{name}: not a torch.save archive: expected one <folder>/data.pkl member, found "
                           f"{len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    stray = [n for n in names if not n.startswith(prefix)]
    if stray:
        raise PayloadError(f"{name}: zip member {_clip(repr(stray[0]))} is outside {_clip(repr(prefix))}")
    return prefix


def _read_member(archive: zipfile.ZipFile, member: str, max_bytes: int, name: str) -> bytes | None:
    """A member's bytes (None when absent), refused when it declares more than max_bytes."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        return None
    if info.file_size > max_bytes:
        raise PayloadError(f"{name}: zip member {_clip(repr(member))} is {info.file_size} bytes, more than {max_bytes}")
    try:
        data = archive.read(info)  # stored (checked in _open_zip): a copy, with its CRC checked
    except Exception as e:  # zipfile only parses here; whatever it raises means a malformed archive
        raise PayloadError(f"{name}: cannot read zip member {_clip(repr(member))} ({_clip(str(e))})") from None
    if len(data) != info.file_size:
        raise PayloadError(f"{name}: zip member {_clip(repr(member))} is truncated")
    return data


def _is_big_endian(archive: zipfile.ZipFile, prefix: str, name: str) -> bool:
    record = _read_member(archive, prefix + "byteorder", _MAX_BYTEORDER_BYTES, name)
    if record is None or record == b"little":  # torch.save has written this record since 2.1; before, little
        return False
    if record == b"big":
        return True
    raise PayloadError(f"{name}: byteorder record is {record[:16]!r}; expected 'little' or 'big'")


def _tensor_from_torch_archive(raw: bytes, name: str) -> _StridedTensor:
    archive = _open_zip(raw, name)
    prefix = _archive_prefix(archive, name)
    big_endian = _is_big_endian(archive, prefix, name)
    data_pkl = _read_member(archive, prefix + "data.pkl", _MAX_DATA_PKL_BYTES, name)
    ref = _tensor_reference(data_pkl, name)
    member = f"{prefix}data/{ref.storage_key}"
    storage = _read_member(archive, member, len(raw), name)
    if storage is None:
        raise PayloadError(f"{name}: storage {ref.storage_key!r} named in data.pkl has no zip member "
                           f"{_clip(repr(member))}")
    itemsize = _ELEMENT_FORMATS[ref.dtype][1]
    if len(storage) != ref.numel * itemsize:
        raise PayloadError(f"{name}: storage {_clip(repr(member))} holds {len(storage)} bytes, but data.pkl declares "
                           f"{ref.numel} {_DTYPE_NAMES[ref.dtype]} elements ({ref.numel * itemsize} bytes)")
    return _StridedTensor(dtype=ref.dtype, big_endian=big_endian, storage=storage, numel=ref.numel,
                          offset=ref.offset, size=ref.size, stride=ref.stride, negate=ref.negate)


# --------------------------------------------------------------------------------------------------- data.pkl
#
# What torch.save writes for one dense tensor (protocol 2; protocols 4-5 spell globals with STACK_GLOBAL):
#
#   torch._utils._rebuild_tensor_v2(
#       persistent_id(("storage", torch.FloatStorage, "0", "cpu", numel)),   # or HalfStorage, BFloat16Storage
#       storage_offset, (size...), (stride...), requires_grad, collections.OrderedDict()[, {"neg": True}])
#
# The records below stand for those globals, calls and ids; they are compared by name and never resolved.


@dataclass(frozen=True)
class _Global:
    """A GLOBAL / STACK_GLOBAL opcode's target, by name only: nothing is imported."""
    module: str
    qualname: str

    def __str__(self) -> str:
        return _clip(f"{self.module}.{self.qualname}")


# repr=False: a value built from memo references can be exponentially large; messages use _describe instead.
@dataclass(frozen=True, eq=False, repr=False)
class _Call:
    """A REDUCE opcode recorded as data (callable, argument tuple): nothing is called."""
    func: _Global
    args: tuple


@dataclass(frozen=True, eq=False, repr=False)
class _PersistentId:
    """A BINPERSID opcode recorded as data: torch.save's reference to a storage, looked up by us in the zip."""
    pid: Any


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = _Global("collections", "OrderedDict")  # the (always empty) backward-hooks argument
_STORAGE_DTYPES = {_Global("torch", "HalfStorage"): "F16", _Global("torch", "BFloat16Storage"): "BF16",
                   _Global("torch", "FloatStorage"): "F32"}
_ALLOWED_GLOBALS = {_REBUILD_TENSOR_V2, _ORDERED_DICT, *_STORAGE_DTYPES}

# Globals torch.save writes for things other than one dense float tensor, named so a refusal says what it saw.
_KNOWN_REFUSED_GLOBALS = {
    _Global("torch._utils", "_rebuild_sparse_tensor"): "a sparse tensor",
    _Global("torch._utils", "_rebuild_qtensor"): "a quantized tensor",
    _Global("torch._utils", "_rebuild_nested_tensor"): "a nested tensor",
    _Global("torch._utils", "_rebuild_parameter"): "a torch.nn.Parameter",
    _Global("torch._utils", "_rebuild_parameter_with_state"): "a torch.nn.Parameter",
    _Global("torch._tensor", "_rebuild_from_type_v2"): "a tensor subclass or a tensor with Python attributes",
    _Global("torch._utils", "_rebuild_wrapper_subclass"): "a tensor subclass",
    _Global("torch._utils", "_rebuild_meta_tensor_no_storage"): "a meta tensor (no data)",
}
_OTHER_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
_EXPECTED = "expected a single dense float16, bfloat16 or float32 tensor"


def _check_global(target: _Global, name: str) -> _Global:
    if target in _ALLOWED_GLOBALS:
        return target
    if target in _KNOWN_REFUSED_GLOBALS:
        raise PayloadError(f"{name}: found {_KNOWN_REFUSED_GLOBALS[target]} ({target}); {_EXPECTED}")
    if target.module == "torch" and target.qualname in _OTHER_STORAGE_DTYPES:
        raise PayloadError(f"{name}: found a tensor of dtype {_OTHER_STORAGE_DTYPES[target.qualname]} ({target}); "
                           f"only float16, bfloat16 and float32 are accepted")
    raise PayloadError(f"{name}: data.pkl refers to {target}, which is not allowed; {_EXPECTED}")


def _pickle_opcodes(data: bytes, name: str) -> Iterator[tuple[pickletools.OpcodeInfo, Any, int]]:
    """genops parses opcodes and their arguments and stops at STOP; it executes nothing."""
    opcodes = pickletools.genops(data)
    while True:
        try:
            item = next(opcodes)
        except StopIteration:
            return
        except Exception as e:  # genops only parses; whatever it raises means malformed input
            raise PayloadError(f"{name}: data.pkl is not a valid pickle ({_clip(str(e))})") from None
        yield item


class _SymbolicPickle:
    """Interprets a pickle's opcodes as data, for the few opcodes one saved tensor uses.

    Values are ints, bools, strs, None, tuples, lists, dicts, and the records _Global, _Call and _PersistentId.
    Opcodes that build lists and dicts are here only so that a list or dict of tensors is reported as such.
    """

    def __init__(self, name: str):
        self.name = name
        self.stack: list[Any] = []
        self.marks: list[int] = []  # stack heights at each open MARK
        self.memo: dict[int, Any] = {}
        self.persistent_ids: list[_PersistentId] = []

    def run(self, data: bytes) -> Any:
        for opcode, arg, pos in _pickle_opcodes(data, self.name):
            if opcode.name == "STOP":
                return self._result(pos, len(data))
            handler = self._HANDLERS.get(opcode.name)
            if handler is None:
                raise PayloadError(f"{self.name}: data.pkl uses pickle opcode {opcode.name} (at byte {pos}), which "
                                   f"a saved tensor does not; {_EXPECTED}")
            handler(self, arg)
        raise PayloadError(f"{self.name}: data.pkl has no STOP opcode")  # genops raises first; kept for clarity

    def _refuse(self, why: str) -> None:
        raise PayloadError(f"{self.name}: data.pkl is malformed ({why})")

    def _result(self, stop_pos: int, data_len: int) -> Any:
        if stop_pos + 1 != data_len:
            self._refuse("bytes after STOP")
        if self.marks or len(self.stack) != 1:
            self._refuse("STOP does not leave exactly one value")
        return self.stack[0]

    # Stack primitives. As in pickle itself, nothing is popped across an open MARK.
    def _floor(self) -> int:
        return self.marks[-1] if self.marks else 0

    def _pop(self) -> Any:
        if len(self.stack) <= self._floor():
            self._refuse("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        if len(self.stack) <= self._floor():
            self._refuse("stack underflow")
        return self.stack[-1]

    def _pop_to_mark(self) -> list[Any]:
        if not self.marks:
            self._refuse("no MARK")
        floor = self.marks.pop()
        items = self.stack[floor:]
        del self.stack[floor:]
        return items

    def _push_int(self, value: Any) -> None:
        if type(value) is int and abs(value) > _MAX_PICKLE_INT:
            self._refuse(f"integer {value} out of range")
        self.stack.append(value)  # INT also decodes the bools of protocol 1 (I00 / I01)

    # Opcode handlers: arg is what genops decoded.
    def _proto(self, arg: int) -> None:
        if not 2 <= arg <= 5:
            self._refuse(f"protocol {arg}")

    def _frame(self, arg: int) -> None:
        pass  # framing only groups bytes for buffered reading

    def _push_arg(self, arg: Any) -> None:  # string opcodes
        self.stack.append(arg)

    def _true(self, arg: None) -> None:
        self.stack.append(True)

    def _false(self, arg: None) -> None:
        self.stack.append(False)

    def _none(self, arg: None) -> None:
        self.stack.append(None)

    def _mark(self, arg: None) -> None:
        self.marks.append(len(self.stack))

    def _tuple(self, arg: None) -> None:
        self.stack.append(tuple(self._pop_to_mark()))

    def _empty_tuple(self, arg: None) -> None:
        self.stack.append(())

    def _pop_tuple(self, count: int) -> None:
        items = [self._pop() for _ in range(count)]
        self.stack.append(tuple(reversed(items)))

    def _tuple1(self, arg: None) -> None:
        self._pop_tuple(1)

    def _tuple2(self, arg: None) -> None:
        self._pop_tuple(2)

    def _tuple3(self, arg: None) -> None:
        self._pop_tuple(3)

    def _empty_dict(self, arg: None) -> None:
        self.stack.append({})

    def _set_items(self, pairs: list[Any]) -> None:
        target = self._top()
        if not isinstance(target, dict):
            self._refuse("SETITEM on a non-dict")
        for key, value in zip(pairs[::2], pairs[1::2]):
            if type(key) not in (str, int):
                self._refuse(f"dict key of type {type(key).__name__}")
            target[key] = value

    def _setitem(self, arg: None) -> None:
        value = self._pop()
        key = self._pop()
        self._set_items([key, value])

    def _setitems(self, arg: None) -> None:
        pairs = self._pop_to_mark()
        if len(pairs) % 2:
            self._refuse("SETITEMS with an odd number of items")
        self._set_items(pairs)

    def _empty_list(self, arg: None) -> None:
        self.stack.append([])

    def _extend_list(self, items: list[Any]) -> None:
        target = self._top()
        if not isinstance(target, list):
            self._refuse("APPEND on a non-list")
        target.extend(items)

    def _append(self, arg: None) -> None:
        self._extend_list([self._pop()])

    def _appends(self, arg: None) -> None:
        self._extend_list(self._pop_to_mark())

    def _put(self, arg: int) -> None:
        self.memo[arg] = self._top()

    def _memoize(self, arg: None) -> None:
        self.memo[len(self.memo)] = self._top()

    def _get(self, arg: int) -> None:
        if arg not in self.memo:
            self._refuse(f"memo {arg} read before it was written")
        self.stack.append(self.memo[arg])

    def _global(self, arg: str) -> None:  # protocols 0-3: "module qualname"
        parts = arg.split(" ")
        if len(parts) != 2:
            self._refuse(f"GLOBAL {_clip(repr(arg))}")
        self.stack.append(_check_global(_Global(*parts), self.name))

    def _stack_global(self, arg: None) -> None:  # protocol 4+: module and qualname pushed as strings
        qualname = self._pop()
        module = self._pop()
        if not (isinstance(module, str) and isinstance(qualname, str)):
            self._refuse("STACK_GLOBAL of non-strings")
        self.stack.append(_check_global(_Global(module, qualname), self.name))

    def _binpersid(self, arg: None) -> None:
        ref = _PersistentId(self._pop())
        self.persistent_ids.append(ref)
        self.stack.append(ref)

    def _reduce(self, arg: None) -> None:
        args = self._pop()
        func = self._pop()
        if not (isinstance(func, _Global) and isinstance(args, tuple)):
            self._refuse("REDUCE of something other than a global and a tuple")
        self.stack.append(_Call(func, args))  # recorded, not called

    _HANDLERS = {
        "PROTO": _proto, "FRAME": _frame,
        "SHORT_BINUNICODE": _push_arg, "BINUNICODE": _push_arg, "BINUNICODE8": _push_arg,
        "BININT": _push_int, "BININT1": _push_int, "BININT2": _push_int, "LONG1": _push_int, "INT": _push_int,
        "NEWTRUE": _true, "NEWFALSE": _false, "NONE": _none,
        "MARK": _mark, "TUPLE": _tuple, "EMPTY_TUPLE": _empty_tuple, "TUPLE1": _tuple1, "TUPLE2": _tuple2,
        "TUPLE3": _tuple3,
        "EMPTY_DICT": _empty_dict, "SETITEM": _setitem, "SETITEMS": _setitems,
        "EMPTY_LIST": _empty_list, "APPEND": _append, "APPENDS": _appends,
        "BINPUT": _put, "LONG_BINPUT": _put, "MEMOIZE": _memoize, "BINGET": _get, "LONG_BINGET": _get,
        "GLOBAL": _global, "STACK_GLOBAL": _stack_global, "BINPERSID": _binpersid, "REDUCE": _reduce,
    }


@dataclass(frozen=True)
class _TensorReference:
    """What data.pkl says about the tensor: which storage, and the view of it."""
    dtype: str
    storage_key: str
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    negate: bool


def _describe(value: Any) -> str:
    """A short account of a symbolic value, for refusal messages. Values are never repr()'d whole: memo
    references let a few hundred bytes of pickle describe a value exponentially large."""
    if value is None or type(value) in (bool, int):
        return repr(value)
    if isinstance(value, str):
        return _clip(repr(value))
    if isinstance(value, tuple) and len(value) <= 8 and all(type(v) in (bool, int) for v in value):
        return repr(value)
    if isinstance(value, dict):  # keys are str or int (_set_items)
        keys = ", ".join(_clip(repr(k), 40) for k in list(value)[:5])
        return f"a dict with {len(value)} {'entry' if len(value) == 1 else 'entries'} ({keys})"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, _Call):
        return f"a call to {value.func}"
    if isinstance(value, _Global):
        return f"the global {value}"
    if isinstance(value, _PersistentId):
        return "a bare storage"
    return f"a {type(value).__name__}"


def _size_tuple(value: Any, what: str, name: str) -> tuple[int, ...]:
    if not _is_shape(value, tuple):
        raise PayloadError(f"{name}: tensor {what} must be a tuple of at most {_MAX_RANK} non-negative integers, "
                           f"got {_describe(value)}")
    return value


def _storage_reference(ref: Any, name: str) -> tuple[str, str, int]:
    """(dtype, key, numel) from torch.save's persistent id ("storage", <storage type>, key, location, numel)."""
    pid = ref.pid if isinstance(ref, _PersistentId) else None
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise PayloadError(f"{name}: tensor storage is not a torch.save storage reference")
    _, storage_type, key, location, numel = pid
    if not (isinstance(storage_type, _Global) and storage_type in _STORAGE_DTYPES):
        raise PayloadError(f"{name}: storage type {_describe(storage_type)} is not a float16, bfloat16 or float32 "
                           f"storage")
    # The key only names a zip member; torch.save uses small decimal numbers.
    if not (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", key)):
        raise PayloadError(f"{name}: storage key {_describe(key)} is not a plain name")
    if not isinstance(location, str):  # "cpu", "cuda:0", ...: where torch would put it; unused here
        raise PayloadError(f"{name}: storage location {_describe(location)} is not a string")
    if not _is_size(numel):
        raise PayloadError(f"{name}: storage size {_describe(numel)} is not a non-negative integer")
    return _STORAGE_DTYPES[storage_type], key, numel


def _negate_from_metadata(metadata: Any, name: str) -> bool:
    """_rebuild_tensor_v2's optional metadata: {"neg": True} marks a negated view (torch's _neg_view)."""
    if not isinstance(metadata, dict):
        raise PayloadError(f"{name}: tensor metadata {_describe(metadata)} is not a dict")
    for key, value in metadata.items():
        if key not in ("neg", "conj") or type(value) is not bool:
            raise PayloadError(f"{name}: unsupported tensor metadata {_describe(key)}: {_describe(value)}")
    if metadata.get("conj"):
        raise PayloadError(f"{name}: a conjugated (complex) tensor; {_EXPECTED}")
    return metadata.get("neg", False)


def _tensor_reference(data_pkl: bytes | None, name: str) -> _TensorReference:
    if data_pkl is None:  # _archive_prefix found it; kept so a reader need not check
        raise PayloadError(f"{name}: not a torch.save archive (no data.pkl)")
    machine = _SymbolicPickle(name)
    root = machine.run(data_pkl)
    if not (isinstance(root, _Call) and root.func == _REBUILD_TENSOR_V2):
        raise PayloadError(f"{name}: found {_describe(root)}; {_EXPECTED}")
    if len(machine.persistent_ids) != 1:
        raise PayloadError(f"{name}: found {len(machine.persistent_ids)} storages; {_EXPECTED} (one storage)")
    args = root.args
    if len(args) not in (6, 7):
        raise PayloadError(f"{name}: {_REBUILD_TENSOR_V2} with {len(args)} arguments; expected 6 or 7")
    storage_ref, offset, size, stride, requires_grad, hooks = args[:6]
    if storage_ref is not machine.persistent_ids[0]:
        raise PayloadError(f"{name}: the tensor's first argument is not its storage")
    dtype, key, numel = _storage_reference(storage_ref, name)
    size = _size_tuple(size, "size", name)
    stride = _size_tuple(stride, "stride", name)
    if len(size) != len(stride):
        raise PayloadError(f"{name}: tensor size {list(size)} and stride {list(stride)} differ in length")
    if not _is_size(offset):
        raise PayloadError(f"{name}: storage offset {_describe(offset)} is not a non-negative integer")
    if type(requires_grad) is not bool:  # ignored: gradients mean nothing to a prompt
        raise PayloadError(f"{name}: requires_grad {_describe(requires_grad)} is not a bool")
    if not (isinstance(hooks, _Call) and hooks.func == _ORDERED_DICT and hooks.args == ()):
        raise PayloadError(f"{name}: backward hooks are {_describe(hooks)}; expected an empty OrderedDict")
    negate = _negate_from_metadata(args[6], name) if len(args) == 7 else False
    return _TensorReference(dtype=dtype, storage_key=key, numel=numel, offset=offset, size=size, stride=stride,
                            negate=negate)
