import json

import pytest

from services.shared import formats as server_formats
from stt import formats

SEGS = [
    {
        "start": 0.0,
        "end": 1.5,
        "text": " Hello there.",
        "words": [{"word": "Hello", "start": 0.0, "end": 0.5}],
    },
    {"start": 61.25, "end": 3725.004, "text": "Second line", "words": []},
    {"start": 3726.0, "end": 3727.0, "text": "  ", "words": []},
]


def test_text_joins_segments():
    assert formats.render(SEGS, "text") == "Hello there. Second line\n"


def test_srt_numbering_and_clock():
    out = formats.render(SEGS, "srt")
    assert out.startswith(
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:01:01,250 --> 01:02:05,004\n"
    )
    assert "3\n" not in out  # empty segments make no cue


def test_vtt_header_and_dot_separator():
    out = formats.render(SEGS, "vtt")
    assert out.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n")


def test_json_carries_words_and_metadata():
    doc = json.loads(formats.render(SEGS, "json", language="en", duration=3727.0))
    assert doc["text"] == "Hello there. Second line"
    assert doc["language"] == "en" and doc["duration"] == 3727.0
    assert doc["segments"][0]["words"][0]["word"] == "Hello"


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        formats.render(SEGS, "docx")


@pytest.mark.parametrize("fmt", ["text", "json", "srt", "vtt"])
def test_the_sdk_and_the_server_render_alike(fmt):
    # The SDK renders Recognize results, the server job transcripts: the same rules on both sides.
    kw = {"language": "en", "duration": 3727.0}
    assert formats.render(SEGS, fmt, **kw) == server_formats.render(SEGS, fmt, **kw)
