"""Context-window extension on the tiny Llama: rope scaling options, saved settings, long-context eval."""

import json
import random

import pytest
import torch

from afina.config import RecipeError, load_recipe
from afina.models.rope import apply_rope_settings, context_length, read_rope_settings, rope_settings
from conftest import needs_llama_cpp


def _tiny_config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir)


def _context(kind, **values):
    return load_recipe(None, [f"context.rope_scaling={kind}", *[f"context.{k}={v}" for k, v in values.items()]]).context


def _rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


def _cos(rotary, length):
    x = torch.zeros(1, length, 8)
    cos, _ = rotary(x, torch.arange(length)[None])
    return cos[0]


def test_recipe_needs_exactly_one_of_factor_or_target():
    with pytest.raises(RecipeError, match="exactly one of context.factor or context.target_length"):
        load_recipe(None, ["context.rope_scaling=linear"])
    with pytest.raises(RecipeError, match="exactly one"):
        load_recipe(None, ["context.rope_scaling=yarn", "context.factor=2", "context.target_length=1024"])
    with pytest.raises(RecipeError, match="context.rope_scaling"):
        load_recipe(None, ["context.rope_scaling=ntk", "context.factor=2"])


def test_linear_scaling_divides_the_rotary_frequencies(tiny_model_dir):
    base = _tiny_config(tiny_model_dir)
    settings = rope_settings(_context("linear", target_length=2048), base)
    assert settings["factor"] == 4.0 and settings["original_length"] == 512 and settings["target_length"] == 2048
    scaled = apply_rope_settings(_tiny_config(tiny_model_dir), settings)
    assert scaled.max_position_embeddings == 2048 and context_length(scaled) == 2048
    torch.testing.assert_close(_rotary(scaled).inv_freq, _rotary(base).inv_freq / 4)
    # Position 4p under linear x4 is rotated like position p without scaling.
    torch.testing.assert_close(_cos(_rotary(scaled), 400)[::4], _cos(_rotary(base), 100))


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones(tiny_model_dir):
    base = _tiny_config(tiny_model_dir)
    settings = rope_settings(_context("yarn", factor=4), base)
    scaled = apply_rope_settings(_tiny_config(tiny_model_dir), settings)
    assert scaled.rope_parameters["original_max_position_embeddings"] == 512 and scaled.max_position_embeddings == 2048
    ratio = _rotary(scaled).inv_freq / _rotary(base).inv_freq
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(0.25, rel=1e-3)
    assert _rotary(scaled).attention_scaling > 1.0  # YaRN's attention temperature


