"""StreamingRecognize through real gRPC servers (in-process gateway + transcriber)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time

import grpc
import numpy as np
import pytest

from services.gateway import speech as speech_api
from services.gateway.streaming import collapse_repeats
from services.shared.domain import Word
from stt.client import AsyncClient
from stt.errors import SttError
from stt.streaming import PcmAudio, paced_bytes, pcm_chunks
from stt.v1 import common_pb2, speech_pb2
from tests.support import audio
from tests.support.speech import held_stream
from tests.support.text import normalize, wer
from tests.support.waiting import until


@pytest.fixture(scope="module")
def dialog() -> audio.Clip:
    return audio.conversation(audio.SENTENCES[:3], pause=1.0, lead=0.5)


def _pcm(clip: audio.Clip) -> PcmAudio:
    return PcmAudio(audio.encode(clip.samples, "raw"), 16000, 1)


async def _collect(stream) -> list[tuple[float, speech_pb2.StreamingRecognizeResponse]]:  # type: ignore[no-untyped-def]
    out = []
    async for resp in stream:
        out.append((time.monotonic(), resp))
    return out


def _finals(responses) -> list[speech_pb2.SpeechRecognitionResult]:  # type: ignore[no-untyped-def]
    return [r for _, resp in responses for r in resp.results if r.is_final]


async def test_realtime_stream_gives_finals_during_the_stream(client: AsyncClient, dialog: audio.Clip):
    sent_all = 0.0

    async def chunks():
        nonlocal sent_all
        async for c in pcm_chunks(_pcm(dialog), realtime=True):
            yield c
        sent_all = time.monotonic()

    responses = await _collect(client.stream(chunks(), interim=True))
    # The server's default timing, reported on every response.
    assert {resp.final_result_timing for _, resp in responses} == {speech_pb2.FINAL_RESULT_TIMING_STABLE}
    finals = _finals(responses)
    text = " ".join(r.transcript for r in finals)
    assert wer(dialog.text, text) <= 0.25, text
    first_final = next(t for t, resp in responses if any(r.is_final for r in resp.results))
    assert first_final < sent_all - 3.0, "finals must come while audio is still being sent"
    interims = [r for _, resp in responses for r in resp.results if not r.is_final]
    assert interims and all(0 <= r.stability < 1 for r in interims)
    events = [resp.speech_event_type for _, resp in responses if resp.speech_event_type]
    assert (
        speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_BEGIN in events
        and speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_END in events
    )
    words = [w for r in finals for w in r.words]
    starts = [w.start_seconds for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start_seconds <= w.end_seconds <= dialog.seconds + 0.05 for w in words)
    # Words are placed where they were spoken: a recognised word that belongs to one sentence only
    # lies in (or within 0.5 s of) that sentence's span. (Recognition errors are the WER check's job:
    # on a loaded machine one sentence's words can be half wrong and still be in the right place.)
    vocab = [set(normalize(sentence).split()) for _, _, sentence in dialog.spans]
    placed = misplaced = 0
    for w in words:
        token = normalize(w.word)
        owners = [i for i, v in enumerate(vocab) if token in v]
        if len(owners) != 1:
            continue
        start, end, _ = dialog.spans[owners[0]]
        mid = (w.start_seconds + w.end_seconds) / 2
        if start - 0.5 <= mid <= end + 0.5:
            placed += 1
        else:
            misplaced += 1
    assert placed >= 10 and misplaced <= placed // 10, (
        placed,
        misplaced,
        [(w.word, w.start_seconds) for w in words],
    )


async def test_finals_at_utterance_end_come_once_the_utterance_ended(client: AsyncClient, dialog: audio.Clip):
    """final_result_timing UTTERANCE_END: interims while each sentence is spoken, its words final
    only when it ended: once an utterance has a final, no interim of it follows, and its finals come
    one after another, the last marked utterance_end."""
    responses = await _collect(
        client.stream(pcm_chunks(_pcm(dialog), realtime=True), interim=True, final_results="utterance_end")
    )
    assert {resp.final_result_timing for _, resp in responses} == {
        speech_pb2.FINAL_RESULT_TIMING_UTTERANCE_END
    }
    results = [r for _, resp in responses for r in resp.results]
    finals = [r for r in results if r.is_final]
    assert wer(dialog.text, " ".join(r.transcript for r in finals)) <= 0.25
    utterances = sorted({r.utterance_index for r in finals if r.transcript})
    assert len(utterances) >= 2
    interims_first = 0
    for u in utterances:
        mine = [r for r in results if r.utterance_index == u]
        first = next(i for i, r in enumerate(mine) if r.is_final)
        interims_first += first > 0
        assert all(r.is_final for r in mine[first:]), f"utterance {u}: an interim after its final"
        assert mine[-1].utterance_end and not any(r.utterance_end for r in mine[:-1])
    # Interims came while sentences were spoken (a short one on a loaded machine may reach its pause
    # before any hypothesis has words, so not necessarily for each).
    assert interims_first >= 1


async def test_fast_client_without_interim(client: AsyncClient, dialog: audio.Clip):
    offline = await client.recognize(audio.encode(dialog.samples, "wav"))
    responses = await _collect(client.stream(pcm_chunks(_pcm(dialog)), interim=False))
    assert all(r.is_final for _, resp in responses for r in resp.results)
    text = " ".join(r.transcript for r in _finals(responses))
    assert wer(offline.transcript, text) <= 0.25, (offline.transcript, text)
    assert responses[-1][1].total_billed_seconds == pytest.approx(dialog.seconds, abs=0.1)


@pytest.mark.parametrize(
    ("fmt", "encoding"), [("ogg", "OGG_OPUS"), ("webm", "WEBM_OPUS"), ("mp3", "MP3"), ("flac", "FLAC")]
)
async def test_compressed_streams(client: AsyncClient, dialog: audio.Clip, fmt: str, encoding: str):
    data = audio.encode(dialog.samples, fmt)
    responses = await _collect(
        client.stream(paced_bytes(data, dialog.seconds, realtime=False), encoding=encoding, sample_rate=0)
    )
    text = " ".join(r.transcript for r in _finals(responses))
    # Every sentence comes back, the last one too (it was once lost after the half-close); the tiny
    # model's mistakes on espeak sent faster than real time vary between runs ("But when her today"
    # for "The weather today" once put a correct-length MP3 stream at 0.27), so WER has room for them.
    assert wer(dialog.text, text) <= 0.35, text
    last = normalize(dialog.spans[-1][2]).split()
    heard = set(normalize(text).split())
    assert sum(w in heard for w in last) >= len(last) // 2, text


@pytest.mark.parametrize(("fmt", "encoding", "size"), [("flac", "FLAC", 60), ("ogg", "OGG_OPUS", 200)])
async def test_a_compressed_stream_cut_before_its_first_audio_ends_ok(
    client: AsyncClient, fmt: str, encoding: str, size: int
):
    """A stream that began right but was half-closed before its header was complete (a hang-up in
    the first instant) held no audio: OK with no results, not "not FLAC audio: [Errno ...] End of file"."""
    head = audio.encode(audio.silence(1), fmt)[:size]
    responses = await _collect(client.stream([head], encoding=encoding, sample_rate=0))
    assert not [r for _, resp in responses for r in resp.results]
    # The same length of something that only starts right is still refused.
    garbage = head[:4] + np.random.default_rng(1).bytes(3000)
    with pytest.raises(SttError) as err:
        await _collect(client.stream([garbage], encoding=encoding, sample_rate=0))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value


async def test_silence_gives_no_words_and_no_model_calls(client: AsyncClient, transcriber):
    calls = transcriber.batcher.calls
    silent = PcmAudio(audio.encode(audio.silence(8), "raw"), 16000, 1)
    responses = await _collect(client.stream(pcm_chunks(silent), interim=True))
    assert not [r for _, resp in responses for r in resp.results]
    assert transcriber.batcher.calls == calls
    rng = np.random.default_rng(5)
    noise = PcmAudio(
        audio.encode((rng.standard_normal(16000 * 6) * 0.01).astype(np.float32), "raw"), 16000, 1
    )
    responses = await _collect(client.stream(pcm_chunks(noise), interim=True))
    assert normalize(" ".join(r.transcript for r in _finals(responses))) == ""


async def test_single_utterance_ends_the_stream(client: AsyncClient, dialog: audio.Clip):
    responses = await _collect(client.stream(pcm_chunks(_pcm(dialog)), single_utterance=True, interim=False))
    events = [resp.speech_event_type for _, resp in responses if resp.speech_event_type]
    assert events[-1] == speech_pb2.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE
    text = " ".join(r.transcript for r in _finals(responses))
    assert wer(audio.SENTENCES[0], text) <= 0.3, text  # only the first sentence


async def test_max_stream_duration_is_enforced(client: AsyncClient, dialog: audio.Clip):
    got: list[speech_pb2.StreamingRecognizeResponse] = []
    with pytest.raises(SttError) as err:
        async for resp in client.stream(pcm_chunks(_pcm(dialog)), max_seconds=4.0, interim=False):
            got.append(resp)
    assert (
        err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum duration of 4s" in err.value.message
    )
    finals = [r for resp in got for r in resp.results if r.is_final]
    assert finals and all(r.end_seconds <= 4.1 for r in finals)  # what came before the limit is final


def _cfg(**kw) -> speech_pb2.StreamingRecognizeRequest:  # type: ignore[no-untyped-def]
    return speech_pb2.StreamingRecognizeRequest(
        streaming_config=speech_pb2.StreamingRecognitionConfig(config=common_pb2.RecognitionConfig(**kw))
    )


AUDIO = speech_pb2.StreamingRecognizeRequest(audio_content=b"\0\0" * 1600)


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "ended before its streaming_config"),
        ([AUDIO, _cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000)], "first message must carry streaming_config"),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_MP4_AAC)], "not supported for streaming"),
        ([_cfg()], "not supported for streaming"),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16)], "sample_rate_hz"),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, language_code="xx")], "unknown language"),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000), AUDIO,
          _cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000)], "only be sent once"),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, audio_channel_count=2),
          speech_pb2.StreamingRecognizeRequest(audio_content=b"\0\0\0")], None),
        ([_cfg(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS), speech_pb2.StreamingRecognizeRequest(audio_content=b"not ogg" * 500)],
         "OGG_OPUS"),
        ([speech_pb2.StreamingRecognizeRequest(streaming_config=speech_pb2.StreamingRecognitionConfig(
            config=common_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000),
            final_result_timing=9))], "final_result_timing 9 is not one"),
    ],
)  # fmt: skip
async def test_bad_streams_are_refused(client: AsyncClient, requests, message):  # type: ignore[no-untyped-def]
    async def gen():
        for r in requests:
            yield r

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.speech.StreamingRecognize(gen(), timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    if message:
        assert message in (err.value.details() or "")


async def test_cancelled_stream_leaves_nothing_behind(client: AsyncClient, gateway, dialog: audio.Clip):
    before_streams = speech_api.STREAMS._value.get()
    for encoding in ("LINEAR16", "OGG_OPUS"):
        await asyncio.sleep(0.5)
        gc.collect()
        before_set = set(asyncio.all_tasks())
        tasks_before = len(before_set)
        data = audio.encode(dialog.samples, "raw" if encoding == "LINEAR16" else "ogg")

        async def forever(data: bytes = data):  # type: ignore[no-untyped-def]
            async for c in paced_bytes(data, dialog.seconds, realtime=True):
                yield c
            await asyncio.sleep(3600)

        stream = client.stream(
            forever(), encoding=encoding, sample_rate=16000 if encoding == "LINEAR16" else 0
        )
        got = 0
        async for _ in stream:
            got += 1
            if got >= 3:
                break
        assert speech_api.STREAMS._value.get() == before_streams + 1
        await stream.aclose()  # the client goes away mid-stream
        with contextlib.suppress(AssertionError):  # the asserts below say what is left
            await until(
                lambda: (
                    speech_api.STREAMS._value.get() == before_streams
                    and len(asyncio.all_tasks()) <= tasks_before  # noqa: B023
                ),
                timeout=20,
            )
        assert speech_api.STREAMS._value.get() == before_streams
        assert len(asyncio.all_tasks()) <= tasks_before, [
            repr(t)[:400] for t in asyncio.all_tasks() - before_set
        ]
        # No decoder thread outlives its stream (pools the services share, such as the database's
        # connection workers or the model's, may have grown meanwhile).
        decoders = [t.name for t in threading.enumerate() if t.name.startswith("decode-")]
        assert decoders == [], decoders


async def test_a_file_streamed_as_linear16_is_refused_on_its_first_bytes(
    client: AsyncClient, dialog: audio.Clip
):
    """An Ogg, or a WAV at another rate than the stream's, streamed as LINEAR16: INVALID_ARGUMENT
    ENCODING_MISMATCH at once, also when its first bytes come in pieces smaller than a signature,
    saying what to stream instead (it was transcribed as raw samples, an Ogg as noise)."""
    two_seconds = dialog.samples[: 2 * 16000]
    wav8k = audio.encode(two_seconds, "wav", rate=8000)
    ogg = audio.encode(two_seconds, "ogg")
    cases = [(wav8k, 3200, "set sample_rate_hz to 8000"), (wav8k, 3, "strip the header"),
             (ogg + bytes(len(ogg) % 2), 3200, "OGG_OPUS")]  # fmt: skip
    for data, first, advice in cases:
        chunks = [data[:first]] + [data[i : i + 3200] for i in range(first, len(data), 3200)]
        with pytest.raises(SttError) as err:
            async for _ in client.stream(chunks, encoding="LINEAR16", sample_rate=16000):
                pass
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.reason == "ENCODING_MISMATCH", err.value
        assert "streaming_config.config.encoding" in err.value.fields
        assert advice in err.value.message and "leave the encoding unspecified" not in err.value.message
    raw = audio.encode(two_seconds, "raw")
    responses = [r async for r in client.stream([raw[i : i + 3200] for i in range(0, len(raw), 3200)])]
    assert responses


async def test_a_wav_streamed_as_linear16_at_its_own_rate_is_its_samples(
    client: AsyncClient, dialog: audio.Clip
):
    """A WAV of 16-bit PCM streamed as LINEAR16 at its rate and channels (Google Speech takes it;
    it was refused as ENCODING_MISMATCH): its header is dropped, also when it comes in pieces and
    spans several messages (a large chunk before the data), and also with a pipe's placeholder
    size; the stream decodes to exactly the samples of the same audio streamed raw."""
    from services.gateway.audio import Limits
    from services.gateway.stream_decoder import make_decoder

    two_seconds = dialog.samples[: 2 * 16000]
    raw = audio.encode(two_seconds, "raw")
    wav = audio.encode(two_seconds, "wav")
    at = wav.index(b"data")
    big_list = b"LIST" + (9001).to_bytes(4, "little") + b"INFO" + bytes(range(256)) * 35 + b"z" * 37 + b"\0"
    with_list = wav[:at] + big_list + wav[at:]
    piped = audio.piped_wav(two_seconds)
    loop = asyncio.get_running_loop()

    def decoded(data: bytes, sizes: list[int]) -> np.ndarray:
        out: list[np.ndarray] = []
        dec = make_decoder("LINEAR16", 16000, 1, Limits(1 << 30, 3600.0), out.append, loop)
        at = 0
        for size in sizes:
            dec.feed(data[at : at + size])
            at += size
        while at < len(data):
            dec.feed(data[at : at + 3200])
            at += 3200
        dec.finish()
        return np.concatenate(out)

    expected = decoded(raw, [])
    for name, data, sizes in (("wav", wav, []), ("wav in 3-byte pieces", wav, [3] * 40),
                              ("a LIST chunk over several messages", with_list, [20, 100, 4000, 4000, 4000]),
                              ("sox's pipe", piped, [7, 5])):  # fmt: skip
        assert np.array_equal(decoded(data, sizes), expected), name
    responses = [r async for r in client.stream([wav[i : i + 3200] for i in range(0, len(wav), 3200)],
                                                encoding="LINEAR16", sample_rate=16000)]  # fmt: skip
    assert responses


def test_collapse_repeats():
    def ws(text):  # type: ignore[no-untyped-def]
        return [Word(t, i, i + 1) for i, t in enumerate(text.split())]

    assert [
        w.word for w in collapse_repeats(ws("Please remember... Please remember... Please remember"))
    ] == [
        "Please",
        "remember...",
    ]
    assert [w.word for w in collapse_repeats(ws("no no"))] == ["no", "no"]
    assert [w.word for w in collapse_repeats(ws("go go go go"))] == ["go"]
    assert [w.word for w in collapse_repeats(ws("a b c"))] == ["a", "b", "c"]


async def test_deadline_ends_the_stream_and_frees_the_session(client: AsyncClient, dialog: audio.Clip):
    before = speech_api.STREAMS._value.get()
    with pytest.raises(SttError) as err:
        async for _ in client.stream(pcm_chunks(_pcm(dialog), realtime=True), timeout=2.0):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(40):
        if speech_api.STREAMS._value.get() == before:
            break
        await asyncio.sleep(0.05)
    assert speech_api.STREAMS._value.get() == before


def test_drop_repeated_prefix():
    from services.gateway.streaming import drop_repeated_prefix

    def ws(text):  # type: ignore[no-untyped-def]
        return [Word(t, i, i + 1) for i, t in enumerate(text.split())]

    final = ws("She keeps her old letters in a wooden box under the bed.")
    # The model echoes its prompt (recent final text) before the new words.
    assert [w.word for w in drop_repeated_prefix(ws("She keeps her old letters. The engineers"), final)] == [
        "The",
        "engineers",
    ]
    assert [w.word for w in drop_repeated_prefix(ws("the bed. The engineers"), final)] == ["The", "engineers"]
    assert [w.word for w in drop_repeated_prefix(ws("The engineers tested"), final)] == [
        "The",
        "engineers",
        "tested",
    ]


def test_after_final_keeps_new_words_at_the_seam_and_drops_final_words_heard_again():
    """The last final words are "my front line" (line ends at 10.0 s). A word of a new pass that starts
    before 10.0 - 0.1 s and goes on past 10.0 s is new after the last final word, and the last final
    word heard again (as "lawn") in its place; a pass that starts with it decides by its text."""
    from services.gateway.streaming import after_final

    def pass_(*words: tuple[str, float, float]) -> list[Word]:
        return [Word(t, a, b) for t, a, b in words]

    final = pass_(("my", 9.0, 9.3), ("front", 9.3, 9.6), ("line.", 9.6, 10.0))

    def kept(words: list[Word]) -> list[str]:
        return [w.word for w in after_final(words, final[-2:], 10.0)]

    # After "line" heard again: "lawn" (9.8-10.3 s) is new speech (the start filter lost it).
    assert kept(pass_(("front", 9.2, 9.5), ("line", 9.5, 9.8), ("lawn", 9.8, 10.3))) == ["lawn"]
    # In the place of "line" (after "front"): "line" heard as "lawn", not a new word.
    assert kept(pass_(("my", 9.0, 9.3), ("front", 9.3, 9.55), ("lawn", 9.55, 10.2), ("She", 10.4, 10.6))) == [
        "She"
    ]
    # A pass that starts at the seam: a word like a last final word is that word again.
    assert kept(pass_(("lines", 9.7, 10.2), ("She", 10.4, 10.6))) == ["She"]
    assert kept(pass_(("circumstances", 9.7, 10.2), ("She", 10.4, 10.6))) == ["circumstances", "She"]
    # Ending at (or before) the end of the final words: heard again, whatever its text.
    assert kept(pass_(("lawn", 9.5, 10.01))) == []
    # Punctuation alone at the seam is not new speech.
    assert kept(pass_(("...", 9.7, 10.2), ("She", 10.4, 10.6))) == ["She"]

    def seam(last: list[tuple[str, float, float]], words: list[tuple[str, float, float]]) -> list[str]:
        return [w.word for w in after_final(pass_(*words), pass_(*last), 10.0)]

    # The last final word heard again in two words, or as its end: not new (a review's cases).
    said = [("I", 9.0, 9.5), ("cannot", 9.5, 10.0)]
    assert seam(said, [("I", 9.0, 9.5), ("can", 9.5, 9.7), ("not", 9.7, 10.1), ("go", 10.2, 10.5)]) == ["go"]
    said = [("nor", 7.5, 7.8), ("circumstances", 7.8, 10.0)]
    assert seam(said, [("ances", 9.0, 10.2), ("which", 10.3, 10.6)]) == ["which"]
    said = [("said", 9.0, 9.4), ("nevertheless", 9.4, 10.0)]
    assert seam(said, [("never", 9.4, 9.6), ("the", 9.6, 9.7), ("less", 9.7, 10.1), ("we", 10.2, 10.4)]) == [
        "we"
    ]
    # Short words are alike only when equal: "this" heard again before a re-heard "is" ("as").
    said = [("this", 9.2, 9.5), ("is", 9.5, 10.0)]
    assert seam(said, [("this", 9.2, 9.5), ("as", 9.5, 10.1), ("fine", 10.2, 10.5)]) == ["fine"]
    assert seam(said[:1], [("this", 9.2, 9.8), ("is", 9.8, 10.1), ("fine", 10.2, 10.5)]) == ["is", "fine"]


def test_drop_repeated_block():
    from services.gateway.streaming import drop_repeated_block

    def ws(text):  # type: ignore[no-untyped-def]
        return [Word(t, i, i + 1) for i, t in enumerate(text.split())]

    # The rest of a sentence, then the whole sentence again: only the second copy goes.
    out = drop_repeated_block(
        ws("story. The student read a short story."), ws("Hello. The student read a short")
    )
    assert [w.word for w in out] == ["story."]
    assert (
        drop_repeated_block(
            ws("The student read a short story."), ws("Hello. The student read a short story.")
        )
        == []
    )
    assert [w.word for w in drop_repeated_block(ws("no no"), ws("I said"))] == ["no", "no"]
    # Short repeats are speech, not a second copy.
    assert [w.word for w in drop_repeated_block(ws("it was very good"), ws("it was"))] == [
        "it",
        "was",
        "very",
        "good",
    ]


def _repeated_ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return {g for g in grams if grams.count(g) > 1}


@pytest.mark.parametrize("name", ["jfk_inaugural_16k", "harvard_osr_0010_8k"])
async def test_real_speech_at_real_time_has_no_repeated_phrases(client: AsyncClient, name: str):
    """Real recordings streamed at real time: no phrase of the finals is said twice unless the
    speaker said it twice (a final must never cover audio that is already final), and the words
    are the offline ones."""
    from tests.support.speech import by_name, load_16k

    clip = by_name(name)
    samples = load_16k(clip)
    pcm = PcmAudio(audio.encode(samples, "raw"), 16000, 1)
    responses = await _collect(client.stream(pcm_chunks(pcm, realtime=True), interim=True, language="en"))
    finals = _finals(responses)
    text = " ".join(r.transcript for r in finals)
    assert _repeated_ngrams(text) <= _repeated_ngrams(clip.text), text
    starts = [w.start_seconds for r in finals for w in r.words]
    assert starts == sorted(starts)
    offline = await client.recognize(audio.encode(samples, "flac"), language="en")
    assert wer(clip.text, text) <= wer(clip.text, offline.transcript) + 0.25, (text, offline.transcript)


async def test_hypotheses_widen_their_beam_only_while_few_streams_are_live(
    client: AsyncClient, gateway, short_clip
):
    """One stream on one transcriber is light load: its hypotheses use stream_light_load_beam_size
    (3) and hear stream_hypothesis_context_seconds before their window (the final words there as
    their prefix), an utterance's final pass the stream beam (5); with the threshold at 0 streams (as
    under load) hypotheses are greedy without a prefix and final passes use at most
    stream_loaded_final_beam_size (2 here); with stream_hypothesis_context_streams at 0 a lone stream's
    hypotheses have no prefix either. Admission learns a transcriber's cost only from windows shaped
    as under load (here the greedy ones): light-load windows cost more and made the estimate swing."""
    beams: list[int] = []
    prefixed: list[int] = []  # beams of the windows with a prefix
    pool = gateway.speech.pool
    real = pool.transcribe
    admission = gateway.speech.admission
    learnt: list[int] = []
    observe = admission.observe

    async def recording(samples, options, work_class):  # type: ignore[no-untyped-def]
        beams.append(options.beam_size)
        if options.prefix:
            prefixed.append(options.beam_size)
        return await real(samples, options, work_class)

    def learning(result):  # type: ignore[no-untyped-def]
        learnt.append(result.batch_size)
        observe(result)

    pcm = PcmAudio(audio.encode(short_clip.samples, "raw"), 16000, 1)
    settings = gateway.speech.settings
    saved = settings.stream_light_load_streams, settings.stream_loaded_final_beam_size
    saved_context = settings.stream_hypothesis_context_streams
    pool.transcribe, admission.observe = recording, learning  # type: ignore[method-assign]
    try:
        finals = _finals(await _collect(client.stream(pcm_chunks(pcm), interim=True, language="en")))
        light, light_prefixed, light_learnt = list(beams), list(prefixed), len(learnt)
        beams.clear(), prefixed.clear(), learnt.clear()
        settings.stream_hypothesis_context_streams = 0
        assert _finals(await _collect(client.stream(pcm_chunks(pcm), interim=True, language="en")))
        assert set(beams) == {3, 5} and not prefixed, (beams, prefixed)
        beams.clear(), learnt.clear()
        settings.stream_light_load_streams, settings.stream_loaded_final_beam_size = 0, 2
        finals_loaded = _finals(await _collect(client.stream(pcm_chunks(pcm), interim=True, language="en")))
    finally:
        pool.transcribe, admission.observe = real, observe  # type: ignore[method-assign]
        settings.stream_light_load_streams, settings.stream_loaded_final_beam_size = saved
        settings.stream_hypothesis_context_streams = saved_context
    assert finals and finals_loaded
    assert set(light) == {3, 5} and set(beams) == {1, 2}, (light, beams)
    assert 3 in light_prefixed and not prefixed, (light_prefixed, prefixed)
    assert light_learnt == 0, (light_learnt, light)
    assert len(learnt) == len(beams), (learnt, beams)


async def test_words_need_one_hypothesis_only_under_heavy_load(client: AsyncClient, gateway, short_clip):
    """Up to stream_heavy_load_streams live streams per serving transcriber, words are final by
    agreement of stream_agreement hypotheses; above it, of stream_loaded_agreement (one); 0 turns the
    switch off. A live stream asks for each hypothesis."""
    speech = gateway.speech
    s = speech.settings
    heavy = s.stream_heavy_load_streams * speech.pool.serving_count
    saved = speech.admission.active, s.stream_heavy_load_streams
    asked: list[int] = []
    real = speech.agreement

    def agreement() -> int:
        asked.append(real())
        return asked[-1]

    speech.agreement = agreement  # type: ignore[method-assign]
    try:
        pcm = PcmAudio(audio.encode(short_clip.samples, "raw"), 16000, 1)
        assert _finals(await _collect(client.stream(pcm_chunks(pcm), language="en")))
        assert asked and set(asked) == {2}, asked
        speech.admission.active = heavy
        assert heavy > 0 and speech.agreement() == s.stream_agreement == 2
        speech.admission.active = heavy + 1
        assert speech.agreement() == s.stream_loaded_agreement == 1
        s.stream_heavy_load_streams = 0
        assert speech.agreement() == 2
    finally:
        speech.admission.active, s.stream_heavy_load_streams = saved
        del speech.agreement


async def test_the_last_response_bills_the_whole_stream_also_after_trailing_silence(
    client: AsyncClient, short_clip
):
    """Speech, then 2.5 s of silence, at real time: the utterance's final comes at the pause, and the
    stream's last response (a results-less one, passed on by the SDK) carries all of the audio."""
    samples = np.concatenate([short_clip.samples, np.zeros(int(2.5 * 16000), dtype=np.float32)])
    pcm = PcmAudio(audio.encode(samples, "raw"), 16000, 1)
    responses = [r for _, r in await _collect(client.stream(pcm_chunks(pcm, realtime=True), interim=False))]
    assert _finals([(0.0, r) for r in responses])
    last_final = max(i for i, r in enumerate(responses) if r.results)
    assert responses[last_final].total_billed_seconds < pcm.seconds - 1.0  # sent at the pause
    assert responses[-1].total_billed_seconds == pytest.approx(pcm.seconds, abs=0.05)


async def test_streams_past_capacity_are_refused_with_retry_info(client: AsyncClient, gateway):
    """Admission control: with room for one live stream, a second is refused at admission with
    RESOURCE_EXHAUSTED / CAPACITY_EXHAUSTED and a retry delay; the admitted one is unaffected."""
    admission = gateway.speech.admission
    saved = admission.fixed
    admission.fixed = 1
    try:
        async with held_stream(client):
            await until(lambda: admission.active == 1, timeout=10)
            info = await client.server_info()
            assert info.limits.live_stream_capacity == 1
            with pytest.raises(SttError) as err:
                async for _ in client.stream([b"\x00\x00" * 1600]):
                    pass
            e = err.value
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "CAPACITY_EXHAUSTED"
            assert e.retry_after is not None and e.retry_after > 0
    finally:
        admission.fixed = saved
    await until(lambda: admission.active == 0, timeout=10)
