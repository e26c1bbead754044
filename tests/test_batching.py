"""Cross-request batching in the transcriber."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

from services.shared.domain import DecodeOptions, WindowResult, Word, WorkClass
from services.shared.errors import Unavailable
from services.shared.internal.v1 import transcriber_pb2, transcriber_pb2_grpc
from services.shared.pcm import to_pcm16
from services.transcriber.batcher import Batcher
from services.transcriber.engine import WindowRequest
from tests.support import audio
from tests.support.waiting import until


def _window(live: bool = False) -> WindowRequest:
    """0.1 s of silence; live: a live window's options (dynamic context)."""
    return WindowRequest(np.zeros(1600, dtype=np.float32), DecodeOptions(dynamic_context=live))


async def _start_when_queued(b: Batcher, tasks: list[asyncio.Task[WindowResult]], queued: int) -> None:
    """Start the workers once `queued` windows wait (so the first take sees them all), serve the
    tasks, close."""
    await until(lambda: b.pending == queued, what=f"{queued} windows to queue")
    b.start()
    try:
        await asyncio.gather(*tasks)
    finally:
        await b.close()


async def test_batcher_groups_calls_and_serves_live_first():
    batches: list[list[float]] = []
    gate = threading.Event()

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        gate.wait(5)
        batches.append([float(r.audio[0]) for r in reqs])
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=20, max_batch=3, max_queue=100)
    b.start()
    try:

        def req(tag: float) -> WindowRequest:
            return WindowRequest(np.full(1600, tag, dtype=np.float32), DecodeOptions())

        first = asyncio.create_task(b.submit(req(0.0), WorkClass.BATCH))  # occupies the model
        await until(lambda: b.busy == 1, what="the first call to occupy the model")
        waiting = [asyncio.create_task(b.submit(req(0.1 * i), WorkClass.BATCH)) for i in range(1, 5)]
        await until(lambda: b.pending == 4, what="four batch windows to queue")
        live = [asyncio.create_task(b.submit(req(0.9), WorkClass.LIVE)) for _ in range(2)]
        await until(lambda: b.pending == 6, what="two live windows to queue")
        gate.set()
        await asyncio.gather(first, *waiting, *live)
    finally:
        await b.close()
    assert batches[0] == [0.0]
    # The next model call takes the two live windows first, then the oldest batch window.
    assert batches[1] == [np.float32(0.9), np.float32(0.9), np.float32(0.1)]
    assert sorted(x for batch in batches[2:] for x in batch) == [
        np.float32(0.2),
        np.float32(0.3),
        np.float32(0.4),
    ]
    assert b.calls == 3


async def test_the_last_few_batch_windows_join_a_full_call():
    """A full call of batch work takes the last batch windows along (at most max_batch // 4), never
    into a call of live windows, and never more than that."""
    batches: list[list[float]] = []
    gate = threading.Event()

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        gate.wait(5)
        batches.append([round(float(r.audio[0]), 2) for r in reqs])
        return [WindowResult([], "en") for _ in reqs]

    def req(tag: float) -> WindowRequest:
        return WindowRequest(np.full(1600, tag, dtype=np.float32), DecodeOptions())

    async def burst(n: int, live: int = 0) -> list[list[float]]:
        batches.clear()
        gate.clear()
        first = asyncio.create_task(b.submit(req(0.0), WorkClass.BATCH))  # occupies the model
        await until(lambda: b.busy == 1, what="the first call to occupy the model")
        tasks = [asyncio.create_task(b.submit(req(0.01 * (i + 1)), WorkClass.BATCH)) for i in range(n)]
        tasks += [asyncio.create_task(b.submit(req(0.9), WorkClass.LIVE)) for _ in range(live)]
        await until(lambda: b.pending == n + live, what="the windows to queue")
        gate.set()
        await asyncio.gather(first, *tasks)
        return [len(x) for x in batches[1:]]

    b = Batcher(run, window_ms=20, max_batch=8, max_queue=100)
    b.start()
    try:
        assert await burst(9) == [9]  # not 8 + 1
        assert await burst(10) == [10]
        assert await burst(11) == [8, 3]  # more than max_batch // 4 left: two calls
        assert await burst(8, live=2) == [8, 2]  # live first (2 live + 6 batch), then the rest
        assert batches[1][:2] == [0.9, 0.9]
    finally:
        await b.close()