def test_dynamic_ntk_leaves_short_inputs_alone_and_rescales_long_ones(tiny_model_dir):
    base = _tiny_config(tiny_model_dir)
    settings = rope_settings(_context("dynamic", factor=2), base)
    scaled = apply_rope_settings(_tiny_config(tiny_model_dir), settings)
    # transformers reads the original window from max_position_embeddings; afina keeps the extended one apart.
    assert scaled.max_position_embeddings == 512 and context_length(scaled) == 1024
    torch.testing.assert_close(_cos(_rotary(scaled), 300), _cos(_rotary(base), 300))
    long_scaled, long_base = _cos(_rotary(scaled), 900), _cos(_rotary(base), 900)
    assert not torch.allclose(long_scaled[600:], long_base[600:], atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_scaled_model_config_round_trips_through_save(tiny_model_dir, tmp_path, kind):
    from afina.models import load_model

    settings = rope_settings(_context(kind, factor=2), _tiny_config(tiny_model_dir))
    model = load_model(str(tiny_model_dir), rope=settings)
    model.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert reloaded.config.rope_parameters["rope_type"] == kind
    assert context_length(reloaded.config) == 1024
    ids = torch.randint(0, 100, (1, 700))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_passkey_case_puts_the_key_where_it_says(tokenizer):
    from afina.eval.haystack import Haystack
    from afina.eval.long_context import INSTRUCTION, QUESTION, passkey_case

    haystack = Haystack(tokenizer, seed=1)
    rng = random.Random(0)
    for length, depth in [(200, 0.0), (300, 0.5), (400, 0.9), (400, 1.0)]:
        case = passkey_case(tokenizer, haystack, length, depth, rng)
        assert len(case.input_ids) == length
        needle = tokenizer.decode(case.input_ids[case.needle_start : case.needle_start + case.needle_length])
        assert needle.strip() == f"The pass key is {case.key}. Remember it. {case.key} is the pass key."
        assert tokenizer.decode(case.input_ids[-case.answer_length :]).strip() == case.key
        prefix = 1 + len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
        question = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
        filler = length - prefix - case.needle_length - question - case.answer_length
        assert case.needle_start - prefix == round(depth * filler)


def test_retrieval_rows_hide_facts_and_train_only_the_answer(tokenizer):
    import re

    from afina.train.retrieval import retrieval_count, retrieval_examples

    texts = ["The river runs past the mill and the old school. " * 3, "Markets open early on Fridays in the square."]
    rows = retrieval_examples(tokenizer, texts, count=40, row_length=300, min_fraction=0.5, facts=3, seed=7)
    assert len(rows) == 40 and retrieval_examples(tokenizer, texts, 40, 300, 0.5, 3, seed=7) == rows
    lengths, fact_counts = set(), set()
    for row in rows:
        n = len(row["input_ids"])
        assert 150 <= n <= 300 and len(row["labels"]) == n
        lengths.add(n)
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        answer = tokenizer.decode(trained).strip()
        assert answer.isdigit() and 3 <= len(answer) <= 7
        assert row["labels"][-len(trained) :] == trained  # only the final answer tokens carry labels
        text = tokenizer.decode(row["input_ids"][: -len(trained)])
        keys = re.findall(r"\b\d{3,7}\b", text)
        assert answer in keys  # the asked fact is in the text, among 1..3 facts (the others are distractors)
        fact_counts.add(len(set(keys)))
        assert "pass key" not in text  # the passkey test's wording stays unseen in training
    assert len(lengths) > 10 and fact_counts == {1, 2, 3}
    short = retrieval_examples(tokenizer, texts, count=30, row_length=60, min_fraction=0.5, facts=3, seed=1)
    assert all(30 <= len(row["input_ids"]) <= 60 for row in short)  # short rows drop distractors to fit
    with pytest.raises(ValueError, match="cannot hold a fact"):
        retrieval_examples(tokenizer, texts, count=5, row_length=8, min_fraction=1.0, facts=1, seed=1)
    examples = [{"input_ids": [1] * 500}] * 4  # 2,000 tokens = 2 packed rows of 1,000
    assert retrieval_count(0.5, examples, 1000) == 2 and retrieval_count(0.2, examples, None) == 1
    assert retrieval_count(0.0, examples, 1000) == 0


def test_retrieval_rows_need_a_generative_task():
    with pytest.raises(RecipeError, match="context.retrieval"):
        load_recipe(None, ["task=classification", "context.retrieval.fraction=0.2"])


def test_generated_haystack_is_varied_prose(tokenizer):
    from afina.eval.haystack import generated_sentences

    sentences = generated_sentences(500, seed=3)
    assert len(set(sentences)) > 450 and generated_sentences(500, seed=3) == sentences


def test_estimate_grows_with_sequence_length(tiny_model_dir):
    from afina.train.estimate import activation_bytes, attention_flops_share

    config = _tiny_config(tiny_model_dir)
    short, long = (activation_bytes(config, n, n, checkpointing=True) for n in (512, 2048))
    assert long > 3 * short - activation_bytes(config, 0, 2048, True)  # linear in tokens beyond the loss chunk
    eager = [
        activation_bytes(config, n, n, False, attention="eager") - activation_bytes(config, n, n, False)
        for n in (512, 2048)
    ]
    assert eager[1] == 16 * eager[0]  # eager attention scores grow with the square of the length
    assert attention_flops_share(config, 8192) > attention_flops_share(config, 512)


def test_continuous_packing_keeps_positions_running(tokenizer):
    from afina.train.batches import collate

    examples = [{"input_ids": [5] * 10, "labels": [5] * 10}, {"input_ids": [6] * 7, "labels": [6] * 7}]
    batch = collate(examples, [[0, 1]], pad_id=0, pack_length=20, continuous=True)
    assert batch["position_ids"][0].tolist() == list(range(20))
    assert batch["labels"][0, 10].item() == 6 and (batch["labels"][0, 17:] == -100).all()


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory, tiny_model_dir):
    """Train the tiny model on long text rows with yarn x2 (continuous packing), then the long-context eval."""
    from afina.eval.haystack import generated_sentences
    from afina.eval.long_context import evaluate_long_context
    from afina.pipeline import prepare, train
    from conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("context")
    sentences = generated_sentences(600, seed=5)
    docs = [{"text": " ".join(sentences[i : i + 12])} for i in range(0, 600, 12)]
    data = write_jsonl(tmp / "docs.jsonl", docs)
    recipe = load_recipe(
        None,
        [
            "name=ctx",
            f"output_dir={tmp / 'runs'}",
            f"model.name={tiny_model_dir}",
            f"data.path={data}",
            "data.max_length=1024",
            "data.dedup.near=false",
            "training.max_steps=2",
            "training.batch_size=1",
            "training.packing=true",
            "training.precision=fp32",
            "training.gradient_checkpointing=true",
            "context.rope_scaling=yarn",
            "context.factor=2",
            "context.retrieval.fraction=0.3",
            "context.eval.lengths=[96,200]",
            "context.eval.depths=[0.2,0.8]",
            "context.eval.trials=1",
            "context.eval.max_sequences=1",
            "export.formats=[merged,gguf]",
            "export.gguf_types=[f16]",
        ],
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    result = evaluate_long_context(recipe, echo=lambda _: None)
    return recipe, summary, result


def test_training_saves_rope_settings_and_trains_at_the_target_length(extended_run):
    recipe, summary, _ = extended_run
    assert summary["pack_length"] == 1024 and summary["rope_scaling"]["target_length"] == 1024
    # fraction 0.3 of the rows: 3 retrieval rows for every 7 packed rows of text
    text_rows = summary["train_examples"] - summary["retrieval_rows"]
    assert summary["retrieval_rows"] >= 1 and text_rows > summary["retrieval_rows"]
    saved = read_rope_settings(recipe.run_dir / "adapter")
    assert saved == summary["rope_scaling"] and saved["rope_type"] == "yarn"


def test_eval_loads_the_adapter_with_its_rope_scaling(extended_run):
    from afina.models import load_trained

    recipe, _, _ = extended_run
    tuned = load_trained(recipe.run_dir, recipe.model.name, torch.device("cpu"))
    assert tuned.get_base_model().config.rope_parameters["rope_type"] == "yarn"
    assert context_length(tuned.get_base_model().config) == 1024


def test_long_context_eval_writes_results_and_heat_map(extended_run):
    recipe, _, result = extended_run
    assert set(result["systems"]) == {"base", "base_scaled", "tuned"}
    cells = result["systems"]["tuned"]["passkey"]["cells"]
    assert {(c["length"], c["depth"]) for c in cells} == {(96, 0.2), (96, 0.8), (200, 0.2), (200, 0.8)}
    buckets = result["systems"]["base"]["perplexity"]["buckets"]
    assert [(b["from"], b["to"]) for b in buckets] == [(0, 200)] and buckets[0]["tokens"] == 199
    saved = json.loads((recipe.run_dir / "eval" / "long_context.json").read_text())
    assert saved["rope_scaling"]["rope_type"] == "yarn"
    page = (recipe.run_dir / "eval" / "long_context.html").read_text()
    assert '<img class="plot"' in page and "passkey" in page.lower()


@needs_llama_cpp
def test_export_keeps_rope_scaling_in_merged_and_gguf(extended_run):
    from gguf import GGUFReader

    from afina.export.merge import export

    recipe, _, _ = extended_run
    results = export(recipe)
    merged = json.loads((recipe.run_dir / "export" / "merged" / "config.json").read_text())
    assert merged["rope_parameters"]["rope_type"] == "yarn" and merged["max_position_embeddings"] == 1024
    assert results["merged"]["ok"] and results["gguf_f16"]["ok"], results
    fields = GGUFReader(results["gguf_f16"]["path"]).fields
    assert fields["llama.rope.scaling.type"].contents() == "yarn"
    assert fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    assert fields["llama.rope.scaling.original_context_length"].contents() == 512
    assert fields["llama.context_length"].contents() == 1024


def test_serve_loads_the_run_with_its_extended_window(extended_run):
    from afina.serve.models import load_served

    recipe, _, _ = extended_run
    served = load_served(recipe.model.name, {"ctx": str(recipe.run_dir / "adapter")})
    assert served.max_context == 1024
    assert served.model.get_base_model().config.rope_parameters["rope_type"] == "yarn"


def test_afina_estimate_models_the_longer_rows(extended_run):
    from afina.pipeline import estimate
    from afina.train.estimate import format_estimate

    recipe, _, _ = extended_run
    longer = recipe.model_copy(deep=True)
    longer.training.pack_length = 2048
    short_result, long_result = estimate(recipe, measure_steps=1), estimate(longer, measure_steps=1)
    assert short_result["sequence_length"] == 1024 and long_result["sequence_length"] == 2048
    assert long_result["memory_bytes"]["activations"] > short_result["memory_bytes"]["activations"]
    assert long_result["attention_flops_share"] > short_result["attention_flops_share"]
    assert "rope scaling yarn x2 (512 -> 1024 tokens)" in format_estimate(short_result)
