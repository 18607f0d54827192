"""Tests for the simulator's deterministic text, token counts and embeddings."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

import math

import orjson
from hypothesis import given
from hypothesis import strategies as st

from citadel.sim.text import (
    FIRST_PIECE_JSON,
    PIECE_JSON,
    VOCABULARY,
    chat_prompt_tokens,
    count_words,
    detokenize,
    embed,
    generate,
)


def test_vocabulary_is_512_distinct_single_words() -> None:
    """The vocabulary holds 512 distinct words, none empty or containing whitespace."""
    assert 512 == len(set(VOCABULARY))
    assert [] == [word for word in VOCABULARY if not word or word.split() != [word]]


def test_pieces_are_the_words_as_json_strings() -> None:
    """Streamed pieces decode to the word, with a leading space after the first piece."""
    assert VOCABULARY == tuple(orjson.loads(piece) for piece in FIRST_PIECE_JSON)
    assert tuple(" " + w for w in VOCABULARY) == tuple(orjson.loads(p) for p in PIECE_JSON)


def test_same_inputs_give_the_same_text() -> None:
    """Generation is a pure function of seed, model, prompt, length and choice."""
    first = detokenize(generate(0, "sim-chat", "Tell me a story.", 16))
    assert first == detokenize(generate(0, "sim-chat", "Tell me a story.", 16))
    assert 16 == count_words(first)


def test_seed_model_prompt_and_choice_each_change_the_text() -> None:
    """Changing any one input changes the generated text."""
    base = generate(0, "sim-chat", "Tell me a story.", 16)
    variants = [
        generate(1, "sim-chat", "Tell me a story.", 16),
        generate(0, "sim-code", "Tell me a story.", 16),
        generate(0, "sim-chat", "Tell me a poem.", 16),
        generate(0, "sim-chat", "Tell me a story.", 16, choice=1),
    ]
    assert [True, True, True, True] == [list(v) != list(base) for v in variants]


@given(
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    prompt=st.text(max_size=200),
    short=st.integers(min_value=0, max_value=300),
    extra=st.integers(min_value=0, max_value=300),
)
def test_a_shorter_reply_is_a_prefix_of_a_longer_one(
    seed: int, prompt: str, short: int, extra: int
) -> None:
    """Like greedy decoding, asking for fewer tokens gives the start of the longer reply."""
    longer = list(generate(seed, "m", prompt, short + extra))
    assert longer[:short] == list(generate(seed, "m", prompt, short))
    assert short + extra == len(longer)


def test_replies_longer_than_the_corpus_have_the_asked_length() -> None:
    """A reply longer than the pre-drawn corpus wraps around and still has every token."""
    tokens = generate(3, "sim-chat", "long", 20_000)
    assert 20_000 == len(tokens)
    assert 20_000 == count_words(detokenize(tokens))


@given(st.lists(st.integers(min_value=0, max_value=511), max_size=50))
def test_detokenized_text_has_one_word_per_token(tokens: list[int]) -> None:
    """One word is one token: the text of N tokens has N words."""
    assert len(tokens) == count_words(detokenize(tokens))


def test_prompt_tokens_count_words_and_chat_template() -> None:
    """Prompt tokens are whitespace-separated words, plus 3 per chat message and 3."""
    assert 0 == count_words("")
    assert 4 == count_words("  one two\nthree\tfour ")
    assert 4 + 3 * 2 + 3 == chat_prompt_tokens("You are terse.\nHello!", 2)


def test_embeddings_are_deterministic_unit_vectors() -> None:
    """The same text embeds to the same unit vector; another text or model to another."""
    vector = embed("sim-embed", "hello world", 64)
    assert 64 == len(vector)
    assert math.isclose(1.0, math.fsum(v * v for v in vector), rel_tol=1e-5)
    assert list(vector) == list(embed("sim-embed", "hello world", 64))
    assert list(vector) != list(embed("sim-embed", "hello there", 64))
    assert list(vector) != list(embed("sim-other", "hello world", 64))
    assert 3 == len(embed("sim-embed", "hello world", 3))
