"""Decoding with limits (unit level: no grpc)."""

import io
import resource

import av
import numpy as np
import pytest

from services.gateway.audio import Limits, Linear16Decoder, decode, probe
from services.shared.errors import InvalidInput, LimitExceeded
from tests.support import audio

LIMITS = Limits(max_bytes=50 * 1024 * 1024, max_seconds=120.0)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return audio.speak("Testing one two three, the decoder should handle every format.")


def _envelope(x: np.ndarray) -> np.ndarray:
    n = x.shape[0] // 400
    return np.sqrt(np.square(x[: n * 400].reshape(n, 400)).mean(axis=1))  # 25 ms frames


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "webm", "m4a"])
def test_containers_decode_to_16k_mono(speech, fmt):
    out = decode(audio.encode(speech, fmt), limits=LIMITS)
    assert out.samples.dtype == np.float32
    # Lossy codecs add up to a few frames of encoder delay.
    assert abs(out.duration - speech.shape[0] / 16000) < (0.01 if fmt in ("wav", "flac") else 0.2)
    # The loudness envelope survives (best over small codec delays).
    a, b = _envelope(speech), _envelope(out.samples)
    n = min(a.shape[0], b.shape[0]) - 8
    best = max(np.corrcoef(a[:n], b[k : k + n])[0, 1] for k in range(8))
    assert best > 0.9


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (8000, 1), (44100, 2), (48000, 6)])
def test_linear16_any_rate_and_channels(speech, rate, channels):
    raw = audio.encode(speech, "raw", rate=rate, channels=channels)
    out = decode(raw, limits=LIMITS, encoding="LINEAR16", sample_rate=rate, channels=channels)
    assert abs(out.duration - speech.shape[0] / 16000) < 0.01


def test_linear16_incremental_equals_whole(speech):
    raw = audio.encode(speech, "raw", rate=22050)
    dec = Linear16Decoder(22050, 1, LIMITS)
    parts = []
    for i in range(0, len(raw), 777):  # odd sizes: half samples carry over
        parts += list(dec.push(raw[i : i + 777]))
    parts += list(dec.flush())
    whole = decode(raw, limits=LIMITS, encoding="LINEAR16", sample_rate=22050, channels=1).samples
    got = np.concatenate(parts)
    assert abs(got.shape[0] - whole.shape[0]) <= 2
    assert np.allclose(got[:1000], whole[:1000], atol=1e-3)


@pytest.mark.parametrize(
    ("data", "kw", "exc", "match"),
    [
        (b"", {}, InvalidInput, "empty"),
        (
            bytes(np.random.default_rng(1).integers(0, 256, 40000, dtype=np.uint8)),
            {},
            InvalidInput,
            "could not read",
        ),
        (b"hello, this is plain text and not audio at all" * 10, {}, InvalidInput, "could not read"),
        (b"\x00\x01" * 100, {"encoding": "LINEAR16"}, InvalidInput, "sample_rate_hz"),
        (
            b"\x00\x01" * 100,
            {"encoding": "LINEAR16", "sample_rate": 16000, "channels": 12},
            InvalidInput,
            "1..8",
        ),
        (b"\x00\x01\x02", {"encoding": "LINEAR16", "sample_rate": 16000}, InvalidInput, "whole number"),
    ],
)
def test_bad_input(data, kw, exc, match):
    with pytest.raises(exc, match=match):
        decode(data, limits=LIMITS, **kw)


def test_unsupported_container(speech):
    with pytest.raises(InvalidInput, match="unsupported audio format 'aiff'"):
        decode(audio.encode(speech, "aiff"), limits=LIMITS)


def test_declared_encoding_must_match(speech):
    with pytest.raises(InvalidInput, match="config.encoding is FLAC but the content is MP3"):
        decode(audio.encode(speech, "mp3"), limits=LIMITS, encoding="FLAC")


def _without_id3(mp3: bytes) -> bytes:
    if mp3[:3] != b"ID3":
        return mp3
    size = (mp3[6] & 0x7F) << 21 | (mp3[7] & 0x7F) << 14 | (mp3[8] & 0x7F) << 7 | (mp3[9] & 0x7F)
    return mp3[10 + size :]


