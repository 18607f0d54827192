"""The simulator over real sockets, driven by the official OpenAI client."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

import base64
import math
import struct
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from support import free_port, process_output, start_process, stop_process

if TYPE_CHECKING:
    from conftest import SimServer

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT_TOKENS = 5 + 3 + 3  # five words, one message, reply priming


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` in /metrics whose labels include ``labels``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        series_name, _, label_text = series.partition("{")
        if series_name == name and all(w in label_text for w in wanted):
            total += float(value)
    return total


def wait_for(probe: Callable[[], float], expected: float, timeout: float = 5.0) -> float:
    """Poll ``probe`` until it returns ``expected`` or ``timeout`` seconds pass; the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value


def fault(value: str) -> dict[str, str]:
    return {"x-sim-fault": value}


# -- models and whole responses --------------------------------------------------------------


def test_models_lists_the_configured_models(client: openai.OpenAI) -> None:
    """GET /v1/models lists the default models in vLLM's shape."""
    models = client.models.list().data
    assert ["sim-chat", "sim-code", "sim-embed"] == [m.id for m in models]
    assert {"vllm"} == {m.owned_by for m in models}


def test_chat_usage_counts_the_words(client: openai.OpenAI) -> None:
    """A chat reply has the default 16 tokens, one per word, and usage adds up."""
    reply = client.chat.completions.create(model="sim-chat", messages=USER)
    content = reply.choices[0].message.content or ""
    assert reply.id.startswith("chatcmpl-")
    assert ("chat.completion", "sim-chat", "assistant") == (
        reply.object,
        reply.model,
        reply.choices[0].message.role,
    )
    assert "stop" == reply.choices[0].finish_reason
    assert reply.usage is not None
    assert (PROMPT_TOKENS, 16, PROMPT_TOKENS + 16) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
        reply.usage.total_tokens,
    )
    assert len(content.split()) == reply.usage.completion_tokens


def test_max_tokens_sets_the_length_and_finish_reason(client: openai.OpenAI) -> None:
    """With max_tokens the reply has exactly that many tokens and finishes for "length"."""
    reply = client.chat.completions.create(
        model="sim-chat",
        messages=USER,
        max_completion_tokens=5,
    )
    assert (5, "length") == (
        len((reply.choices[0].message.content or "").split()),
        reply.choices[0].finish_reason,
    )


def test_replies_are_deterministic_and_seed_changes_them(client: openai.OpenAI) -> None:
    """The same request gets the same text; another seed gets another text."""

    def text(**extra: Any) -> str:
        reply = client.chat.completions.create(model="sim-chat", messages=USER, **extra)
        return reply.choices[0].message.content or ""

    assert text() == text()
    assert text(seed=42) == text(seed=42)
    assert text() != text(seed=42)


def test_n_gives_that_many_different_choices(client: openai.OpenAI) -> None:
    """``n`` gives n indexed choices, and usage counts the tokens of all of them."""
    reply = client.chat.completions.create(
        model="sim-chat",
        messages=USER,
        n=3,
        max_tokens=4,
    )
    assert [0, 1, 2] == [c.index for c in reply.choices]
    assert 3 == len({c.message.content for c in reply.choices})
    assert reply.usage is not None
    assert 12 == reply.usage.completion_tokens