def test_window_groups_balance_the_last_call():
    from services.gateway.chunking import Window, WindowGroups

    def sizes(n: int, size: int = 8) -> list[int]:
        groups = WindowGroups(lambda: size)
        out = [len(g) for i in range(n) if (g := groups.add(Window(i, i + 1)))]
        rest = groups.finish()
        return [*out, len(rest)] if rest else out

    assert sizes(9) == [9]
    assert sizes(18) == [8, 10]
    assert sizes(20) == [8, 8, 4]
    assert sizes(3) == [3]
    assert sizes(5, size=1) == [1, 1, 1, 1, 1]


async def test_a_caller_that_gives_up_costs_nothing():
    seen: list[int] = []
    gate = threading.Event()

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        gate.wait(5)
        seen.append(len(reqs))
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100)
    b.start()
    try:
        req = WindowRequest(np.zeros(1600, dtype=np.float32), DecodeOptions())
        busy = asyncio.create_task(b.submit(req, WorkClass.BATCH))
        await until(lambda: b.busy == 1, what="the first call to occupy the model")
        gone = asyncio.create_task(b.submit(req, WorkClass.BATCH))
        await until(lambda: b.pending == 1, what="the second window to queue")
        gone.cancel()
        gate.set()
        await busy
        # The worker takes the cancelled window off the queue without a model call.
        await until(lambda: b.pending == 0 and b.busy == 0, what="the queue to empty")
    finally:
        await b.close()
    assert seen == [1]


async def test_live_windows_are_shared_out_among_idle_workers():
    """With two workers, a tick of live windows becomes two calls that run side by side (each waits
    at a barrier for the other: they can only both pass it running at once); batch work is not split
    (a job's windows fill one call); every result says how many calls the transcriber runs at once."""
    sizes: list[tuple[WorkClass, int]] = []
    both = threading.Barrier(2, timeout=10)

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        live = reqs[0].options.dynamic_context
        if live:
            both.wait()  # BrokenBarrierError (the calls fail) unless the other call runs too
        sizes.append((WorkClass.LIVE if live else WorkClass.BATCH, len(reqs)))
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2)
    ticks = [asyncio.create_task(b.submit(_window(True), WorkClass.LIVE)) for _ in range(7)]
    await until(lambda: b.pending == 7, what="seven live windows to queue")
    b.start()
    try:
        served = await asyncio.gather(*ticks)
        job = await asyncio.gather(*[b.submit(_window(False), WorkClass.BATCH) for _ in range(6)])
    finally:
        await b.close()
    assert sorted(sizes[:2]) == [(WorkClass.LIVE, 3), (WorkClass.LIVE, 4)]
    assert sizes[2:] == [(WorkClass.BATCH, 6)]
    assert {r.model_workers for r in served + job} == {2}


async def test_job_windows_run_beside_a_live_call():
    """Beside a call of live windows, the idle worker takes other work: streams that keep the model
    busy (their calls drifting apart, so that no moment has no call running) must not keep a job's
    windows waiting for good."""
    gate = threading.Event()
    order: list[str] = []

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        live = reqs[0].options.dynamic_context
        if live:
            gate.wait(10)
        order.append("live" if live else "job")
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2)
    b.start()
    try:
        stream = asyncio.create_task(b.submit(_window(True), WorkClass.LIVE))
        await until(lambda: b.busy == 1, what="a live call to occupy one worker")
        await asyncio.wait_for(b.submit(_window(False), WorkClass.BATCH), 5)  # while the live call runs
        assert not stream.done()
        gate.set()
        await stream
    finally:
        gate.set()
        await b.close()
    assert order == ["job", "live"]


