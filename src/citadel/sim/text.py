"""Deterministic model output: generated text, prompt token counts and embeddings, without a model.

Theory of operation. The vocabulary is a fixed list of 512 common English words and one word is one
token, so a reply's ``completion_tokens`` is the number of words in its text. At import a fixed
pseudo-random "corpus" of token ids is drawn once (Zipf-like, so the text reads like word soup
rather than noise); a reply is a run of that corpus starting at an offset that is a CRC-32 of
(seed, model, choice index, prompt). Generating a reply is therefore one hash and one slice: cheap
enough that the simulator never limits a benchmark, a pure function of its inputs, and a shorter
reply to the same request is a prefix of a longer one, as greedy decoding would give.

Prompt tokens are counted as vLLM's usage would count them, roughly: the whitespace-separated
words of the text, plus 3 per chat message and 3 to prime the reply.

Embeddings are unit vectors whose components come from a SHAKE-256 digest of (model, text):
identical inputs give identical vectors, different inputs unrelated ones.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import zlib
from array import array
from collections.abc import Sequence

import orjson

__all__ = [
    "CHAT_MESSAGE_TOKENS",
    "CHAT_REPLY_TOKENS",
    "FIRST_PIECE_JSON",
    "PIECE_JSON",
    "VOCABULARY",
    "chat_prompt_tokens",
    "count_words",
    "detokenize",
    "embed",
    "generate",
]

_WORDS = """
the of and to in is that it was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which
do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where
after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right
boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together
next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold
notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure
star box noun field rest correct able pound done beauty drive stood contain front teach week
final gave green quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among grand ball yet wave drop heart present heavy dance engine
position arm wide sail material size vary settle speak
"""
VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())
"""The words the simulator speaks; a token id is an index into this tuple."""

PIECE_JSON: tuple[bytes, ...] = tuple(orjson.dumps(" " + word) for word in VOCABULARY)
"""Each token as a streamed piece after the first (leading space), encoded as a JSON string."""
FIRST_PIECE_JSON: tuple[bytes, ...] = tuple(orjson.dumps(word) for word in VOCABULARY)
"""Each token as the first streamed piece of a reply (no leading space), as a JSON string."""

CHAT_MESSAGE_TOKENS = 3
"""Tokens the chat template adds around each message."""
CHAT_REPLY_TOKENS = 3
"""Tokens that prime the assistant's reply."""

_CORPUS_SIZE = 8192
_CORPUS_SEED = 20240601


def _corpus() -> tuple[int, ...]:
    rng = random.Random(_CORPUS_SEED)
    # Zipf-like weights: the first words of the vocabulary are the most common in English.
    weights = [1.0 / (rank + 8) for rank in range(len(VOCABULARY))]
    ids = rng.choices(range(len(VOCABULARY)), weights=weights, k=_CORPUS_SIZE)
    return tuple(ids) * 2  # doubled, so that any run up to the corpus size is one slice


_CORPUS = _corpus()


def generate(seed: int, model: str, prompt: str, count: int, choice: int = 0) -> Sequence[int]:
    """The ``count`` token ids of choice number ``choice`` of ``model``'s reply to ``prompt``."""
    key = zlib.crc32(f"{seed}\x00{model}\x00{choice}\x00".encode())
    start = zlib.crc32(prompt.encode("utf-8", "surrogatepass"), key) % _CORPUS_SIZE
    if count <= _CORPUS_SIZE:
        return _CORPUS[start : start + count]
    laps = _CORPUS[start : start + _CORPUS_SIZE] * (count // _CORPUS_SIZE + 1)
    return laps[:count]


def detokenize(tokens: Sequence[int]) -> str:
    """The text of ``tokens``: their words separated by single spaces."""
    return " ".join(map(VOCABULARY.__getitem__, tokens))


def count_words(text: str) -> int:
    """The number of whitespace-separated words in ``text``: its tokens, to the simulator."""
    return len(text.split())


def chat_prompt_tokens(text: str, messages: int) -> int:
    """The prompt tokens of a chat request: the words of its messages plus the template's."""
    return count_words(text) + CHAT_MESSAGE_TOKENS * messages + CHAT_REPLY_TOKENS


def embed(model: str, text: str, dimensions: int) -> array[float]:
    """A unit vector of ``dimensions`` float32 components for ``text``, as ``model`` embeds it."""
    digest = hashlib.shake_256(f"{model}\x00{text}".encode("utf-8", "surrogatepass"))
    raw = array("h", digest.digest(2 * dimensions))
    if sys.byteorder == "big":  # pragma: no cover - the same vectors on every machine
        raw.byteswap()
    norm = math.sqrt(math.fsum(v * v for v in raw)) or 1.0
    return array("f", [v / norm for v in raw])
