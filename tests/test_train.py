import json

import pytest
import torch

from afina.data.format import encode_chat
from afina.device import autocast_factory
from afina.models import load_model
from afina.pipeline import prepare, train
from afina.rundir import RunDir, read_jsonl
from afina.train.batches import pad_batch
from afina.train.loss import accumulate_gradients, label_token_loss
from conftest import support_rows

FP32 = autocast_factory("fp32", torch.device("cpu"))


def encoded_examples(tokenizer, n=6):
    rows = support_rows(3, 2)[:n]
    # Different answer lengths, so micro-batches hold different label-token counts.
    rows[1]["messages"][-1]["content"] += " Please rinse it twice, slowly, with cold water only."
    return [encode_chat(tokenizer, r["messages"]) for r in rows]


def test_label_token_loss_matches_transformers_loss(tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir))
    batch = pad_batch(encoded_examples(tokenizer), tokenizer.pad_token_id)
    loss_sum, n = label_token_loss(model, **batch)
    reference = model(**batch).loss  # transformers' own shifted, masked mean cross-entropy
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / n, reference, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir))
    examples = encoded_examples(tokenizer)
    pad = tokenizer.pad_token_id

    def grads(groups):
        model.zero_grad()
        loss, _ = accumulate_gradients(model, [pad_batch(g, pad) for g in groups], FP32)
        return loss, [p.grad.clone() for p in model.parameters()]

    loss_one, one = grads([examples])
    loss_acc, acc = grads([examples[:1], examples[1:4], examples[4:]])
    assert loss_one == pytest.approx(loss_acc, rel=1e-5)
    for a, b in zip(one, acc):
        assert torch.allclose(a, b, atol=1e-6)


def test_lora_training_lowers_validation_loss_and_writes_the_run(tiny_recipe):
    recipe = tiny_recipe("training.max_steps=12", "training.log_every=2")
    prepare(recipe)
    summary = train(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    assert summary["steps"] == 12
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert (run.adapter / "adapter_config.json").is_file() and (run.adapter / "adapter_model.safetensors").is_file()
    assert summary["trainable_parameters"] < summary["total_parameters"]
    lines = [json.loads(l) for l in run.metrics.read_text().splitlines()]
    assert [l["step"] for l in lines if l["step"] % 2 == 0][:3] == [2, 4, 6]
    assert all({"loss", "lr", "tokens_per_s", "peak_memory_mb"} <= set(l) for l in lines)
    assert "val_loss" in lines[-1]
    assert run.read_manifest()["train"]["steps"] == 12


def test_full_fine_tuning_saves_a_plain_model(tiny_recipe):
    recipe = tiny_recipe("method.type=full", "training.max_steps=3", "training.learning_rate=0.001")
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert (RunDir(recipe.run_dir).model / "model.safetensors").is_file()
    reloaded = load_model(str(RunDir(recipe.run_dir).model))
    assert reloaded.config.num_hidden_layers == 2


def test_non_finite_loss_stops_with_a_message(tiny_recipe, tiny_model_dir, tokenizer, tmp_path):
    broken = tmp_path / "broken-model"
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    recipe = tiny_recipe(f"model.name={broken}")
    prepare(recipe)
    with pytest.raises(FloatingPointError, match="at step 1"):
        train(recipe, progress=False)
    assert not RunDir(recipe.run_dir).adapter.exists()  # nothing broken is saved as a result


def test_train_before_prepare_says_what_to_run(tiny_recipe):
    with pytest.raises(FileNotFoundError, match="afina prepare"):
        train(tiny_recipe(), progress=False)


def test_training_is_reproducible_with_a_seed(tiny_recipe):
    recipe = tiny_recipe("training.max_steps=3")
    prepare(recipe)
    first = train(recipe, progress=False)["final_train_loss"]
    assert train(recipe, progress=False)["final_train_loss"] == first
    assert read_jsonl(RunDir(recipe.run_dir).split_path("train"))


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tokenizer):
    from afina.train.batches import collate_packed, pack_examples

    model = load_model(str(tiny_model_dir))
    examples = encoded_examples(tokenizer)
    packs = pack_examples(examples, list(range(len(examples))), pack_length=200)
    assert len(packs) < len(examples)  # several examples share a row
    packed = collate_packed(examples, packs, tokenizer.pad_token_id)
    assert "attention_mask" not in packed
    loss_packed, n_packed = label_token_loss(model, **packed)
    loss_one_by_one = sum(label_token_loss(model, **pad_batch([e], tokenizer.pad_token_id))[0] for e in examples)
    n_one_by_one = sum(label_token_loss(model, **pad_batch([e], tokenizer.pad_token_id))[1] for e in examples)
    assert n_packed == n_one_by_one
    assert torch.allclose(loss_packed, loss_one_by_one, rtol=1e-5)


