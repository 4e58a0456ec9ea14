"""A GGUF file's metadata and tensor table, read in one pass with struct over a memory map.

The gguf package's GGUFReader builds numpy views for every element of every array in the metadata: with a
49k-token byte-level vocabulary (tokens and merges) that is about 8 seconds per file on a 2-core CPU, and an
export check reads each file several times. This reader walks the same bytes (GGUF v2/v3, either byte order)
and keeps scalars, strings and short arrays; long arrays (the vocabulary, its merges and scores) are skipped and
recorded by element type and length. Files whose arrays are needed (a SentencePiece vocabulary) use GGUFReader.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF metadata value types -> struct format (without byte order)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GgufHeaderError(ValueError):
    """The file is not GGUF, or its header is cut short or damaged."""


@dataclass(frozen=True)
class SkippedArray:
    """A long metadata array left unread: its element type (GGUF value type) and length."""

    element_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int]  # GGUF order: row length first
    type_id: int  # ggml type (gguf.GGMLQuantizationType)
    offset: int  # from the start of the tensor data

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id).name


@dataclass(frozen=True)
class GgufHeader:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int  # where the tensor data begins (the header's end, aligned to general.alignment)

    def tensor_end(self, tensor: TensorInfo) -> int:
        """The byte after the tensor's data in the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.type_id)]
        elements = 1
        for d in tensor.shape:
            elements *= d
        return self.data_start + tensor.offset + elements // block * size

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key, default)
        return default if isinstance(value, SkippedArray) else value


def read_gguf_header(path: str | Path, keep_arrays: int = 256) -> GgufHeader:
    """Metadata (arrays longer than keep_arrays as SkippedArray) and the tensor table of a GGUF file."""
    path = Path(path)
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GgufHeaderError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:
            raise GgufHeaderError(f"{path}: cannot map the file ({exc})") from None
    with buf:
        try:
            return _parse(buf, keep_arrays)
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise GgufHeaderError(
                f"{path}: the GGUF header is damaged or truncated ({type(exc).__name__}: {exc})"
            ) from None


def _parse(buf: mmap.mmap, keep_arrays: int) -> GgufHeader:
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written big-endian
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    u64, u32 = struct.Struct(order + "Q"), struct.Struct(order + "I")
    tensor_count, kv_count = struct.unpack_from(order + "QQ", buf, 8)
    pos = 24

    def string() -> str:
        nonlocal pos
        (length,) = u64.unpack_from(buf, pos)
        start = pos + 8
        pos = start + length
        if pos > len(buf):
            raise IndexError(f"a string of {length} bytes runs past the end of the file")
        return buf[start:pos].decode("utf-8")

    def skip_strings(count: int) -> None:
        nonlocal pos
        unpack = u64.unpack_from
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        if pos > len(buf):
            raise IndexError("an array of strings runs past the end of the file")

    def value(kind: int) -> Any:
        nonlocal pos
        if kind in _SCALARS:
            fmt = struct.Struct(order + _SCALARS[kind])
            (v,) = fmt.unpack_from(buf, pos)
            pos += fmt.size
            return v
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            (element,) = u32.unpack_from(buf, pos)
            (length,) = u64.unpack_from(buf, pos + 4)
            pos += 12
            if length > keep_arrays:
                if element == _STRING:
                    skip_strings(length)
                elif element in _SCALARS:
                    pos += length * struct.calcsize(_SCALARS[element])
                else:  # arrays of arrays: walk them
                    for _ in range(length):
                        value(element)
                return SkippedArray(element, length)
            return [value(element) for _ in range(length)]
        raise GgufHeaderError(f"unknown GGUF value type {kind} at byte {pos}")

    fields: dict[str, Any] = {}
    for _ in range(kv_count):
        key = string()
        (kind,) = u32.unpack_from(buf, pos)
        pos += 4
        fields[key] = value(kind)
    tensors = []
    for _ in range(tensor_count):
        name = string()
        (dims,) = u32.unpack_from(buf, pos)
        shape = list(struct.unpack_from(f"{order}{dims}Q", buf, pos + 4))
        pos += 4 + 8 * dims
        type_id, offset = struct.unpack_from(order + "IQ", buf, pos)
        pos += 12
        tensors.append(TensorInfo(name, [int(d) for d in shape], int(type_id), int(offset)))
    alignment = int(fields.get("general.alignment", 32))
    return GgufHeader(int(version), fields, tensors, -(-pos // alignment) * alignment)
