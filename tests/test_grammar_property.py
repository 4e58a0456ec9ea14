"""Property: whatever the JSON schema, every answer decoded under its grammar parses and validates, with a byte-level
BPE tokenizer (the default model's) and a SentencePiece one with byte fallback (as Gemma's). The logits are random
(a model that knows nothing), so only the constraint keeps the answer inside the schema."""

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afina.serve.grammar import GrammarLogitsProcessor, json_grammar, tool_grammar
from afina.serve.tools import ToolCallStream

MAX_STEPS = 160
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)


def leaf():
    return st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 500),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(
            lambda v: {"enum": v},
            st.lists(
                st.one_of(st.integers(-9, 9), st.text('abc é"\\', max_size=4), st.booleans()),
                min_size=1,
                max_size=3,
                unique=True,
            ),
        ),
        st.just({"type": "string", "pattern": "^[a-f]{1,3}-[0-9]{2}$"}),
        st.just({"type": "string", "format": "date"}),
        st.builds(lambda c: {"const": c}, st.text("xyz\n", max_size=3)),
    )


def extend(children):
    objects = st.builds(
        lambda props, data: {
            "type": "object",
            "properties": props,
            "required": data.draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else [],
            "additionalProperties": False,
        },
        st.dictionaries(NAMES, children, max_size=3),
        st.data(),
    )
    arrays = st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3))
    alternatives = st.builds(lambda a, b: {"anyOf": [a, b]}, children, children)
    return st.one_of(objects, arrays, alternatives)


SCHEMAS = st.recursive(leaf(), extend, max_leaves=6)
WITH_REF = st.builds(
    lambda inner: {"$defs": {"part": inner}, "type": "array", "items": {"$ref": "#/$defs/part"}, "maxItems": 2}, SCHEMAS
)


def decode(tokenizer, grammar: str, seed: int) -> tuple[str, bool]:
    """Greedy decoding of random logits under the grammar: the text, and whether it ended (EOS)."""
    generator = torch.Generator().manual_seed(seed)
    processor = GrammarLogitsProcessor(tokenizer, grammar, prompt_length=0)
    ids = torch.zeros((1, 0), dtype=torch.long)
    eos = tokenizer.eos_token_id
    for _ in range(MAX_STEPS):
        scores = torch.randn((1, len(tokenizer)), generator=generator)
        scores[0, eos] += 2.0  # a model that stops when it may, now and then: answers end within the budget
        token = int(processor(ids, scores).argmax())
        if token == eos:
            return tokenizer.decode(ids[0]), True
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(ids[0]), False


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    from archs import sentencepiece_tokenizer

    return sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(params=["byte-level-bpe", "sentencepiece"])
def any_tokenizer(request, tokenizer, sentencepiece):
    return tokenizer if request.param == "byte-level-bpe" else sentencepiece


PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(schema=st.one_of(SCHEMAS, WITH_REF), seed=st.integers(0, 2**16))
def test_every_constrained_answer_parses_and_validates(any_tokenizer, schema, seed):
    text, ended = decode(any_tokenizer, json_grammar(schema), seed)
    if ended:
        jsonschema.validate(json.loads(text), schema)
    else:  # cut off by the step budget: still the start of a valid answer, and no blank padding
        assert text.strip() == text


@PROPERTY
@given(parameters=extend(leaf()).filter(lambda s: s.get("type") == "object"), seed=st.integers(0, 2**16))
def test_every_constrained_tool_call_validates_against_its_tool(any_tokenizer, parameters, seed):
    tools = [{"type": "function", "function": {"name": "act", "parameters": parameters}}]
    text, ended = decode(any_tokenizer, tool_grammar(tools, "required", parallel=False), seed)
    stream = ToolCallStream(expect_calls=True)
    stream.add(text, final=True)
    if ended:
        (call,) = stream.message()["tool_calls"]
        assert call["function"]["name"] == "act"
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
