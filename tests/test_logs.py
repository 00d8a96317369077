"""Every log line names its call, in text and in JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from support import collect

from callbrain.llm import OpenAIConfig
from callbrain.llm.openai import OpenAILLM
from callbrain.logs import PER_REQUEST_LOGGERS, call_id_var, configure_logging
from callbrain.testing.fake_llm import FakeOpenAIServer


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def _log_from_a_call_task(call_id: str) -> None:
    token = call_id_var.set(call_id)
    try:
        # A task created inside the call inherits its id, as turn tasks do.
        await asyncio.create_task(_log_line())
    finally:
        call_id_var.reset(token)


async def _log_line() -> None:
    logging.getLogger("callbrain.test").warning("turn done")


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_call_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    asyncio.run(_log_from_a_call_task("call-7"))
    logging.getLogger("callbrain.test").info("outside any call")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(entry["call_id"], entry["msg"]) for entry in lines] == [
        ("call-7", "turn done"),
        ("-", "outside any call"),
    ]
    assert lines[0]["level"] == "warning" and lines[0]["logger"] == "callbrain.test"


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_carry_the_call_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug")
    asyncio.run(_log_from_a_call_task("abc123"))
    assert "call=abc123 turn done" in capsys.readouterr().err


async def _one_model_request() -> None:
    async with FakeOpenAIServer() as fake:
        llm = OpenAILLM(OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k"))
        try:
            await collect(llm)
        finally:
            await llm.aclose()


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "debug"])
def test_no_line_per_model_request_above_debug(
    capsys: pytest.CaptureFixture[str], level: str
) -> None:
    configure_logging(level)
    asyncio.run(_one_model_request())
    for name in PER_REQUEST_LOGGERS:
        logging.getLogger(name).warning("a warning of %s", name)  # never hidden
    err = capsys.readouterr().err
    assert ("HTTP Request: POST" in err) == (level == "debug")
    for name in PER_REQUEST_LOGGERS:
        assert f"a warning of {name}" in err
