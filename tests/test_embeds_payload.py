"""prompt_embeds payloads as vLLM clients send them: base64 of torch.save(tensor) or of a safetensors file.

Good payloads are built with torch and safetensors and must decode to exactly `t.to(torch.float16).numpy()`;
hostile ones (code-running pickles, sparse/quantized tensors, zip bombs, lying headers) must be refused with a
message that says what was found, and nothing in them may run.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from pagedllm.openai_api import embeds_payload
from pagedllm.openai_api.embeds_payload import PayloadError, decode_prompt_embeds, max_base64_chars

H = 64  # hidden size used throughout
MAX_ROWS = 16


# ------------------------------------------------------------------------------------------- payload builders


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # quantized and nested tensors warn that they are deprecated / prototypes
        warnings.simplefilter("ignore")
        torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def decode(payload: str, hidden_size: int = H, max_rows: int = MAX_ROWS, **kwargs) -> np.ndarray:
    return decode_prompt_embeds(payload, hidden_size=hidden_size, max_rows=max_rows, **kwargs)


def refused(payload: str, **kwargs) -> str:
    with pytest.raises(PayloadError) as info:
        decode(payload, **kwargs)
    message = str(info.value)
    assert message.startswith(kwargs.get("name", "prompt_embeds") + ": "), message
    return message


def as_fp16(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_neg().to(torch.float16).numpy()


def members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return {name: z.read(name) for name in z.namelist()}


def rezip(files: dict[str, bytes], compress_type: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data, compress_type=compress_type)
    return buf.getvalue()


def torch_like_zip(data_pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive") -> bytes:
    """A zip laid out like torch.save's, around a data.pkl of our choosing."""
    files = {f"{prefix}/data.pkl": data_pkl, f"{prefix}/byteorder": b"little"}
    files.update({f"{prefix}/data/{key}": data for key, data in (storages or {}).items()})
    files[f"{prefix}/version"] = b"3\n"
    return rezip(files)


# Protocol-2 opcodes, written by hand the way torch.save writes them, to build data.pkl variants.
def op_global(module: str, qualname: str) -> bytes:
    return b"c" + f"{module}\n{qualname}\n".encode()


def op_str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def op_int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_storage(numel: int, key: str = "0", storage: str = "FloatStorage") -> bytes:
    pid = op_tuple(op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"), op_int(numel))
    return pid + b"Q"  # BINPERSID


def tensor_pkl(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0,
               metadata: bytes = b"", storage: str = "FloatStorage") -> bytes:
    args = [op_storage(numel, storage=storage), op_int(offset), op_tuple(*map(op_int, size)),
            op_tuple(*map(op_int, stride)), b"\x89", op_global("collections", "OrderedDict") + b")R"]
    return b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(*args, metadata) + b"R."


def safetensors_file(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ------------------------------------------------------------------------------------------- accepted payloads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_equals_torch_conversion_to_float16(dtype):
    t = (torch.randn(5, H) * torch.logspace(-9, 3.5, H)).to(dtype)  # FP16 subnormals up to thousands: all rounding
    out = decode(b64(saved(t)))
    assert out.dtype == np.float16 and out.shape == (5, H) and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, as_fp16(t))


def test_view_of_a_larger_storage():
    big = torch.randn(10, 70)
    view = big[3:7, 2:66]
    raw = saved(view)
    assert len(members(raw)["archive/data/0"]) == 10 * 70 * 4  # torch.save wrote the whole storage
    np.testing.assert_array_equal(decode(b64(raw)), as_fp16(view))


def test_transposed_non_contiguous_tensor():
    t = torch.randn(H, 6).t()
    assert not t.is_contiguous()
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


def test_transposed_view_of_bfloat16_with_offset():
    t = torch.randn(H + 3, 9).bfloat16()[3:, 1:8].t()
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


def test_requires_grad_tensor():
    t = torch.randn(3, H, requires_grad=True)
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


def test_leading_batch_of_one_is_squeezed():
    t = torch.randn(1, 4, H)
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t[0]))


def test_expanded_rows_sharing_one_storage_row():
    t = torch.randn(1, H).expand(4, H)  # stride (0, 1)
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_pickle_protocols_1_to_5(protocol):
    t = torch.randn(2, H)
    np.testing.assert_array_equal(decode(b64(saved(t, pickle_protocol=protocol))), as_fp16(t))