async def test_a_cancelled_live_window_does_not_split_other_work():
    """A live window whose caller went away, first in line, is not live work to share out: the
    interactive windows behind it go in one call."""
    sizes: list[int] = []

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        sizes.append(len(reqs))
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2)
    gone = asyncio.create_task(b.submit(_window(True), WorkClass.LIVE))
    await until(lambda: b.pending == 1, what="the live window to queue")
    gone.cancel()
    calls = [asyncio.create_task(b.submit(_window(), WorkClass.INTERACTIVE)) for _ in range(4)]
    await _start_when_queued(b, calls, 5)
    assert sizes == [4]


async def test_close_answers_the_windows_of_a_running_call():
    """Closing the batcher while a model call runs: its callers get UNAVAILABLE (DRAINING) instead of
    waiting for good, and the event loop is not blocked while the call finishes in its thread."""
    gate = threading.Event()

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        gate.wait(10)
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2)
    b.start()
    window = WindowRequest(np.zeros(1600, dtype=np.float32), DecodeOptions())
    running = asyncio.create_task(b.submit(window, WorkClass.INTERACTIVE))
    await until(lambda: b.busy == 1, what="a call to run")
    closing = asyncio.create_task(b.close())
    with pytest.raises(Unavailable) as err:
        await asyncio.wait_for(running, 5)  # answered while the call still runs (the loop is free)
    assert err.value.reason == "DRAINING" and not closing.done()
    gate.set()
    await asyncio.wait_for(closing, 10)


async def test_on_a_gpu_workers_do_not_share_a_tick_out():
    """share_live off (a GPU, where one call of many windows costs little more than one): a tick's
    live windows stay in one call, as many as max_batch."""
    sizes: list[int] = []

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        sizes.append(len(reqs))
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2, share_live=False)
    ticks = [asyncio.create_task(b.submit(_window(True), WorkClass.LIVE)) for _ in range(7)]
    await _start_when_queued(b, ticks, 7)
    assert sizes == [7]


