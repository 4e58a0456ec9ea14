"""Chat templates by choice (`model.chat_template`): the model's own, a named standard, or a Jinja file.

A base model (Gemma 3 270M, any pretrained checkpoint) has no chat template; a chat model may have one
the user wants to replace. The choice is set on the tokenizer once, when it is loaded, so training,
evaluation, serving, the GGUF file (`tokenizer.chat_template`) and the Ollama Modelfile (built from
the same template) all use the same one.

    tokenizer = with_chat_template(tokenizer, "chatml")
"""

from __future__ import annotations

from pathlib import Path

# ChatML (Qwen, SmolLM2, many fine-tunes): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format (<start_of_turn>user ... <end_of_turn>), whose tokens every Gemma vocabulary has.
# Gemma's own template folds the system prompt into the first user turn; this one keeps the system prompt
# as its own turn so every role is wrapped the same way (the shape an Ollama TEMPLATE can express).
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# ChatML with tools in the Hermes / Qwen2.5 way, for models whose own template has no tool support: the tools
# listed as JSON between <tools></tools> in the system turn, each call a <tool_call>{"name", "arguments"}
# </tool_call> block in the assistant turn, tool results as <tool_response> blocks in a user turn. Without
# tools it renders exactly as `chatml` does. afina's server parses this call format (serve/tools.py).
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>' }}{%- for tool in tools %}{{- '\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '\n</tools>\n\nFor each function call, return a json object with "
    'function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
    "'<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'assistant' and not "
    "message.tool_calls) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}{%- if message.content %}"
    "{{- '\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\n<tool_call>\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "chatml-tools": CHATML_TOOLS, "gemma": GEMMA}
# The special tokens each named template needs in the vocabulary; the second ends a turn.
_TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "chatml-tools": ["<|im_start|>", "<|im_end|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
}


class ChatTemplateError(ValueError):
    """A `model.chat_template` that cannot be used; the message says why and what to do."""


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def resolve_chat_template(choice: str | None, tokenizer) -> str | None:
    """The Jinja template for a choice: None or 'model' (the tokenizer's own), a name, or a file path."""
    if choice in (None, "", "model"):
        return tokenizer.chat_template
    if choice in NAMED_TEMPLATES:
        missing = [t for t in _TEMPLATE_TOKENS[choice] if t not in tokenizer.get_vocab()]
        if missing:
            raise ChatTemplateError(
                f"model.chat_template={choice}: the model's vocabulary lacks {', '.join(missing)}; its embeddings "
                f"would start untrained. Use a template made of tokens it has (e.g. {_suggest(tokenizer)}) or a file"
            )
        template = NAMED_TEMPLATES[choice]
        # A model trained with a BOS token (Gemma, Llama) needs it at the start of every prompt; afina tokenizes
        # rendered chats without adding special tokens, so the template carries it.
        if _adds_bos(tokenizer) and "bos_token" not in template:
            template = "{{ bos_token }}" + template
        return template
    path = Path(choice).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ChatTemplateError(
        f"model.chat_template={choice!r}: not 'model', a named template ({', '.join(NAMED_TEMPLATES)}) or an existing "
        "Jinja file; name one of those"
    )


def _suggest(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    fits = [name for name, tokens in _TEMPLATE_TOKENS.items() if all(t in vocab for t in tokens)]
    return ", ".join(fits) if fits else "a Jinja file using the model's own special tokens"


def with_chat_template(tokenizer, choice: str | None):
    """Set the chosen template on the tokenizer (in place) and return it.

    With a named template, its end-of-turn token becomes the tokenizer's EOS: generation (eval, serve,
    llama.cpp, Ollama) stops where a trained answer ends, and the GGUF file records the same EOS.
    """
    template = resolve_chat_template(choice, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    if choice in NAMED_TEMPLATES:
        tokenizer.eos_token = _TEMPLATE_TOKENS[choice][1]
    return tokenizer
