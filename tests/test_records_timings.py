"""The recorded timings are true: a model that is slow to its first token, or
slow between words, shows as exactly that in the record.

Only orderings and lower bounds: the fake cannot answer sooner than it is
told to, but a busy machine may make anything later.
"""

from __future__ import annotations

from pathlib import Path

from records_support import clinic_agent, read_call

from callbrain.records.settings import RecordsSettings
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply

TTFT_S = 0.3
CHUNK_S = 0.05
TEXT = "One two three four five."  # five word chunks


async def test_first_token_and_first_frame_reflect_the_models_delay(tmp_path: Path) -> None:
    database = str(tmp_path / "calls.db")
    replies = [Reply(TEXT, ttft=TTFT_S, chunk_delay=CHUNK_S), Reply("Quick.")]
    async with (
        FakeOpenAIServer(*replies) as fake,
        serve_agent(clinic_agent(fake, RecordsSettings(url=database))) as url,
        RetellClient.connect(url, "timed") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
        slow = await call.ask("Slow one?")
        quick = await call.ask("Quick one?")
        assert (slow.text, quick.text) == (TEXT, "Quick.")
    _, slow_turn, quick_turn = (await read_call(database, "timed"))["turns"]

    timings = slow_turn["timings_ms"]
    assert 0 <= timings["llm_request"] < timings["first_token"]
    # The model's wait is in the first token, measured from the request...
    assert timings["first_token"] >= TTFT_S * 1000
    [model] = slow_turn["models"]
    assert model["first_token_ms"] - model["requested_ms"] >= TTFT_S * 1000
    assert model["first_token_ms"] == timings["first_token"]
    # ...the first frame follows it, and the last of five chunks came four gaps later.
    assert timings["first_token"] <= timings["first_frame"] <= timings["complete"]
    assert timings["complete"] - timings["first_token"] >= 4 * CHUNK_S * 1000

    quick_timings = quick_turn["timings_ms"]
    assert quick_timings["llm_request"] <= quick_timings["first_token"]
    assert quick_timings["first_token"] <= quick_timings["first_frame"] <= quick_timings["complete"]
    # The turns are placed in the call in the order they came.
    assert slow_turn["at_ms"] + timings["complete"] <= quick_turn["at_ms"]
