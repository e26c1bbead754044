"""Transcript renderings: text, JSON (segments with word timings), SRT, VTT.

Works on plain dicts ({"start", "end", "text", "words": [{"word", "start", "end", "probability"}]}).
Job transcripts are rendered by the server (GetTranscript) with the same rules; this copy renders
Recognize results on the client (`stt transcribe --format srt`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("text", "json", "srt", "vtt")


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def plain_text(segments: Sequence[dict[str, Any]]) -> str:
    return " ".join(str(s["text"]).strip() for s in segments if str(s["text"]).strip())


def render(
    segments: Sequence[dict[str, Any]],
    fmt: str = "text",
    *,
    language: str = "",
    duration: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    fmt = fmt.lower()
    if fmt == "text":
        return plain_text(segments) + "\n"
    if fmt == "json":
        doc: dict[str, Any] = {"text": plain_text(segments), "language": language}
        if duration is not None:
            doc["duration"] = round(duration, 3)
        if extra:
            doc.update(extra)
        doc["segments"] = list(segments)
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    cues = [s for s in segments if str(s["text"]).strip()]
    if fmt == "srt":
        return "".join(
            f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{str(s['text']).strip()}\n\n"
            for i, s in enumerate(cues, 1)
        )
    if fmt == "vtt":
        body = "".join(
            f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{str(s['text']).strip()}\n\n"
            for s in cues
        )
        return "WEBVTT\n\n" + body
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