def test_chunked_loss_equals_whole_loss(tiny_model_dir, tokenizer, monkeypatch):
    import afina.train.loss as loss_module

    model = load_model(str(tiny_model_dir))
    batch = pad_batch(encoded_examples(tokenizer), tokenizer.pad_token_id)
    whole, n = label_token_loss(model, **batch)
    whole.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 7)  # force many chunks
    chunked, n_chunked = label_token_loss(model, **batch)
    chunked.backward()
    assert n == n_chunked and torch.allclose(whole, chunked, rtol=1e-5)
    for a, p in zip(grads, model.parameters()):
        assert float((a - p.grad).norm() / a.norm()) < 1e-5  # same gradient up to summation order
    with torch.no_grad():  # validation and scoring chunk too (the logits of every label never exist at once)
        scored, n_scored = label_token_loss(model, **batch)
    assert n_scored == n and float(scored) == pytest.approx(float(whole), rel=1e-5)


def test_packed_training_runs_and_learns(tiny_recipe):
    recipe = tiny_recipe(
        "training.packing=true", "training.pack_length=160", "training.batch_size=1", "training.max_steps=10"
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["packing"] and summary["val_loss_after"] < summary["val_loss_before"]


@pytest.mark.parametrize(
    "method",
    [
        ["method.rslora=true"],
        ["method.dora=true"],
        ["method.type=loha", "method.r=4"],
        ["method.type=lokr", "method.r=4"],
        ["method.type=ia3"],
        ["method.type=full", "method.freeze_layers=1", "method.freeze_embeddings=true", "training.learning_rate=0.001"],
    ],
)
def test_methods_train_the_right_weights(tiny_recipe, method):
    recipe = tiny_recipe(*method, "training.max_steps=2", "training.report_to=[]", "training.plots=false")
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]


