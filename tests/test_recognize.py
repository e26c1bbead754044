"""Speech.Recognize through real gRPC servers on port 0 (in-process transcriber + gateway)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.shared import metrics
from stt.client import AsyncClient
from stt.errors import SttError
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.text import normalize, wer


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "webm", "m4a"])
async def test_spoken_clip_in_every_container(client: AsyncClient, short_clip, fmt):
    resp = await client.recognize(audio.encode(short_clip.samples, fmt), word_timestamps=True)
    assert wer(short_clip.text, resp.transcript) <= 0.15, resp.transcript
    assert resp.language_code == "en"
    assert resp.metadata.window_count == 1
    assert abs(resp.metadata.audio_duration_seconds - short_clip.seconds) < 0.2
    words = [w for r in resp.results for w in r.words]
    assert words and all(0 <= w.start_seconds <= w.end_seconds <= short_clip.seconds + 0.05 for w in words)
    assert all(r.is_final for r in resp.results)


# 8 kHz is telephone bandwidth: the tiny model loses some words there.
@pytest.mark.parametrize(
    ("rate", "channels", "max_wer"), [(16000, 1, 0.15), (44100, 2, 0.15), (8000, 1, 0.4)]
)
async def test_raw_linear16(client: AsyncClient, short_clip, rate, channels, max_wer):
    raw = audio.encode(short_clip.samples, "raw", rate=rate, channels=channels)
    resp = await client.recognize(raw, encoding="LINEAR16", sample_rate=rate, channels=channels)
    assert wer(short_clip.text, resp.transcript) <= max_wer, resp.transcript


async def test_long_clip_is_chunked_and_merged_with_correct_times(client: AsyncClient, long_clip):
    assert long_clip.seconds > 60
    resp = await client.recognize(audio.encode(long_clip.samples, "flac"), word_timestamps=True)
    assert resp.metadata.window_count >= 3
    assert wer(long_clip.text, resp.transcript) <= 0.15, resp.transcript
    words = [w for r in resp.results for w in r.words]
    starts = [w.start_seconds for w in words]
    assert starts == sorted(starts), "word times must be monotonic"
    assert all(w.start_seconds <= w.end_seconds <= long_clip.seconds for w in words)
    seg_starts = [r.start_seconds for r in resp.results]
    assert seg_starts == sorted(seg_starts)
    # Every word lands in the sentence that was spoken at that time (times are whole-file times).
    for start, end, sentence in long_clip.spans:
        said = " ".join(
            w.word for w in words if start - 0.4 <= (w.start_seconds + w.end_seconds) / 2 <= end + 0.4
        )
        assert wer(sentence, said) <= 0.5, (start, sentence, said)


async def test_silence_gives_no_words(client: AsyncClient):
    resp = await client.recognize(audio.encode(audio.silence(20), "wav"))
    assert resp.transcript == "" and not resp.results
    # No speech found (the model call may have been cancelled): still the English-only model's language.
    assert resp.language_code == "en" and resp.metadata.model and resp.metadata.window_count == 0


async def test_noise_only_gives_no_words(client: AsyncClient):
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(16000 * 10) * 0.01).astype(np.float32)
    resp = await client.recognize(audio.encode(noise, "wav"))
    assert normalize(resp.transcript) == ""


async def test_unknown_or_unsupported_language(client: AsyncClient, short_clip):
    data = audio.encode(short_clip.samples, "wav")
    with pytest.raises(SttError) as err:
        await client.recognize(data, language="xx")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown language" in err.value.message
    with pytest.raises(SttError) as err:
        await client.recognize(data, language="de")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "English-only" in err.value.message
    assert "config.language_code" in err.value.fields


# -- bad input: each gets a clear status and message, and the server keeps serving -------------


def _flac_without_length(seconds: int) -> bytes:
    from tests.test_audio import _flac_without_length as make

    return make(seconds)


def _bad_inputs(short_clip) -> list[tuple[str, bytes, dict, grpc.StatusCode, str]]:
    wav = audio.encode(short_clip.samples, "wav")
    flac = audio.encode(short_clip.samples, "flac")
    rng = np.random.default_rng(3)
    return [
        ("empty", b"", {}, grpc.StatusCode.INVALID_ARGUMENT, "audio is empty"),
        ("random", rng.bytes(100_000), {}, grpc.StatusCode.INVALID_ARGUMENT, "could not read the audio"),
        ("truncated wav", wav[: len(wav) // 2], {}, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("truncated flac", flac[: len(flac) // 2], {}, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("header only", flac[:40], {}, grpc.StatusCode.INVALID_ARGUMENT, "could not"),
        ("aiff", audio.encode(short_clip.samples, "aiff"), {}, grpc.StatusCode.INVALID_ARGUMENT,
         "unsupported audio format 'aiff'"),
        ("linear16 without rate", wav[44:], {"encoding": "LINEAR16"}, grpc.StatusCode.INVALID_ARGUMENT,
         "sample_rate_hz"),
        ("too long", audio.encode(audio.silence(130), "wav"), {}, grpc.StatusCode.RESOURCE_EXHAUSTED,
         "the limit is 120s"),
        ("bomb", _flac_without_length(3 * 3600), {}, grpc.StatusCode.RESOURCE_EXHAUSTED,
         "decodes to more than 120s"),
        ("over message size", b"\0" * (9 * 1024 * 1024), {}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]  # fmt: skip


async def test_bad_input_gets_clear_status_and_server_keeps_serving(client: AsyncClient, short_clip):
    for name, data, kw, code, message in _bad_inputs(short_clip):
        with pytest.raises(SttError) as err:
            await client.recognize(data, timeout=30, **kw)
        assert err.value.code == code, (name, err.value)
        assert message in err.value.message, (name, err.value.message)
    resp = await client.recognize(audio.encode(short_clip.samples, "wav"))
    assert wer(short_clip.text, resp.transcript) <= 0.15


async def test_rich_error_details(client: AsyncClient):
    with pytest.raises(SttError) as err:
        await client.recognize(b"\0\0" * 100, encoding="LINEAR16")
    assert err.value.reason == "MISSING_SAMPLE_RATE"
    assert "config.sample_rate_hz" in err.value.fields


async def test_access_metrics_count_errors(client: AsyncClient):
    before = metrics.RPC_TOTAL.labels("/stt.v1.Speech/Recognize", "INVALID_ARGUMENT")._value.get()
    with pytest.raises(SttError):
        await client.recognize(b"")
    after = metrics.RPC_TOTAL.labels("/stt.v1.Speech/Recognize", "INVALID_ARGUMENT")._value.get()
    assert after == before + 1


async def test_a_call_without_speech_does_not_wait_for_the_model():
    """Up to 30 s, VAD runs beside the model; when it finds no speech first, the model call is
    cancelled (noise or a tone can keep the model looping for seconds) and no words come back."""
    import asyncio

    from services.gateway.chunking import VadSettings
    from services.gateway.recognize import recognize
    from services.shared.domain import DecodeOptions, WorkClass

    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck_model(samples: np.ndarray, options: DecodeOptions, work_class: WorkClass):  # type: ignore[no-untyped-def]
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    tone = (np.sign(np.sin(2 * np.pi * 440 * np.arange(48000) / 16000)) * 0.99).astype(np.float32)
    result = await asyncio.wait_for(
        recognize(tone, stuck_model, DecodeOptions(language="en"), vad=VadSettings(), max_parallel=1), 30
    )
    assert started.is_set() and cancelled.is_set()
    assert result.segments == [] and result.windows == []


# -- the same audio through every door: Recognize, CreateJob, HTTP ------------------------------------


async def _every_door(client: AsyncClient, gateway, data: bytes, **config: object) -> list[object]:  # type: ignore[no-untyped-def]
    """Recognize, CreateJob and POST /v1/audio/transcriptions (the HTTP door takes no config) on
    the same bytes: each door's response, or the SttError / HTTP error body it gave."""
    import httpx

    out: list[object] = []
    for door in (client.recognize, client.submit):
        try:
            out.append(await door(data, **config))  # type: ignore[operator]
        except SttError as exc:
            out.append(exc)
    if not config:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=120) as http:
            resp = await http.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)})
            out.append(
                resp.json()
                if resp.status_code == 200
                else resp.json()["error"] | {"status": resp.status_code}
            )
    return out


