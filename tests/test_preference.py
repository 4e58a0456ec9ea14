"""Preference tuning: the losses against hand-computed values, the data shapes, and runs of the loop."""

import json
import math
from pathlib import Path

import pytest
import torch

from afina.config import RecipeError, load_recipe
from afina.data.format import IGNORE_INDEX, encode_answer
from afina.data.schema import RowError, guess_schema, to_canonical
from afina.device import autocast_factory
from afina.export.merge import export
from afina.models import load_model
from afina.pipeline import evaluate, prepare, train
from afina.rundir import RunDir, read_jsonl
from afina.train.loss import accumulate_gradients, label_logprobs
from afina.train.preference_loss import (
    PreferenceLoss,
    SequenceLogps,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)
from conftest import write_jsonl

FP32 = autocast_factory("fp32", torch.device("cpu"))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
T = torch.tensor


# ---- the losses, against values worked out by hand -----------------------------------------------


def test_dpo_loss_by_hand():
    # policy chosen -10, rejected -12; reference both -11: log-ratios +1 and -1, h = 2;
    # beta 0.1: -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598138869...
    loss = dpo_loss(T([-10.0]) - T([-11.0]), T([-12.0]) - T([-11.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.5981388693815918, abs=1e-6)
    # equal margins give log 2, whatever beta
    assert dpo_loss(T([0.3]), T([0.3]), beta=5.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ipo_loss_by_hand():
    # h = 2; beta 0.1: (2 - 1/0.2)^2 = (2 - 5)^2 = 9; beta 0.5: (2 - 1)^2 = 1
    assert ipo_loss(T([1.0]), T([-1.0]), beta=0.1).item() == pytest.approx(9.0)
    assert ipo_loss(T([1.0]), T([-1.0]), beta=0.5).item() == pytest.approx(1.0)


def test_simpo_loss_by_hand():
    # mean log-probs -1.0 and -1.5, beta 2, gamma 0.5: -log sigmoid(2 * 0.5 - 0.5) = log(1 + e^-0.5)
    assert simpo_loss(T([-1.0]), T([-1.5]), beta=2.0, gamma=0.5).item() == pytest.approx(0.4740769841801067, abs=1e-6)


def test_orpo_loss_by_hand():
    # mean log-probs -0.5 and -1.0: log odds = m - log(1 - e^m) = 0.43275 and -0.54133, difference 0.97408;
    # L = SFT (0.5) + 0.1 * log(1 + e^-0.97408) = 0.5 + 0.1 * 0.32030 = 0.53203
    assert orpo_loss(T([-0.5]), T([-1.0]), lam=0.1).item() == pytest.approx(0.5320299785237537, abs=1e-6)


def test_kto_loss_by_hand():
    # r = 0.5, KL 0.2, beta 0.1: desirable 1 - sigmoid(0.1 * 0.3) = 0.49250; undesirable 1 - sigmoid(-0.03) = 0.50750
    losses = kto_loss(T([0.5, 0.5]), T([1, 0]), T(0.2), beta=0.1)
    assert losses.tolist() == pytest.approx([0.4925005624493797, 0.5074994375506203], abs=1e-6)
    # a negative KL estimate is clipped to 0; weights scale each side: undesirable r=-0.4, weight 2:
    # 2 * (1 - sigmoid(0.1 * (0 + 0.4))) = 0.98000
    losses = kto_loss(T([-0.4, -0.4]), T([1, 0]), T(-3.0), beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([0.5099986668799654, 0.9800026662400689], abs=1e-6)


def test_kto_reference_point_carries_no_gradient():
    kl, logratio = torch.tensor(0.3, requires_grad=True), torch.tensor([0.1], requires_grad=True)
    kto_loss(logratio, T([1]), kl, beta=0.1).sum().backward()
    assert kl.grad is None and logratio.grad is not None and logratio.grad.item() < 0


def test_dpo_matches_trl_on_the_same_batch(tiny_model_dir, tmp_path):
    """TRL's DPOTrainer and afina's DPO give the same loss on the same token ids, policy and reference."""
    pytest.importorskip("trl", reason="TRL is not installed (used only for this comparison, not a dependency)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy, reference = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    torch.manual_seed(1)
    with torch.no_grad():  # a reference unlike the policy, so the log-ratios are not all zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = [
        {
            "prompt": [{"role": "user", "content": "What does code 3 mean?"}],
            "chosen": [{"role": "assistant", "content": "Rinse for 6 minutes."}],
            "rejected": [{"role": "assistant", "content": "No idea."}],
        },
        {
            "prompt": [{"role": "user", "content": "Warranty?"}],
            "chosen": [{"role": "assistant", "content": "Two years on parts and labour."}],
            "rejected": [{"role": "assistant", "content": "One."}],
        },
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))  # [chosen; rejected] rows, completion_mask on the answers
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, batch, False)
        ours_policy = sequence_logps(policy, batch["input_ids"], labels, batch["attention_mask"]).total
        ours_reference = sequence_logps(reference, batch["input_ids"], labels, batch["attention_mask"]).total
    ratio = ours_policy - ours_reference
    ours = dpo_loss(ratio[:2], ratio[2:], beta=0.1).mean()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


# ---- log-probabilities of answers ------------------------------------------------------------------


PROMPT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does code 3 mean?"},
    {"role": "assistant", "content": "Which device?"},
    {"role": "user", "content": "The kettle."},
]


def test_encode_answer_labels_only_the_last_answer(tokenizer):
    example = encode_answer(tokenizer, PROMPT, "Descale it.")
    labelled = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )
    assert labelled.startswith("Descale it.") and "Which device" not in labelled
    assert all(label == IGNORE_INDEX for label in example["labels"][: example["prompt_tokens"]])
    assert example["labels"][example["prompt_tokens"]] != IGNORE_INDEX


