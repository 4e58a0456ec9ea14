"""A GGUF file's SentencePiece vocabulary given back as tokenizer.model (what llama.cpp's converter reads for Gemma)."""

import gguf
import sentencepiece as spm

from afina.export.gguf_convert import write_sentencepiece_model
from archs import sentencepiece_tokenizer


def _gguf_with_vocab(path, model_file) -> None:
    """A GGUF file whose tokenizer fields are the SentencePiece model's (pieces, scores, types), as in Gemma's files."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode() for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])  # GGUF numbers token types as SentencePiece does
    spec = proto.trainer_spec
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    writer.add_unk_token_id(spec.unk_id)
    writer.add_pad_token_id(spec.pad_id)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_model_from_gguf_tokenizes_like_the_original(tmp_path):
    sentencepiece_tokenizer(tmp_path / "tok")
    model_file = tmp_path / "tok" / "tokenizer.model"
    original = spm.SentencePieceProcessor(model_file=str(model_file))
    _gguf_with_vocab(tmp_path / "vocab.gguf", model_file)
    assert write_sentencepiece_model(tmp_path / "vocab.gguf", tmp_path / "tokenizer.model")
    rebuilt = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert rebuilt.vocab_size() == original.vocab_size()
    for i in range(original.vocab_size()):
        assert rebuilt.id_to_piece(i) == original.id_to_piece(i) and rebuilt.get_score(i) == original.get_score(i)
        assert (rebuilt.is_control(i), rebuilt.is_byte(i)) == (original.is_control(i), original.is_byte(i))
    for text in (
        "Code 3 means the filter needs 6 minutes of rinsing.",
        "  two  spaces\nand é ü 🚀",
        "<start_of_turn>user",
    ):
        assert rebuilt.encode(text) == original.encode(text)


def test_a_byte_level_bpe_vocabulary_is_left_alone(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([b"a", b"b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not write_sentencepiece_model(tmp_path / "bpe.gguf", tmp_path / "tokenizer.model")
    assert not (tmp_path / "tokenizer.model").exists()


def test_the_converter_reads_a_staged_folder_with_the_added_tokens_typed(tmp_path):
    """transformers 5 saves no added_tokens_decoder; the converter gets it (and tokenizer.model) in a staged view."""
    import json

    from afina.export.gguf_convert import _stage_folder

    tokenizer = sentencepiece_tokenizer(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    assert "added_tokens_decoder" not in json.loads(before["tokenizer_config.json"])
    (tmp_path / "stage").mkdir()
    staged = _stage_folder(tmp_path / "merged", tmp_path / "stage", tmp_path / "base")
    decoder = json.loads((staged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    turn = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert decoder[str(turn)]["content"] == "<start_of_turn>"
    assert (staged / "tokenizer.model").read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before  # the folder is untouched