@pytest.mark.parametrize(
    "fmt", ["riff avi", "flac", "mp3", "mp3 without ID3", "ogg", "webm", "m4a", "aiff", "png"]
)
def test_a_file_sent_as_linear16_is_an_encoding_mismatch(speech, fmt, tmp_path):
    """LINEAR16 is raw samples: a file (its magic at the start) sent as LINEAR16 was decoded as noise
    and transcribed as whatever the model made of it. Now ENCODING_MISMATCH, from bytes, a file
    and the upload check."""
    if fmt == "png":
        data = b"\x89PNG\r\n\x1a\n" + bytes(20_000)
    elif fmt == "riff avi":
        data = b"RIFF" + (20_004).to_bytes(4, "little") + b"AVI " + bytes(20_000)
    elif fmt == "mp3 without ID3":
        data = _without_id3(audio.encode(speech, "mp3"))
        assert data[0] == 0xFF
    else:
        data = audio.encode(speech, fmt)
    data += bytes(len(data) % 2)  # whole 16-bit frames: not refused as PARTIAL_FRAME instead
    path = tmp_path / "file"
    path.write_bytes(data)
    raw = {"encoding": "LINEAR16", "sample_rate": 16000}
    for check in (lambda: decode(data, limits=LIMITS, **raw), lambda: decode(str(path), limits=LIMITS, **raw),
                  lambda: probe(str(path), limits=LIMITS, **raw)):  # fmt: skip
        with pytest.raises(InvalidInput) as err:
            check()
        assert err.value.reason == "ENCODING_MISMATCH" and err.value.field == "config.encoding"
        assert "is LINEAR16 (raw 16-bit samples) but the content is" in err.value.message
        assert "leave the encoding unspecified to have it detected" in err.value.message


def _wav(pcm: bytes, rate: int, channels: int, *, bits: int = 16, tag: int = 1, subformat: int = 0,
         rf64: bool = False, before_data: bytes = b"", data_size: int | None = None) -> bytes:  # fmt: skip
    """A WAV made here: `fmt ` (WAVE_FORMAT_EXTENSIBLE when `subformat`), chunks `before_data`, then
    `data` holding `pcm` (its size stated as `data_size`, if given). RF64: sizes in a ds64 chunk."""
    block = channels * bits // 8
    fmt = tag.to_bytes(2, "little") + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
    fmt += (rate * block).to_bytes(4, "little") + block.to_bytes(2, "little") + bits.to_bytes(2, "little")
    if subformat:
        guid = subformat.to_bytes(2, "little") + bytes.fromhex("000000001000800000aa00389b71")
        fmt += (22).to_bytes(2, "little") + bits.to_bytes(2, "little") + bytes(4) + guid
    size = len(pcm) if data_size is None else data_size
    chunks = b"fmt " + len(fmt).to_bytes(4, "little") + fmt + before_data
    if rf64:
        ds64 = (
            (36 + len(chunks) + len(pcm)).to_bytes(8, "little") + len(pcm).to_bytes(8, "little") + bytes(12)
        )
        chunks = b"ds64" + len(ds64).to_bytes(4, "little") + ds64 + chunks
        return b"RF64" + b"\xff" * 4 + b"WAVE" + chunks + b"data" + b"\xff" * 4 + pcm
    body = b"WAVE" + chunks + b"data" + size.to_bytes(4, "little") + pcm
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def test_a_wav_of_the_configured_format_sent_as_linear16_is_its_samples(speech, tmp_path):
    """A WAV of 16-bit PCM sent as LINEAR16 at its own rate and channels (Google Speech takes that)
    was refused as ENCODING_MISMATCH (and before that, its header was a click): it is now its
    samples, exactly those of the same audio sent raw, from bytes, a file and the upload check.
    Plain PCM or WAVE_FORMAT_EXTENSIBLE PCM, RIFF or RF64, chunks before the data, a WAV written to
    a pipe (placeholder size), chunks after the data (not heard)."""
    for rate, channels in ((16000, 1), (44100, 2)):
        raw = audio.encode(speech, "raw", rate=rate, channels=channels)
        cfg = {"encoding": "LINEAR16", "sample_rate": rate, "channels": channels}
        expected = decode(raw, limits=LIMITS, **cfg).samples
        wavs = {
            "pcm": _wav(raw, rate, channels),
            "extensible": _wav(raw, rate, channels, tag=0xFFFE, subformat=1),
            "rf64": _wav(raw, rate, channels, rf64=True),
            "list before data": _wav(raw, rate, channels, before_data=b"LIST\x05\x00\x00\x00INFOx\x00"),
            "pipe": _wav(raw, rate, channels, data_size=0xFFFFFFFF),
            "list after data": _wav(
                raw + b"LIST" + (4).to_bytes(4, "little") + b"INFO", rate, channels, data_size=len(raw)
            ),
        }
        for name, data in wavs.items():
            path = tmp_path / f"{name}.wav"
            path.write_bytes(data)
            for source in (data, str(path)):
                got = decode(source, limits=LIMITS, **cfg)
                assert np.array_equal(got.samples, expected), (rate, name)
            assert (
                abs(probe(str(path), limits=LIMITS, **cfg).seconds - len(raw) / (2 * channels * rate)) < 1e-6
            )
    # sox's, the usual writer of WAVs to pipes
    piped = audio.piped_wav(speech)
    out = decode(piped, limits=LIMITS, encoding="LINEAR16", sample_rate=16000)
    assert np.array_equal(out.samples, decode(audio.encode(speech, "raw"), limits=LIMITS,
                                              encoding="LINEAR16", sample_rate=16000).samples)  # fmt: skip


