"""Synthetic key-retrieval rows for context extension (`context.retrieval`).

Training on long text alone teaches a model its new positions: perplexity far into a long input
falls. For a small model and a short fine-tune it does not teach the model to *use* a fact seen
hundreds or thousands of tokens earlier: in afina's measurements passkey retrieval did not improve
after text-only extension (README, context extension). So `context.retrieval.fraction` mixes in
rows where a few number facts hide at random depths in the training text and a question at the
end asks for one of them; the loss is on the answer only. This is the long-context recipe of
the field in miniature (long-context instruction data such as LongAlpaca's, synthetic retrieval
in LongLoRA-style and "needle" training sets).

The wording is deliberately not the passkey test's (afina.eval.long_context): other facts
("the vault code of Mira", "the entry code", "the license key"; never "pass key"), instructions and
questions, one to `facts` facts per row (the others are distractors, so copying the only number in sight
does not pay), keys of 3 to 7 digits, and the haystack is the training split's own text. The evaluation
then measures a skill that transfers to an unseen template and unseen prose, not a memorised one.

Provenance: the templates and word lists are written for afina.
"""

from __future__ import annotations

import math
import random
from typing import Any

from afina.data.format import IGNORE_INDEX

SUBJECTS = [
    "vault code",
    "access code",
    "locker number",
    "ticket number",
    "room number",
    "badge number",
    "order number",
    "account number",
    "parcel number",
    "gate code",
    "invoice number",
    "door code",
    "member number",
    "case number",
    "serial number",
    "booking reference",
    "security code",
    "PIN",
    "secret number",
    "entry code",
    "lucky number",
    "reference number",
    "license key",
    "product key",
    "API key",
    "access key",
    "room key number",
]
OWNERS = [
    "Mira",
    "Tomas",
    "Aiko",
    "Dr. Okafor",
    "the harbour office",
    "the night shift",
    "the north warehouse",
    "the library",
    "Mrs. Lindqvist",
    "the chess club",
    "Rafael",
    "the east wing",
    "Professor Adeyemi",
    "the bakery on Elm Street",
    "Jonas",
    "the ferry company",
    "Priya",
    "the archive",
    "Captain Moreau",
    "Lena",
]
NEEDLES = [  # a fact that belongs to someone (rows with distractors of the same kind)
    "The {subject} of {owner} is {key}.",
    "Note that the {subject} of {owner} is {key}; keep it in mind.",
    "For the record, {owner} has {key} as the {subject}.",
    "Please remember: {owner}, {subject} {key}.",
    "It was agreed that the {subject} of {owner} would be {key}.",
]
PLAIN_NEEDLES = [  # a fact on its own (distractors are other subjects)
    "The {subject} is {key}.",
    "Remember this: the {subject} is {key}.",
    "Write it down, the {subject} is {key}. Again, {key}.",
    "{key} is the {subject}, do not forget it.",
    "Important: the {subject} you will need is {key}.",
]
INSTRUCTIONS = [
    "Some facts are hidden in the long text below. Read all of it; a question about one of them follows.\n",
    "Read the following document carefully. You will be asked about a number mentioned in it.\n",
    "The text below contains a few numbers that matter among much that does not.\n",
    "Somewhere in this long text is a detail you will need. Read everything; the question comes at the end.\n",
    "",
]
QUESTIONS = [
    "\nQuestion: what is the {subject} of {owner}? Answer: the {subject} of {owner} is",
    "\nWhich number is the {subject} of {owner}? It is",
    "\nNow recall the {subject} of {owner}. The {subject} of {owner} is",
]
PLAIN_QUESTIONS = [
    "\nWhat is the {subject}? The {subject} is",
    "\nQuestion: which number is the {subject}? Answer:",
    "\nNow, the {subject} mentioned above is",
]


def _key(rng: random.Random) -> str:
    digits = rng.randint(3, 7)
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def retrieval_example(
    tokenizer, filler_tokens: list[list[int]], length: int, facts: int, rng: random.Random
) -> dict[str, list[int]]:
    """One row of exactly `length` tokens: instruction, filler with 1..facts number facts at
    random depths, a question about one of them; labels on the answer's tokens only."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    count = rng.randint(1, facts)
    owned = rng.random() < 0.5  # "the vault code of Mira" facts, or plain "the vault code" facts
    if owned:
        pairs = rng.sample([(s, o) for s in SUBJECTS for o in OWNERS], count)
    else:
        pairs = [(s, "") for s in rng.sample(SUBJECTS, count)]
    needle_templates, question_templates = (NEEDLES, QUESTIONS) if owned else (PLAIN_NEEDLES, PLAIN_QUESTIONS)
    keys = [_key(rng) for _ in pairs]
    needles = [
        encode(" " + rng.choice(needle_templates).format(subject=s, owner=o, key=k)) for (s, o), k in zip(pairs, keys)
    ]
    asked = rng.randrange(count)
    subject, owner = pairs[asked]
    prefix = encode(rng.choice(INSTRUCTIONS))
    question = encode(rng.choice(question_templates).format(subject=subject, owner=owner))
    answer = encode(f" {keys[asked]}")

    def spare() -> int:
        return length - len(prefix) - sum(map(len, needles)) - len(question) - len(answer)

    while spare() < 0 and len(needles) > 1:  # a short row: drop distractors, then the instruction
        drop = next(i for i in range(len(needles)) if i != asked)
        del needles[drop]
        if drop < asked:
            asked -= 1
    if spare() < 0:
        prefix = []
    if spare() < 0:
        raise ValueError(
            f"a retrieval row of {length} tokens cannot hold a fact and its question "
            f"({length - spare()} tokens); raise context.retrieval.min_length or the row length"
        )
    room = spare()
    filler: list[int] = []
    while len(filler) < room:
        filler += filler_tokens[rng.randrange(len(filler_tokens))]
    filler = filler[:room]
    cuts = sorted(rng.randint(0, room) for _ in needles)
    body: list[int] = []
    last = 0
    for cut, needle in zip(cuts, needles):
        body += filler[last:cut] + needle
        last = cut
    body += filler[last:]
    ids = prefix + body + question + answer
    labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    return {"input_ids": ids, "labels": labels}


def row_texts(rows: list[dict[str, Any]]) -> list[str]:
    """The prose of training rows: `text`, or a chat's turns joined."""
    return [row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"]) for row in rows]


def retrieval_examples(
    tokenizer, texts: list[str], count: int, row_length: int, min_fraction: float, facts: int, seed: int
) -> list[dict[str, list[int]]]:
    """`count` retrieval rows of lengths drawn uniformly from [min_fraction x row_length, row_length]."""
    pieces = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in texts if t.strip()]
    if not pieces:
        raise ValueError("context.retrieval needs training text to hide facts in; the train split has none")
    rng = random.Random(seed)
    shortest = max(64, int(min_fraction * row_length))
    return [
        retrieval_example(tokenizer, pieces, rng.randint(min(shortest, row_length), row_length), facts, rng)
        for _ in range(count)
    ]


def retrieval_count(fraction: float, train_set: list[dict[str, list[int]]], pack_length: int | None) -> int:
    """How many retrieval rows make `fraction` of the training rows (packed rows counted as rows)."""
    if fraction <= 0:
        return 0
    if pack_length:
        rows = math.ceil(sum(len(e["input_ids"]) for e in train_set) / pack_length)
    else:
        rows = len(train_set)
    return max(1, round(fraction / (1 - fraction) * rows))
