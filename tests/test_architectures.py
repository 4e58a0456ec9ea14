"""The architecture matrix: a tiny model of each family through prepare, train, eval, export and serve.

Each family has its real chat template (tests/fixtures/chat_templates). LoRA runs every stage: prepare
(with the template), train, eval, export (adapter, merged, GGUF F16 and Q4_K_M made by llama.cpp's
converter and quantizer and verified in llama.cpp and transformers, the Ollama Modelfile) and serve
(the run over HTTP). Full fine-tuning and QLoRA train and export the merged model. What a family
cannot do is asserted as the clear error a user gets.
"""

from __future__ import annotations

import httpx
import pytest

from afina.config import load_recipe
from afina.export.merge import export
from afina.pipeline import evaluate, prepare, run_stage, train
from afina.rundir import RunDir
from archs import ARCHS, build_tiny_model, family_tokenizer
from conftest import LLAMA_CPP_MISSING, support_rows, write_jsonl

# Families whose Ollama TEMPLATE cannot be cut from their chat template, and why (recorded, not written wrong).
NO_MODELFILE = {
    "mistral": "drops or rewrites message content",  # the system prompt joins the last user turn
    "gemma2": "ends roles differently",  # the system prompt joins the first user turn
    "gemma3_text": "ends roles differently",
}
# The test's borrowed vocabulary under transformers' Qwen2Tokenizer (which transformers 5 always uses for a qwen2
# folder) is a pre-tokenizer llama.cpp does not know; a real Qwen2 tokenizer it recognises ("qwen2").
CONVERTER_REFUSES = {"qwen2": "BPE pre-tokenizer was not recognized"}


@pytest.fixture(scope="module")
def arch_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny_model(arch, tokenizer, root / arch) for arch in ARCHS}


def _rows(arch: str) -> list[dict]:
    rows = support_rows(n_facts=4, per_fact=3)
    if arch == "mistral":  # Mistral's template puts the system prompt into the last user turn only
        rows = [{**row, "messages": row["messages"][1:]} for row in rows]
    return rows


def _recipe(tmp_path, model_dir, arch: str, *overrides: str):
    data = write_jsonl(tmp_path / "chats.jsonl", _rows(arch))
    return load_recipe(
        None,
        [
            f"name={arch}",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={model_dir}",
            f"data.path={data}",
            "training.batch_size=4",
            "training.max_steps=3",
            "training.learning_rate=0.01",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            "eval.max_new_tokens=6",
            "eval.max_examples=2",
            "eval.systems=[base,tuned]",
            "eval.forgetting.enabled=false",
            "eval.report=false",
            *overrides,
        ],
    )