def test_a_wav_of_another_format_sent_as_linear16_is_an_encoding_mismatch(speech, tmp_path):
    """A WAV whose format, rate or channels are not the config's: ENCODING_MISMATCH, saying what the
    WAV is and what to do (give its rate and channels, or leave the encoding unspecified)."""
    raw = audio.encode(speech, "raw")
    cases = {
        "8 kHz": (_wav(audio.encode(speech, "raw", rate=8000), 8000, 1), "16-bit PCM, 8000 Hz, 1 channel",
                  "set sample_rate_hz to 8000 and audio_channel_count to 1"),
        "stereo": (_wav(audio.encode(speech, "raw", channels=2), 16000, 2), "16-bit PCM, 16000 Hz, 2 channels",
                   "set sample_rate_hz to 16000 and audio_channel_count to 2"),
        "24-bit": (audio.piped_wav(speech, "-b24"), "24-bit PCM, 16000 Hz", "leave the encoding unspecified"),
        "float": (audio.piped_wav(speech, "-efloat"), "32-bit IEEE float", "leave the encoding unspecified"),
        "extensible float": (_wav(raw + raw, 16000, 1, bits=32, tag=0xFFFE, subformat=3), "32-bit IEEE float",
                             "leave the encoding unspecified"),
        "mu-law": (_wav(raw[: len(raw) // 2], 16000, 1, bits=8, tag=7), "mu-law", "leave the encoding unspecified"),
    }  # fmt: skip
    for name, (data, what, advice) in cases.items():
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        for check in (lambda: decode(data, limits=LIMITS, encoding="LINEAR16", sample_rate=16000),  # noqa: B023
                      lambda: decode(str(path), limits=LIMITS, encoding="LINEAR16", sample_rate=16000),  # noqa: B023
                      lambda: probe(str(path), limits=LIMITS, encoding="LINEAR16", sample_rate=16000)):  # noqa: B023  # fmt: skip
            with pytest.raises(InvalidInput) as err:
                check()
            assert err.value.reason == "ENCODING_MISMATCH" and err.value.field == "config.encoding", name
            assert "is LINEAR16 (16000 Hz, 1 channel) but the content is a WAV of" in err.value.message
            assert what in err.value.message and advice in err.value.message, (name, err.value.message)


def test_raw_speech_never_looks_like_a_file(speech):
    """The signatures are ones raw samples do not start with: speech at any rate, from any sample,
    and random bytes pass."""
    from services.gateway.audio import container_of

    for rate in (8000, 16000, 44100):
        raw = audio.encode(speech, "raw", rate=rate)
        assert not [off for off in range(0, len(raw) - 4096, 2) if container_of(raw[off : off + 4096])]
    rng = np.random.default_rng(5)
    assert not [i for i in range(20_000) if container_of(rng.bytes(4096))]


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (8000, 1), (44100, 2)])
def test_plain_wav_is_read_without_a_container_and_decodes_the_same(speech, rate, channels, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """A whole 16-bit PCM WAV (bytes or a file) is read as LINEAR16: the same samples as FFmpeg's,
    without opening a container."""
    from services.gateway import audio as gateway_audio

    data = audio.encode(speech, "wav", rate=rate, channels=channels)
    path = tmp_path / "x.wav"
    path.write_bytes(data)
    reference = np.concatenate(list(gateway_audio.iter_container(data, LIMITS)))

    def no_container(*_a, **_k):
        raise AssertionError("a plain WAV opened a container")

    monkeypatch.setattr(gateway_audio, "iter_container", no_container)
    for source in (data, str(path)):
        out = decode(source, limits=LIMITS)
        assert out.info.container == "wav" and out.info.length_exact
        assert abs(out.samples.shape[0] - reference.shape[0]) <= 2
        n = min(out.samples.shape[0], reference.shape[0])
        # (FFmpeg's resampler and ours differ by a little at other rates.)
        assert np.abs(out.samples[:n] - reference[:n]).mean() < (1e-6 if rate == 16000 else 0.01)


def test_plain_wav_file_over_the_duration_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "long.wav"
    path.write_bytes(audio.encode(audio.silence(200), "wav"))
    with pytest.raises(LimitExceeded, match="audio is 200s; the limit is 120s"):
        decode(str(path), limits=LIMITS)


def test_cut_off_wav_file_still_goes_to_ffmpeg_and_is_refused(speech, tmp_path):
    data = audio.encode(np.concatenate([speech, speech]), "wav")
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match="truncated"):
        decode(str(path), limits=LIMITS)


@pytest.mark.parametrize("encoding", ["-b16", "-b24", "-efloat"])
def test_a_wav_written_to_a_pipe_is_as_long_as_what_it_holds(speech, tmp_path, encoding):
    """A WAV written where its writer cannot seek back (to a pipe) has a placeholder for its data
    size: sox writes 0x7FFFF000, others 0x7FFFFFFF, 0xFFFFFFFF or 0. It is not hours long (it was
    refused as AUDIO_TOO_LONG) nor cut off: it is what the file holds, from bytes, a file and the
    upload check alike."""
    data = audio.piped_wav(speech, encoding)
    data_size = int.from_bytes(data[data.index(b"data") + 4 :][:4], "little")
    assert data_size >= 0x7FFF0000  # sox's placeholder
    variants = [data]
    if encoding == "-b16":  # the other writers' placeholders
        variants += [
            data[:40] + size.to_bytes(4, "little") + data[44:] for size in (0x7FFFFFFF, 0xFFFFFFFF, 0)
        ]
    for i, wav in enumerate(variants):
        path = tmp_path / f"piped{i}.wav"
        path.write_bytes(wav)
        for source in (wav, str(path)):
            out = decode(source, limits=LIMITS)
            assert abs(out.duration - speech.shape[0] / 16000) < 0.01, (i, out.info)
            assert not out.info.length_exact
        assert abs(probe(str(path), limits=LIMITS).seconds - speech.shape[0] / 16000) < 0.01
        # Past the duration limit, it is refused for what it holds.
        with pytest.raises(LimitExceeded, match="the limit is 1.0s"):
            decode(wav, limits=Limits(LIMITS.max_bytes, 1.0))
    # A WAV whose header states a real length and that holds less is still cut off.
    whole = audio.encode(np.concatenate([speech, speech]), "wav")
    with pytest.raises(InvalidInput) as cut:
        decode(whole[: len(whole) // 2], limits=LIMITS)
    assert cut.value.reason == "TRUNCATED_AUDIO"


def test_a_wav_whose_data_starts_past_the_first_64_kib_is_checked_against_its_header(speech, tmp_path):
    """A 100 KiB JUNK chunk before the data (as bext, iXML or JUNK chunks of some writers): its
    data chunk's stated length is still read (it was taken as unknown): cut off, it is
    TRUNCATED_AUDIO; stating an hour, it is AUDIO_TOO_LONG before any decoding; whole, it decodes,
    from bytes, a file and the upload check."""
    wav = audio.encode(np.concatenate([speech, speech]), "wav")
    at = wav.index(b"data")
    big = wav[:at] + b"JUNK" + (100 * 1024).to_bytes(4, "little") + bytes(100 * 1024) + wav[at:]
    data_at = big.index(b"data")
    assert data_at > 65536
    cut = big[: data_at + (len(big) - data_at) // 2]
    hour = _with_data_size(big, 16000 * 2 * 3600)
    seconds = 2 * speech.shape[0] / 16000
    for name, data in (("whole", big), ("cut", cut), ("an hour", hour)):
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        for check in (lambda: decode(data, limits=LIMITS).duration,  # noqa: B023
                      lambda: decode(str(path), limits=LIMITS).duration,  # noqa: B023
                      lambda: probe(str(path), limits=LIMITS).seconds):  # noqa: B023  # fmt: skip
            if name == "whole":
                assert abs(check() - seconds) < 0.01
            elif name == "cut":
                with pytest.raises(InvalidInput) as err:
                    check()
                assert err.value.reason == "TRUNCATED_AUDIO", err.value
            else:
                with pytest.raises(LimitExceeded, match="audio is 3600s; the limit is 120s"):
                    check()


def test_the_walk_over_a_wav_s_chunks_is_bounded(speech, tmp_path):
    """A WAV's chunk headers are walked in Python: a hostile file of a million empty chunks (8 bytes
    each) would cost a loop per chunk, several times per file. Past MAX_WAV_CHUNKS the walk stops
    (the layout is left to FFmpeg, which still decodes the file whole); up to it, the data chunk is
    found as before."""
    from services.gateway import audio as audio_mod

    wav = audio.encode(speech, "wav")
    at = wav.index(b"data")
    seconds = speech.shape[0] / 16000
    for chunks, found in ((audio_mod.MAX_WAV_CHUNKS - 4, True), (200_000, False)):
        data = wav[:at] + b"JUNK" + bytes(4) + (b"JUNK" + bytes(4)) * (chunks - 1) + wav[at:]
        assert (audio_mod._wav_layout(data) is not None) == found
        assert (audio_mod._walk_wav_chunks(io.BytesIO(data), len(data)) is not None) == found
        path = tmp_path / f"{chunks}.wav"
        path.write_bytes(data)
        assert abs(decode(str(path), limits=LIMITS).duration - seconds) < 0.01


def test_a_wav_streamed_as_linear16_is_heard_as_far_as_its_data_chunk_says(speech):
    """A WAV streamed as LINEAR16 at its own format: the samples its data chunk states, in pieces
    of any size; the chunks a file has after its audio (LIST, id3) are not heard (they were, as a
    click); bytes after a stated size that are no chunk are heard (a writer that stated too little);
    a pipe's placeholder size takes everything; a header whose chunk swallows the stream (stating
    gigabytes) is UNDECODABLE_AUDIO at its end, not an empty success."""
    from services.gateway.audio import Linear16Start

    raw = audio.encode(speech, "raw")
    wav = audio.encode(speech, "wav")
    wav = wav[: wav.index(b"data") + 8] + raw  # the data chunk last, whatever the encoder wrote after
    tail = (
        b"LIST" + (26).to_bytes(4, "little") + b"INFOISFT" + (14).to_bytes(4, "little") + b"Lavf61.7.100\0\0"
    )

    def streamed(data: bytes, piece: int) -> bytes:
        start = Linear16Start(16000, 1, "audio_content", "", "OGG_OPUS")
        out = b"".join(start.feed(data[i : i + piece]) for i in range(0, len(data), piece))
        return out + start.finish()

    short = _with_data_size(wav, len(raw) - 3200)  # 0.1 s more than it says, no chunk after it
    for piece in (3, 1000, 3200, len(wav) + len(tail)):
        assert streamed(wav + tail, piece) == raw, piece
        assert streamed(short, piece) == raw, piece
        assert streamed(_with_data_size(wav, 0x7FFFF000) + tail, piece) == raw + tail, piece
    at = wav.index(b"data")
    swallowed = wav[:at] + b"JUNK" + (0xFFFFFFF0).to_bytes(4, "little") + wav[at:]
    start = Linear16Start(16000, 1, "audio_content", "", "OGG_OPUS")
    assert start.feed(swallowed) == b""
    with pytest.raises(InvalidInput) as err:
        start.finish()
    assert err.value.reason == "UNDECODABLE_AUDIO" and "never reached a data chunk" in err.value.message


def _with_data_size(wav: bytes, size: int) -> bytes:
    at = wav.index(b"data") + 4
    return wav[:at] + size.to_bytes(4, "little") + wav[at + 4 :]


def test_a_wav_whose_data_chunk_says_less_than_follows_is_refused(speech, tmp_path):
    """Decoders stop where the data chunk says it ends: a header that says 100 bytes with seconds of
    audio after them gave 0.003 s and an empty transcript. Refused (CORRUPT_AUDIO) from bytes, a
    file and the upload check; what may lawfully follow the data (RIFF chunks, a tag, zero padding,
    a few stray bytes) still decodes, at the stated length."""
    wav = audio.encode(speech, "wav")
    path = tmp_path / "lie.wav"
    path.write_bytes(lie := _with_data_size(wav, 100))
    for check in (lambda: decode(lie, limits=LIMITS), lambda: decode(str(path), limits=LIMITS),
                  lambda: probe(str(path), limits=LIMITS)):  # fmt: skip
        with pytest.raises(InvalidInput) as err:
            check()
        assert err.value.reason == "CORRUPT_AUDIO" and "data chunk says 100 bytes" in err.value.message
    seconds = speech.shape[0] / 16000
    riff = lambda b: b[:4] + (len(b) - 8).to_bytes(4, "little") + b[8:]  # noqa: E731
    lawful = {
        "list chunk": riff(wav + b"LIST" + (5000).to_bytes(4, "little") + b"INFO" + b"x" * 4996),
        "id3 tag": wav + b"ID3\x04\x00\x00\x00\x00\x7f\x7f" + bytes(range(256)) * 40,
        "zero padding": wav + bytes(50_000),
        "stray bytes": wav + bytes(range(256)) * 16,
    }
    for name, data in lawful.items():
        out = decode(data, limits=LIMITS)
        assert abs(out.duration - seconds) < 0.01, name
    # A header one second short of the audio is as wrong.
    with pytest.raises(InvalidInput, match="the WAV header is wrong"):
        decode(_with_data_size(wav, len(wav) - (wav.index(b"data") + 8) - 32000), limits=LIMITS)


def test_the_chunks_after_a_wav_data_chunk_are_walked_as_writers_write_them(speech, tmp_path):
    """Some writers leave out the pad byte after an odd-sized chunk: a LIST chunk of 13 bytes with
    none, then an iXML chunk of 5000 bytes, is a lawful tail (it was CORRUPT_AUDIO: the walk
    landed a byte into the iXML header and took it all for stray bytes). A chunk length past the
    end of the file is no chunk: 5000 stray bytes behind a wild LIST header are CORRUPT_AUDIO (the
    walk jumped past the end and took them for chunks)."""
    wav = audio.encode(speech, "wav")
    riff = lambda b: b[:4] + (len(b) - 8).to_bytes(4, "little") + b[8:]  # noqa: E731
    odd_list = b"LIST" + (13).to_bytes(4, "little") + b"INFOICMT" + (1).to_bytes(4, "little") + b"x"
    ixml = (b"<BWFXML>" + b"<NOTE>take 1</NOTE>" * 300)[:5000]
    lawful = riff(wav + odd_list + b"iXML" + len(ixml).to_bytes(4, "little") + ixml)
    wild = riff(wav + b"LIST" + (0x7FFFFFF0).to_bytes(4, "little") + bytes(range(1, 251)) * 20)
    for name, data in (("lawful", lawful), ("wild", wild)):
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        for check in (lambda: decode(data, limits=LIMITS).duration,  # noqa: B023
                      lambda: decode(str(path), limits=LIMITS).duration,  # noqa: B023
                      lambda: probe(str(path), limits=LIMITS).seconds):  # noqa: B023  # fmt: skip
            if name == "lawful":
                assert abs(check() - speech.shape[0] / 16000) < 0.01
            else:
                with pytest.raises(InvalidInput) as err:
                    check()
                assert err.value.reason == "CORRUPT_AUDIO", err.value


@pytest.mark.parametrize("fmt", ["ogg", "webm"])
def test_damaged_ogg_and_webm_are_refused_like_flac(speech, fmt, tmp_path):
    """Ogg states its length in its last page's granule position, WebM in its Duration element: a
    file that decodes to much less than that (damaged in the middle; a WebM cut off) is refused as
    TRUNCATED_AUDIO from bytes, a file and the upload check, as FLAC and M4A are (it gave partial
    audio and a transcript of it). (The upload check decodes the first 5 s and the end: this file
    is shorter. Longer, damage in the middle fails the job instead, as for FLAC.)"""
    data = audio.encode(speech, fmt)
    damaged = bytearray(data)
    damaged[len(data) // 3 : len(data) // 3 + 2000] = bytes(2000)
    cases = [bytes(damaged)] + ([data[: len(data) // 2]] if fmt == "webm" else [])
    for i, bad in enumerate(cases):
        path = tmp_path / f"bad{i}.{fmt}"
        path.write_bytes(bad)
        for check in (lambda: decode(bad, limits=LIMITS), lambda: decode(str(path), limits=LIMITS),  # noqa: B023
                      lambda: probe(str(path), limits=LIMITS)):  # noqa: B023  # fmt: skip
            with pytest.raises(InvalidInput) as err:
                check()
            assert err.value.reason == "TRUNCATED_AUDIO", (i, err.value)
    # Whole files, and a WebM whose muxer wrote no Duration (a live recorder's), decode in full.
    assert abs(decode(data, limits=LIMITS).duration - speech.shape[0] / 16000) < 0.05
    if fmt == "webm":
        live = audio.encode(speech, fmt, seekable=False)
        assert decode(live[: len(live) // 2], limits=LIMITS).info.length_exact is False


def test_a_webm_whose_duration_overstates_its_audio_decodes_in_full(speech, tmp_path):
    """Web apps patch the Duration of MediaRecorder's WebM with the wall-clock time of the
    recording, pauses included (fix-webm-duration): a WebM all of whose bytes demux but whose
    Duration says three times as long decodes in full (it was TRUNCATED_AUDIO), from bytes, a file
    and the upload check (longer than its first seconds: it checks the end too). Cut off or
    damaged, the same WebM is still TRUNCATED_AUDIO."""
    import struct

    long = np.concatenate([speech] * 3)
    data = audio.encode(long, "webm")
    at = data.index(b"\x44\x89\x88") + 3  # the Duration element, an 8-byte float (milliseconds)
    stated = struct.unpack(">d", data[at : at + 8])[0]
    assert abs(stated / 1000 - long.shape[0] / 16000) < 0.1
    patched = data[:at] + struct.pack(">d", stated * 3) + data[at + 8 :]
    path = tmp_path / "patched.webm"
    path.write_bytes(patched)
    seconds = long.shape[0] / 16000
    assert abs(decode(patched, limits=LIMITS).duration - seconds) < 0.2
    assert abs(decode(str(path), limits=LIMITS).duration - seconds) < 0.2
    assert abs(probe(str(path), limits=LIMITS).seconds - seconds) < 0.2
    damaged = bytearray(patched)
    damaged[len(patched) // 3 : len(patched) // 3 + 2000] = bytes(2000)
    for bad in (patched[: len(patched) // 2], bytes(damaged)):
        with pytest.raises(InvalidInput) as err:
            decode(bad, limits=LIMITS)
        assert err.value.reason == "TRUNCATED_AUDIO", err.value


@pytest.mark.parametrize("fmt", ["wav", "flac", "m4a", "mp3", "webm"])  # (this MP3 has an Info header)
def test_truncated_files_are_refused(speech, fmt):
    data = audio.encode(np.concatenate([speech, speech]), fmt)
    with pytest.raises(InvalidInput, match="truncated|could not"):
        decode(data[: len(data) // 2], limits=LIMITS)


def test_mp3s_longer_than_their_header_says_are_not_truncated(speech):
    """Only a shortfall against a stated length is truncation: an MP3 with a tag or padding after
    its frames, or two MP3s concatenated (FFmpeg then estimates the length from the bitrate) decode
    as they are."""
    data = audio.encode(speech, "mp3")
    seconds = decode(data, limits=LIMITS).info.seconds
    for extra in (bytes(20_000), data, bytes(len(data) // 6)):
        got = decode(data + extra, limits=LIMITS)
        assert got.info.seconds >= seconds - 0.1
        assert not got.info.length_exact


def test_truncated_header_is_refused(speech):
    with pytest.raises(InvalidInput):
        decode(audio.encode(speech, "flac")[:30], limits=LIMITS)


def test_size_limit(speech):
    with pytest.raises(LimitExceeded, match="limit is 1000 bytes"):
        decode(audio.encode(speech, "wav"), limits=Limits(1000, 60))


def test_declared_duration_over_limit_is_refused_before_decoding():
    data = audio.encode(audio.silence(200), "flac")
    with pytest.raises(LimitExceeded, match="audio is 200s; the limit is 120s"):
        decode(data, limits=LIMITS)


def _flac_without_length(seconds: float) -> bytes:
    """A FLAC of silence whose header does not say how long it is."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as out:
        st = out.add_stream("flac", rate=16000, layout="mono")
        zeros = np.zeros((1, 16000), dtype="<i2")
        for i in range(int(seconds)):
            f = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, i * 16000
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    b = bytearray(buf.getvalue())
    b[8 + 13] &= 0xF0  # STREAMINFO total samples := 0 (unknown)
    b[8 + 14 : 8 + 18] = b"\0\0\0\0"
    return bytes(b)


def test_decompression_bomb_stops_at_the_limit_with_bounded_memory():
    bomb = _flac_without_length(2 * 3600)  # two hours of audio in a few hundred KB
    assert len(bomb) < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LimitExceeded, match="decodes to more than 120s"):
        decode(bomb, limits=LIMITS)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # two hours of float32 would be 460 MB


def test_probe_checks_an_upload_without_decoding_all_of_it(tmp_path):
    """The upload check: length from the header, a cut-off file refused, garbage refused."""
    from services.gateway.audio import Limits, probe
    from services.shared.errors import InvalidInput, LimitExceeded
    from tests.support import audio as taudio

    samples = taudio.conversation(taudio.SENTENCES[:4], pause=1.0).samples
    limits = Limits(1 << 30, 3600.0)
    for fmt in ("wav", "flac", "mp3"):
        data = taudio.encode(samples, fmt)
        whole = tmp_path / f"whole.{fmt}"
        whole.write_bytes(data)
        info = probe(str(whole), limits=limits)
        assert abs(info.seconds - samples.shape[0] / 16000) < 0.2
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(InvalidInput) as err:
            probe(str(cut), limits=limits)
        assert err.value.reason == "TRUNCATED_AUDIO"
        with pytest.raises(LimitExceeded):
            probe(str(whole), limits=Limits(1 << 30, 5.0))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(InvalidInput):
        probe(str(garbage), limits=limits)


def test_16_bit_samples_go_back_and_forth_unchanged():
    """The gateway converts a job's audio to 16-bit for its spool and again for the transcriber: no
    sample may move on the way (scaling by 32767 and truncating took a step off each time)."""
    from services.shared.pcm import from_pcm16, to_pcm16

    every = np.arange(-32768, 32768, dtype="<i2")
    assert np.array_equal(np.frombuffer(to_pcm16(from_pcm16(every.tobytes())), dtype="<i2"), every)
    edges = np.frombuffer(to_pcm16(np.array([1.0, -1.0, 3.0, -3.0], dtype=np.float32)), dtype="<i2")
    assert edges.tolist() == [32767, -32768, 32767, -32768]
