"""Judge an exported model against the trained one, in a way that does not depend on the logits' scale.

An absolute logit tolerance fails a healthy file as soon as training made the logits sharper (the
same q8_0 rounding moves large logits further), and passes a broken one whose logits happen to be
small. What a user sees is the next-token distribution and the greedy text, so those are compared:

- `kl_mean` / `kl_max`: KL(trained || export) of the next-token distributions, in nats, at the
  prompt's last position and along the trained model's greedy continuation (teacher-forced, so a
  single flip does not derail the positions after it);
- `top1_agreement`: share of those positions where both pick the same greedy token;
- `decided_agreement`: the same, counted only where the trained model's choice is decided (its
  top token leads the runner-up by at least `DECIDED_MARGIN` probability) — a flip at a near-tie
  is rounding, a flip at a decided position is damage;
- `top10_overlap`: mean share of the trained model's 10 most likely tokens the export also ranks
  in its top 10;
- `greedy_text_equal`: the export's own free-running greedy text equals the trained model's.

A file passes when its tokenization equals the trained tokenizer's, `kl_mean` is at most the type's
threshold and `decided_agreement` at least the type's. The thresholds (`THRESHOLDS`) come from the
measured spread of healthy files (README: "How exports are verified").

    reference = Reference.of(model, tokenizer, prompts)
    check = judge(reference, "q4_k_m", run_llama_cpp(path, reference))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from afina.export.gguf_file import ExportError

CONTINUATION_TOKENS = 32
DECIDED_MARGIN = 0.1
TOP_K = 10

# Per type: (largest mean KL in nats, smallest agreement at decided positions). Healthy files measured
# on SmolLM2-135M trained by the quickstart (and the tiny test models) sit well inside these; see README.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 1.0),
    "f16": (2e-3, 0.98),
    "bf16": (1e-2, 0.95),
    "q8_0": (1e-2, 0.95),
    "q6_k": (3e-2, 0.9),
    "q5_k_m": (6e-2, 0.85),
    "q4_k_m": (0.15, 0.8),
    "adapter": (1e-5, 1.0),
    "merged": (1e-5, 1.0),
}


class ExportCheckError(ExportError):
    """Exports that do not reproduce the trained model; the message names each file, measure and threshold."""


@dataclass
class Candidate:
    """What an exported model produced on the reference prompts, by any runtime (transformers, llama.cpp)."""

    input_ids: list[list[int]]  # its own tokenization of each prompt
    logits: list[torch.Tensor]  # teacher-forced on the reference sequence: [positions, vocab] per prompt
    texts: list[str]  # its own greedy continuation of each prompt


@dataclass
class Reference:
    prompts: list[str]
    input_ids: list[list[int]]
    sequences: list[list[int]]  # prompt + greedy continuation
    logprobs: list[torch.Tensor]  # [positions, vocab]: the prompt's last position and each continuation position
    texts: list[str]

    @classmethod
    @torch.no_grad()
    def of(cls, model, tokenizer, prompts: list[str], new_tokens: int = CONTINUATION_TOKENS) -> Reference:
        ids_all, sequences, logprobs, texts = [], [], [], []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            sequence = out[0].tolist()
            ids_all.append(ids[0].tolist())
            sequences.append(sequence)
            logprobs.append(torch.log_softmax(teacher_forced_logits(model, sequence, ids.shape[1]), -1))
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return cls(list(prompts), ids_all, sequences, logprobs, texts)

    def positions(self, index: int) -> tuple[list[int], int]:
        """The sequence to teacher-force and where the scored positions start in it."""
        return self.sequences[index], len(self.input_ids[index]) - 1


@torch.no_grad()
def teacher_forced_logits(model, sequence: list[int], prompt_length: int) -> torch.Tensor:
    """Logits of a transformers model at the positions that predict the continuation: prompt_length-1 .. len-2
    (just the prompt's last position when there is no continuation)."""
    ids = torch.tensor([sequence], device=model.device)
    logits = model(input_ids=ids).logits[0].float().cpu()
    return logits[prompt_length - 1 : max(len(sequence) - 1, prompt_length)]


@torch.no_grad()
def transformers_candidate(model, tokenizer, reference: Reference) -> Candidate:
    """Run a transformers model (a reloaded export) on the reference prompts."""
    ids_all, logits, texts = [], [], []
    for index, prompt in enumerate(reference.prompts):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        ids_all.append(ids[0].tolist())
        sequence, start = reference.positions(index)
        logits.append(teacher_forced_logits(model, sequence, start + 1))
        new = len(reference.sequences[index]) - len(reference.input_ids[index])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max(new, 1),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return Candidate(ids_all, logits, texts)


def compare(reference: Reference, candidate: Candidate) -> dict[str, Any]:
    """The scale-free measures (module docstring) over every scored position of every prompt."""
    kls, top1, decided, overlap, max_diff = [], [], [], [], 0.0
    for ref_logprobs, cand_logits in zip(reference.logprobs, candidate.logits):
        n = min(len(ref_logprobs), len(cand_logits))
        ref_lp = ref_logprobs[:n].float()
        vocab = min(ref_lp.shape[-1], cand_logits.shape[-1])  # a converter may drop padding rows past the vocabulary
        ref_lp, cand = ref_lp[:, :vocab], cand_logits[:n, :vocab].float()
        cand_lp = torch.log_softmax(cand, -1)
        ref_p = ref_lp.exp()
        kls.append((ref_p * (ref_lp - cand_lp)).sum(-1).clamp_min(0))
        ref_top, cand_top = ref_lp.argmax(-1), cand_lp.argmax(-1)
        same = ref_top == cand_top
        top1.append(same)
        best2 = ref_p.topk(2, -1).values
        decided.append(same[(best2[:, 0] - best2[:, 1]) >= DECIDED_MARGIN])
        k = min(TOP_K, vocab)
        ref_k, cand_k = ref_lp.topk(k, -1).indices, cand_lp.topk(k, -1).indices
        overlap.append(torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref_k, cand_k)]))
        if n:  # on the tokens that matter (the trained model's top k); the far tail moves most and means least
            max_diff = max(max_diff, float((ref_lp.gather(1, ref_k) - cand_lp.gather(1, ref_k)).abs().max()))
    kl, agree, dec, ovl = (torch.cat(x) for x in (kls, top1, decided, overlap))
    return {
        "kl_mean": float(kl.mean()) if len(kl) else 0.0,
        "kl_max": float(kl.max()) if len(kl) else 0.0,
        "top1_agreement": float(agree.float().mean()) if len(agree) else 1.0,
        "decided_agreement": float(dec.float().mean()) if len(dec) else 1.0,
        "decided_positions": len(dec),
        "top10_overlap": float(ovl.mean()) if len(ovl) else 1.0,
        "positions": len(kl),
        "max_top10_logprob_diff": max_diff,
        "greedy_text_equal": reference.texts == candidate.texts,
        "tokenization_equal": reference.input_ids == candidate.input_ids,
    }


