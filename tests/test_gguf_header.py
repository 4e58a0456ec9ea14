"""afina's one-pass GGUF header reader against the gguf package's GGUFReader, on real and written files."""

from __future__ import annotations

import pytest

from afina.models.gguf_header import GgufHeaderError, SkippedArray, read_gguf_header


def _packaged_gguf():
    from afina.models import DEFAULT_MODEL
    from afina.models.loader import PACKAGED_MODELS

    return PACKAGED_MODELS[DEFAULT_MODEL].locate()


def _same_as_gguf_reader(path, keep_arrays: int = 256) -> int:
    """Every field and tensor as GGUFReader reads them; returns how many fields were compared."""
    from gguf import GGUFReader

    header = read_gguf_header(path, keep_arrays)
    reader = GGUFReader(str(path))
    compared = 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # GGUFReader's own entries for the file's header words
            continue
        ours = header.fields[key]
        if isinstance(ours, SkippedArray):
            assert ours.length == len(field.data) and ours.length > keep_arrays, key
        else:
            theirs = field.contents()
            assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, key
        compared += 1
    assert len(header.fields) == compared
    assert [(t.name, t.shape, t.type_name) for t in header.tensors] == [
        (t.name, [int(x) for x in t.shape], t.tensor_type.name) for t in reader.tensors
    ]
    assert [header.data_start + t.offset for t in header.tensors] == [int(t.data_offset) for t in reader.tensors]
    assert [header.tensor_end(t) for t in header.tensors] == [
        int(t.data_offset) + int(t.n_bytes) for t in reader.tensors
    ]
    return compared


def test_the_packaged_model_reads_as_gguf_reads_it():
    path = _packaged_gguf()
    assert _same_as_gguf_reader(path) > 20
    header = read_gguf_header(path)
    assert header.get("general.architecture") == "llama" and "{% for message in messages %}" in header.get(
        "tokenizer.chat_template"
    )
    vocab = header.fields["tokenizer.ggml.tokens"]
    assert isinstance(vocab, SkippedArray) and vocab.length == 49152
    assert header.get("tokenizer.ggml.tokens") is None  # skipped arrays are not values


@pytest.mark.parametrize("endianess", ["little", "big"])
def test_every_value_type_in_either_byte_order(tmp_path, endianess):
    import gguf
    import numpy as np

    path = tmp_path / f"{endianess}.gguf"
    order = gguf.GGUFEndian.BIG if endianess == "big" else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=order)
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -32000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**60)
    writer.add_int64("t.i64", -(2**60))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.short", [1, 2, 3])
    writer.add_array("t.words", ["a", "bb", "ccc"])
    writer.add_array("t.long_words", [f"w{i}" for i in range(300)])
    writer.add_array("t.long_numbers", list(range(300)))
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))  # byte-swapped by the writer if big
    writer.add_tensor("b", np.ones(5, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert _same_as_gguf_reader(path, keep_arrays=100) == 17  # general.architecture and the 16 above
    header = read_gguf_header(path, keep_arrays=100)
    assert header.get("t.str") == "héllo ✓" and header.get("t.words") == ["a", "bb", "ccc"]
    assert header.fields["t.long_numbers"] == SkippedArray(element_type=5, length=300)  # int32 elements
    assert [(t.name, t.shape, t.type_name) for t in header.tensors] == [("w", [4, 3], "F32"), ("b", [5], "F32")]


def test_a_cut_or_foreign_file_gets_a_clear_error(tmp_path):
    cut = tmp_path / "cut.gguf"
    with _packaged_gguf().open("rb") as fh:
        cut.write_bytes(fh.read(200_000))  # inside the vocabulary
    with pytest.raises(GgufHeaderError, match="cut.gguf: the GGUF header is damaged or truncated"):
        read_gguf_header(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04not gguf")
    with pytest.raises(GgufHeaderError, match="other.gguf: not a GGUF file"):
        read_gguf_header(other)
