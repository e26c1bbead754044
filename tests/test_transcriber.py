"""The transcriber service on its own: loading, validation, draining on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.server import create_server as create_gateway
from services.shared import metrics
from services.shared.internal.v1 import transcriber_pb2, transcriber_pb2_grpc
from services.shared.pcm import to_pcm16
from services.transcriber.server import Transcriber
from services.transcriber.server import create_server as create_transcriber
from stt.client import AsyncClient
from stt.errors import SttError
from tests.conftest import gateway_settings, transcriber_settings
from tests.support import audio
from tests.support.metrics import metric, scrape
from tests.support.procs import ServiceProcess, free_port
from tests.support.speech import DATA, by_name, load_16k
from tests.support.text import wer
from tests.support.waiting import until


def _request(samples: np.ndarray, **opts: object) -> transcriber_pb2.TranscribeRequest:
    return transcriber_pb2.TranscribeRequest(
        pcm=to_pcm16(samples),
        options=transcriber_pb2.DecodeOptions(**opts),
        work_class=transcriber_pb2.WORK_CLASS_BATCH,
    )


async def test_transcribe_one_window(transcriber: Transcriber, short_clip):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        resp = await transcriber_pb2_grpc.TranscriberStub(ch).Transcribe(
            _request(short_clip.samples, word_timestamps=True), timeout=60
        )
    assert wer(short_clip.text, " ".join(s.text for s in resp.segments)) <= 0.15
    seg = resp.segments[0]
    assert seg.words and seg.avg_logprob < 0 and 0 <= seg.no_speech_prob <= 1 and seg.compression_ratio > 0
    assert resp.model.startswith("tiny.en") and resp.served_by and resp.window_seconds > 9


@pytest.mark.parametrize(
    ("pcm", "match"),
    [(b"", "empty"), (b"\0\0\0", "even number"), (b"\0\0" * (16000 * 31), "maximum is 30s")],
)
async def test_bad_windows_are_refused(transcriber: Transcriber, pcm: bytes, match: str):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await transcriber_pb2_grpc.TranscriberStub(ch).Transcribe(
                transcriber_pb2.TranscribeRequest(pcm=pcm), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (err.value.details() or "")


async def test_not_serving_and_unavailable_until_the_model_is_loaded():
    app = await create_transcriber(transcriber_settings(), port=0, load=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = transcriber_pb2_grpc.TranscriberStub(ch)
            resp = await health.Check(
                health_pb2.HealthCheckRequest(service="stt.internal.v1.Transcriber"), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Transcribe(_request(audio.silence(1)), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (err.value.details() or "")
            await app.load()
            resp = await health.Check(
                health_pb2.HealthCheckRequest(service="stt.internal.v1.Transcriber"), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await stub.Transcribe(_request(audio.silence(1)), timeout=30)
    finally:
        await app.stop(0)


async def test_client_retries_while_no_transcriber_is_ready(short_clip):
    """The gateway answers UNAVAILABLE while its transcriber loads; the SDK retries and succeeds."""
    port = free_port()
    gw = await create_gateway(gateway_settings(f"127.0.0.1:{port}"), port=0)
    app: Transcriber | None = None
    unavailable = metrics.RPC_TOTAL.labels("/stt.v1.Speech/Recognize", "UNAVAILABLE")
    before = unavailable._value.get()
    try:
        async with AsyncClient(f"127.0.0.1:{gw.port}") as client:
            call = asyncio.create_task(client.recognize(audio.encode(short_clip.samples, "wav"), timeout=90))
            await asyncio.sleep(6.0)  # longer than the gateway waits for a ready transcriber
            assert not call.done()
            app = await create_transcriber(transcriber_settings(), port=port, load=False)
            await app.load()
            resp = await call
        assert wer(short_clip.text, resp.transcript) <= 0.15
        assert unavailable._value.get() > before  # the first attempt(s) were refused, then retried
    finally:
        await gw.stop(0)
        if app:
            await app.stop(0)


async def test_sigterm_drains_in_flight_calls(short_clip):
    proc = ServiceProcess(
        "transcriber",
        env={
            "STT_CPU_THREADS": "2",
            "STT_SHUTDOWN_GRACE_SECONDS": "30",
            "STT_METRICS_PORT": str(free_port()),
        },
    )

    def in_flight() -> bool:
        text = scrape(proc)
        return metric(text, "stt_rpc_in_flight", method="/stt.internal.v1.Transcriber/Transcribe") >= 3

    try:
        await proc.start()
        async with grpc.aio.insecure_channel(proc.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while (
                await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            ).status != health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.1)
            stub = transcriber_pb2_grpc.TranscriberStub(ch)
            long_window = np.concatenate([short_clip.samples, short_clip.samples, short_clip.samples])[
                : 16000 * 29
            ]
            calls = [
                asyncio.ensure_future(stub.Transcribe(_request(long_window), timeout=60)) for _ in range(3)
            ]
            # SIGTERM once the transcriber has all three calls (its access log shows them in flight
            # as soon as they are running): in-flight calls must finish.
            await until(in_flight, what="three calls in flight")
            proc.signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
            assert all(r.segments for r in results)  # every in-flight call finished
        assert await proc.wait_exit(30) == 0
        assert "draining" in proc.log()
    finally:
        await proc.stop()


async def test_sdk_error_for_unreachable_server():
    async with AsyncClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(SttError) as err:
            await client.recognize(b"x", timeout=3)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_model_failures_are_retryable_server_errors(transcriber: Transcriber, gateway, short_clip):
    """A model call that fails (out of memory, ...) is UNAVAILABLE / MODEL_ERROR, not the client's
    fault: the pool tries again, and a failure that persists reaches the client as retryable."""
    engine = transcriber.engine
    real = engine._decode_group
    failures = {"left": 1}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures["left"] > 0:
            failures["left"] -= 1
            raise MemoryError("injected: out of memory in a model call")
        return real(*args, **kwargs)

    engine._decode_group = failing  # type: ignore[method-assign]
    try:
        async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
            wav = audio.encode(short_clip.samples, "wav")
            resp = await client.recognize(wav, timeout=120)  # one failure: retried, then fine
            assert wer(short_clip.text, resp.transcript) <= 0.15 and failures["left"] == 0
            failures["left"] = 10**6
            with pytest.raises(SttError) as err:
                await client.recognize(wav, timeout=120)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "MODEL_ERROR"
            assert err.value.retry_after is not None
    finally:
        engine._decode_group = real  # type: ignore[method-assign]


async def test_a_window_whose_text_stops_early_is_decoded_to_its_end(transcriber: Transcriber):
    """Real speech on which Whisper writes end-of-text after 11 s of a 30 s window (the start of the
    bench's stream clip: Kennedy, a pause, then read Harvard sentences): the rest of the window must
    still come back (the engine decodes it again), words in order and inside the window."""
    jfk, harvard = by_name("jfk_inaugural_16k"), by_name("harvard_osr_0010_8k")
    first = load_16k(jfk)
    second_start = 0.5 + first.shape[0] / audio.SR + 0.8
    window = np.concatenate([audio.silence(0.5), first, audio.silence(0.8), load_16k(harvard)])
    window = window[: 30 * audio.SR]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        resp = await transcriber_pb2_grpc.TranscriberStub(ch).Transcribe(
            _request(window, word_timestamps=True, language_code="en", beam_size=5), timeout=120
        )
    words = [w for s in resp.segments for w in s.words]
    assert words and words[-1].end_seconds >= 26.0, " ".join(s.text for s in resp.segments)
    assert all(a.start_seconds <= b.start_seconds for a, b in itertools.pairwise(words))
    assert wer(jfk.text, " ".join(w.word for w in words if w.start_seconds < second_start - 0.3)) <= 0.2
    # The first sentences of the Harvard recording (at 8 kHz, so the tiny model makes a few errors).
    opening = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."
    later = [w.word for w in words if w.start_seconds >= second_start - 0.3]
    assert wer(opening, " ".join(later[: len(opening.split())])) <= 0.3, later


async def test_a_window_whose_text_starts_late_is_decoded_from_its_start(transcriber: Transcriber):
    """A 22.7 s window of a job over real recordings (the end of a Harvard list, Kennedy's "ask not",
    then a LibriSpeech sentence; tests/data/windows) on which Whisper's first timestamp jumps to
    14.5 s: the 14 s of speech before must still come back (the engine decodes them again)."""
    import av

    with av.open(str(DATA.parent / "windows" / "skipped_start.flac")) as f:
        pcm = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)]).astype("<i2")
    request = transcriber_pb2.TranscribeRequest(
        pcm=pcm.tobytes(),  # the window's exact samples: the model's skip depends on them
        options=transcriber_pb2.DecodeOptions(word_timestamps=True, language_code="en", beam_size=5),
        work_class=transcriber_pb2.WORK_CLASS_BATCH,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        resp = await transcriber_pb2_grpc.TranscriberStub(ch).Transcribe(request, timeout=120)
    words = [w for s in resp.segments for w in s.words]
    text = " ".join(w.word for w in words)
    assert words and words[0].start_seconds < 2.0, text
    assert all(a.start_seconds <= b.start_seconds for a, b in itertools.pairwise(words))
    said = " ".join(w.word for w in words if w.start_seconds < 14.3)
    assert wer("when you hear the bell come quickly " + by_name("jfk_inaugural_16k").text, said) <= 0.25, said
    rest = " ".join(w.word for w in words if w.start_seconds >= 14.3)
    libri = by_name("librispeech_2412-153948-0000").text  # (its first sentence is in the window)
    assert wer(libri[: libri.index(" THE NARRATIVE")], rest) <= 0.2, text


async def test_a_window_given_a_prefix_goes_on_after_it(transcriber: Transcriber):
    """What a live stream's final pass relies on: a window given a prefix (the words already final in
    its first seconds) returns words whose text starts with the prefix, once, and goes on with the
    rest of the speech (Kennedy, then the first Harvard sentences: 20 s, full context)."""
    jfk, harvard = by_name("jfk_inaugural_16k"), by_name("harvard_osr_0010_8k")
    window = np.concatenate([load_16k(jfk), audio.silence(0.8), load_16k(harvard)])[: 20 * audio.SR]
    prefix = "And so, my fellow Americans, ask not what your country can do for you, ask what you can"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{transcriber.port}") as ch:
        resp = await transcriber_pb2_grpc.TranscriberStub(ch).Transcribe(
            _request(window, word_timestamps=True, language_code="en", beam_size=5, prefix=prefix),
            timeout=120,
        )
    words = [w.word for s in resp.segments for w in s.words]
    n = len(prefix.split())
    assert " ".join(words[:n]) == prefix, words
    rest = " ".join(words[n:])
    assert (
        wer("do for your country. The birch canoe slid on the smooth planks.", " ".join(words[n : n + 13]))
        <= 0.35
    ), rest
    assert "ask not" not in rest.lower(), rest


def _square_wave(seconds: float) -> np.ndarray:
    n = np.arange(int(seconds * audio.SR))
    return (np.sign(np.sin(2 * np.pi * 440 * n / audio.SR)) * 0.99).astype(np.float32)


class _CountingModel:
    """The CTranslate2 model with its generate() calls counted."""

    def __init__(self, model: object) -> None:
        self.model, self.calls = model, 0

    def generate(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.model.generate(*args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)


async def test_a_tone_is_decoded_within_its_length_and_not_again_once_abandoned(transcriber: Transcriber):
    """A full-scale tone makes Whisper loop at every fallback temperature: the tokens of a window are
    capped by its length (3 s: 60, not 448), and a window nobody waits for any more (its call was
    cancelled) is not sampled again."""
    from services.shared.domain import DecodeOptions
    from services.transcriber.engine import WindowRequest

    engine = transcriber.engine
    counting = _CountingModel(engine._model.model)
    opts = DecodeOptions(beam_size=5, language="en", word_timestamps=True)
    engine._model.model = counting
    try:
        kept = await asyncio.to_thread(engine.transcribe_batch, [WindowRequest(_square_wave(3), opts)])
        fallbacks = counting.calls
        counting.calls = 0
        gone = WindowRequest(_square_wave(3), opts, abandoned=lambda: True)
        await asyncio.to_thread(engine.transcribe_batch, [gone])
    finally:
        engine._model.model = counting.model
    assert fallbacks >= 2, "the tone no longer makes the model fall back: the test needs another input"
    assert counting.calls == 1
    # Whatever it wrote stays within the cap (about 12 tokens a second plus 24).
    words = [w for s in kept[0].segments for w in s.words]  # type: ignore[union-attr]
    assert len(words) <= 60, words


def test_a_second_model_replica_is_loaded_only_for_calls_side_by_side():
    """With two workers the transcriber holds one model until two calls run at once (a second
    replica costs memory and, as CTranslate2 replicas taking calls in turn, speed): calls one after
    another stay on the first; a call that finds it busy loads a second and runs beside it."""
    import threading

    from services.shared.domain import DecodeOptions
    from services.transcriber.engine import Engine, WindowRequest

    engine = Engine(transcriber_settings(num_workers=2, warmup=False))
    engine.load()
    req = WindowRequest(audio.speak("The weather today is sunny."), DecodeOptions())
    for _ in range(2):
        engine.transcribe_batch([req])
    assert len(engine._replicas) == 1

    first = engine._replicas[0]
    real_encode = first.encode
    first_in, second_done = threading.Event(), threading.Event()

    def encode_after_the_second_call(features):  # the first call holds its replica meanwhile
        first_in.set()
        assert second_done.wait(60), "the second call did not run beside the first"
        return real_encode(features)

    first.encode = encode_after_the_second_call
    texts: list[str] = []
    try:
        t = threading.Thread(target=lambda: texts.append(engine.transcribe(req).segments[0].text))
        t.start()
        assert first_in.wait(60)
        texts.append(engine.transcribe(req).segments[0].text)  # on a second replica, loaded now
        second_done.set()
        t.join(60)
    finally:
        first.encode = real_encode
    assert len(engine._replicas) == 2 and sorted(engine._free) == [0, 1]
    assert all("today is sunny" in x.lower() for x in texts), texts