def test_monitoring_writes_tensorboard_events_and_plot(tiny_recipe):
    recipe = tiny_recipe("training.max_steps=4", "training.eval_every=2")
    prepare(recipe)
    train(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    assert list((run.root / "tensorboard").glob("events.out.tfevents.*"))
    assert (run.root / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"
    vals = [json.loads(l) for l in run.metrics.read_text().splitlines() if "val_loss" in l]
    assert [v["step"] for v in vals] == [2, 4]


def test_early_stopping_keeps_the_best_weights(tiny_recipe):
    # A learning rate this high makes validation worse after the first evaluations.
    recipe = tiny_recipe(
        "training.max_steps=40",
        "training.eval_every=1",
        "training.early_stopping_patience=2",
        "training.learning_rate=0.5",
        "training.scheduler=constant",
        "training.warmup_ratio=0",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["stopped"].startswith("early stopping")
    assert summary["steps"] < 40
    assert summary["best_step"] <= summary["steps"] - 2
    # What `afina train` prints says the saved weights are the best step's, not the last step's loss.
    from afina.pipeline import best_kept

    said = best_kept(summary, load_best_at_end=True)
    assert said == f" (best {summary['best_val_loss']:.3f} at step {summary['best_step']}, those weights kept)"
    assert summary["best_val_loss"] < summary["val_loss_after"]
    assert best_kept(summary, load_best_at_end=False) == ""
    assert best_kept({**summary, "best_step": summary["steps"]}, load_best_at_end=True) == ""


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_qlora_trains_lora_over_a_4bit_base(tiny_recipe, weights):
    pytest.importorskip("bitsandbytes")
    recipe = tiny_recipe(
        "method.type=qlora",
        f"model.dtype={weights}",
        "training.max_steps=6",
        "training.precision=bf16",
        "training.report_to=[]",
        "training.plots=false",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    from safetensors.torch import load_file

    adapter = load_file(str(RunDir(recipe.run_dir).adapter / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)


def test_estimate_counts_parameters_memory_and_time(tiny_recipe):
    from afina.pipeline import estimate
    from afina.train.estimate import format_estimate

    recipe = tiny_recipe("training.max_steps=20")
    prepare(recipe)
    result = estimate(recipe, measure_steps=2)
    train_rows = read_jsonl(RunDir(recipe.run_dir).split_path("train"))
    assert result["train_examples"] == len(train_rows)
    assert result["total_steps"] == 20
    assert 0 < result["trainable_parameters"] < result["total_parameters"]
    assert result["fits"] and result["seconds_per_step"] > 0 and result["expected_seconds"] > 0
    assert result["memory_bytes"]["optimizer"] == 8 * result["trainable_parameters"]
    assert "trainable" in format_estimate(result)


def test_estimate_warns_when_the_run_will_not_fit(tiny_recipe):
    from afina.pipeline import estimate
    from afina.train.estimate import format_estimate

    recipe = tiny_recipe()
    prepare(recipe)
    result = estimate(recipe, available=1_000_000)
    assert not result["fits"] and "seconds_per_step" not in result
    assert "WARNING" in format_estimate(result) and "gradient_checkpointing" in result["warning"]


def test_compiled_packed_training_matches_eager(tiny_recipe):
    eager = tiny_recipe(
        "training.packing=true",
        "training.pack_length=128",
        "training.batch_size=1",
        "training.max_steps=3",
        "training.report_to=[]",
        "training.plots=false",
    )
    prepare(eager)
    expected = train(eager, progress=False)["final_train_loss"]
    compiled = tiny_recipe(
        "training.packing=true",
        "training.pack_length=128",
        "training.batch_size=1",
        "training.max_steps=3",
        "training.report_to=[]",
        "training.plots=false",
        "training.compile=true",
    )
    assert train(compiled, progress=False)["final_train_loss"] == pytest.approx(expected, rel=1e-3)


def test_gradient_checkpointing_gives_the_same_training(tiny_recipe):
    plain = tiny_recipe("training.max_steps=2", "training.report_to=[]", "training.plots=false")
    prepare(plain)
    expected = train(plain, progress=False)["final_train_loss"]
    checkpointed = tiny_recipe(
        "training.max_steps=2",
        "training.report_to=[]",
        "training.plots=false",
        "training.gradient_checkpointing=true",
    )
    assert train(checkpointed, progress=False)["final_train_loss"] == pytest.approx(expected, rel=1e-5)


def test_dora_and_rslora_change_what_trains(tiny_model_dir):
    """The flags reach peft: DoRA adds a trained magnitude per output feature of every adapted layer; rsLoRA
    scales the update by alpha/sqrt(r) instead of alpha/r (so a rank-16 adapter's update is 4x larger)."""
    from afina.config import MethodConfig
    from afina.train.methods import apply_method

    def build(**flags):
        method = MethodConfig(type="lora", r=16, alpha=32, **flags)
        return apply_method(load_model(str(tiny_model_dir)), method)

    plain, dora, rslora = build(), build(dora=True), build(rslora=True)

    def trainable(model):
        return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}

    def adapted(model):
        return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]

    magnitudes = {n: k for n, k in trainable(dora).items() if "lora_magnitude_vector" in n}
    assert magnitudes and not any("magnitude" in n for n in trainable(plain))
    assert sum(magnitudes.values()) == sum(m.out_features for m in adapted(dora))
    assert sum(trainable(dora).values()) == sum(trainable(plain).values()) + sum(magnitudes.values())
    assert {m.scaling["default"] for m in adapted(plain)} == {32 / 16}
    assert {m.scaling["default"] for m in adapted(rslora)} == {32 / 16**0.5}
    # The same input and adapter weights give a different output once B is non-zero.
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        for model in (plain, rslora):
            for module in adapted(model):
                torch.nn.init.constant_(module.lora_B["default"].weight, 0.01)
        assert not torch.allclose(plain(input_ids=ids).logits, rslora(input_ids=ids).logits)