async def test_beside_a_running_call_a_second_worker_takes_only_live_windows():
    """A job's call does not hold up a live window (the idle worker serves it at once), but other
    work waits for the running call: never two calls of job windows at once."""
    order: list[str] = []
    gate = threading.Event()

    def run(reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        tag = "live" if reqs[0].options.dynamic_context else f"job{len(order)}"
        order.append(f"{tag} start")
        if tag == "job0":
            gate.wait(10)
        order.append(f"{tag} end")
        return [WindowResult([], "en") for _ in reqs]

    b = Batcher(run, window_ms=0, max_batch=8, max_queue=100, workers=2)
    b.start()
    try:
        first = asyncio.create_task(b.submit(_window(False), WorkClass.BATCH))
        await until(lambda: b.busy == 1, what="a job window to occupy one worker")
        second = asyncio.create_task(b.submit(_window(False), WorkClass.INTERACTIVE))
        await until(lambda: b.pending == 1, what="a second window to queue")
        await b.submit(_window(True), WorkClass.LIVE)  # served while the job's call still runs
        assert not gate.is_set() and b.pending == 1  # the second window still waits
        gate.set()
        await asyncio.gather(first, second)
    finally:
        await b.close()
    assert order == ["job0 start", "live start", "live end", "job0 end", "job4 start", "job4 end"]


async def test_concurrent_calls_share_model_calls_with_the_same_words(transcriber, long_clip):
    windows = [long_clip.samples[i * 16000 * 6 : (i + 1) * 16000 * 6] for i in range(6)]

    def request(samples: np.ndarray) -> transcriber_pb2.TranscribeRequest:
        return transcriber_pb2.TranscribeRequest(
            pcm=to_pcm16(samples),
            options=transcriber_pb2.DecodeOptions(word_timestamps=True),
            work_class=transcriber_pb2.WORK_CLASS_BATCH,
        )

    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        stub = transcriber_pb2_grpc.TranscriberStub(ch)
        alone = [await stub.Transcribe(request(w), timeout=60) for w in windows]
        together = await asyncio.gather(*[stub.Transcribe(request(w), timeout=60) for w in windows])
    assert all(r.batch_size == 1 for r in alone), [r.batch_size for r in alone]
    assert max(r.batch_size for r in together) > 1
    for a, t in zip(alone, together, strict=True):
        # The same words; segment boundaries follow word times, which may move a little.
        assert " ".join(s.text for s in a.segments) == " ".join(s.text for s in t.segments)
        wa = [(w.word, w.start_seconds) for s in a.segments for w in s.words]
        wt = [(w.word, w.start_seconds) for s in t.segments for w in s.words]
        assert [w for w, _ in wa] == [w for w, _ in wt]
        # Batched int8 matrix products differ slightly from single ones, and the alignment (DTW over
        # cross-attention) can put a word right after a pause elsewhere in the pause: the words
        # never change; nearly all times agree; an outlier stays within the pause (< 1 s).
        diffs = [abs(x - y) for (_, x), (_, y) in zip(wa, wt, strict=True)]
        assert sum(d <= 0.05 for d in diffs) >= 0.9 * len(diffs), diffs
        assert sum(d > 0.3 for d in diffs) <= max(1, len(diffs) // 50), diffs
        # (The first word after a window's leading silence is the least certain: it may move within it.)
        assert all(d < 1.0 for d in diffs[1:]) and diffs[0] < 2.0, diffs


def test_dynamic_context_keeps_the_words(transcriber):
    engine = transcriber.engine
    clip = audio.conversation(audio.SENTENCES[:2], pause=0.5)
    full = engine.transcribe(WindowRequest(clip.samples, DecodeOptions(word_timestamps=True)))
    short = engine.transcribe(
        WindowRequest(clip.samples, DecodeOptions(word_timestamps=True, dynamic_context=True))
    )
    from tests.support.text import wer

    text = lambda r: " ".join(s.text for s in r.segments)  # noqa: E731
    assert wer(text(full), text(short)) <= 0.1


def test_split_sentences_at_marks_pauses_and_length():
    from services.transcriber.engine import split_sentences

    def w(text: str, a: float, b: float) -> Word:
        return Word(text, a, b, 0.9)

    words = [w("Hello", 0.0, 0.4), w("there.", 0.4, 0.8), w("How", 0.8, 1.0), w("are", 1.0, 1.2), w("you", 1.2, 2.0),
             w("today", 2.0, 2.5)]  # fmt: skip
    audio_ = np.full(16000 * 3, 0.3, dtype=np.float32)
    audio_[int(1.4 * 16000) : int(1.9 * 16000)] = 0.0  # a pause inside "you" as aligned
    groups = split_sentences(words, audio_)
    assert [[x.word for x in g] for g in groups] == [["Hello", "there."], ["How", "are", "you"], ["today"]]
    long = [w(f"w{i}", i * 0.5, i * 0.5 + 0.5) for i in range(60)]
    assert all(g[-1].end - g[0].start <= 18.5 for g in split_sentences(long))


def test_windows_with_different_prompts_in_one_batch(transcriber):
    """Regression: prompts of different lengths cannot share a generate call; they must not fail."""
    engine = transcriber.engine
    a = audio.speak("The weather today is sunny with a light breeze from the west.")
    long_text = " ".join(audio.SENTENCES[:4])
    reqs = [
        WindowRequest(a, DecodeOptions()),
        WindowRequest(a, DecodeOptions(initial_prompt="Weather report.")),
        WindowRequest(a, DecodeOptions(initial_prompt=long_text)),
        # Live windows keep the same number of prompt tokens, so streams with long histories batch.
        WindowRequest(a, DecodeOptions(initial_prompt=long_text, dynamic_context=True)),
        WindowRequest(a, DecodeOptions(initial_prompt=" ".join(audio.SENTENCES[4:8]), dynamic_context=True)),
    ]
    results = engine.transcribe_batch(reqs)
    assert all(isinstance(r, WindowResult) and "weather" in r.segments[0].text.lower() for r in results), (
        results
    )
    assert [r.batch_size for r in results] == [1, 1, 1, 2, 2]  # type: ignore[union-attr]


async def test_live_windows_share_a_call_by_context_on_a_cpu(transcriber):
    """Live (dynamic-context) windows are encoded with a context of their length rounded up to 5 s.
    On a CPU, where a call costs in proportion to its windows, each context size is its own group
    (no window pays for a longer one's context); on a GPU they share one group, padded to the
    longest (pad_live_contexts). Served, every window reports the whole call (its windows and
    seconds: what the gateway's admission control fits the cost of a live call from)."""
    engine = transcriber.engine
    short = audio.speak("The weather today is sunny.")
    long = np.concatenate([short, np.zeros(16000, dtype=np.float32), short])
    assert short.shape[0] < 3.5 * 16000 and 4.5 * 16000 < long.shape[0] < 8.5 * 16000  # 5 s and 10 s
    live = DecodeOptions(dynamic_context=True, temperature_fallback=False)
    reqs = [WindowRequest(short, live), WindowRequest(long, live), WindowRequest(short, live)]
    saved = engine.pad_live_contexts  # (False on a CPU)
    try:
        engine.pad_live_contexts = False
        grouped = engine.transcribe_batch(reqs)
        engine.pad_live_contexts = True
        padded = engine.transcribe_batch(reqs)
    finally:
        engine.pad_live_contexts = saved
    for results in (grouped, padded):
        assert all(
            isinstance(r, WindowResult) and "today is" in r.segments[0].text.lower() for r in results
        ), [" | ".join(s.text for s in r.segments) if isinstance(r, WindowResult) else r for r in results]
    assert [r.batch_size for r in grouped] == [2, 1, 2]  # type: ignore[union-attr]
    assert [r.batch_size for r in padded] == [3, 3, 3]  # type: ignore[union-attr]

    b = Batcher(engine.transcribe_batch, window_ms=0, max_batch=8, max_queue=100)
    calls = [asyncio.create_task(b.submit(r, WorkClass.LIVE)) for r in reqs]
    calls.append(asyncio.create_task(b.submit(WindowRequest(short, DecodeOptions()), WorkClass.BATCH)))
    await until(lambda: b.pending == 4, what="three live windows and a job's to queue")
    b.start()  # (after they queued: one call takes all four)
    try:
        served = await asyncio.gather(*calls)
    finally:
        await b.close()
    assert b.calls == 1
    # Each counts the call's windows of its own class; all share the call's seconds.
    assert [r.batch_size for r in served] == [3, 3, 3, 1]
    assert len({r.model_seconds for r in served}) == 1 and served[0].model_seconds > 0


def test_words_are_aligned_one_window_at_a_time_on_a_cpu(transcriber, long_clip):
    """A call's windows share the encoder and `generate`, but are aligned one by one: aligning a whole
    call at once was its memory peak, and faster-whisper carries the last speech time from one item of
    a batch to the next (a window's first word would depend on its companions)."""
    engine = transcriber.engine
    model = engine._model
    real = model.add_word_timestamps
    sizes: list[int] = []

    def spy(segments, *args, **kwargs):
        sizes.append(len(segments))
        return real(segments, *args, **kwargs)

    windows = [long_clip.samples[i * 16000 * 6 : (i + 1) * 16000 * 6] for i in range(3)]
    model.add_word_timestamps = spy
    try:
        together = engine.transcribe_batch(
            [WindowRequest(w, DecodeOptions(word_timestamps=True)) for w in windows], tails=0
        )
    finally:
        model.add_word_timestamps = real
    assert sizes == [1, 1, 1]
    assert all(isinstance(r, WindowResult) and r.batch_size == 3 and r.segments[0].words for r in together)
    alone = engine.transcribe(WindowRequest(windows[1], DecodeOptions(word_timestamps=True)))
    first = lambda r: r.segments[0].words[0]  # noqa: E731
    assert first(together[1]).word == first(alone).word
    assert abs(first(together[1]).start - first(alone).start) < 0.3


def test_memory_trim_is_safe_to_call():
    from services.shared import memory

    assert memory.trim() in (True, False)  # glibc: frees what it can; elsewhere a no-op