async def test_a_wav_written_to_a_pipe_through_every_door(client: AsyncClient, gateway, short_clip):
    """sox writing a WAV to a pipe puts 0x7FFFF000 in its sizes: it is the audio it holds (Recognize,
    a job that runs to its transcript, HTTP), not AUDIO_TOO_LONG."""
    piped = audio.piped_wav(short_clip.samples)
    recognized, job, http = await _every_door(client, gateway, piped)
    assert not isinstance(recognized, SttError), recognized
    assert abs(recognized.metadata.audio_duration_seconds - short_clip.seconds) < 0.05  # type: ignore[attr-defined]
    assert wer(short_clip.text, recognized.transcript) <= 0.15  # type: ignore[attr-defined]
    assert not isinstance(job, SttError), job
    assert abs(job.audio_duration_seconds - short_clip.seconds) < 0.05  # type: ignore[attr-defined]
    done = await client.wait(job.job_id)  # type: ignore[attr-defined]
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done
    assert wer(short_clip.text, (await client.transcript(done.job_id)).content) <= 0.15
    assert isinstance(http, dict) and wer(short_clip.text, http["text"]) <= 0.15, http


async def test_a_wav_whose_header_says_less_than_it_holds_is_refused_at_every_door(
    client: AsyncClient, gateway, short_clip
):
    """A data chunk that says 100 bytes with seconds of audio after it: not 0.003 s and an empty
    transcript (Recognize, HTTP) nor a job of 0.003 s, but INVALID_ARGUMENT CORRUPT_AUDIO."""
    wav = audio.encode(short_clip.samples, "wav")
    at = wav.index(b"data") + 4
    lie = wav[:at] + (100).to_bytes(4, "little") + wav[at + 4 :]
    recognized, job, http = await _every_door(client, gateway, lie)
    for err in (recognized, job):
        assert isinstance(err, SttError), err
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "CORRUPT_AUDIO", err
        assert "data chunk says 100 bytes" in err.message
    assert isinstance(http, dict) and http["status"] == 400 and http["code"] == "corrupt_audio", http
    assert http["param"] == "file"


