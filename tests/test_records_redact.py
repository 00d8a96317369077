"""Redaction: what of a call's text reaches the database under each mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from records_support import booking_call, booking_replies, clinic_agent, read_call

from callbrain.examples import clinic_tools
from callbrain.records.redact import Redactor
from callbrain.records.settings import RecordsSettings
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.fake_llm import FakeOpenAIServer


@pytest.fixture(autouse=True)
def _empty_calendar() -> Iterator[None]:
    clinic_tools._booked.clear()
    yield
    clinic_tools._booked.clear()


def test_pii_replaces_numbers_emails_and_known_names() -> None:
    redact = Redactor("pii")
    redact.learn({"first_name": "Sam", "city": "Leeds"})
    text = "Sam, call +1 (415) 555-0100 or sam.lee@example.com; card 4111 1111 1111 1111."
    assert redact.text(text) == "[name], call [number] or [email]; card [number]."
    # Short numbers and times stay: they are how people talk about appointments.
    assert redact.text("Book 2 people at 10:30 on the 3rd.") == "Book 2 people at 10:30 on the 3rd."
    assert redact.text("Born 12/05/1990, zip 94107.") == "Born [number], zip [number]."
    assert redact.text("The city is Leeds.") == "The city is Leeds."  # not a name-like key


def test_pii_learns_names_from_tool_arguments_and_keeps_their_shape() -> None:
    redact = Redactor("pii")
    arguments = redact.arguments('{"patient_name": "Ana Ruiz", "day": "friday", "party": 4}')
    assert orjson.loads(arguments) == {"patient_name": "[name]", "day": "friday", "party": 4}
    assert redact.text("Thanks Ana, see you, Ms RUIZ.") == "Thanks [name], see you, Ms [name]."
    assert redact.arguments("not json 5551234") == "not json [number]"
    assert redact.variables(
        {"last_name": "Lee", "nested": {"full_name": "Jo Lee", "n": 123456}}
    ) == {
        "last_name": "[name]",
        "nested": {"full_name": "[name]", "n": "[number]"},
    }
    assert redact.text("Bye Jo.") == "Bye [name]."  # learnt from the nested key


def test_all_text_keeps_lengths_and_keys_only() -> None:
    redact = Redactor("all_text")
    assert redact.text("Hello there") == "[redacted: 11 chars]"
    assert redact.text("") == ""
    assert orjson.loads(redact.arguments('{"day": "friday", "ok": true}')) == {
        "day": "[redacted: 6 chars]",
        "ok": True,
    }


def test_none_keeps_everything() -> None:
    redact = Redactor("none")
    assert redact.text("Sam 555-0100") == "Sam 555-0100"
    assert redact.arguments('{"name": "Sam"}') == '{"name": "Sam"}'


@pytest.mark.parametrize("mode", ["pii", "all_text"])
async def test_a_redacted_call_keeps_no_name_in_the_database(mode: str, tmp_path: Path) -> None:
    database = str(tmp_path / "calls.db")
    async with FakeOpenAIServer(*booking_replies()) as fake:
        settings = RecordsSettings(url=database, redact=mode)  # type: ignore[arg-type]
        async with serve_agent(clinic_agent(fake, settings)) as url:
            await booking_call(url, "redacted-call")
    call = await read_call(database, "redacted-call")
    stored = orjson.dumps(call).decode()
    assert "Sam" not in stored and "Lee" not in stored
    begin, _, booked, repeat = call["turns"]
    # The shape of the call survives: outcomes, tools, timings, tokens.
    assert [t["outcome"] for t in call["turns"]] == ["completed", "superseded", *["completed"] * 2]
    assert [t["name"] for t in booked["tools"]] == ["book_appointment"]
    assert repeat["tools"][0]["replayed"] is True
    assert booked["timings_ms"]["complete"] is not None
    assert booked["input_tokens"] == 24
    if mode == "pii":
        assert begin["spoken"] == "Hi [name], Sunrise Clinic."
        assert booked["caller_text"] == "Ten thirty please, I'm [name] [name]."
        assert orjson.loads(booked["tools"][0]["arguments"]) == {
            "patient_name": "[name]",
            "day": "tuesday",
            "time": "10:30",
        }
        assert call["variables"]["first_name"] == "[name]"
    else:
        assert booked["caller_text"] == "[redacted: 31 chars]"
        assert set(orjson.loads(booked["tools"][0]["arguments"])) == {"patient_name", "day", "time"}
