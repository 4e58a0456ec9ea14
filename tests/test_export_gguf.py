"""GGUF export with llama.cpp's converter and quantizer, verified in llama.cpp and transformers; Ollama Modelfiles."""

from pathlib import Path

import pytest
import yaml
from gguf import GGUFReader

from afina.export.merge import export
from afina.export.ollama import template_pieces
from afina.pipeline import prepare, train
from afina.rundir import RunDir
from conftest import needs_llama_cpp

pytestmark = needs_llama_cpp
TYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    from afina.config import load_recipe
    from conftest import support_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("gguf-export")
    data = write_jsonl(tmp / "support.jsonl", support_rows())
    recipe = load_recipe(
        None,
        [
            "name=tiny",
            f"output_dir={tmp / 'runs'}",
            f"model.name={tiny_model_dir}",
            f"data.path={data}",
            "training.batch_size=4",
            "training.max_steps=4",
            "training.learning_rate=0.01",
            "training.precision=fp32",
            "export.formats=[gguf,gguf_adapter,ollama]",
            f"export.gguf_types=[{','.join(TYPES)}]",
        ],
    )
    prepare(recipe)
    train(recipe, progress=False)
    return recipe, export(recipe)


def test_every_type_is_verified_in_llama_cpp_and_transformers(exported):
    recipe, results = exported
    for outtype in TYPES:
        check = results[f"gguf_{outtype}"]
        assert check["ok"], check
        for runtime in ("llama_cpp", "transformers"):
            measured = check[runtime]
            assert measured["ok"] and measured["tokenization_equal"], (outtype, runtime, measured)
            assert measured["kl_mean"] <= measured["max_kl"] and measured["positions"] > 3
        assert check["chat_template_equal"] and check["eos_token_id_equal"] and check["rope_scaling_equal"]
    # F16 is what the trained model computes, to rounding: the same greedy text in llama.cpp.
    assert results["gguf_f16"]["llama_cpp"]["greedy_text_equal"] and results["gguf_f16"]["llama_cpp"]["kl_mean"] < 1e-3
    manifest = RunDir(recipe.run_dir).read_manifest()["export"]
    assert set(manifest) == {*(f"gguf_{t}" for t in TYPES), "gguf_adapter", "ollama"}
    assert all(manifest[f"gguf_{t}"]["ok"] for t in TYPES)


def test_files_carry_tokenizer_template_and_quantized_weights(exported, tokenizer):
    _, results = exported
    reader = GGUFReader(results["gguf_q8_0"]["path"])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert results["gguf_f16"]["tensor_types"]["F16"] > 0 and not results["gguf_f16"]["fallbacks"]


def test_k_quant_fallbacks_are_recorded_with_their_reason(exported):
    _, results = exported
    check = results["gguf_q4_k_m"]
    # The tiny model's rows are 64 wide: no tensor can take a 256-wide K-quant block; llama.cpp falls back.
    assert check["fallbacks"], check["tensor_types"]
    fallback = check["fallbacks"][0]
    assert fallback["reason"] == f"row length {fallback['shape'][0]} is not a multiple of 256"
    assert sum(check["fallback_summary"].values()) == len(check["fallbacks"])
    stored = {t.name: t.tensor_type.name for t in GGUFReader(check["path"]).tensors}
    assert all(stored[f["tensor"]] == f["type"] for f in check["fallbacks"])
    assert check["size_mb"] < results["gguf_q8_0"]["size_mb"] < results["gguf_f16"]["size_mb"]


def test_lora_adapter_as_gguf_runs_over_the_base_in_llama_cpp(exported):
    _, results = exported
    adapter = results["gguf_adapter"]
    assert adapter["ok"] and adapter["llama_cpp"]["tokenization_equal"], adapter
    assert GGUFReader(adapter["path"]).fields["general.type"].contents() == "adapter"
    modelfile = Path(results["ollama"]["adapter_modelfile"]["path"]).read_text()
    assert "FROM ./tiny-base-f16.gguf\nADAPTER ./tiny-lora-f16.gguf\n" in modelfile


def test_modelfile_uses_the_smallest_verified_file_and_chatml(exported, tokenizer):
    _, results = exported
    text = Path(results["ollama"]["path"]).read_text()
    assert text.startswith("FROM ./tiny-q4_k_m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert '{{ if eq .Role "system" }}<|im_start|>system\n' in text
    assert text.count("TEMPLATE") == 1 and "SYSTEM" in text  # SmolLM2's template adds a default system turn
    pieces = template_pieces(tokenizer)
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
    ]
    assert pieces.render(chat) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_a_failed_check_names_file_measure_and_threshold_and_keeps_the_rest(exported, tmp_path, capsys):
    from afina.cli import main

    recipe, _ = exported
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True)))
    # A threshold no quantized file meets: the q4_k_m file fails its check.
    code = main(
        [
            "export",
            str(recipe_file),
            "export.formats=[gguf]",
            "export.gguf_types=[f16,q4_k_m]",
            "export.gguf_max_kl.q4_k_m=1e-12",
            "export.gguf_check_transformers=false",  # llama.cpp's check decides; the second reader is tested above
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "gguf_q4_k_m" in err and "tiny-q4_k_m.gguf" in err and "kl_mean" in err and "max_kl 1e-12" in err
    assert "gguf_f16" not in err
    gguf_dir = RunDir(recipe.run_dir).export / "gguf"
    assert (gguf_dir / "tiny-f16.gguf").is_file() and not (gguf_dir / "tiny-q4_k_m.gguf").exists()
    manifest = RunDir(recipe.run_dir).read_manifest()["export"]
    assert manifest["gguf_f16"]["ok"] and manifest["gguf_q4_k_m"]["ok"] is False and manifest["gguf_q4_k_m"]["removed"]
