"""The task classifier and the choice of a model for a task."""

from __future__ import annotations

import random
import timeit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.routing.classifier import (
    LONG_CONTEXT_TOKENS,
    TASKS,
    ModelChoice,
    choose_model,
    classify,
)
from citadel.settings import Deployment, Model, Price

PYTHON = """Why does this fail?

def mean(values):
    total = sum(values)
    return total / len(values)
"""
PYTHON_IMPORTS = "import numpy as np\nfrom scipy import stats\n\nx = np.arange(10)"
JAVASCRIPT = "Make this faster:\nconst items = await fetch(url).then((r) => r.json());"
JS_FUNCTION = "function add(a, b) {\n  return a + b;\n}"
SQL = "SELECT name, email FROM users WHERE created_at > now() - interval '1 day'"
SQL_LOWER = "why is this slow?\nselect u.id, count(*) from users u join orders o on o.uid = u.id"
C = '#include <stdio.h>\nint main(void) { printf("hi\\n"); return 0; }'
FENCED = "Explain this:\n```\nls -la | grep foo\n```"
INLINE = "What does `git rebase -i HEAD~3` do?"
JSON = '{"a": {"b": 1}, "c": {"d": [1, 2]}, "e": {"f": {"g": 3}}, "h": {}}'
CODE_SUBJECT = "Write a Python script that renames all my photos by date."
CODE = [PYTHON, PYTHON_IMPORTS, JAVASCRIPT, JS_FUNCTION, SQL, SQL_LOWER, C, FENCED, INLINE, JSON]

PROOF = "Prove that the square root of 2 is irrational."
STEPS = "A train leaves at 3pm going 60 mph. Think step-by-step: when does it reach the city?"
SOLVE = "Can you solve this for me: a farmer has chickens and cows, 30 heads and 74 legs."
MATH = "If x^2 + 3x = 10 and y = 2x + 1, what are x and y?"
LATEX = r"What is \int_0^1 x^2 dx + \sum_{n=1}^{10} n? Also \frac{1}{2}."
REASONING = [PROOF, STEPS, SOLVE, MATH, LATEX]

CHAT = [
    "Hi! What's a good name for a grey cat?",
    "I need to return this class of imports by Friday; can you draft a polite email?",
    "Summarise the plot of Hamlet in three sentences.",
    "Select the best one from the list: apples, pears, plums.",
    "Tell me about the weather in Paris (in spring) and what to pack: coat, umbrella.",
]


@pytest.mark.parametrize("prompt", CODE)
def test_code(prompt: str) -> None:
    """Python, JavaScript, SQL, C, fences, inline code and brace-heavy text are code."""
    assert "code" == classify(prompt, estimated_tokens=100)


def test_a_request_about_programming_is_code() -> None:
    """Naming a programming subject near the start makes it code, with no code in it."""
    assert "code" == classify(CODE_SUBJECT, estimated_tokens=20)


@pytest.mark.parametrize("prompt", REASONING)
def test_reasoning(prompt: str) -> None:
    """Proofs, step-by-step requests, puzzles and math-heavy text are reasoning."""
    assert "reasoning" == classify(prompt, estimated_tokens=100)


@pytest.mark.parametrize("prompt", CHAT)
def test_chat(prompt: str) -> None:
    """Prose is chat, even when it uses words that code uses too."""
    assert "chat" == classify(prompt, estimated_tokens=100)


def test_words_must_be_whole() -> None:
    """ "improve" is not "prove", "resolve" is not "solve", "computer" is not "compute"."""
    prompt = "Please improve my letter and resolve the tone; my computer is slow."
    assert "chat" == classify(prompt, estimated_tokens=20)


def test_long_context_threshold() -> None:
    """Over LONG_CONTEXT_TOKENS tokens the task is long-context, whatever the text."""
    assert "long-context" == classify(PYTHON, estimated_tokens=LONG_CONTEXT_TOKENS + 1)
    assert "code" == classify(PYTHON, estimated_tokens=LONG_CONTEXT_TOKENS)


def test_hint_wins() -> None:
    """A known task in the header wins over the text and the size, in any case and spacing."""
    assert "reasoning" == classify(PYTHON, estimated_tokens=10, hint="reasoning")
    assert "chat" == classify(PYTHON, estimated_tokens=LONG_CONTEXT_TOKENS + 1, hint=" Chat ")
    assert "embedding" == classify("", estimated_tokens=0, hint="embedding")


def test_blank_hint_is_no_hint() -> None:
    """An empty header counts as absent."""
    assert "code" == classify(PYTHON, estimated_tokens=10, hint="  ")


def test_bad_hint_raises() -> None:
    """An unknown task in the header is an error naming it and the known tasks."""
    with pytest.raises(ValueError, match=r"'poetry'.*code, reasoning, long-context"):
        classify("hello", estimated_tokens=1, hint="poetry")


def test_a_long_prompt_is_judged_on_its_ends() -> None:
    """Beyond the scanned head and tail, text is not looked at, so the cost stays bounded."""
    filler = "Lorem ipsum dolor sit amet. " * 500
    assert "chat" == classify(filler + PYTHON + filler, estimated_tokens=4000)
    assert "code" == classify(filler + PYTHON, estimated_tokens=4000)


@given(st.text(max_size=3000), st.integers(min_value=0, max_value=20_000))
def test_any_text_gets_a_task(prompt: str, tokens: int) -> None:
    """Every prompt is given one of the known tasks, and never the header-only embedding."""
    task = classify(prompt, estimated_tokens=tokens)
    assert task in TASKS
    assert task != "embedding"