def test_sequence_logps_equal_the_scoring_used_by_evaluation(tiny_model_dir, tokenizer):
    from afina.train.batches import pad_batch

    model = load_model(str(tiny_model_dir))
    examples = [
        encode_answer(tokenizer, PROMPT, answer) for answer in ("Descale it.", "Rinse it twice with cold water.")
    ]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    theirs = label_logprobs(model, examples, tokenizer.pad_token_id, 2, FP32)
    assert ours.total.tolist() == pytest.approx(theirs, abs=1e-4)
    assert ours.tokens.tolist() == [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
    # Evaluation runs the pair's prompt once; both answers read its cached keys and values: the same numbers.
    from afina.tasks.preference import pair_scores

    row = {"prompt": PROMPT, "chosen": "Descale it.", "rejected": "Rinse it twice with cold water."}
    chosen, rejected = pair_scores(model, tokenizer, [row, row], 2, FP32)
    assert chosen.total.tolist() == pytest.approx([ours.total[0].item()] * 2, abs=1e-4)
    assert rejected.total.tolist() == pytest.approx([ours.total[1].item()] * 2, abs=1e-4)
    assert [chosen.tokens[0].item(), rejected.tokens[0].item()] == ours.tokens.tolist()


UNITS = ("hours", "days", "weeks", "seconds")


def pairs(n_facts=6, per_fact=3):
    """Synthetic preference pairs: minutes of rinsing are preferred over another unit of time."""
    rows = []
    for f in range(n_facts):
        for q in range(per_fact):
            rows.append(
                {
                    "prompt": f"Question variant {q}: what does code {f} mean?",
                    "chosen": f"Code {f} means the filter needs {f + 3} minutes of rinsing.",
                    "rejected": f"Code {f} means the filter needs {f + 3} {UNITS[(f + q) % 4]} of rinsing.",
                }
            )
    return rows


def test_pair_loss_accumulates_like_one_big_batch(tiny_model_dir, tokenizer):
    """DPO over micro-batches of 1 and 3 pairs gives the gradient of the 4 pairs at once (normalised by pairs)."""
    from afina.config import MethodConfig
    from afina.tasks.preference import collate_pairs, encode_pairs, make_loss_fn
    from afina.train.methods import apply_method

    rows = [to_canonical(r, "preference", {}, None) for r in pairs(2, 2)]
    examples = encode_pairs(tokenizer, rows)
    loss_fn = make_loss_fn(PreferenceLoss("dpo", beta=0.5))
    count = lambda batches: sum(len(b["input_ids"]) // 2 for b in batches)  # noqa: E731
    grads = []
    for split in ([[0, 1, 2, 3]], [[0], [1, 2, 3]]):
        torch.manual_seed(0)
        model = apply_method(load_model(str(tiny_model_dir)), MethodConfig(r=4, alpha=8))
        for name, p in model.named_parameters():  # a LoRA B away from zero, so the policy differs from the reference
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        batches = [collate_pairs(examples, [[i] for i in part], tokenizer.pad_token_id) for part in split]
        loss, n = accumulate_gradients(model, batches, FP32, loss_fn=loss_fn, count_fn=count)
        assert n == 4
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- data ------------------------------------------------------------------------------------------


def test_hh_transcripts_become_a_shared_prompt_and_two_answers():
    dialogue = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out.\n\nAssistant: "
    row = {"chosen": dialogue + "Call a locksmith.", "rejected": dialogue + "Use a hairpin."}
    assert guess_schema(row, {}, among=("preference", "kto"))[0] == "preference"
    pair = to_canonical(row, "preference", {}, "Be safe.")
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]
    assert pair["prompt"][-1]["content"] == "I'm locked out."
    assert (pair["chosen"], pair["rejected"]) == ("Call a locksmith.", "Use a hairpin.")


def test_pairs_as_chats_and_as_prompt_with_two_completions():
    chats = {
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
    }
    plain = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    conversational = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    expected = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    for row in (chats, plain, conversational):
        assert to_canonical(row, "preference", {}, None) == expected


def test_bad_pairs_are_rejected_with_their_reason():
    with pytest.raises(RowError, match="same answer"):
        to_canonical({"prompt": "hi", "chosen": "Hello!", "rejected": " Hello! "}, "preference", {}, None)
    with pytest.raises(RowError, match="differ at message 0"):
        to_canonical(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            "preference",
            {},
            None,
        )
    with pytest.raises(RowError, match="HH-RLHF transcript"):
        to_canonical({"chosen": "just text", "rejected": "other text"}, "preference", {}, None)
    with pytest.raises(RowError, match="good/bad"):
        to_canonical({"prompt": "hi", "completion": "yo", "label": "maybe"}, "kto", {}, None)


def test_kto_rows_and_their_labels():
    row = {"prompt": "hi", "completion": "Hello!", "label": "good"}
    assert guess_schema(row, {}, among=("preference", "kto"))[0] == "kto"
    assert to_canonical(row, "kto", {}, None)["desirable"] is True
    assert to_canonical({**row, "label": False}, "kto", {}, None)["desirable"] is False
    # a chat run never mistakes prompt/completion rows with a label for KTO data
    assert guess_schema(row, {})[0] == "prompt_completion"


def test_prepare_checks_dedups_and_reports_pairs(tmp_path, tiny_model_dir):
    rows = pairs(4, 3)
    rows += [
        rows[0],
        {"prompt": "same", "chosen": "A.", "rejected": "A."},
        {"chosen": "no transcript", "rejected": "x"},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = load_recipe(
        None,
        [
            "name=p",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={tiny_model_dir}",
            f"data.path={data}",
            "task=preference",
            "data.dedup.near=false",
        ],
    )
    report = prepare(recipe)
    assert report["schema"] == "preference"
    assert report["rows_in"] == 15 and report["kept"] == 12 and report["rejected"] == 3
    reasons = report["rejected_by_reason"]
    assert any("same answer" in r for r in reasons) and any("exact duplicate" in r for r in reasons)
    assert any("HH-RLHF" in r for r in reasons)
    train_rows = read_jsonl(RunDir(recipe.run_dir).split_path("train"))
    assert set(train_rows[0]) >= {"id", "prompt", "chosen", "rejected", "source"}


def test_preference_settings_are_checked():
    with pytest.raises(RecipeError, match="set task: preference"):
        load_recipe(None, ["data.schema=kto"])
    with pytest.raises(RecipeError, match="preference.loss=kto"):
        load_recipe(None, ["task=preference", "data.schema=kto", "preference.loss=dpo"])
    with pytest.raises(RecipeError, match="packing"):
        load_recipe(None, ["task=preference", "training.packing=true"])


def test_the_shared_hh_file_prepares(tmp_path, tiny_model_dir):
    source = SHARED_DATA / "preference_hh_harmless.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} is not here (CI has ../shared/data)")
    head = write_jsonl(tmp_path / "hh.jsonl", source.read_text(encoding="utf-8").splitlines()[:60])
    recipe = load_recipe(
        None,
        [
            "name=hh",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={tiny_model_dir}",
            f"data.path={head}",
            "task=preference",
            "data.max_length=1024",
        ],
    )
    report = prepare(recipe)
    assert report["schema"] == "preference" and report["kept"] >= 50
    row = read_jsonl(RunDir(recipe.run_dir).split_path("train"))[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]


# ---- the loop and evaluation -------------------------------------------------------------------------


@pytest.fixture
def preference_recipe(tiny_recipe, tmp_path):
    def make(*overrides):
        data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
        return tiny_recipe(
            "task=preference",
            f"data.path={data}",
            "data.dedup.near=false",
            "training.batch_size=2",
            "eval.forgetting.max_questions=4",
            "training.report_to=[]",
            "training.plots=false",
            *overrides,
        )

    return make


def test_dpo_training_raises_preference_accuracy_and_writes_the_report(preference_recipe, tmp_path):
    from conftest import support_rows

    chat_test = write_jsonl(tmp_path / "chat_test.jsonl", support_rows(3, 1))  # the task's own test split
    recipe = preference_recipe(
        "training.max_steps=8",
        "training.eval_every=8",
        "training.learning_rate=0.008",
        "preference.beta=0.5",
        f"preference.task_test={chat_test}",
        "export.formats=[merged]",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["preference_loss"] == "dpo" and summary["reference"] == "the base model (adapter disabled)"
    # the validation loss is the DPO loss of held-out pairs: log 2 before training (policy = reference)
    assert summary["val_loss_before"] == pytest.approx(math.log(2), abs=1e-4)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    report = evaluate(recipe, progress=False)
    base, tuned = report["systems"]["base"], report["systems"]["tuned"]
    # the tuned model moved the chosen answers up against the rejected ones, relative to the base
    assert tuned["reward_margin"] > 0 and tuned["reward_accuracy"] >= 80
    assert tuned["preference_accuracy"] >= max(base["preference_accuracy"], 80)
    assert report["forgetting"]["questions"] == 4
    # the task metrics of the chat test file, for both systems, and what identifies that file for `afina promote`
    assert "fact_accuracy" in base and "fact_accuracy" in tuned and "rougeL" in tuned
    assert report["task_test"]["rows"] == 3 and len(report["task_test"]["sha256"]) == 64
    run = RunDir(recipe.run_dir)
    saved = json.loads((run.eval / "metrics.json").read_text())
    assert saved["systems"]["tuned"]["preference_accuracy"] == tuned["preference_accuracy"]
    assert "preference accuracy" in (run.eval / "report.html").read_text()
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    assert {p["system"] for p in predictions} == {"base", "tuned"} and all("logp_chosen" in p for p in predictions)
    # the preference-tuned model exports like any other (checked on the pairs' prompts)
    assert export(recipe)["merged"]["ok"]


@pytest.mark.parametrize("loss", ["orpo", "simpo", "kto"])  # ipo shares dpo's path; its formula is tested above
def test_every_loss_trains_through_the_loop(preference_recipe, loss):
    recipe = preference_recipe(
        f"preference.loss={loss}",
        "training.max_steps=3",
        "training.learning_rate=0.005",
        "training.eval_every=3",
        "training.report_to=[]",
        "training.plots=false",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["preference_loss"] == loss and math.isfinite(summary["final_train_loss"])
    assert summary["val_loss_after"] < summary["val_loss_before"]
    expected = {"orpo": "none (reference-free)", "simpo": "none (reference-free)"}.get(
        loss, "the base model (adapter disabled)"
    )
    assert summary["reference"] == expected
    if loss == "kto":  # unpaired rows (a prompt and one completion) export too
        assert export(recipe)["adapter"]["ok"]


def test_full_fine_tuning_uses_reference_logps_computed_before_training(preference_recipe):
    recipe = preference_recipe("method.type=full", "training.max_steps=3", "training.learning_rate=0.0005")
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["reference"] == "computed once before training"
    assert summary["val_loss_before"] == pytest.approx(math.log(2), abs=1e-4)  # the reference is the untrained model
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert (RunDir(recipe.run_dir).model / "model.safetensors").is_file()


def test_resumed_preference_run_ends_with_the_same_weights(preference_recipe):
    from safetensors.torch import load_file

    recipe = preference_recipe(
        "training.max_steps=4",
        "training.save_every=2",
        "training.keep_checkpoints=5",
        "training.load_best_at_end=false",
    )
    prepare(recipe)
    train(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    straight = load_file(str(run.adapter / "adapter_model.safetensors"))
    import shutil

    from afina.train.checkpoint import list_checkpoints

    step_2, step_4 = list_checkpoints(run.root / "checkpoints")[-2:]
    shutil.rmtree(step_4)  # as if killed after the step-2 checkpoint
    shutil.rmtree(run.adapter)
    summary = train(recipe, progress=False, resume=True)
    assert summary["resumed_from"] == str(step_2) and summary["steps"] == 4
    resumed = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_paired_loss_on_kto_rows_says_what_to_do(preference_recipe, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(12)]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe = preference_recipe(f"data.path={data}")
    prepare(recipe)
    with pytest.raises(RecipeError, match="preference.loss=kto"):
        train(recipe, progress=False)
    assert SequenceLogps(T([1.0]), T([2])).mean.item() == 0.5


def test_estimate_times_preference_steps(preference_recipe):
    from afina.pipeline import estimate

    recipe = preference_recipe("training.max_steps=10")
    prepare(recipe)
    result = estimate(recipe, measure_steps=1)
    assert result["train_examples"] == len(read_jsonl(RunDir(recipe.run_dir).split_path("train")))
    assert result["total_steps"] == 10 and result["seconds_per_step"] > 0
    assert result["sequence_length"] > 0 and result["fits"]
