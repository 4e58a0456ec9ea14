"""Clean the text of canonical rows: Unicode form, control characters, whitespace, HTML, PII.

Every operation counts the rows it changed, and PII redaction counts what it replaced, so the
report can say exactly what cleaning did:

    cleaner = TextCleaner(recipe.data.clean, recipe.data.pii)
    row = cleaner.clean_row(row)          # a new row; cleaner.rows_changed / cleaner.redacted hold counts
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from typing import Any

from afina.config import CleanConfig, PiiConfig

# C0/C1 controls except tab, newline and carriage return; zero-width space/joiners except ZWJ (emoji); BOM.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200e\u200f\u2060\ufeff]")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")
HTML_HINT = re.compile(r"<[A-Za-z/!][^>]*>|&[#A-Za-z0-9]+;")
BLOCK_TAGS = {
    "p",
    "br",
    "div",
    "li",
    "ul",
    "ol",
    "tr",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "hr",
}

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_CANDIDATE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?!\w)")
NANP = re.compile(r"^(?:\+1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}$")
PII_MARKERS = {"email": "[EMAIL]", "card": "[CARD]", "ip": "[IP]", "phone": "[PHONE]"}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_phone(candidate: str) -> bool:
    """A phone number rather than any run of numbers: 9-15 digits, written the way phones are written."""
    digits = sum(ch.isdigit() for ch in candidate)
    if not 9 <= digits <= 15:
        return False
    return (
        candidate.startswith("+")
        or "(" in candidate
        or bool(NANP.match(candidate))
        or (candidate.startswith("0") and 10 <= digits <= 11)
    )


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self.skipping += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skipping = max(0, self.skipping - 1)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """The visible text of an HTML fragment: tags, scripts and styles removed, entities decoded."""
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


class TextCleaner:
    """Applies the recipe's cleaning to every text field of a canonical row and counts what changed."""

    def __init__(self, clean: CleanConfig, pii: PiiConfig):
        self.clean_config = clean
        self.pii_kinds = list(pii.kinds) if pii.redact else []
        self.rows_changed: Counter[str] = Counter()  # operation -> rows it changed
        self.redacted: Counter[str] = Counter()  # PII kind -> replacements made
        self._changed: set[str] = set()

    def clean_row(self, row: dict[str, Any]) -> dict[str, Any]:
        self._changed = set()
        out = dict(row)
        if "messages" in row:
            out["messages"] = [{**m, "content": self.clean_text(m["content"])} for m in row["messages"]]
        if "text" in row:
            out["text"] = self.clean_text(row["text"])
        if "prompt" in row:  # preference pairs and KTO examples: the prompt's turns and each answer
            out["prompt"] = [{**m, "content": self.clean_text(m["content"])} for m in row["prompt"]]
        for key in ("chosen", "rejected", "completion"):
            if key in row:
                out[key] = self.clean_text(row[key])
        if "tokens" in row:  # tokens are words: normalise them, never merge or split them
            out["tokens"] = [self.clean_text(token, whitespace=False) for token in row["tokens"]]
        self.rows_changed.update(self._changed)
        return out

    def clean_text(self, text: str, whitespace: bool = True) -> str:
        config = self.clean_config
        if config.strip_html and HTML_HINT.search(text):
            text = self._apply("html", text, strip_html(text))
        if config.unicode != "none" and not unicodedata.is_normalized(config.unicode, text):
            text = self._apply("unicode", text, unicodedata.normalize(config.unicode, text))
        if config.strip_control:
            text = self._apply("control", text, CONTROL_CHARS.sub("", text))
        if config.whitespace and whitespace:
            text = self._apply("whitespace", text, normalise_whitespace(text))
        elif config.whitespace:
            text = self._apply("whitespace", text, text.strip())
        if self.pii_kinds:
            text = self.redact(text)
        return text

    def _apply(self, operation: str, before: str, after: str) -> str:
        if after != before:
            self._changed.add(operation)
        return after

    def redact(self, text: str) -> str:
        """Replace each enabled kind of PII with a marker such as [EMAIL]; counts every replacement."""
        if "email" in self.pii_kinds and "@" in text:
            text = self._sub("email", EMAIL, text, lambda m: True)
        if "card" in self.pii_kinds:
            text = self._sub("card", CARD_CANDIDATE, text, lambda m: luhn_valid(re.sub(r"\D", "", m)))
        if "ip" in self.pii_kinds:
            text = self._sub("ip", IPV4, text, lambda m: True)
            if ":" in text:
                text = self._sub("ip", IPV6_CANDIDATE, text, _is_ipv6)
        if "phone" in self.pii_kinds:
            text = self._sub("phone", PHONE_CANDIDATE, text, _is_phone)
        return text

    def _sub(self, kind: str, pattern: re.Pattern[str], text: str, accept) -> str:
        def replace(match: re.Match[str]) -> str:
            if not accept(match.group(0)):
                return match.group(0)
            self.redacted[kind] += 1
            self._changed.add("pii")
            return PII_MARKERS[kind]

        return pattern.sub(replace, text)


