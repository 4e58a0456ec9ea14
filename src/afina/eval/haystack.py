"""Haystack prose for long-context tests: real text from a file, or varied generated filler.

Passkey tests hide a key in long filler text. A filler of one repeated sentence is easy to skim
(the key is the only novel span) and unlike real documents, so afina uses either real prose from a
file the user names (plain text, or JSONL with a `text` field, e.g. Wikipedia paragraphs), or
sentences generated here from a seeded grammar: a small vocabulary of places, people, trades and
events combined by sentence templates, so no two neighbouring sentences are alike.

Provenance of the generated filler: written for afina (the templates and word lists below);
nothing is copied from a corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

PLACES = [
    "the harbour town",
    "the river valley",
    "the old quarter",
    "the hill villages",
    "the northern coast",
    "the market square",
    "the railway junction",
    "the mill district",
    "the island ferry port",
    "the forest edge",
    "the university town",
    "the salt marshes",
    "the mountain pass",
    "the vineyard slopes",
    "the fishing village",
]
PEOPLE = [
    "the baker",
    "a retired teacher",
    "the ferry captain",
    "two carpenters",
    "the village doctor",
    "a young painter",
    "the postmistress",
    "the night watchman",
    "a travelling musician",
    "the mayor's clerk",
    "an apprentice smith",
    "the librarian",
    "a shepherd",
    "the station master",
    "a group of students",
    "the innkeeper",
]
THINGS = [
    "a new bridge",
    "the spring fair",
    "a long drought",
    "the first snowfall",
    "a broken water pump",
    "the autumn harvest",
    "a lost dog",
    "the annual boat race",
    "a shipment of books",
    "the town clock",
    "a sudden storm",
    "the new school roof",
    "a dispute over fishing rights",
    "the lantern festival",
    "a traveller's map",
    "the orchard's best year",
]
TIMES = [
    "In early spring",
    "Late one evening",
    "By the end of the summer",
    "On a grey Tuesday",
    "Every winter",
    "Some years ago",
    "At first light",
    "During the long rains",
    "After the harvest",
    "Before the war",
    "On market days",
    "In the quiet weeks of autumn",
]
VERBS = [
    "talked about",
    "argued over",
    "wrote a letter about",
    "kept a record of",
    "repaired",
    "celebrated",
    "worried about",
    "walked past",
    "sketched",
    "told stories about",
    "remembered",
    "planned for",
]
FEELINGS = ["calm", "restless", "hopeful", "tired but content", "curious", "uneasy", "cheerful", "thoughtful"]
TEMPLATES = [
    "{time}, {person} in {place} {verb} {thing}.",
    "People in {place} still remember {thing}, and {person} {verb} it for years.",
    "{time}, the mood in {place} was {feeling}, mostly because of {thing}.",
    "{person_cap} said that {thing} had changed {place} more than anyone expected.",
    "Nobody in {place} agreed about {thing}; {person} {verb} it with anyone who would listen.",
    "{time}, {person} walked from {place} to {place2} and {verb} {thing} on the way.",
    "The records of {place} mention {thing} only once, in a note written by {person}.",
    "It is said that {person} felt {feeling} whenever {thing} came up in conversation.",
    "{time}, {thing} brought visitors to {place}, and {person} {verb} every one of them.",
    "Between {place} and {place2} the road is long, and {person} knows each turn of it.",
]


def generated_sentences(count: int, seed: int) -> list[str]:
    """`count` sentences of generated filler prose (see the module docstring), deterministic per seed."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        person = rng.choice(PEOPLE)
        place, place2 = rng.sample(PLACES, 2)
        sentence = rng.choice(TEMPLATES).format(
            time=rng.choice(TIMES),
            person=person,
            person_cap=person[0].upper() + person[1:],
            place=place,
            place2=place2,
            thing=rng.choice(THINGS),
            verb=rng.choice(VERBS),
            feeling=rng.choice(FEELINGS),
        )
        sentences.append(sentence[0].upper() + sentence[1:])
    return sentences


def file_paragraphs(path: Path, field: str = "text") -> list[str]:
    """Paragraphs of real prose from a .txt file (blank-line separated) or a JSONL file's `field` values."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: haystack text file not found (context.eval.haystack)")
    if path.suffix.lower() in (".jsonl", ".json"):
        from afina.data.load import iter_json_objects

        paragraphs = []
        for number, row in iter_json_objects(path):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{path}:{number}: the JSONL row needs a string field `{field}`")
            paragraphs.append(row[field].strip())
    else:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(f"{path}: no text in the haystack file")
    return paragraphs


class Haystack:
    """A source of prose pieces; `take(tokens)` returns text of about that many tokens.

    Pieces are drawn in a seeded random order (cycling through a file when a haystack is longer
    than it), so different trials see different text.
    """

    def __init__(self, tokenizer, path: Path | None = None, seed: int = 0, field: str = "text"):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        pieces = file_paragraphs(path, field) if path is not None else generated_sentences(4000, seed)
        self.pieces = [(p, len(tokenizer(" " + p, add_special_tokens=False)["input_ids"])) for p in pieces]
        self.provenance = (
            f"{path} (field {field})" if path is not None else "generated filler (afina.eval.haystack, seeded grammar)"
        )

    def take(self, tokens: int) -> list[str]:
        """Pieces of prose totalling at least `tokens` tokens (callers trim to the exact length)."""
        out, total = [], 0
        while total < tokens:
            text, n = self.pieces[self.rng.randrange(len(self.pieces))]
            out.append(text)
            total += n
        return out
