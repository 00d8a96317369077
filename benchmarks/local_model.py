"""How fast is the local backend on this machine, for a phone-agent-sized prompt?

    python benchmarks/local_model.py [--runs N] [--model-path P] [--threads T]

Goes through :class:`callbrain.llm.local.LocalLLM` exactly as a call would and
prints one JSON object:

* ``load_s``: building the llama.cpp server (the GIL is held meanwhile), and
  ``warmup_s``: the one-token completion :meth:`LocalLLM.warmup` adds; given the
  system prompt, as the server's start-up gives it, so it is cached afterwards;
* ``ttft_cold_s``: the first turn after start-up (the first caller's wait);
* ``ttft_s``: p50/p95 over ``--runs`` turns whose system prompt and earlier turns
  are already in the slot's prompt cache, as they are on every later turn of a
  live call (each run changes the last user message, so that part is prefilled);
* ``first_sentence_s``: p50/p95 over the same turns of the wait for the first
  whole sentence, which is when the backend passes the first words on with
  ``whole_sentences`` (the default; this benchmark turns it off to time tokens);
* ``decode_tokens_per_s``: tokens after the first, per second of streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from typing import Any

from callbrain.llm import ChatRequest, LocalConfig, Message, TextDelta, Usage
from callbrain.llm.local import LocalLLM, default_threads
from callbrain.llm.local.sentences import sentence_end

SYSTEM = """\
You are Sam, the phone receptionist at Bright Smile Dental, 42 Harbour Street, Portsmouth.
You are speaking on the phone: answer in one or two short sentences, never use lists or
markdown, and spell out times ("nine a.m.").

Opening hours: Monday to Friday 8 a.m. to 6 p.m., Saturday 9 a.m. to 1 p.m., closed Sunday.
Services: check-ups (30 minutes), hygienist cleaning (45 minutes), fillings, crowns, whitening,
children's dentistry, and emergency appointments the same day when a slot is free.
Prices: check-up 45 pounds, cleaning 65 pounds, emergency visit 90 pounds. NHS patients pay
NHS band charges. We accept cards and cash, not cheques.
Booking: collect the caller's full name, date of birth, phone number and preferred day and
time. Offer the nearest free slot. Never promise a slot you have not checked; say that the
team will confirm by text message within the hour.
Cancellations need 24 hours' notice or a 20 pound fee applies.
If the caller is in severe pain, has swelling of the face, or bleeding that will not stop,
tell them to call 111 or go to A&E now.
If you do not know an answer, offer to have a team member call them back.
"""

TURNS = (
    Message("user", "Hi there, is that Bright Smile Dental?"),
    Message("assistant", "Yes, this is Sam at Bright Smile Dental. How can I help you today?"),
    Message("user", "I'd like to book a cleaning with the hygienist, please."),
    Message(
        "assistant",
        "Happy to help. Could I have your full name and date of birth, please?",
    ),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def request(run: int) -> ChatRequest:
    """The same call so far, with a new last turn per run."""
    day = DAYS[run % len(DAYS)]
    last = (
        f"It's Jordan Lee, born 3 March 1990. Do you have anything on {day} around {run % 9 + 1}?"
    )
    return ChatRequest(system=SYSTEM, messages=(*TURNS, Message("user", last)))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed value, sensible for a handful of runs."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def one_turn(llm: LocalLLM, req: ChatRequest) -> dict[str, Any]:
    started = time.perf_counter()
    first = last = sentence = None
    usage = None
    text = ""
    async with llm.chat(req) as stream:
        async for chunk in stream:
            if isinstance(chunk, TextDelta):
                last = time.perf_counter()
                if first is None:
                    first = last
                text += chunk.text
                if sentence is None and sentence_end(text):
                    sentence = last
            elif isinstance(chunk, Usage):
                usage = chunk
    assert first is not None and last is not None and usage is not None, "empty reply"
    decoding = last - first
    return {
        "ttft_s": first - started,
        # A reply that is one sentence is only known to be whole at its end.
        "first_sentence_s": (sentence or last) - started,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "decode_tps": (usage.output_tokens - 1) / decoding if decoding > 0 else None,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    config = LocalConfig(
        provider="local",
        model_path=args.model_path,
        n_threads=args.threads,
        temperature=0,
        max_tokens=args.max_tokens,
        whole_sentences=False,
    )
    llm = LocalLLM(config)
    try:
        started = time.perf_counter()
        await llm._ensure_server()  # the load alone; warmup() adds one token
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        await llm.warmup(ChatRequest(system=SYSTEM, messages=()))
        warmup_s = time.perf_counter() - started

        cold = await one_turn(llm, request(0))
        warm = [await one_turn(llm, request(run)) for run in range(1, args.runs + 1)]
    finally:
        await llm.aclose()

    ttfts = [r["ttft_s"] for r in warm]
    sentences = [r["first_sentence_s"] for r in warm]
    rates = [r["decode_tps"] for r in (cold, *warm) if r["decode_tps"]]
    return {
        "model": llm.model,
        "n_threads": args.threads or default_threads(),
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "prompt_tokens": cold["input_tokens"],
        "output_tokens_mean": round(statistics.mean(r["output_tokens"] for r in warm), 1),
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "ttft_cold_s": round(cold["ttft_s"], 3),
        "ttft_s": {
            "p50": round(percentile(ttfts, 50), 3),
            "p95": round(percentile(ttfts, 95), 3),
        },
        "first_sentence_s": {
            "p50": round(percentile(sentences, 50), 3),
            "p95": round(percentile(sentences, 95), 3),
        },
        "decode_tokens_per_s": {
            "p50": round(percentile(rates, 50), 1),
            "p5": round(percentile(rates, 5), 1),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Time the local LLM backend.")
    parser.add_argument("--runs", type=int, default=10, help="warm turns to time (default 10)")
    parser.add_argument("--model-path", help="GGUF file (default: the shipped SmolLM2-135M)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--max-tokens", type=int, default=64, help="reply length cap (default 64)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print(json.dumps(asyncio.run(main(args)), indent=2))
