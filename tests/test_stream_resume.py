"""Resumable streams, utterances and per-stream bounds.

Unit tests drive StreamingSession with a scripted model (no grpc, deterministic): a stream broken at
any response and resumed from that response's resume state gives exactly the finals of an unbroken
run. Service tests use real gRPC gateways in-process (the session's transcriber): SIGTERM drain and
a stopped gateway mid-stream are resumed by the SDK on the other gateway; connection ageing does not
cut a stream; idle and config timeouts; bad resume points.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.gateway.streaming import Event, EventType, ResumeState, StreamingSession, StreamPolicy
from services.shared.domain import SAMPLE_RATE, DecodeOptions, Segment, WindowResult, Word, WorkClass

# -- a scripted model: audio value k (k > 0) held for a word's duration is the word "wK" ---------------


def script(words: list[tuple[float, float]], total: float) -> np.ndarray:
    """Audio where word i (1-based) is the constant i / 1000 between its start and end."""
    audio = np.zeros(int(total * SAMPLE_RATE), dtype=np.float32)
    for i, (start, end) in enumerate(words, 1):
        audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)] = i / 1000
    return audio


async def fake_transcribe(audio: np.ndarray, options: DecodeOptions, work: WorkClass) -> WindowResult:
    words = []
    values = np.round(audio * 1000).astype(int)
    i = 0
    while i < len(values):
        k = values[i]
        j = i
        while j < len(values) and values[j] == k:
            j += 1
        # Only words heard to their end (the run stops before the window does).
        if k > 0 and j < len(values):
            words.append(Word(f" w{k}", round(i / SAMPLE_RATE, 3), round(j / SAMPLE_RATE, 3), 0.9))
        i = j
    seg = Segment(words[0].start, words[-1].end, "".join(w.word for w in words), words) if words else None
    return WindowResult(segments=[seg] if seg else [], language="en")


def fake_vad(block: np.ndarray) -> np.ndarray:
    frames = block.reshape(-1, 512)
    return (np.abs(frames).max(axis=1) > 0).astype(np.float32)


POLICY = StreamPolicy(step=0.3, max_window=6.0, endpoint_silence=0.5, hold=0.2, settle=1.2)


def session(resume: ResumeState | None = None) -> StreamingSession:
    return StreamingSession(
        fake_transcribe, DecodeOptions(), POLICY, interim=True, vad_model=fake_vad, resume=resume
    )


async def run(s: StreamingSession, audio: np.ndarray, *, stop_after: int | None = None) -> list[tuple[Event, ResumeState]]:
    """Feed `audio` in 0.1 s pieces, as fast as the session takes it; collect events with the resume
    state a response for them would carry. stop_after: break the stream after that many events."""
    out: list[tuple[Event, ResumeState]] = []

    async def feed() -> None:
        step = SAMPLE_RATE // 10
        for i in range(0, len(audio), step):
            s.add_audio(audio[i : i + step])
            while s.backlog_seconds > 1.0:
                await s.progressed()
            await asyncio.sleep(0)
        s.end_audio()

    feeder = asyncio.create_task(feed())
    try:
        async for ev in s.events():
            out.append((ev, s.resume_state()))
            if stop_after is not None and len(out) >= stop_after:
                break
    finally:
        feeder.cancel()
    return out


def finals(events: list[tuple[Event, ResumeState]]) -> list[Event]:
    return [ev for ev, _ in events if ev.type == EventType.RESULT and ev.is_final]


# Three utterances: 5 words, a pause, 12 words with short gaps (longer than the window), a pause, 3.
def _words() -> list[tuple[float, float]]:
    out, t = [], 0.5
    for n, pause in ((5, 1.5), (12, 1.5), (3, 1.0)):
        for _ in range(n):
            out.append((t, t + 0.35))
            t += 0.45
        t += pause
    return out


WORDS = _words()
TOTAL = WORDS[-1][1] + 1.0


def text_of(evs: list[Event]) -> list[str]:
    return [w.word.strip() for ev in evs for w in ev.words]


async def test_unbroken_session_marks_utterances():
    evs = finals(await run(session(), script(WORDS, TOTAL)))
    assert text_of(evs) == [f"w{i}" for i in range(1, len(WORDS) + 1)]
    ends = [ev for ev in evs if ev.utterance_end]
    assert [ev.utterance for ev in ends] == [0, 1, 2]
    # Every final of an utterance has its index; indexes only grow.
    by_utt = {}
    for ev in evs:
        by_utt.setdefault(ev.utterance, []).extend(w.word.strip() for w in ev.words)
    assert by_utt == {
        0: [f"w{i}" for i in range(1, 6)],
        1: [f"w{i}" for i in range(6, 18)],
        2: [f"w{i}" for i in range(18, 21)],
    }
    assert [ev.utterance for ev in evs] == sorted(ev.utterance for ev in evs)


async def test_resume_at_every_response_gives_the_unbroken_finals():
    audio = script(WORDS, TOTAL)
    whole = await run(session(), audio)
    expected = [(w.word, w.start, w.end, ev.utterance, ev.utterance_end) for ev in finals(whole) for w in ev.words]
    expected_ends = [ev.utterance for ev in finals(whole) if ev.utterance_end]
    for cut in range(1, len(whole), 2):
        first = await run(session(), audio, stop_after=cut)
        state = first[-1][1]
        assert 0 <= state.offset <= TOTAL
        start = round(state.offset * SAMPLE_RATE)
        second = await run(session(resume=state), audio[start:])
        got_finals = finals(first) + finals(second)
        got = [(w.word, w.start, w.end, ev.utterance, ev.utterance_end) for ev in got_finals for w in ev.words]
        assert [g[0] for g in got] == [e[0] for e in expected], f"cut after response {cut}: {state}"
        assert [g[3] for g in got] == [e[3] for e in expected], f"utterances, cut {cut}"
        times = [t for g in got for t in g[1:3]]
        assert times == pytest.approx([t for e in expected for t in e[1:3]], abs=0.05), f"cut {cut}"
        assert [ev.utterance for ev in got_finals if ev.utterance_end] == expected_ends, f"cut {cut}"


async def test_resume_state_carries_prompt_and_window_words():
    audio = script(WORDS, TOTAL)
    events = await run(session(), audio)
    states = [st for _, st in events]
    assert all(b.offset >= a.offset for a, b in zip(states, states[1:], strict=False)), "offsets only grow"
    inside = [st for st in states if st.window_words]
    assert inside, "some finals are made inside the window (agreement before the pause)"
    st = inside[0]
    assert len(st.context.split()) >= st.window_words
    assert st.utterance_open and st.final_end > st.offset
    last = states[-1]
    assert not last.utterance_open and last.utterance == 3
