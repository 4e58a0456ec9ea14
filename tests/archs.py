"""Tiny models (2 layers, random weights) of each architecture family users fine-tune, built in code.

The byte-level BPE families share one tokenizer (the default model's, plus the special tokens of the
families' chat formats); the Gemma families get a SentencePiece BPE tokenizer with byte fallback trained
here in a second (as Gemma's own is, and as llama.cpp's converter requires for Gemma: tokenizer.model).
Each family gets its own real chat template (tests/fixtures/chat_templates), its BOS/EOS and its
architecture's particulars (Qwen's q/k/v biases, Qwen3's q/k norms, Gemma's soft-capping and sliding
windows, Phi-3's fused projections, MoE experts).
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# The family's chat format markers, added to the shared tokenizer as special tokens.
FORMAT_TOKENS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
    "</s>",
    "<s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
]

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
SENTENCEPIECE_FAMILIES = {"gemma2", "gemma3_text"}


def sentencepiece_tokenizer(folder: Path):
    """A SentencePiece BPE tokenizer (byte fallback, Gemma's special pieces) trained on the test chats, loaded
    by transformers from its tokenizer.model as a Gemma checkpoint's is."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from conftest import SYSTEM, support_rows

    texts = [m["content"] for row in support_rows(12, 4) for m in row["messages"]] + [
        SYSTEM,
        "Hello there, how are you?",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    return AutoTokenizer.from_pretrained(folder)


def family_tokenizer(base_tokenizer, arch: str, folder: Path):
    """A copy of the shared tokenizer (a SentencePiece one for Gemma) with the family's markers, template, BOS, EOS."""
    import copy

    if arch in SENTENCEPIECE_FAMILIES:
        tokenizer = sentencepiece_tokenizer(folder)
    else:
        tokenizer = copy.deepcopy(base_tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": FORMAT_TOKENS})
    template, bos, eos = FAMILIES[arch]
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    tokenizer.bos_token = bos  # None: the family has none in its prompts (Qwen, Phi-3)
    tokenizer.eos_token = eos
    if arch not in SENTENCEPIECE_FAMILIES:
        tokenizer.pad_token = eos
    return tokenizer


def tiny_config(arch: str, tokenizer):
    """A 2-layer config of the architecture, vocabulary padded to a multiple of 64 as real checkpoints are."""
    from transformers import AutoConfig

    vocab = (len(tokenizer) + 63) // 64 * 64
    common = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    extra: dict = {
        "llama": {"tie_word_embeddings": True},
        "qwen2": {"tie_word_embeddings": True},
        "qwen3": {"head_dim": 16, "tie_word_embeddings": True},
        "mistral": {"sliding_window": None, "tie_word_embeddings": False},
        "gemma2": {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
        },
        "gemma3_text": {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "phi3": {"num_key_value_heads": 4, "tie_word_embeddings": False, "pad_token_id": tokenizer.pad_token_id},
        "qwen2_moe": {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,  # as Qwen's MoE checkpoints (llama.cpp's qwen2moe needs output.weight)
        },
    }[arch]
    return AutoConfig.for_model(arch, **{**common, **extra})


def build_tiny_model(arch: str, base_tokenizer, path: Path, seed: int = 0) -> Path:
    """Save the tiny model of `arch` with its family tokenizer as a local HF folder; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = family_tokenizer(base_tokenizer, arch, path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    # Random init (std 0.02) gives near-uniform next-token distributions; a larger embedding scale gives the
    # tiny model decided preferences, as a trained model has, so the export checks have something to check.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # The shared BPE tokenizer as it is (llama.cpp recognises its pre-tokenizer): transformers would otherwise
    # rebuild it as Qwen2Tokenizer with Qwen2's own pre-tokenizer for a qwen2 config; GPT2Tokenizer is also
    # Phi-4's class (a byte-level BPE on the phi3 architecture), which llama.cpp's phi3 converter reads.
    if arch in ("phi3", "qwen2"):
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}, indent=2))
    return path
