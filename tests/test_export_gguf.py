"""GGUF and Ollama exports: written with the gguf package, read back by transformers, compared."""

import importlib.util

import pytest
from gguf import GGUFReader

from afina.export.merge import export
from afina.export.ollama import template_pieces
from afina.pipeline import prepare, train
from afina.rundir import RunDir


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
            "export.formats=[gguf,ollama]",
        ],
    )
    prepare(recipe)
    train(recipe, progress=False)
    return recipe, export(recipe)


def test_gguf_files_reload_in_transformers_and_match(exported):
    recipe, results = exported
    for outtype in ("f16", "q8_0"):
        check = results[f"gguf_{outtype}"]
        assert check["ok"], check
        assert check["tokenization_equal"] and check["chat_template_equal"]
        assert (
            check["max_logit_diff"] <= check["logit_tolerance"] and check["greedy_margin"] <= check["logit_tolerance"]
        )
    assert results["gguf_f16"]["greedy_text_equal"]
    manifest = RunDir(recipe.run_dir).read_manifest()["export"]
    assert manifest["gguf_q8_0"]["ok"] and manifest["gguf_f16"]["ok"] and manifest["ollama"]["ok"]
    assert set(manifest) == {"gguf_f16", "gguf_q8_0", "ollama"}


def test_gguf_file_carries_tokenizer_template_and_quantized_weights(exported, tokenizer):
    _, results = exported
    reader = GGUFReader(results["gguf_q8_0"]["path"])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama" and fields["general.name"].contents() == "tiny"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    f16 = {t.name: t.tensor_type.name for t in GGUFReader(results["gguf_f16"]["path"]).tensors}
    assert f16["blk.0.ffn_down.weight"] == "F16"


def test_modelfile_has_chatml_template_and_stop_tokens(exported, tokenizer):
    _, results = exported
    text = open(results["ollama"]["path"]).read()
    assert text.startswith("FROM ./tiny-q8_0.gguf\n")
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


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_gguf_file_like_transformers(exported, tokenizer):
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    _, results = exported
    path = results["gguf_f16"]["path"]
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does code 2 mean?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # same tokenizer inside the file
    llm.eval(ids)
    cpp_logits = np.array(llm.scores[len(ids) - 1])
    folder, name = path.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(cpp_logits - hf_logits).max() <= results["gguf_f16"]["logit_tolerance"]