def test_negated_view_reads_as_torch_reads_it():
    t = torch.randn(2, H)._neg_view()  # stored as t with metadata {"neg": True}
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


def test_big_endian_archive():
    t = torch.randn(3, H)
    files = members(saved(t))
    files["archive/byteorder"] = b"big"
    files["archive/data/0"] = np.frombuffer(files["archive/data/0"], "<f4").astype(">f4").tobytes()
    np.testing.assert_array_equal(decode(b64(rezip(files))), as_fp16(t))


def test_archive_without_byteorder_record_is_little_endian():
    t = torch.randn(3, H)
    files = members(saved(t))
    del files["archive/byteorder"]
    np.testing.assert_array_equal(decode(b64(rezip(files))), as_fp16(t))


def test_any_archive_folder_name():
    t = torch.randn(3, H)
    files = {name.replace("archive/", "my_prompt/", 1): data for name, data in members(saved(t)).items()}
    np.testing.assert_array_equal(decode(b64(rezip(files))), as_fp16(t))


def test_hand_written_pickle_of_a_strided_view():
    storage = np.arange(4 * H, dtype="<f4")
    pkl = tensor_pkl(numel=4 * H, size=(2, H // 2), stride=(2 * H, 2), offset=1)
    expected = np.stack([storage[1 + r * 2 * H: 1 + r * 2 * H + H: 2] for r in range(2)])
    out = decode(b64(torch_like_zip(pkl, {"0": storage.tobytes()})), hidden_size=H // 2)
    np.testing.assert_array_equal(out, expected.astype(np.float16))


def test_largest_payload_fits_the_length_limit():
    t = torch.randn(MAX_ROWS, H)  # the widest dtype at the most rows
    payload = b64(saved(t))
    assert len(payload) <= max_base64_chars(MAX_ROWS, H)
    np.testing.assert_array_equal(decode(payload), as_fp16(t))


def test_fp16_rounding_at_the_top_of_the_range_matches_torch():
    t = torch.full((1, H), 65504.0)
    t[0, 1] = 65519.0  # rounds down to 65504, as torch does
    t[0, 2] = -65510.0
    np.testing.assert_array_equal(decode(b64(saved(t))), as_fp16(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_with_one_tensor(dtype):
    t = (torch.randn(6, H) * 2).to(dtype)
    np.testing.assert_array_equal(decode(b64(safetensors_save({"embeds": t}))), as_fp16(t))


def test_safetensors_with_metadata_and_leading_batch():
    t = torch.randn(1, 3, H)
    payload = b64(safetensors_save({"embeds": t}, metadata={"format": "pt"}))
    np.testing.assert_array_equal(decode(payload), as_fp16(t[0]))


# ------------------------------------------------------------------------------------------- code-running pickles


class CreatesFile:
    """Unpickling this would create `path` (open(path, "w"))."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def assert_calls_open(data_pkl: bytes) -> None:
    """The fixture really is hostile: it names io.open and calls it."""
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data_pkl)]
    assert ("GLOBAL", "io open") in ops or ("SHORT_BINUNICODE", "open") in ops
    assert ("REDUCE", None) in ops


@pytest.mark.parametrize("protocol", [2, 4])
def test_reduce_payload_in_a_torch_archive_is_refused_and_never_run(tmp_path, protocol):
    target = tmp_path / "pwned"
    data_pkl = pickle.dumps(CreatesFile(target), protocol=protocol)
    assert_calls_open(data_pkl)
    message = refused(b64(torch_like_zip(data_pkl, {"0": b"\0" * 4})))
    assert "io.open" in message and "not allowed" in message
    assert not target.exists()


def test_plain_pickle_payload_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned"
    data_pkl = pickle.dumps(CreatesFile(target), protocol=2)
    assert_calls_open(data_pkl)
    assert "bare pickle" in refused(b64(data_pkl))
    assert "not a torch.save zip archive" in refused(b64(pickle.dumps(CreatesFile(target), protocol=0)))
    assert not target.exists()


@pytest.mark.parametrize("module,qualname", [("os", "system"), ("builtins", "eval"), ("posix", "system"),
                                             ("builtins", "getattr"), ("torch", "load")])
def test_any_other_global_is_refused(module, qualname):
    data_pkl = b"\x80\x02" + op_global(module, qualname) + op_tuple(op_str("touch /tmp/x")) + b"R."
    message = refused(b64(torch_like_zip(data_pkl)))
    assert f"{module}.{qualname}" in message and "not allowed" in message


def test_other_global_hidden_inside_a_tensor_is_refused():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1)).replace(
        op_global("collections", "OrderedDict"), op_global("builtins", "exec"))
    assert "builtins.exec" in refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))


# ------------------------------------------------------------------------------------------- not one dense tensor


def test_sparse_tensor():
    assert "a sparse tensor" in refused(b64(saved(torch.randn(3, H).to_sparse())))


def test_quantized_tensor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        q = torch.quantize_per_tensor(torch.randn(3, H), 0.1, 0, torch.qint8)
    assert "a quantized tensor" in refused(b64(saved(q)))


def test_nested_tensor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([torch.randn(2, H), torch.randn(3, H)])
    assert "a nested tensor" in refused(b64(saved(nested)))


def test_parameter():
    assert "torch.nn.Parameter" in refused(b64(saved(torch.nn.Parameter(torch.randn(3, H)))))


def test_dict_of_tensors():
    assert "a dict with 1 entry ('embeds')" in refused(b64(saved({"embeds": torch.randn(3, H)})))


def test_list_of_two_tensors():
    assert "a list of 2 items" in refused(b64(saved([torch.randn(3, H), torch.randn(2, H)])))


def test_tuple_of_tensors():
    assert "a tuple of 2 items" in refused(b64(saved((torch.randn(3, H), torch.randn(2, H)))))


def test_second_storage():
    second = b"}" + op_str("neg") + op_storage(4, key="1") + b"s"  # metadata {"neg": <another storage>}
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1), metadata=second)
    assert "found 2 storages" in refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H), "1": bytes(16)})))


@pytest.mark.parametrize("dtype,what", [(torch.int64, "int64"), (torch.float64, "float64"), (torch.bool, "bool"),
                                        (torch.uint8, "uint8")])
def test_other_dtypes(dtype, what):
    assert f"dtype {what}" in refused(b64(saved(torch.zeros(2, H, dtype=dtype))))


def test_unsupported_opcode():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1))[:-1] + b"}b."  # EMPTY_DICT, BUILD
    assert "opcode BUILD" in refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))


def test_pickle_with_bytes_after_stop_or_truncated():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1))
    assert "bytes after STOP" in refused(b64(torch_like_zip(pkl + b"junk", {"0": bytes(8 * H)})))
    assert "not a valid pickle" in refused(b64(torch_like_zip(pkl[:-5], {"0": bytes(8 * H)})))


def test_exponentially_shared_value_is_refused_quickly():
    # Each level memoizes the value below it (LONG_BINPUT), fetches it again (LONG_BINGET) and pairs the two
    # (TUPLE2): 300 levels describe a value with 2**300 leaves in 3 KB. Nothing may walk or repr it whole.
    level = b"r%sj%s\x86"
    pkl = b"\x80\x02N" + b"".join(level % (struct.pack("<I", i), struct.pack("<I", i)) for i in range(300)) + b"."
    start = time.perf_counter()
    assert "a tuple of 2 items" in refused(b64(torch_like_zip(pkl)))
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------------- shapes and values


def test_wrong_hidden_size():
    message = refused(b64(saved(torch.randn(3, 32))))
    assert "expected shape [seq_len, 64] but got [3, 32]" in message


@pytest.mark.parametrize("shape", [(H,), (2, 3, H), (1, 1, 2, H)])
def test_wrong_rank(shape):
    assert f"but got {list(shape)}" in refused(b64(saved(torch.randn(*shape))))


def test_no_rows():
    assert "no rows" in refused(b64(saved(torch.randn(0, H))))


def test_more_rows_than_the_limit():
    assert "17 rows is more than the limit of 16" in refused(b64(saved(torch.randn(17, H).half())))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_or_inf(bad, dtype):
    t = torch.randn(2, H)
    t[1, 5] = bad
    assert "contains NaN or Inf" in refused(b64(saved(t.to(dtype))))


def test_fp16_overflow():
    t = torch.randn(2, H)
    t[0, 0] = 1e6
    assert "values outside the range of FP16 (±65504)" in refused(b64(saved(t)))
    assert "outside the range of FP16" in refused(b64(safetensors_save({"e": t.bfloat16()})))


# ------------------------------------------------------------------------------------------- base64 and size


@pytest.mark.parametrize("text", ["not base64!", "QUJ", "QUJDRA", "QUJD\nRA==", "ÀÁÂÃ"])
def test_not_base64(text):
    assert refused(text) == "prompt_embeds: not valid base64"


@pytest.mark.parametrize("value", [b"QUJD", None, 5, ["QUJD"]])
def test_not_a_string(value):
    assert "expected a base64 string" in refused(value)


def test_empty_string():
    assert refused("") == "prompt_embeds: empty string"


def test_neither_zip_nor_safetensors():
    assert "not a torch.save zip archive or a safetensors file" in refused(b64(b"hello world"))


def test_legacy_torch_save_format():
    assert "bare pickle" in refused(b64(saved(torch.randn(2, H), _use_new_zipfile_serialization=False)))


def test_oversized_payload_is_refused_by_length_before_decoding():
    huge = "A" * 200_000_000
    start = time.perf_counter()
    message = refused(huge)
    assert time.perf_counter() - start < 0.5
    assert f"200000000 base64 characters is more than the limit of {max_base64_chars(MAX_ROWS, H)}" in message


def test_limit_arithmetic():
    assert max_base64_chars(1, 3) == 4 * -(-(12 + 64 * 1024) // 3)
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError) as info:
            max_base64_chars(bad, H)
        assert not isinstance(info.value, PayloadError)  # a configuration error, not the client's


def test_caller_name_starts_every_message():
    assert refused("?", name="prompt_embeds[2]") == "prompt_embeds[2]: not valid base64"
    assert "[3, 32]" in refused(b64(saved(torch.randn(3, 32))), name="prompt_embeds[2]")


# ------------------------------------------------------------------------------------------- zip structure


def test_zip_bomb():
    files = members(saved(torch.randn(2, H)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            if name == "archive/data/0":  # 32 MiB of zeros deflate to a few KB
                z.writestr(name, bytes(32 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                z.writestr(name, data)
    bomb = buf.getvalue()
    assert len(bomb) < 100_000
    message = refused(b64(bomb))
    assert "'archive/data/0' declares 33554432 bytes, more than the whole" in message


def test_compressed_member():
    files = members(saved(torch.randn(2, H)))
    assert "is compressed (method 8)" in refused(b64(rezip(files, compress_type=zipfile.ZIP_DEFLATED)))


def test_stored_member_declaring_more_than_the_payload():
    raw = bytearray(saved(torch.randn(2, H)))
    entry = raw.index(b"PK\x01\x02")  # the first central-directory entry: sizes at +20 and +24
    raw[entry + 20:entry + 28] = struct.pack("<II", 10**9, 10**9)
    assert "declares 1000000000 bytes" in refused(b64(bytes(raw)))


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.update({f"archive/extra/{i}": b"x" for i in range(40)}), "members"),
    (lambda f: f.pop("archive/data.pkl"), "expected one <folder>/data.pkl member, found 0"),
    (lambda f: f.update({"elsewhere/data/0": b"x"}), "outside 'archive/'"),
    (lambda f: f.pop("archive/data/0"), "has no zip member 'archive/data/0'"),
    (lambda f: f.update({"archive/byteorder": b"middle"}), "byteorder"),
], ids=["too-many-members", "no-data-pkl", "member-outside-the-folder", "missing-storage", "bad-byteorder"])
def test_a_malformed_archive_is_refused_naming_what_is_wrong(edit, message):
    files = members(saved(torch.randn(2, H)))
    edit(files)
    assert message in refused(b64(rezip(files)))


def test_corrupted_member_fails_its_crc():
    raw = bytearray(saved(torch.randn(2, H)))
    raw[raw.index(b"_rebuild_tensor_v2")] ^= 1
    assert "archive/data.pkl" in refused(b64(bytes(raw)))


# ------------------------------------------------------------------------------------------- storage and view


def test_storage_bytes_disagree_with_numel():
    files = members(saved(torch.randn(2, H)))
    files["archive/data/0"] = files["archive/data/0"][:-4]
    assert f"holds {8 * H - 4} bytes, but data.pkl declares {2 * H} float32 elements" in refused(b64(rezip(files)))


def test_strides_reaching_outside_the_storage():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 2))
    message = refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))
    assert f"address element {H + 2 * (H - 1)}, outside a storage of {2 * H} elements" in message


def test_offset_reaching_outside_the_storage():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1), offset=1)
    assert "outside a storage" in refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))


def test_negative_stride():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(-H, 1), offset=H)
    message = refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))
    assert "stride must be a tuple of at most 8 non-negative integers" in message


def test_unknown_storage_type():
    pkl = tensor_pkl(numel=2 * H, size=(2, H), stride=(H, 1), storage="FancyStorage")
    assert "torch.FancyStorage, which is not allowed" in refused(b64(torch_like_zip(pkl, {"0": bytes(8 * H)})))


# ------------------------------------------------------------------------------------------- safetensors refusals


def test_safetensors_with_two_tensors():
    payload = b64(safetensors_save({"a": torch.randn(2, H), "b": torch.randn(2, H)}))
    assert "holds 2 tensors ('a', 'b'); expected exactly one" in refused(payload)


def test_safetensors_bad_header():
    data = bytes(8 * H)
    entry = {"dtype": "F32", "shape": [2, H], "data_offsets": [0, 8 * H]}
    assert "not valid JSON" in refused(b64(safetensors_file(b'{"e": [1, 2', data)))
    assert "not valid JSON" in refused(b64(safetensors_file(b'{"e": 1, "e": 2}', data)))  # duplicate key
    assert "not valid JSON" in refused(b64(safetensors_file(b'{"e": ' + b"[" * 10000, data)))  # nested too deeply
    assert "runs past the end" in refused(b64(struct.pack("<Q", 10_000) + b'{"e": 1}'))
    assert "larger than" in refused(b64(struct.pack("<Q", 10**12) + b'{"e": 1}'))
    assert "expected exactly the keys" in refused(b64(safetensors_file({"e": {**entry, "extra": 1}}, data)))
    assert "shape must be" in refused(b64(safetensors_file({"e": {**entry, "shape": [2, -H]}}, data)))
    assert "shape must be" in refused(b64(safetensors_file({"e": {**entry, "shape": [1] * 9 + [2, H]}}, data)))
    assert "dtype [" in refused(b64(safetensors_file({"e": {**entry, "dtype": ["F32"]}}, data)))  # unhashable
    assert "__metadata__" in refused(b64(safetensors_file({"__metadata__": {"a": 1}, "e": entry}, data)))


def test_safetensors_offsets_past_the_end():
    payload = safetensors_file({"e": {"dtype": "F32", "shape": [2, H], "data_offsets": [0, 8 * H]}}, bytes(8 * H - 4))
    assert "reach past the end" in refused(b64(payload))


def test_safetensors_offsets_disagree_with_shape():
    payload = safetensors_file({"e": {"dtype": "F32", "shape": [3, H], "data_offsets": [0, 8 * H]}}, bytes(8 * H))
    assert f"hold {8 * H} bytes but shape [3, {H}] of F32 needs {12 * H}" in refused(b64(payload))


def test_safetensors_other_dtype():
    assert "dtype 'I64'" in refused(b64(safetensors_save({"e": torch.zeros(2, H, dtype=torch.int64)})))


def mutated(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(len(raw))
        if rng.random() < 0.6:
            raw[k] = rng.randrange(256)
        else:
            del raw[k:k + rng.randint(1, 8)]
    return bytes(raw)


def test_mutated_payloads_are_decoded_or_refused_never_crash():
    rng = random.Random(0)
    archives = [members(saved(torch.randn(3, H))), members(saved(torch.randn(H, 3).t(), pickle_protocol=4))]
    tensor_file = safetensors_save({"e": torch.randn(3, H)})
    for _ in range(300):
        files = dict(rng.choice(archives))
        files["archive/data.pkl"] = mutated(files["archive/data.pkl"], rng)  # rezipped: the CRC stays valid
        for payload in (rezip(files), mutated(tensor_file, rng)):
            try:
                out = decode(b64(payload))
            except PayloadError:
                continue
            assert out.dtype == np.float16 and out.shape[1] == H


# ------------------------------------------------------------------------------------------- the module itself


def test_module_source_never_deserializes():
    source = Path(embeds_payload.__file__).read_text()
    for forbidden in ("torch.load", "pickle.load", "pickle.loads", "Unpickler", "eval(", "exec(", "__import__",
                      "importlib", "getattr(", "as_strided"):
        assert forbidden not in source, forbidden
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.MULTILINE)
    assert not re.search(r"^\s*(import|from)\s+pickle\b", source, re.MULTILINE)


def test_module_imports_without_torch():
    backend = Path(embeds_payload.__file__).resolve().parents[2]
    code = "import sys, pagedllm.openai_api.embeds_payload; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], cwd=backend, check=True, timeout=60)