def thresholds_for(kind: str, overrides: dict[str, float] | None = None) -> tuple[float, float]:
    max_kl, min_agreement = THRESHOLDS[kind]
    if overrides and kind in overrides:
        max_kl = overrides[kind]
    return max_kl, min_agreement


def judge(
    reference: Reference,
    kind: str,
    candidate: Candidate,
    max_kl_overrides: dict[str, float] | None = None,
) -> dict[str, Any]:
    """compare() plus the verdict for an export of this kind: `ok` and, when not, `failed` naming each measure."""
    check = compare(reference, candidate)
    max_kl, min_agreement = thresholds_for(kind, max_kl_overrides)
    check.update(max_kl=max_kl, min_decided_agreement=min_agreement)
    failed = []
    if not check["tokenization_equal"]:
        failed.append("tokenization differs from the trained tokenizer")
    if check["kl_mean"] > max_kl:
        failed.append(f"kl_mean {check['kl_mean']:.4g} > max_kl {max_kl:g}")
    if check["decided_agreement"] < min_agreement:
        failed.append(f"decided_agreement {check['decided_agreement']:.3f} < {min_agreement:g}")
    check["ok"] = not failed
    if failed:
        check["failed"] = "; ".join(failed)
    return check


def failure_message(results: dict[str, dict[str, Any]]) -> str | None:
    """One line per failed export (its file, the measure and the threshold), or None when all passed."""
    lines = [
        f"  {key} ({value.get('path', '')}): {value.get('failed', 'check failed')}"
        for key, value in results.items()
        if isinstance(value, dict) and value.get("ok") is False
    ]
    if not lines:
        return None
    return (
        "exports that do not reproduce the trained model (removed; the others are kept and recorded in "
        "manifest.json under `export`):\n"
        + "\n".join(lines)
        + "\nRaise the type's threshold with export.gguf_max_kl.<type>=<value> if the difference is acceptable, "
        "or export a less aggressive type (q8_0, f16)."
    )


def describe_export(fmt: str, info: dict[str, Any]) -> str:
    """One line per export for the console: where it is and what its check measured."""
    if "skipped" in info:
        return f"{fmt}: skipped ({info['skipped']})"
    if "template_matches_chat_template" in info:
        return (
            f"{fmt}: {info['path']} (verified: template reproduces the chat template: "
            f"{info['template_matches_chat_template']}; stop {', '.join(info['stop'])})"
        )
    measured = info.get("llama_cpp", info)
    if "kl_mean" not in measured:
        return f"{fmt}: {info.get('path', '')} ({info.get('failed', 'not verified')})"
    where = " in llama.cpp" if "llama_cpp" in info else ""
    size = f", {info['size_mb']} MB" if "size_mb" in info else ""
    hf = info.get("transformers") or {}
    also = f"; transformers: {hf['failed']}" if hf.get("ok") is False else ""
    return (
        f"{fmt}: {info['path']} (verified{where}: KL {measured['kl_mean']:.2e} nats, greedy agreement "
        f"{measured['top1_agreement']:.0%}, greedy text equal: {measured['greedy_text_equal']}{size}{also})"
    )