def test_completions_answer_text(client: openai.OpenAI) -> None:
    """/v1/completions answers text_completion objects with the same token accounting."""
    reply = client.completions.create(model="sim-code", prompt="def main():  pass", max_tokens=7)
    assert reply.id.startswith("cmpl-")
    assert ("text_completion", 7, "length") == (
        reply.object,
        len(reply.choices[0].text.split()),
        reply.choices[0].finish_reason,
    )
    assert reply.usage is not None
    assert (3, 7) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_completion_stream_sends_text_pieces(client: openai.OpenAI) -> None:
    """A streamed completion sends one text piece per token, then the finish reason."""
    chunks = list(
        client.completions.create(model="sim-code", prompt="x", max_tokens=3, stream=True)
    )
    assert ["length"] == [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    texts = [c.choices[0].text for c in chunks]
    assert 3 == len("".join(texts).split())
    assert [False, True, True] == [t.startswith(" ") for t in texts[:3]]


# -- streams -----------------------------------------------------------------------------------


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    """A stream sends the role, one chunk per token, the finish reason, then the usage chunk."""
    chunks = list(
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert ("assistant", "") == (
        chunks[0].choices[0].delta.role,
        chunks[0].choices[0].delta.content,
    )
    pieces = [c.choices[0].delta.content for c in chunks[1:7]]
    assert 6 == len([p for p in pieces if p])
    assert [False, True, True, True, True, True] == [(p or "").startswith(" ") for p in pieces]
    assert "length" == chunks[7].choices[0].finish_reason
    usage_chunk = chunks[8]
    assert [] == usage_chunk.choices
    assert usage_chunk.usage is not None
    assert (PROMPT_TOKENS, len("".join(p or "" for p in pieces).split())) == (
        usage_chunk.usage.prompt_tokens,
        usage_chunk.usage.completion_tokens,
    )
    assert 9 == len(chunks)


def test_chat_stream_without_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    """Without include_usage no chunk carries usage, and the text matches the whole reply's."""
    chunks = list(
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            stream=True,
        )
    )
    whole = client.chat.completions.create(model="sim-chat", messages=USER)
    assert [] == [c for c in chunks if c.usage is not None or not c.choices]
    assert whole.choices[0].message.content == "".join(
        c.choices[0].delta.content or "" for c in chunks
    )


def test_ttft_header_delays_the_first_chunk(client: openai.OpenAI) -> None:
    """x-sim-ttft-ms holds the first chunk back for that long."""
    start = time.monotonic()
    with client.chat.completions.create(
        model="sim-chat",
        messages=USER,
        stream=True,
        extra_headers={"x-sim-ttft-ms": "300"},
    ) as stream:
        next(iter(stream))
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5


def test_whole_reply_takes_ttft_plus_time_between_tokens(client: openai.OpenAI) -> None:
    """A whole reply takes the time to first token plus the time between its other tokens."""
    start = time.monotonic()
    client.chat.completions.create(
        model="sim-chat",
        messages=USER,
        max_tokens=5,
        extra_headers={"x-sim-ttft-ms": "100", "x-sim-tbt-ms": "50"},
    )
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_in_base64_and_float_agree(client: openai.OpenAI) -> None:
    """The default (base64) and float encodings give the same deterministic unit vectors."""
    default = client.embeddings.create(model="sim-embed", input=["hello world", "bye"])
    floats = client.embeddings.create(
        model="sim-embed", input=["hello world", "bye"], encoding_format="float"
    )
    vectors = [d.embedding for d in default.data]
    assert vectors == [d.embedding for d in floats.data]
    assert [64, 64] == [len(v) for v in vectors]
    assert [True, True] == [math.isclose(1.0, sum(x * x for x in v), rel_tol=1e-5) for v in vectors]
    assert vectors[0] != vectors[1]
    assert (3, 3) == (default.usage.prompt_tokens, default.usage.total_tokens)


def test_embeddings_base64_is_little_endian_float32(sim: SimServer) -> None:
    """encoding_format=base64 sends the float32 components little-endian, as OpenAI does."""
    body = {"model": "sim-embed", "input": "x", "encoding_format": "base64", "dimensions": 8}
    raw = _post(sim.url, "/v1/embeddings", body)
    encoded = raw["data"][0]["embedding"]
    floats = raw and _post(sim.url, "/v1/embeddings", {**body, "encoding_format": "float"})
    assert floats["data"][0]["embedding"] == list(struct.unpack("<8f", base64.b64decode(encoded)))


# -- errors and faults -------------------------------------------------------------------------


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    """An unknown model is a 404 with code model_not_found, as vLLM answers."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert {"code": "model_not_found", "param": "model"}.items() <= _error(info.value).items()


def test_invalid_body_is_a_400(client: openai.OpenAI) -> None:
    """A body the parser rejects is a 400 naming the field."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sim-chat", messages=[])
    assert "messages" == _error(info.value)["param"]


def test_context_length_is_enforced(client: openai.OpenAI) -> None:
    """A prompt plus max_tokens over the context length is a 400, as vLLM answers."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            max_tokens=40_000,
        )
    assert "context_length_exceeded" == _error(info.value)["code"]


def test_status_fault_answers_that_status(client: openai.OpenAI, sim: SimServer) -> None:
    """x-sim-fault: status=503 answers 503 with an OpenAI-style error, and is counted."""
    before = metric(sim.url, "citadel_sim_faults_injected_total", kind="status")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("status=503"),
        )
    assert 503 == info.value.status_code
    assert "503" in _error(info.value)["message"]
    assert before + 1 == metric(sim.url, "citadel_sim_faults_injected_total", kind="status")


def test_bad_fault_header_is_a_400(client: openai.OpenAI) -> None:
    """A bad x-sim-fault value is a 400 naming the header."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("status=2xx"),
        )
    assert "x-sim-fault" == _error(info.value)["param"]


