"""The response-id rules and the call's state, driven directly: no socket, no asyncio."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callbrain.call.state import CallState, Lifecycle
from callbrain.retell.ledger import BEGIN_ID, ResponseLedger, Superseded


def test_the_begin_message_is_owed_until_it_completes() -> None:
    ledger = ResponseLedger()
    assert ledger.owed == BEGIN_ID and ledger.may_send(BEGIN_ID)
    ledger.complete(BEGIN_ID)
    assert ledger.owed is None and not ledger.may_send(BEGIN_ID)


def test_a_newer_request_supersedes_and_silences_the_older() -> None:
    ledger = ResponseLedger()
    assert ledger.admit(3) == Superseded(previous=0, was_open=True)
    assert not ledger.may_send(BEGIN_ID)  # the greeting never got out
    assert ledger.may_send(3) and ledger.owed == 3
    ledger.complete(3)
    assert ledger.admit(5) == Superseded(previous=3, was_open=False)
    assert not ledger.may_send(3) and ledger.may_send(5)


@pytest.mark.parametrize("stale", [0, 4, 5])
def test_an_id_not_newer_is_refused(stale: int) -> None:
    ledger = ResponseLedger()
    ledger.admit(5)
    assert ledger.admit(stale) is None
    assert ledger.latest == 5 and ledger.may_send(5)


def test_completing_twice_or_completing_a_superseded_id_is_a_bug() -> None:
    ledger = ResponseLedger()
    ledger.admit(1)
    ledger.complete(1)
    with pytest.raises(ValueError, match="cannot complete"):
        ledger.complete(1)
    ledger.admit(2)
    with pytest.raises(ValueError, match="cannot complete"):
        ledger.complete(1)


@given(
    st.lists(st.one_of(st.tuples(st.just("admit"), st.integers(0, 20)), st.just(("complete", 0))))
)
def test_at_most_one_id_may_speak_and_ids_complete_once(events: list[tuple[str, int]]) -> None:
    ledger = ResponseLedger()
    completed: list[int] = []
    for kind, value in events:
        if kind == "admit":
            ledger.admit(value)
        elif ledger.owed is not None:
            completed.append(ledger.owed)
            ledger.complete(ledger.owed)
        speaking = [rid for rid in range(21) if ledger.may_send(rid)]
        assert speaking in ([], [ledger.latest])
    assert len(completed) == len(set(completed))
    assert completed == sorted(completed)


def test_the_call_state_only_moves_forward() -> None:
    life = Lifecycle()
    assert life.state is CallState.CONNECTING
    life.to(CallState.OPEN)
    life.to(CallState.DRAINING)
    assert life.draining
    with pytest.raises(RuntimeError, match="draining cannot become open"):
        life.to(CallState.OPEN)
    life.to(CallState.CLOSED)
    life.to(CallState.CLOSED)  # closing twice is fine
    assert life.closed
    with pytest.raises(RuntimeError):
        life.to(CallState.DRAINING)