async def test_a_file_sent_as_linear16_is_an_encoding_mismatch_at_every_door(
    client: AsyncClient, gateway, short_clip
):
    """An M4A declared LINEAR16, or a WAV at another rate than the config's: INVALID_ARGUMENT
    ENCODING_MISMATCH naming the encoding field (Recognize, CreateJob), as FLAC declared on a WAV
    already was, not noise transcribed."""
    m4a = audio.encode(short_clip.samples, "m4a")
    for data in (m4a + bytes(len(m4a) % 2), audio.encode(short_clip.samples, "wav", rate=8000)):
        recognized, job = await _every_door(client, gateway, data, encoding="LINEAR16", sample_rate=16000)
        for err, field in ((recognized, "config.encoding"), (job, "metadata.config.encoding")):
            assert isinstance(err, SttError), err
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "ENCODING_MISMATCH", err
            assert field in err.fields, err.fields


async def test_a_wav_sent_as_linear16_at_its_own_rate_is_transcribed(
    client: AsyncClient, gateway, short_clip
):
    """A 16-bit WAV declared LINEAR16 at its rate (Google Speech takes it): transcribed from its
    samples, header skipped, by Recognize and a job that runs to its transcript (it was refused as
    ENCODING_MISMATCH)."""
    wav = audio.encode(short_clip.samples, "wav")
    recognized, job = await _every_door(client, gateway, wav, encoding="LINEAR16", sample_rate=16000)
    assert not isinstance(recognized, SttError), recognized
    assert abs(recognized.metadata.audio_duration_seconds - short_clip.seconds) < 0.01  # type: ignore[attr-defined]
    assert wer(short_clip.text, recognized.transcript) <= 0.15  # type: ignore[attr-defined]
    assert not isinstance(job, SttError), job
    assert abs(job.audio_duration_seconds - short_clip.seconds) < 0.01  # type: ignore[attr-defined]
    done = await client.wait(job.job_id)  # type: ignore[attr-defined]
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done
    assert wer(short_clip.text, (await client.transcript(done.job_id)).content) <= 0.15


@pytest.mark.parametrize("fmt", ["ogg", "webm"])
async def test_a_damaged_ogg_or_webm_is_refused_at_every_door(client: AsyncClient, gateway, fmt):
    """Damage in the middle of an Ogg/Opus or a WebM (and a WebM cut off): TRUNCATED_AUDIO at every
    door as for FLAC, not OK with the audio before the damage and a transcript of it."""
    sentence = audio.speak(audio.SENTENCES[0])  # shorter than the upload check's first seconds
    data = audio.encode(sentence, fmt)
    damaged = bytearray(data)
    damaged[len(data) // 3 : len(data) // 3 + 2000] = bytes(2000)
    for bad in [bytes(damaged)] + ([data[: len(data) // 2]] if fmt == "webm" else []):
        recognized, job, http = await _every_door(client, gateway, bad)
        for err in (recognized, job):
            assert isinstance(err, SttError), err
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "TRUNCATED_AUDIO", err
        assert isinstance(http, dict) and http["status"] == 400 and http["code"] == "truncated_audio", http
