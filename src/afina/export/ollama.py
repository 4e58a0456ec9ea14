"""An Ollama Modelfile whose TEMPLATE reproduces the model's own (Jinja) chat template.

Ollama templates are Go templates, so the Jinja template cannot be copied in. Instead the chat
template is rendered on sentinel messages and cut into pieces: what goes before and after each
role's content, the generation prompt and a default system prompt. The pieces become a Go
template, and the same pieces rebuild prompts in Python that are compared with
`tokenizer.apply_chat_template` on several conversations (the verification in the manifest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afina.export.gguf_file import ExportError

_SENTINEL = {"system": "\x00SYS\x00", "user": "\x00USR\x00", "assistant": "\x00AST\x00", "user2": "\x00USR2\x00"}


@dataclass
class TemplatePieces:
    prefix: dict[str, str]  # role -> text before the content
    suffix: str  # text after every message's content
    generation_prompt: str
    default_system: str | None  # inserted by the template when a conversation has no system turn

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt Ollama builds from the Go template, built from the same pieces."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix for m in messages)
        return body + self.generation_prompt


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    """The chat template's text without a leading BOS token: Ollama (llama.cpp) puts BOS in front of every prompt
    itself when the GGUF file says add_bos_token, so a TEMPLATE that wrote it too would double it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text[len(tokenizer.bos_token) :] if starts_with_bos(tokenizer, text) else text


def starts_with_bos(tokenizer, text: str | None = None) -> bool:
    """Whether the chat template puts the BOS token first as the sequence's start, once (Gemma, Llama 3, Mistral
    do), and `text`, where given, starts with it. A token that opens every turn is not that, even where the
    tokenizer names it BOS (SmolLM2's is ChatML's <|im_start|>): the template writes it, not the runtime."""
    bos = tokenizer.bos_token
    if not bos:
        return False
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    probe = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if not probe.startswith(bos) or probe.count(bos) != 1:
        return False
    return text is None or text.startswith(bos)


def template_pieces(tokenizer) -> TemplatePieces:
    """Cut the chat template into per-role pieces, or raise ExportError if it is not of that shape."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("the tokenizer has no chat template; an Ollama Modelfile needs one to build its TEMPLATE")
    s = _SENTINEL
    turns = [
        {"role": "system", "content": s["system"]},
        {"role": "user", "content": s["user"]},
        {"role": "assistant", "content": s["assistant"]},
        {"role": "user", "content": s["user2"]},
    ]
    full = _render(tokenizer, turns, False)
    with_prompt = _render(tokenizer, turns, True)
    eos = tokenizer.eos_token or ""
    if eos and full.endswith(eos) and not with_prompt.startswith(full) and with_prompt.startswith(full[: -len(eos)]):
        full = full[: -len(eos)]  # EOS after a finished conversation only (Phi-3): never in a prompt to answer
    if not with_prompt.startswith(full):
        raise ExportError(
            "the chat template's generation prompt is not a plain suffix; write the Modelfile TEMPLATE by hand"
        )
    cuts, rest = [], full
    for key in ("system", "user", "assistant", "user2"):
        before, found, rest = rest.partition(s[key])
        if not found:
            raise ExportError(
                "the chat template drops or rewrites message content; write the Modelfile TEMPLATE by hand"
            )
        cuts.append(before)
    suffix = rest  # after the last user message
    if not all(c.startswith(suffix) for c in cuts[1:]):
        raise ExportError("the chat template ends roles differently; write the Modelfile TEMPLATE by hand")
    prefix = {"system": cuts[0], "user": cuts[1][len(suffix) :], "assistant": cuts[2][len(suffix) :]}
    if cuts[3][len(suffix) :] != prefix["user"]:
        raise ExportError(
            "the chat template wraps the first and later user turns differently; write the TEMPLATE by hand"
        )
    pieces = TemplatePieces(prefix, suffix, with_prompt[len(full) :], None)
    # A template that adds a system turn of its own when there is none (SmolLM2 does): find its text.
    alone = _render(tokenizer, [{"role": "user", "content": s["user"]}], True)
    if alone != pieces.render([{"role": "user", "content": s["user"]}]):
        head = alone[: alone.index(prefix["user"] + s["user"])] if prefix["user"] + s["user"] in alone else ""
        if head.startswith(prefix["system"]) and head.endswith(suffix):
            pieces.default_system = head[len(prefix["system"]) : len(head) - len(suffix)]
        else:
            raise ExportError("the chat template adds text of its own to a conversation; write the TEMPLATE by hand")
    return pieces


def _go_literal(text: str) -> str:
    """Text inside a Go template, outside actions: only '{{' needs escaping."""
    return text.replace("{{", '{{"{{"}}')


def go_template(pieces: TemplatePieces) -> str:
    role_branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_literal(pieces.prefix[role])}'
        for i, role in enumerate(("system", "user", "assistant"))
    )
    return (
        f"{{{{ range .Messages }}}}{role_branches}{{{{ end }}}}{{{{ .Content }}}}{_go_literal(pieces.suffix)}"
        f"{{{{ end }}}}{_go_literal(pieces.generation_prompt)}"
    )


def stop_tokens(tokenizer, pieces: TemplatePieces) -> list[str]:
    """The end-of-turn marker and the EOS token: generation must stop at either."""
    specials = {str(t) for t in tokenizer.all_special_tokens} | {
        a.content for a in tokenizer.added_tokens_decoder.values()
    }
    stops = [t for t in specials if t and t in pieces.suffix]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    start_marker = [t for t in specials if t and pieces.prefix["user"].startswith(t)]
    return sorted(set(stops + start_marker))


def _file_ref(path: Path, folder: Path) -> str:
    return f"./{path.relative_to(folder)}" if path.parent == folder else str(path)


def write_modelfile(path: Path, gguf_path: Path, tokenizer, adapter: Path | None = None) -> dict:
    """Write the Modelfile (FROM the GGUF file; ADAPTER a GGUF LoRA adapter over it when given); verify the
    template pieces against apply_chat_template; return the check."""
    pieces = template_pieces(tokenizer)
    stops = stop_tokens(tokenizer, pieces)
    lines = [f"FROM {_file_ref(gguf_path, path.parent)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_file_ref(adapter, path.parent)}")
    lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    if pieces.default_system is not None:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    conversations = [
        [{"role": "user", "content": "Hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c {{ not a template }}"},
        ],
    ]
    same = all(pieces.render(c) == _render(tokenizer, c, True) for c in conversations)
    return {
        "path": str(path),
        "stop": stops,
        "template_matches_chat_template": same,
        "conversations_checked": len(conversations),
        "ok": same,
    }
