"""The protocol module: lenient inbound parsing, strict outbound frames."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from callbrain.retell.frames import (
    AgentConfigUpdate,
    AgentInterruptFrame,
    CallDetails,
    ConfigFlags,
    ConfigFrame,
    FrameError,
    MetadataFrame,
    PingPong,
    PingPongFrame,
    ReminderRequired,
    ResponseFrame,
    ResponseRequired,
    ToolCallInvocationFrame,
    ToolCallResultFrame,
    UnknownInteraction,
    UpdateAgentFrame,
    UpdateOnly,
    encode,
    parse_inbound,
)

# ---------------------------------------------------------------- inbound samples


def test_reference_samples_parse() -> None:
    details = parse_inbound(
        '{"interaction_type":"call_details","call":{"call_type":"phone_call",'
        '"from_number":"+12137771234","to_number":"+12137771235","direction":"inbound",'
        '"call_id":"Jabr9TXYYJHfvl6Syypi88rdAHYHmcq6","agent_id":"oBeDLoLOeuAbiuaMFXRtDOLriTJ5tSxD",'
        '"call_status":"registered","metadata":{},'
        '"retell_llm_dynamic_variables":{"customer_name":"John Doe"},'
        '"opt_out_sensitive_data_storage":true}}'
    )
    assert isinstance(details, CallDetails)
    assert details.dynamic_variables == {"customer_name": "John Doe"}
    assert details.call["from_number"] == "+12137771234"

    ping = parse_inbound('{"interaction_type":"ping_pong","timestamp":1703302407333}')
    assert ping == PingPong(interaction_type="ping_pong", timestamp=1703302407333)


def test_request_with_words_unknown_roles_and_extra_fields() -> None:
    frame = parse_inbound(
        orjson.dumps(
            {
                "interaction_type": "response_required",
                "response_id": 4,
                "timestamp": 3,  # undocumented, seen in the reference's own sample
                "transcript": [
                    {
                        "role": "agent",
                        "content": "Hi",
                        "words": [{"word": "Hi", "start": 0.1, "end": 0.4}],
                    },
                    {"role": "transfer_target", "content": "Hello?", "words": [{"word": "Hello?"}]},
                    {"role": "user", "content": "(unintelligible audio)", "future_field": 1},
                    {"role": "user", "content": None},
                ],
            }
        )
    )
    assert isinstance(frame, ResponseRequired)
    assert frame.response_id == 4
    roles = [(u.role, u.is_agent) for u in frame.transcript]
    assert roles == [
        ("agent", True),
        ("transfer_target", False),
        ("user", False),
        ("user", False),
    ]
    # Word timings are not kept: nothing reads them, and they are most of the bytes.
    assert "words" not in frame.transcript[0].model_dump()
    assert frame.transcript[2].content == "(unintelligible audio)"
    assert frame.transcript[3].content == ""


def test_missing_optional_fields_default() -> None:
    update = parse_inbound('{"interaction_type":"update_only"}')
    assert isinstance(update, UpdateOnly)
    assert update.transcript == [] and update.turntaking is None
    reminder = parse_inbound('{"interaction_type":"reminder_required","response_id":9}')
    assert isinstance(reminder, ReminderRequired) and reminder.transcript == []


def test_dynamic_variables_are_strings() -> None:
    frame = parse_inbound(
        '{"interaction_type":"call_details","call":{"retell_llm_dynamic_variables":'
        '{"n":3,"ok":true,"gone":null,"name":"Ann"}}}'
    )
    assert isinstance(frame, CallDetails)
    assert frame.dynamic_variables == {"n": "3", "ok": "True", "name": "Ann"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "invalid JSON"),
        ("[1,2]", "expected a JSON object"),
        ('{"response_id":1}', "interaction_type"),
        ('{"interaction_type":5}', "interaction_type"),
        ('{"interaction_type":"response_required"}', "response_id"),
        ('{"interaction_type":"response_required","response_id":"abc"}', "response_id"),
        ('{"interaction_type":"response_required","response_id":-1}', "response_id"),
        ('{"interaction_type":"ping_pong"}', "timestamp"),
        ('{"interaction_type":"update_only","transcript":"hello"}', "transcript"),
        ('{"interaction_type":"update_only","transcript":[{"content":"x"}]}', "role"),
        ('{"interaction_type":"call_details","call":[]}', "call"),
    ],
)
def test_malformed_frames_raise_frame_error(raw: str, message: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_inbound(raw)
    assert message in str(info.value)
    assert not isinstance(info.value, UnknownInteraction)


def test_unknown_interaction_type_is_its_own_error() -> None:
    with pytest.raises(UnknownInteraction) as info:
        parse_inbound('{"interaction_type":"pingpong","content":1}')
    assert info.value.interaction_type == "pingpong"


# ------------------------------------------------------------------ fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_types = st.sampled_from(
    ["ping_pong", "call_details", "update_only", "response_required", "reminder_required", "x"]
)
_frame_like = st.fixed_dictionaries(
    {"interaction_type": _types},
    optional={
        "response_id": st.integers() | _json,
        "timestamp": st.integers() | _json,
        "transcript": st.lists(
            st.fixed_dictionaries(
                {"role": st.text(max_size=10) | _json},
                optional={"content": st.text() | _json, "words": _json},
            ),
            max_size=4,
        )
        | _json,
        "call": _json,
        "turntaking": _json,
    },
)


def _parse_or_frame_error(raw: str | bytes) -> None:
    with contextlib.suppress(FrameError):
        parse_inbound(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _parse_or_frame_error(raw)


@settings(max_examples=400, deadline=None)
@given(_json)
def test_fuzz_arbitrary_json(value: Any) -> None:
    # stdlib json: it also writes integers beyond 64 bits, which orjson refuses to parse.
    _parse_or_frame_error(json.dumps(value))


@settings(max_examples=600, deadline=None)
@given(_frame_like)
def test_fuzz_frame_shaped_json(value: dict[str, Any]) -> None:
    _parse_or_frame_error(json.dumps(value))


# ----------------------------------------------------------------- outbound


def test_every_outbound_frame_serialises_without_nulls() -> None:
    frames = [
        ConfigFrame(config=ConfigFlags(auto_reconnect=True, call_details=True)),
        PingPongFrame(timestamp=1703302407333),
        ResponseFrame(response_id=3, content="I'm doing great, ", content_complete=False),
        ResponseFrame(response_id=10, content="Goodbye.", content_complete=True, end_call=True),
        AgentInterruptFrame(
            interrupt_id=1, content="Done!", content_complete=True, no_interruption_allowed=True
        ),
        UpdateAgentFrame(agent_config=AgentConfigUpdate(responsiveness=0.5, reminder_max_count=3)),
        ToolCallInvocationFrame(tool_call_id="t1", name="book", arguments='{"day":"mon"}'),
        ToolCallResultFrame(tool_call_id="t1", content="booked", successful=True),
        MetadataFrame(metadata={"mood": "happy"}),
    ]
    decoded = [orjson.loads(encode(f)) for f in frames]
    assert decoded[0] == {
        "response_type": "config",
        "config": {"auto_reconnect": True, "call_details": True},
    }
    assert decoded[1] == {"response_type": "ping_pong", "timestamp": 1703302407333}
    assert decoded[2] == {
        "response_type": "response",
        "response_id": 3,
        "content": "I'm doing great, ",
        "content_complete": False,
    }
    assert decoded[3]["end_call"] is True
    assert decoded[5] == {
        "response_type": "update_agent",
        "agent_config": {"responsiveness": 0.5, "reminder_max_count": 3},
    }
    for frame in decoded:
        assert "response_type" in frame
        assert None not in _all_values(frame)


def _all_values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in [item, *_all_values(item)]]
    return []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"response_id": "3", "content": "x", "content_complete": False},
        {"response_id": 3, "content": "x", "content_complete": "true"},
        {"response_id": 3, "content": 5, "content_complete": True},
        {"response_id": True, "content": "x", "content_complete": True},
        {"response_id": 3, "content": "x", "content_complete": True, "extra": 1},
        {
            "response_id": 3,
            "content": "x",
            "content_complete": True,
            "end_call": True,
            "transfer_number": "+1555",
        },
        {
            "response_id": 3,
            "content": "",
            "content_complete": True,
            "transfer_number": "+1555",
            "digit_to_press": "1",
        },
    ],
)
def test_outbound_is_strict(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResponseFrame(**kwargs)
