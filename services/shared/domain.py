"""Domain types shared by the services. Plain dataclasses: no grpc, no protobuf."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

SAMPLE_RATE = 16_000
MAX_WINDOW_SECONDS = 30.0
# ListJobs paging and request ids (the public contract documents these).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID_CHARS = 128


def fold_allowance(max_batch: int) -> int:
    """Windows of batch work a model call may take beyond `max_batch` when they are all the batch work
    left (so the last call of a job is not one or two windows alone: on 2 cores one call of 9
    windows costs ~0.5 s less than a call of 8 and a call of 1; the decoder's cost is per step, nearly
    the same for 1 or 10 windows). The gateway groups a job's windows to match."""
    return max_batch // 4


class WorkClass(IntEnum):
    """Who a transcription window is for. Higher values are served first."""

    BATCH = 0
    INTERACTIVE = 1
    LIVE = 2


@dataclass(slots=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0

    def shifted(self, offset: float) -> Word:
        return Word(self.word, round(self.start + offset, 3), round(self.end + offset, 3), self.probability)


@dataclass(slots=True)
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0

    def shifted(self, offset: float) -> Segment:
        return Segment(
            round(self.start + offset, 3),
            round(self.end + offset, 3),
            self.text,
            [w.shifted(offset) for w in self.words],
            self.avg_logprob,
            self.no_speech_prob,
            self.compression_ratio,
        )

    @property
    def confidence(self) -> float:
        if not self.words:
            return 0.0
        return sum(w.probability for w in self.words) / len(self.words)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "words": [
                {"word": w.word, "start": w.start, "end": w.end, "probability": round(w.probability, 4)}
                for w in self.words
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        return cls(
            start=float(d["start"]),
            end=float(d["end"]),
            text=str(d["text"]),
            words=[
                Word(w["word"], float(w["start"]), float(w["end"]), float(w.get("probability", 0.0)))
                for w in d.get("words", [])
            ],
        )


@dataclass(slots=True)
class DecodeOptions:
    language: str | None = None
    beam_size: int = 0  # 0: the transcriber's default
    initial_prompt: str | None = None
    word_timestamps: bool = True
    temperature: float = 0.0
    temperature_fallback: bool = True
    prefix: str | None = None
    dynamic_context: bool = False


@dataclass(slots=True)
class WindowResult:
    """What the transcriber returns for one window; times relative to the window start."""

    segments: list[Segment]
    language: str
    language_probability: float = 1.0
    duration: float = 0.0
    served_by: str = ""
    batch_size: int = 1
    model: str = ""
    # Seconds the model call that served this window took (shared by its whole batch).
    model_seconds: float = 0.0
    # Model calls the replica that served it runs side by side (its workers).
    model_workers: int = 1


def join_texts(texts: Iterable[str | None]) -> str:
    """The one way pieces of transcript are joined: stripped, empty ones skipped, one space between."""
    return " ".join(t.strip() for t in texts if t and t.strip())


def join_text(segments: Iterable[Segment]) -> str:
    return join_texts(s.text for s in segments)


def last_words(words: list[str], chars: int) -> list[str]:
    """The last of `words` whose text, joined with single spaces, fits in `chars` characters (a
    prompt made of recent text: whole words only)."""
    n, used = 0, -1
    for w in reversed(words):
        if used + 1 + len(w) > chars:
            break
        used += 1 + len(w)
        n += 1
    return words[len(words) - n :]