def _is_ipv6(candidate: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(candidate), ipaddress.IPv6Address)
    except ValueError:
        return False


FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# A line ending in two or more spaces after text is a Markdown hard line break: whitespace that means something.
CODE_LINE = re.compile(
    r"^(?:[ \t]+\S"  # indented
    r"|(?:def|class|import|from|return|if|elif|else|for|while|try|except|with|async|@)\b"  # Python
    r"|[\w.\-\"']+:(?:\s|$)"  # a YAML key
    r"|- |#|[}\]);]"  # a YAML list item, a comment, a closing bracket
    r")"
)


def looks_like_code(text: str) -> bool:
    """Whitespace-significant text outside fences (a Python or YAML answer): most of its lines look like code and
    some are indented. Prose with a list or two does not pass."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2 or not any(line[:1] in (" ", "\t") for line in lines):
        return False
    return sum(bool(CODE_LINE.match(line)) for line in lines) >= 0.6 * len(lines)


def fenced_segments(text: str) -> list[tuple[bool, str]]:
    """(is_code, text) pieces: fenced code blocks (``` or ~~~, fence lines included) and what lies between.
    A fence left open runs to the end of the text, as Markdown renders it."""
    pieces: list[tuple[bool, str]] = []
    current: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        match = FENCE.match(line)
        if fence is None and match:
            if current:
                pieces.append((False, "".join(current)))
            current, fence = [line], match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            current.append(line)
            pieces.append((True, "".join(current)))
            current, fence = [], None
        else:
            current.append(line)
    if current:
        pieces.append((fence is not None, "".join(current)))
    return pieces


def normalise_whitespace(text: str) -> str:
    """LF line ends, no trailing spaces, at most one blank line, trimmed; indentation is kept.

    Code keeps every space and blank line: the inside of fenced blocks (```), and a whole text that looks
    like code (a Python or YAML answer without fences) only get LF line ends. A Markdown hard break (two
    trailing spaces after text) is kept.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "```" not in text and "~~~" not in text:
        if looks_like_code(text):
            return text.strip("\n").rstrip()
        return _normalise_prose(text).strip()
    out = ""
    for is_code, piece in fenced_segments(text):
        if is_code:
            out += piece
        elif out.endswith("\n"):  # blank lines after a fence: counted with the fence's own line end
            out += _normalise_prose("\n" + piece)[1:]
        else:
            out += _normalise_prose(piece)
    return out.strip()


def _normalise_prose(text: str) -> str:
    if " \n" in text or "\t\n" in text:
        text = TRAILING_SPACE.sub(lambda m: "  \n" if _hard_break(m) else "\n", text)
    if "\n\n\n" in text:
        text = BLANK_LINES.sub("\n\n", text)
    return text


def _hard_break(match: re.Match[str]) -> bool:
    """Two or more trailing spaces between two lines of text (not tabs, not before a blank line): a Markdown
    line break."""
    spaces = match.group(0)[:-1]
    start = match.start()
    text, end = match.string, match.end()
    followed_by_text = end < len(text) and text[end] != "\n"
    return len(spaces) >= 2 and set(spaces) == {" "} and start > 0 and text[start - 1] != "\n" and followed_by_text


def is_empty(row: dict[str, Any]) -> str | None:
    """What is empty in a cleaned row (its reason), or None."""
    for i, message in enumerate(row.get("messages", ())):
        if not message["content"].strip() and not message.get("tool_calls"):  # a turn of calls has no text
            return f"messages[{i}].content is empty after cleaning"
    for i, message in enumerate(row.get("prompt", ())):
        if not message["content"].strip():
            return f"prompt[{i}].content is empty after cleaning"
    for key in ("chosen", "rejected", "completion"):
        if key in row and not row[key].strip():
            return f"{key} is empty after cleaning"
    if "chosen" in row and row["chosen"].strip() == row["rejected"].strip():
        return "chosen and rejected are the same answer after cleaning; a pair needs two different answers"
    if "text" in row and not row["text"].strip():
        return "text is empty after cleaning"
    if "tokens" in row and any(not token for token in row["tokens"]):
        return "a token is empty after cleaning"
    return None
