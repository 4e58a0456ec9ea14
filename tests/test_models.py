from pathlib import Path

import pytest

from afina.models import DEFAULT_MODEL, ModelError, list_packaged_models, resolve_model
from afina.models.loader import PACKAGED_MODELS


def packaged_gguf() -> Path:
    return PACKAGED_MODELS[DEFAULT_MODEL].locate()


def test_default_model_is_listed_as_installed():
    rows = {row["name"]: row for row in list_packaged_models()}
    assert rows[DEFAULT_MODEL]["status"] == "installed"
    assert rows[DEFAULT_MODEL]["path"].endswith(".gguf")


def test_default_model_converts_once_then_loads_from_cache(tokenizer, monkeypatch):
    folder = Path(resolve_model(DEFAULT_MODEL))  # converted by the session's tokenizer fixture at the latest
    assert (folder / "model.safetensors").is_file() and (folder / "afina_source.json").is_file()

    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert Path(resolve_model(DEFAULT_MODEL)) == folder


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "nothing")):
        resolve_model(str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nothing.gguf"))


def test_truncated_gguf_is_reported(tmp_path):
    cut = tmp_path / "cut.gguf"
    with packaged_gguf().open("rb") as fh:
        cut.write_bytes(fh.read(5_000_000))
    with pytest.raises(ModelError) as err:
        resolve_model(str(cut))
    assert str(cut) in str(err.value) and ("truncated" in str(err.value) or "damaged" in str(err.value))


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(fake))


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "madeuparch")
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="madeuparch.*not supported"):
        resolve_model(str(path))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_bare_name_lists_packaged_models():
    with pytest.raises(ModelError, match=DEFAULT_MODEL):
        resolve_model("smollm3")