TRANSFORMERS_READS = {"llama", "gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_through_every_stage(arch, arch_dirs, tmp_path):
    from afina.export.verify import ExportCheckError

    recipe = _recipe(
        tmp_path,
        arch_dirs[arch],
        arch,
        "export.formats=[adapter,merged,gguf,ollama]",
        "export.gguf_types=[f16,q4_k_m]",
        # transformers' second reading of each file costs about a minute per file with the 49k-token byte-level
        # vocabulary (parsed in Python three times): kept for one byte-level family and the SentencePiece ones.
        f"export.gguf_check_transformers={str(arch in TRANSFORMERS_READS).lower()}",
    )
    run_stage("prepare", recipe, echo=lambda _: None)  # as `afina prepare`: the manifest records the recipe
    summary = train(recipe, progress=False)
    assert summary["steps"] == 3
    report = evaluate(recipe, progress=False)
    assert set(report["systems"]) == {"base", "tuned"}
    if LLAMA_CPP_MISSING:  # every stage but GGUF still runs; the files are recorded as skipped, with the reason
        results = export(recipe)
        assert results["gguf_f16"]["skipped"] == LLAMA_CPP_MISSING and "skipped" in results["ollama"]
    elif arch in CONVERTER_REFUSES:
        with pytest.raises(ExportCheckError, match=CONVERTER_REFUSES[arch]):
            export(recipe)
        results = RunDir(recipe.run_dir).read_manifest()["export"]
        assert CONVERTER_REFUSES[arch] in results["gguf_f16"]["failed"]
    else:
        results = export(recipe)
        for outtype in ("f16", "q4_k_m"):
            check = results[f"gguf_{outtype}"]
            assert check["ok"], check
            assert check["llama_cpp"]["tokenization_equal"] and check["chat_template_equal"]
            if arch in TRANSFORMERS_READS:  # checked, or skipped where transformers lacks the arch
                assert check["transformers"].get("ok", True)
            else:
                assert "transformers" not in check
        assert results["gguf_f16"]["llama_cpp"]["kl_mean"] < 1e-3
        ollama = results["ollama"]
        if arch in NO_MODELFILE:
            assert NO_MODELFILE[arch] in ollama["skipped"]
        else:
            assert ollama["ok"] and ollama["template_matches_chat_template"]
    assert results["adapter"]["ok"] and results["merged"]["ok"]  # kept whatever happened to the GGUF files
    _serve_and_chat(recipe)
    if LLAMA_CPP_MISSING:
        pytest.skip(f"prepare, train, eval, adapter, merged and serve passed; GGUF not checked: {LLAMA_CPP_MISSING}")


def _serve_and_chat(recipe) -> None:
    from afina.serve.app import create_app
    from afina.serve.models import load_served
    from serving import running_server

    with running_server(create_app(load_served(str(recipe.run_dir)))) as base:
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            timeout=60,
            json={
                "model": recipe.name,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "What does code 1 mean?"}],
            },
        ).json()
    assert reply["object"] == "chat.completion" and isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_template_is_cut_into_modelfile_pieces_or_refused_with_its_reason(arch, tokenizer, tmp_path):
    """The Modelfile TEMPLATE's pieces (no GGUF file or llama.cpp needed) rebuild the family's own prompts."""
    from afina.export.gguf_file import ExportError
    from afina.export.ollama import _render, template_pieces

    family = family_tokenizer(tokenizer, arch, tmp_path)
    if arch in NO_MODELFILE:
        with pytest.raises(ExportError, match=NO_MODELFILE[arch]):
            template_pieces(family)
        return
    pieces = template_pieces(family)
    chats = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    for chat in chats:
        assert pieces.render(chat) == _render(family, chat, True)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_finetune_and_merged_export(arch, arch_dirs, tmp_path):
    recipe = _recipe(
        tmp_path, arch_dirs[arch], arch, "method.type=full", "export.formats=[merged]", "training.learning_rate=0.001"
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["steps"] == 3
    assert export(recipe)["merged"]["ok"]


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_trains_over_the_4bit_base(arch, arch_dirs, tmp_path, weights):
    """Both weight dtypes `auto` may pick (bfloat16 on a CPU with AVX512-BF16, float32 elsewhere), each run
    with a validation pass between its steps (where bitsandbytes' CPU inference packing once broke it)."""
    pytest.importorskip("bitsandbytes")
    recipe = _recipe(
        tmp_path,
        arch_dirs[arch],
        arch,
        "method.type=qlora",
        f"model.dtype={weights}",
        "training.precision=bf16",
        "training.max_steps=2",
        "training.eval_every=1",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["steps"] == 2
    from safetensors.torch import load_file

    adapter = load_file(str(RunDir(recipe.run_dir).adapter / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)


@pytest.mark.parametrize("arch", ARCHS)
def test_label_scores_share_the_prompt_and_match_whole_sequence_scoring(arch, arch_dirs):
    """Generative classification runs each prompt once and its labels from the cached keys and values: under
    every family's template and attention (Gemma's sliding windows included: one prompt is longer than the
    window), each label's score equals the whole prompt + label sequence scored on its own."""
    import torch

    from afina.device import autocast_factory
    from afina.models import load_model, load_tokenizer
    from afina.tasks import classification
    from afina.train.loss import label_logprobs, split_at_answer

    fp32 = autocast_factory("fp32", torch.device("cpu"))
    recipe = load_recipe(None, ["task=classification"])
    model, tokenizer = load_model(str(arch_dirs[arch])), load_tokenizer(str(arch_dirs[arch]))
    rows = [{"text": "short one"}, {"text": " ".join(f"word{i} and more" for i in range(30))}, {"text": "mid text"}]
    labels = ["bad", "good", "not sure at all"]
    encoded = classification.label_groups(tokenizer, rows, labels, recipe)
    for per_row in encoded:  # the shared-prompt path is the one under test
        assert len({tuple(split_at_answer(e)[0]) for e in per_row}) == 1
    assert len(encoded[1][0]["input_ids"]) > 64  # longer than the tiny Gemmas' sliding window
    scored = classification.score_rows(model, tokenizer, rows, labels, recipe, fp32, batch_size=3)
    whole = label_logprobs(model, [e for per_row in encoded for e in per_row], tokenizer.pad_token_id, 9, fp32)
    for i, result in enumerate(scored):
        for j, label in enumerate(labels):
            assert result["label_logprobs"][label] == pytest.approx(whole[i * len(labels) + j], abs=2e-3)
