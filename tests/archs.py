"""Tiny models (2 layers, random weights) of each architecture family users fine-tune, built in code.

Every family shares one tokenizer (the default model's byte-level BPE, plus the special tokens of the
families' chat formats) and gets its own family's real chat template (tests/fixtures/chat_templates),
its BOS/EOS and its architecture's particulars (Qwen's q/k/v biases, Qwen3's q/k norms, Gemma's
soft-capping and sliding windows, Phi-3's fused projections, MoE experts).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# The family's chat format markers, added to the shared tokenizer as special tokens.
FORMAT_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>",
                 "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "</s>", "<s>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|end|>", "<think>", "</think>"]

# arch -> (template fixture, bos token, eos token (the end of an assistant turn))
FAMILIES = {
    "llama": ("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": ("qwen2.jinja", None, "<|im_end|>"),
    "qwen3": ("qwen3.jinja", None, "<|im_end|>"),
    "mistral": ("mistral.jinja", "<s>", "</s>"),
    "gemma2": ("gemma.jinja", "<bos>", "<end_of_turn>"),
    "gemma3_text": ("gemma.jinja", "<bos>", "<end_of_turn>"),
    "phi3": ("phi3.jinja", None, "<|end|>"),
    "qwen2_moe": ("qwen2.jinja", None, "<|im_end|>"),
}
ARCHS = list(FAMILIES)


def family_tokenizer(base_tokenizer, arch: str):
    """A copy of the shared tokenizer with the family's markers, template, BOS and EOS."""
    import copy

    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": FORMAT_TOKENS})
    template, bos, eos = FAMILIES[arch]
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    tokenizer.bos_token = bos  # None: the family has none in its prompts (Qwen, Phi-3)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    return tokenizer


def tiny_config(arch: str, tokenizer):
    """A 2-layer config of the architecture, vocabulary padded to a multiple of 64 as real checkpoints are."""
    from transformers import AutoConfig

    vocab = (len(tokenizer) + 63) // 64 * 64
    common = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    extra: dict = {
        "llama": {"tie_word_embeddings": True},
        "qwen2": {"tie_word_embeddings": True},
        "qwen3": {"head_dim": 16, "tie_word_embeddings": True},
        "mistral": {"sliding_window": None, "tie_word_embeddings": False},
        "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64, "final_logit_softcapping": 30.0,
                       "attn_logit_softcapping": 50.0},
        "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
                            "layer_types": ["sliding_attention", "full_attention"]},
        "phi3": {"num_key_value_heads": 4, "tie_word_embeddings": False, "pad_token_id": tokenizer.pad_token_id},
        "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                          "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "tie_word_embeddings": True},
    }[arch]
    return AutoConfig.for_model(arch, **{**common, **extra})


def build_tiny_model(arch: str, base_tokenizer, path: Path, seed: int = 0) -> Path:
    """Save the tiny model of `arch` with its family tokenizer as a local HF folder; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = family_tokenizer(base_tokenizer, arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    # Random init (std 0.02) gives near-uniform next-token distributions; a larger embedding scale gives the
    # tiny model decided preferences, as a trained model has, so the export checks have something to check.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
