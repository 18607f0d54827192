"""Model specialisation: which task a prompt is, and which model should serve it.

Theory of operation
-------------------
A request for a virtual model (``auto``, or an alias configured as one) names no model: the
gateway asks ``classify`` for the task, then ``choose_model`` for the model.

*The task* is the caller's ``x-citadel-task`` header when it sends one (a task not in ``TASKS`` is
an error, not a guess). Otherwise a few cheap tests on the prompt, first match wins:

1. ``long-context`` when the prompt is over ``LONG_CONTEXT_TOKENS`` tokens: size trumps topic,
   since only a model with a large window can take it at all.
2. ``code`` when the text has a code fence or an inline code span, or a line that starts the way
   only code starts (``def f(``, ``import os``, ``#include``, ``const x =``, ``SELECT``, an
   indented ``return``, ``}``...). Code words alone, such as "class" or "return", are not
   enough: prose uses them too. Also ``code`` when the ends of the prompt name a programming
   subject ("python", "sql", "regex", "debug", "traceback"...).
3. ``reasoning`` when the ends of the prompt say "prove", "solve", "step by step", "theorem"...,
   or the text is math-heavy: at least ``_MATH_HITS`` operators before a number or a variable,
   LaTeX commands and math symbols.
4. ``code`` again when braces and semicolons are dense (at least ``_CODE_PUNCTUATION`` of them and
   one per hundred characters): code with no telling line, or JSON. This comes after reasoning
   because LaTeX is full of braces too.
5. ``chat`` otherwise. ``embedding`` only ever comes from the header (or the endpoint).

Speed is the constraint: this runs on every request for a virtual model, and must cost a few
microseconds on a 2 KB prompt. CPython's ``re`` finds a pattern that starts with a literal by a
fast scan, but tries one that starts with a class, ``\\b`` or ``^`` at every position, ten to a
hundred times slower; and each ``in`` or ``str.count`` of a multi-character string is a full pass.
So every pattern here starts with a literal (a newline, a space, an operator), single-character
``in`` tests (a ``memchr``) gate the rest, and the words are looked for only in the first and
last ``_EDGE_CHARS`` characters, where a prompt's instructions usually are; what lies between
is mostly pasted material, judged by its lines and punctuation. A prompt over ``_SCAN_CHARS``
characters is judged on its head and tail, so the cost is bounded whatever the size.

*The model* is chosen among those the caller's tier allows, of the right kind (embedding models
for the embedding task, and only for it) and with a context window of at least the tokens needed.
Models listing the task among their ``specialties`` are preferred; among the preferred, the one
with the lowest blended price (mean of input and output per 1000 tokens) wins, the first
configured on a tie. A model with no deployment that could serve now (every one drained, broken
open or failing its health probe: ``servable``) is skipped for the next fit; when no fit can
serve, the choice is made among them all, as ``Router.select`` tries unhealthy deployments
rather than none. No model fits: None, and the caller answers with an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from citadel.routing.balancer import blended_per_1k
from citadel.settings import Model

__all__ = ["LONG_CONTEXT_TOKENS", "TASKS", "ModelChoice", "choose_model", "classify"]

TASKS: Final = ("code", "reasoning", "long-context", "chat", "embedding")
LONG_CONTEXT_TOKENS: Final = 8000  # above this many prompt tokens the task is long-context
_SCAN_CHARS: Final = 6000  # a longer prompt is judged on its first 4000 and last 2000 characters
_HEAD_CHARS: Final = 4000
_EDGE_CHARS: Final = 400  # words are looked for in this many characters at each end
_CODE_PUNCTUATION: Final = 8  # braces and semicolons: at least this many, one per 100 characters
_MATH_HITS: Final = 3  # operators before numbers, LaTeX commands, math symbols

# A line that only code starts this way (case-sensitive). Searched for in "\n" + text: the
# leading newline is a literal, so the engine jumps from line to line instead of trying every
# position as ``^`` with MULTILINE would.
_CODE_LINE = re.compile(
    r"""\n[ \t]*(?:
      (?:async\s+)?def\s+\w+\s*\(                                   # Python
    | class\s+\w+\s*(?:\(|:|\{|extends\b|implements\b)
    | from\s+[\w.]+\s+import\s
    | import\s+(?:[\w.]+\s*(?:;|,|\bas\b|$)|\{|\*|[\w$]+\s+from\s)  # Python, JavaScript, Java
    | (?:export\s+)?(?:async\s+)?function\b                          # JavaScript
    | (?:export\s+)?(?:const|let|var)\s+[\w$]+\s*(?::[^=\n]+)?=
    | (?<=[ \t])return\b                                             # an indented return
    | return\b[^\n]*;[ \t\r]*$
    | (?:pub\s+)?(?:async\s+)?fn\s+\w+                               # Rust
    | func\s                                                         # Go
    | (?:public|private|protected|static)\s+[\w<>\[\], ]+\(          # Java, C#
    | \#(?:include|define|ifn?def)\b | \#!/                          # C, a shebang
    | (?:if|for|while|switch)\s*\(.*\)\s*\{
    | (?:console\.log|print|printf|println!?|System\.out\.println)\(
    | [\w.]+\s*\([^)\n]*\)\s*;[ \t\r]*$                                # a call statement
    | [\w.]+\s*=\s*[\w.]+\([^)\n]*\)[ \t\r]*$                           # x = f(y)
    | \}
    | (?:SELECT|INSERT\s+INTO|DELETE\s+FROM|CREATE\s+TABLE|ALTER\s+TABLE)\s  # SQL
    | UPDATE\s+\w+\s+SET\s
    | (?i:select)\s+(?:\*|[\w.]+\s*,\s*[\w.]+)[^\n]*\s(?i:from)\s     # select a, b from
    )""",
    re.VERBOSE | re.MULTILINE,
)
_INLINE_CODE = re.compile(r"`[^`\n]+`")


def _words(table: dict[str, tuple[str, ...]]) -> re.Pattern[str]:
    """One pattern finding any of the words in lower-cased text, each after a space.

    Anchoring every word on a space lets the engine jump from space to space, and grouping the
    words by first letter tries one branch per space instead of one per word: about a sixth of
    the cost of a plain alternation after a word boundary. A space in a phrase also matches a
    hyphen.
    """
    by_letter: dict[str, list[str]] = {}
    for words in table.values():
        for word in words:
            rest = re.escape(word[1:]).replace(r"\ ", "[ -]")
            by_letter.setdefault(word[0], []).append(rest)
    branches = (
        f"{re.escape(letter)}(?:{'|'.join(sorted(rests, key=len, reverse=True))})"
        for letter, rests in sorted(by_letter.items())
    )
    return re.compile(f" ({'|'.join(branches)})\\b")


_TASK_WORDS: Final = {
    "code": (  # a request about programming, even with no code in it
        *("python", "javascript", "typescript", "golang", "kotlin", "haskell", "java"),
        *("sql", "regex", "regexp", "json", "yaml", "html", "css", "shell script", "powershell"),
        *("code", "coding", "codebase", "debug", "debugging", "compile", "compiler"),
        *("traceback", "stacktrace", "refactor", "refactoring", "unittest", "pytest"),
        *("dockerfile", "github"),
    ),
    "reasoning": (
        *("prove", "proves", "proved", "proven", "proving", "proof", "proofs"),
        *("solve", "solves", "solved", "solving", "theorem", "theorems", "lemma", "corollary"),
        *("derive", "derived", "deriving", "derivation", "derivative", "derivatives"),
        *("deduce", "deduced", "deduction", "calculate", "calculated", "calculating"),
        *("calculation", "compute", "computation", "probability", "probabilities"),
        *("equation", "equations", "riddle", "puzzle", "step by step"),
    ),
}
_WORDS = _words(_TASK_WORDS)
_TASK_OF_WORD: Final = {
    word.replace("-", " "): task for task, words in _TASK_WORDS.items() for word in words
}

_MATH_OPERATORS: Final = {  # each pattern starts with its operator, so it is found fast
    op: re.compile(re.escape(op) + r" ?(?:\d|\(|[A-Za-z]\b)") for op in ("=", "^", "+", "×", "÷")
}
_MATH_SYMBOLS: Final = "∑∫√≤≥≠∞π∀∃∈⇒"
_LATEX = re.compile(r"\\(?:frac|sum|int|sqrt|prod|lim|infty|cdot|leq|geq|forall|exists)\b")


def _tasks_named(text: str) -> set[str]:
    """The tasks whose words occur near the start or the end of the text, in any letter case."""
    if len(text) > 2 * _EDGE_CHARS:
        text = text[:_EDGE_CHARS] + " " + text[-_EDGE_CHARS:]
    text = " " + text.lower().replace("\n", " ").replace("\t", " ")
    return {_TASK_OF_WORD[m[1].replace("-", " ")] for m in _WORDS.finditer(text)}


def _math_hits(text: str) -> int:
    hits = 0
    for op, pattern in _MATH_OPERATORS.items():
        if op in text:
            hits += len(pattern.findall(text))
    if "\\" in text:
        hits += len(_LATEX.findall(text))
    if not text.isascii():
        hits += sum(text.count(symbol) for symbol in _MATH_SYMBOLS if symbol in text)
    return hits


def classify(prompt_text: str, *, estimated_tokens: int, hint: str | None = None) -> str:
    """The task of a prompt: ``hint`` (the ``x-citadel-task`` header) if set, else a guess."""
    if hint is not None and hint.strip():
        task = hint.strip().lower()
        if task not in TASKS:
            raise ValueError(f"task {hint!r}: expected one of {', '.join(TASKS)}")
        return task
    if estimated_tokens > LONG_CONTEXT_TOKENS:
        return "long-context"
    text = prompt_text
    if len(text) > _SCAN_CHARS:
        text = text[:_HEAD_CHARS] + "\n" + text[len(text) - (_SCAN_CHARS - _HEAD_CHARS) :]
    if "`" in text and ("```" in text or _INLINE_CODE.search(text)):
        return "code"
    if _CODE_LINE.search("\n" + text):
        return "code"
    named = _tasks_named(text)
    if "code" in named:
        return "code"
    if "reasoning" in named or _math_hits(text) >= _MATH_HITS:
        return "reasoning"
    if "{" in text or ";" in text:
        punctuation = text.count("{") + text.count("}") + text.count(";")
        if punctuation >= _CODE_PUNCTUATION and punctuation * 100 >= len(text):
            return "code"
    return "chat"


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The model chosen for a task, and why, in words for logs and the dry-run endpoint."""

    model: Model
    task: str
    reason: str


def choose_model(
    task: str,
    *,
    needed_tokens: int,
    models: Sequence[Model],
    allowed: Callable[[Model], bool],
    servable: Callable[[Model], bool] | None = None,
) -> ModelChoice | None:
    """The cheapest allowed model that fits ``needed_tokens``, specialists first, among those
    ``servable`` (a healthy deployment) unless none is, or None."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    embedding = task == "embedding"
    fits = [
        m
        for m in models
        if (m.kind == "embedding") == embedding and m.context_window >= needed_tokens and allowed(m)
    ]
    if not fits:
        return None
    down = [] if servable is None else [m for m in fits if not servable(m)]
    if down and len(down) < len(fits):
        fits = [m for m in fits if m not in down]
    else:
        down = []  # all down (or none): choose among them all
    specialists = [m for m in fits if task in m.specialties]
    pool = specialists or fits
    model = min(pool, key=lambda m: blended_per_1k(m.price))  # min keeps the first on a tie
    if specialists:
        why = f"{model.name} specialises in {task}"
        rank = (
            "the only specialist that fits" if len(pool) == 1 else f"cheapest of {len(pool)} fits"
        )
    else:
        why = f"no allowed model that fits specialises in {task}"
        rank = f"{model.name} is " + (
            "the only fit" if len(pool) == 1 else f"the cheapest of {len(pool)} fits"
        )
    skipped = ""
    if down:
        names = ", ".join(m.name for m in down)
        skipped = f" ({names} skipped: no healthy deployment)"
    return ModelChoice(model=model, task=task, reason=f"{task} task: {why}; {rank}{skipped}")