def test_fast_on_a_2kb_prompt() -> None:
    """A 2 KB prose prompt classifies in well under 100 µs (about 10 µs on a laptop)."""
    words = ["the", "a", "of", "to", "and", "we", "talk", "about", "weather", "plans", "city"]
    rng = random.Random(0)
    prompt = " ".join(rng.choice(words) for _ in range(500))[:2048]
    best = min(timeit.repeat(lambda: classify(prompt, estimated_tokens=500), number=200, repeat=5))
    assert best / 200 < 100e-6


# --- choose_model -------------------------------------------------------------------------------


def model(
    name: str,
    *,
    window: int = 8192,
    price: float = 1.0,
    specialties: tuple[str, ...] = (),
    kind: str = "chat",
) -> Model:
    deployment = Deployment(name=f"{name}-0", url="http://127.0.0.1:1", upstream_model=name)
    return Model(
        name=name,
        kind=kind,
        deployments=(deployment,),
        context_window=window,
        specialties=specialties,
        price=Price(input_per_1k=price, output_per_1k=price),
    )


SMALL = model("small", window=8_000, price=0.1)
CODER = model("coder", window=16_000, price=0.5, specialties=("code",))
BIG_CODER = model("big-coder", window=128_000, price=2.0, specialties=("code", "reasoning"))
LONG = model("long", window=200_000, price=3.0, specialties=("long-context",))
EMBED = model("embed", window=8_000, price=0.01, kind="embedding")
MODELS = (SMALL, CODER, BIG_CODER, LONG, EMBED)


def everything(_: Model) -> bool:
    return True


def test_cheapest_specialist_wins() -> None:
    """Of the models specialising in the task, the cheaper one is chosen, and the reason says so."""
    choice = choose_model("code", needed_tokens=1_000, models=MODELS, allowed=everything)
    reason = "code task: coder specialises in code; cheapest of 2 fits"
    assert ModelChoice(CODER, "code", reason) == choice


def test_context_window_filter() -> None:
    """A model whose window is smaller than the tokens needed is not a candidate."""
    choice = choose_model("code", needed_tokens=20_000, models=MODELS, allowed=everything)
    assert choice is not None
    assert BIG_CODER == choice.model
    assert choice.reason.endswith("the only specialist that fits")


def test_tier_filter() -> None:
    """Models the caller's tier may not use are not candidates."""
    choice = choose_model(
        "code", needed_tokens=1_000, models=MODELS, allowed=lambda m: m.name != "coder"
    )
    assert choice is not None
    assert BIG_CODER == choice.model


def test_a_model_that_cannot_serve_is_passed_over() -> None:
    """Issue 18 item 7: a specialist with no servable deployment is skipped for the next fit,
    and the reason names it; when no fit can serve, the choice is made among them all."""
    choice = choose_model(
        "code",
        needed_tokens=1_000,
        models=MODELS,
        allowed=everything,
        servable=lambda m: m.name != "coder",
    )
    assert choice is not None
    assert BIG_CODER == choice.model
    assert choice.reason.endswith("(coder skipped: no healthy deployment)")
    nothing = choose_model(
        "code", needed_tokens=1_000, models=MODELS, allowed=everything, servable=lambda m: False
    )
    assert nothing is not None
    assert CODER == nothing.model


def test_no_specialist_means_the_cheapest_that_fits() -> None:
    """Without a specialist, the cheapest model that fits is chosen, and the reason says why."""
    choice = choose_model("chat", needed_tokens=10_000, models=MODELS, allowed=everything)
    assert choice is not None
    assert CODER == choice.model
    assert (
        "chat task: no allowed model that fits specialises in chat; coder is the cheapest of 3 fits"
        == (choice.reason)
    )


def test_long_context_prefers_the_specialist_that_fits() -> None:
    """A long-context request goes to a long-context model even if a cheaper one also fits."""
    choice = choose_model("long-context", needed_tokens=50_000, models=MODELS, allowed=everything)
    assert choice is not None
    assert LONG == choice.model


def test_embedding_models_serve_only_embedding() -> None:
    """The cheap embedding model is never chosen for chat, and is the only choice for embedding."""
    chat = choose_model("chat", needed_tokens=10, models=MODELS, allowed=everything)
    embedding = choose_model("embedding", needed_tokens=10, models=MODELS, allowed=everything)
    assert chat is not None
    assert embedding is not None
    assert SMALL == chat.model
    assert EMBED == embedding.model


def test_equal_prices_keep_configured_order() -> None:
    """On a price tie the model configured first wins."""
    first, second = model("first", price=1.0), model("second", price=1.0)
    choice = choose_model("chat", needed_tokens=10, models=(first, second), allowed=everything)
    assert choice is not None
    assert first == choice.model


def test_none_fits() -> None:
    """When no allowed model has a window large enough, there is no choice."""
    assert choose_model("chat", needed_tokens=1_000_000, models=MODELS, allowed=everything) is None
    assert choose_model("chat", needed_tokens=10, models=MODELS, allowed=lambda m: False) is None


def test_unknown_task_raises() -> None:
    """choose_model refuses a task it does not know, naming it."""
    with pytest.raises(ValueError, match="'poetry'"):
        choose_model("poetry", needed_tokens=10, models=MODELS, allowed=everything)