def test_malformed_fault_breaks_json_parsing(client: openai.OpenAI) -> None:
    """x-sim-fault: malformed answers 200 with a body, or a stream event, that is not JSON."""
    with pytest.raises(ValueError, match="Expecting"):
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("malformed"),
        )
    with pytest.raises(ValueError, match="Expecting"):
        list(
            client.chat.completions.create(
                model="sim-chat",
                messages=USER,
                stream=True,
                extra_headers=fault("malformed"),
            )
        )


def test_disconnect_fault_cuts_a_stream_after_n_tokens(client: openai.OpenAI) -> None:
    """x-sim-fault: disconnect=2 closes the connection after two content tokens."""
    pieces: list[str] = []
    with pytest.raises(openai.APIConnectionError):  # noqa: PT012 - the chunks before the break count
        for chunk in client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            stream=True,
            extra_headers=fault("disconnect=2"),
        ):
            pieces.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert 2 == len(pieces)


def test_disconnect_fault_closes_a_whole_request_without_answer(client: openai.OpenAI) -> None:
    """For a whole response, disconnect closes the connection without any response."""
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("disconnect=2"),
        )


def test_hang_fault_never_answers(client: openai.OpenAI) -> None:
    """x-sim-fault: hang never answers, so a client with a 1 s timeout gives up."""
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1).chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("hang"),
        )
    assert 1 <= time.monotonic() - start < 5


def test_latency_fault_delays_the_answer(client: openai.OpenAI) -> None:
    """x-sim-fault: latency=300 delays the response by 300 ms."""
    start = time.monotonic()
    client.chat.completions.create(
        model="sim-chat",
        messages=USER,
        extra_headers=fault("latency=300"),
    )
    assert 0.3 <= time.monotonic() - start < 5


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_count_running_requests_and_tokens(client: openai.OpenAI, sim: SimServer) -> None:
    """/metrics shows the vLLM running gauge and counts prompt and generated tokens."""
    before = metric(sim.url, "vllm:prompt_tokens_total", model_name="sim-chat")
    generated = metric(sim.url, "vllm:generation_tokens_total", model_name="sim-chat")
    client.chat.completions.create(model="sim-chat", messages=USER, max_tokens=3)
    with urllib.request.urlopen(f"{sim.url}/metrics", timeout=5) as response:
        assert b'vllm:num_requests_running{model_name="sim-chat"} 0' in response.read()
    assert (before + PROMPT_TOKENS, generated + 3) == (
        metric(sim.url, "vllm:prompt_tokens_total", model_name="sim-chat"),
        metric(sim.url, "vllm:generation_tokens_total", model_name="sim-chat"),
    )


def test_a_client_that_leaves_mid_stream_is_counted_as_aborted(
    client: openai.OpenAI, sim: SimServer
) -> None:
    """Closing the response mid-stream aborts the request: counted, logged, no longer running."""
    labels = {"model_name": "sim-code"}
    aborted = metric(sim.url, "citadel_sim_requests_aborted_total", **labels)
    stream = client.chat.completions.create(
        model="sim-code",
        messages=USER,
        max_tokens=50,
        stream=True,
        extra_headers={"x-sim-tbt-ms": "100"},  # about 5 s in all
    )
    next(iter(stream))
    assert 1 == metric(sim.url, "vllm:num_requests_running", **labels)
    stream.close()
    probe = lambda: metric(sim.url, "citadel_sim_requests_aborted_total", **labels)  # noqa: E731
    assert aborted + 1 == wait_for(probe, aborted + 1)
    assert 0 == metric(sim.url, "vllm:num_requests_running", **labels)
    assert "request aborted by client" in process_output(sim.process)


# -- fault flags -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_sim() -> Iterator[str]:
    """A simulator whose flags fail every request with a 502."""
    port = free_port()
    args = [sys.executable, "-m", "citadel", "sim", "--port", str(port)]
    proc = start_process([*args, "--error-rate", "1", "--error-codes", "502"], port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def test_error_rate_flag_fails_requests_unless_the_header_says_none(faulty_sim: str) -> None:
    """--error-rate 1 fails every request with its code; x-sim-fault: none exempts one."""
    with openai.OpenAI(base_url=f"{faulty_sim}/v1", api_key="sim", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="sim-chat", messages=USER)
        assert 502 == info.value.status_code
        reply = client.chat.completions.create(
            model="sim-chat",
            messages=USER,
            extra_headers=fault("none"),
        )
        assert "stop" == reply.choices[0].finish_reason
    assert 1 == metric(faulty_sim, "citadel_sim_faults_injected_total", kind="status")


# -- helpers -----------------------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(exc.response.content)["error"]
    return body


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}{path}", data=orjson.dumps(body), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = orjson.loads(response.read())
        return result
