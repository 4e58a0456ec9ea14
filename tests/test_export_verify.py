"""The export check: scale-free measures (KL, agreement at decided positions), per-type thresholds, clear failures."""

import copy

import numpy as np
import pytest
import torch

from afina.export.verify import THRESHOLDS, ExportCheckError, Reference, failure_message, judge, transformers_candidate


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with logits ~10x sharper, as a model whose logits grew in training (the case an absolute
    logit tolerance failed: q8_0 rounding moves large logits further without changing what the model says)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)  # tied: the output layer too
    return model


@pytest.fixture(scope="module")
def reference(sharp_model, tokenizer):
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What does code 2 mean?", "Where is my order?")
    ]
    return Reference.of(sharp_model, tokenizer, prompts, new_tokens=12)


def _round_weights(model, kind: str):
    """A copy of the model whose 2-D weights went through gguf's quantize/dequantize of `kind`."""
    from gguf import GGMLQuantizationType, quants

    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[kind]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2 and param.shape[-1] % 32 == 0:
                data = param.detach().numpy().astype(np.float32)
                param.copy_(
                    torch.from_numpy(quants.dequantize(quants.quantize(data, qtype), qtype).reshape(data.shape))
                )
    return rounded


def test_the_same_model_passes_with_zero_divergence(sharp_model, tokenizer, reference):
    check = judge(reference, "f16", transformers_candidate(sharp_model, tokenizer, reference))
    assert check["ok"] and check["kl_mean"] < 1e-6 and check["top1_agreement"] == 1.0
    assert check["greedy_text_equal"] and check["tokenization_equal"] and check["positions"] >= 2


def test_q8_0_rounding_of_a_sharp_model_passes(sharp_model, tokenizer, reference):
    rounded = _round_weights(sharp_model, "q8_0")
    check = judge(reference, "q8_0", transformers_candidate(rounded, tokenizer, reference))
    assert check["max_top10_logprob_diff"] > 0 and check["ok"], check  # the logits moved, what it says did not
    assert check["kl_mean"] <= THRESHOLDS["q8_0"][0]


def test_damaged_weights_fail_naming_the_measure_and_threshold(sharp_model, tokenizer, reference):
    damaged = copy.deepcopy(sharp_model)
    torch.manual_seed(1)
    with torch.no_grad():
        embedding = damaged.get_input_embeddings().weight  # tied: the output layer too
        embedding.add_(torch.randn_like(embedding) * embedding.std() * 0.5)
    check = judge(reference, "q8_0", transformers_candidate(damaged, tokenizer, reference))
    assert not check["ok"]
    assert f"max_kl {THRESHOLDS['q8_0'][0]:g}" in check["failed"]
    message = failure_message({"gguf_q8_0": {"path": "export/gguf/tiny-q8_0.gguf", **check}, "merged": {"ok": True}})
    assert "gguf_q8_0 (export/gguf/tiny-q8_0.gguf)" in message and "kl_mean" in message and "merged" not in message
    assert issubclass(ExportCheckError, RuntimeError)


def test_tokenization_mismatch_fails(sharp_model, tokenizer, reference):
    candidate = transformers_candidate(sharp_model, tokenizer, reference)
    candidate.input_ids[0] = candidate.input_ids[0][1:]
    check = judge(reference, "f16", candidate)
    assert not check["ok"] and "tokenization" in check["failed"]


def test_thresholds_tighten_with_precision():
    order = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
    kls = [THRESHOLDS[t][0] for t in order]
    agreements = [THRESHOLDS[t][1] for t in order]
    assert kls == sorted(kls) and agreements == sorted(agreements, reverse=True)
