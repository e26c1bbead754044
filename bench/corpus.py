"""Benchmark audio: English speech made with espeak-ng from known text, so WER has a reference.

    python -m bench.corpus [--quick] [--out bench/.cache/corpus]   # writes WAVs + references.json

Everything is built from `tests.support.audio` helpers (`speak`, `silence`, `encode`) and cached under
bench/.cache (the spoken sentences as .npy, the built clips as WAV): a second build is instant.

- corpus clips: several voices (en-us, en-us+m3, en-us+f2, en-gb), rates 140-170 wpm, pauses, a long
  silence inside one clip, and a noisy variant of a clean clip (white noise at 30 dB SNR);
- the long file for batch throughput (>= 180 s; 60 s in quick mode);
- a shorter file for concurrent jobs (~60 s; ~20 s in quick mode);
- a clip for live streaming (~60 s; ~25 s in quick mode);
- a 5 s clip for unary latency.
"""

from __future__ import annotations

import argparse
import json
import os
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("BENCH_CACHE", BENCH_DIR / ".cache"))
# tests.support.audio reads this when imported: keep the spoken sentences with the bench's cache.
os.environ.setdefault("STT_TEST_AUDIO_CACHE", str(CACHE_DIR / "audio"))

from tests.support import audio  # noqa: E402

SR = audio.SR

# Plain sentences on top of tests.support.audio.SENTENCES. Numbers are spelled out only where the
# WER normalisation (tests.support.text) maps digits back to words.
EXTRA_SENTENCES = [
    "The new bridge across the river will open to traffic next month.",
    "Could you send me the agenda for the meeting before lunch?",
    "A small bird landed on the windowsill and looked inside the kitchen.",
    "The hospital is looking for volunteers to help on weekends.",
    "Our flight was delayed by two hours because of heavy fog.",
    "She keeps her old letters in a wooden box under the bed.",
    "The engineers tested the engine for three days without a single failure.",
    "Fresh vegetables are cheaper at the market on Saturday mornings.",
    "He forgot his keys at the office and had to call a friend.",
    "The students read a short story and wrote a summary of it.",
    "Turn left at the second traffic light and park behind the bank.",
    "The price of the tickets includes a guided tour of the castle.",
    "Please check that all the windows are closed before you go to bed.",
    "The football match ended in a draw after extra time.",
    "My grandmother grows roses and makes jam from the berries in her garden.",
    "The company plans to hire several new workers this year.",
    "We watched the sun set over the hills from the top of the tower.",
    "The doctor told him to drink more water and sleep at least eight hours.",
    "A strong wind knocked down several trees along the highway last night.",
    "The teacher asked everyone to bring a notebook and a pencil on Monday.",
    "The shop around the corner repairs bicycles and sells spare parts.",
    "They painted the kitchen a pale shade of yellow last weekend.",
]
SENTENCES = list(audio.SENTENCES) + EXTRA_SENTENCES
VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-gb")
RATES = (140, 150, 160, 170)


@dataclass
class ClipSpec:
    name: str
    sentences: list[int]  # indices into SENTENCES
    voices: tuple[str, ...] = ("en-us",)
    rates: tuple[int, ...] = (150,)
    pause: float = 0.8
    lead: float = 0.5
    tail: float = 0.5
    gap_after: int | None = None  # insert a long silence after this many sentences
    gap: float = 0.0
    noise_snr_db: float | None = None  # mix in white noise at this speech-to-noise ratio


@dataclass
class Clip:
    name: str
    samples: np.ndarray  # float32 mono 16 kHz
    text: str
    spans: list[tuple[float, float, str]]  # (start s, end s, sentence)
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(self.samples.shape[0] / SR)

    @property
    def words(self) -> int:
        return len(self.text.split())

    def pcm16(self) -> bytes:
        return audio.encode(self.samples, "raw")

    def wav(self) -> bytes:
        return audio.encode(self.samples, "wav")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "seconds": round(self.seconds, 2), "words": self.words, **self.meta}


def build(spec: ClipSpec) -> Clip:
    parts = [audio.silence(spec.lead)]
    spans: list[tuple[float, float, str]] = []
    t = spec.lead
    for i, idx in enumerate(spec.sentences):
        text = SENTENCES[idx % len(SENTENCES)]
        voice = spec.voices[i % len(spec.voices)]
        rate = spec.rates[i % len(spec.rates)]
        said = audio.speak(text, voice=voice, speed=rate)
        spans.append((round(t, 3), round(t + said.shape[0] / SR, 3), text))
        pause = spec.pause if i + 1 < len(spec.sentences) else spec.tail
        if spec.gap_after is not None and i + 1 == spec.gap_after:
            pause = spec.gap
        parts += [said, audio.silence(pause)]
        t += said.shape[0] / SR + pause
    samples = np.concatenate(parts).astype(np.float32)
    meta: dict[str, object] = {
        "voices": list(dict.fromkeys(spec.voices[i % len(spec.voices)] for i in range(len(spec.sentences)))),
        "rates": list(dict.fromkeys(spec.rates[i % len(spec.rates)] for i in range(len(spec.sentences)))),
        "pause": spec.pause,
    }
    if spec.gap:
        meta["silence_gap"] = spec.gap
    if spec.noise_snr_db is not None:
        samples = add_noise(samples, spec.noise_snr_db, seed=len(spec.name))
        meta["noise_snr_db"] = spec.noise_snr_db
    return Clip(spec.name, samples, " ".join(s for _, _, s in spans), spans, meta)


def add_noise(samples: np.ndarray, snr_db: float, *, seed: int = 0) -> np.ndarray:
    """White noise at `snr_db` below the RMS of the speech (silence excluded)."""
    speech = samples[np.abs(samples) > 1e-3]
    rms = float(np.sqrt(np.mean(np.square(speech)))) if speech.size else 0.05
    sigma = rms / (10 ** (snr_db / 20))
    noise = np.asarray(np.random.default_rng(seed).normal(0.0, sigma, samples.shape[0]), dtype=np.float32)
    return np.clip(samples + noise, -1.0, 1.0).astype(np.float32)


def corpus_specs(quick: bool) -> list[ClipSpec]:
    n = 3 if quick else 6

    def take(start: int) -> list[int]:
        return list(range(start, start + n))

    return [
        ClipSpec("en-us-150", take(0), ("en-us",), (150,), pause=0.8),
        ClipSpec("en-us+m3-140", take(6), ("en-us+m3",), (140,), pause=1.0),
        ClipSpec("en-us+f2-165", take(12), ("en-us+f2",), (165,), pause=0.6),
        ClipSpec("en-gb-155", take(18), ("en-gb",), (155,), pause=0.8),
        ClipSpec(
            "dialogue-170-gap",
            take(24),
            ("en-us", "en-gb", "en-us+f2"),
            (170, 160),
            pause=0.5,
            gap_after=n // 2,
            gap=4.0,
        ),
        ClipSpec("en-us-150+noise30dB", take(0), ("en-us",), (150,), pause=0.8, noise_snr_db=30.0),
    ]


def _long_spec(name: str, min_seconds: float, first: int = 0) -> ClipSpec:
    """Sentences (cycling through voices and rates) until the clip is at least min_seconds long."""
    per = 4.5  # rough seconds per sentence with its pause; the loop below makes sure
    count = max(2, int(min_seconds / per))
    while True:
        spec = ClipSpec(
            name,
            [first + i for i in range(count)],
            VOICES,
            RATES,
            pause=0.9,
            gap_after=count // 2,
            gap=3.0,
        )
        clip = build(spec)
        if clip.seconds >= min_seconds:
            return spec
        count += max(1, int((min_seconds - clip.seconds) / per) + 1)


def real_stream(i: int, min_seconds: float) -> Clip:
    """Real recordings (tests/data/speech: several speakers, telephone-band 8 kHz, noisy, meeting)
    one after another with 0.8 s between them until at least `min_seconds`; stream i starts at a
    different recording, so concurrent streams say different things at any moment."""
    from tests.support.speech import load_16k, real_clips

    clips = real_clips()
    order = [clips[(3 * i + k) % len(clips)] for k in range(len(clips))]
    lead, pause = 0.5, 0.8
    parts = [audio.silence(lead)]
    spans: list[tuple[float, float, str]] = []
    t = lead
    k = 0
    while t < min_seconds or not spans:
        rec = order[k % len(order)]
        k += 1
        samples = load_16k(rec)
        spans.append((round(t, 3), round(t + samples.shape[0] / SR, 3), rec.text))
        parts += [samples, audio.silence(pause)]
        t += samples.shape[0] / SR + pause
    names = [order[j % len(order)].name for j in range(k)]
    return Clip(
        f"real-stream-{i}",
        np.concatenate(parts).astype(np.float32),
        " ".join(s for _, _, s in spans),
        spans,
        {"real_speech": names},
    )


@dataclass
class Corpus:
    quick: bool
    clips: list[Clip]
    long: Clip  # batch throughput, memory
    medium: Clip  # concurrent jobs
    stream: Clip  # live streaming
    short: Clip  # unary latency (5 s)
    _variants: dict[int, Clip] = field(default_factory=dict)

    def stream_variant(self, i: int) -> Clip:
        """Stream clip i: 0 is `stream`; the others start at other recordings, so concurrent streams
        say different things (as real ones do) and carry different prompts."""
        if i == 0:
            return self.stream
        if i not in self._variants:
            self._variants[i] = real_stream(i, 25.0 if self.quick else 60.0)
        return self._variants[i]

    def describe(self) -> dict[str, object]:
        return {
            "clips": [c.describe() for c in self.clips],
            "corpus_seconds": round(sum(c.seconds for c in self.clips), 1),
            "long": self.long.describe(),
            "medium": self.medium.describe(),
            "stream": self.stream.describe(),
            "short": self.short.describe(),
            "sentences": len(SENTENCES),
        }


def short_clip(seconds: float = 5.0) -> Clip:
    """One sentence padded with silence to exactly `seconds` (the longest sentence that fits)."""
    best: tuple[int, np.ndarray] | None = None
    for i, text in enumerate(SENTENCES):
        said = audio.speak(text, voice="en-us", speed=160)
        if said.shape[0] / SR <= seconds - 0.5 and (best is None or said.shape[0] > best[1].shape[0]):
            best = (i, said)
    if best is None:  # every sentence is too long: cut the first one
        best = (0, audio.speak(SENTENCES[0], voice="en-us", speed=170)[: int((seconds - 0.5) * SR)])
    i, said = best
    lead = 0.25
    samples = np.concatenate([audio.silence(lead), said])
    samples = np.concatenate([samples, audio.silence(seconds - samples.shape[0] / SR)])[: int(seconds * SR)]
    span = (lead, round(lead + said.shape[0] / SR, 3), SENTENCES[i])
    return Clip(
        f"short-{seconds:g}s", samples.astype(np.float32), SENTENCES[i], [span], {"voices": ["en-us"]}
    )


def build_corpus(quick: bool) -> Corpus:
    clips = [build(s) for s in corpus_specs(quick)]
    long = build(_long_spec("long", 60.0 if quick else 185.0))
    medium = build(_long_spec("medium", 20.0 if quick else 60.0, first=5))
    stream = real_stream(0, 25.0 if quick else 60.0)  # live streams: real speech
    return Corpus(quick, clips, long, medium, stream, short_clip(5.0))


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = audio.encode(samples, "raw")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm)


def export(corpus: Corpus, out: Path) -> Path:
    """WAV files plus references.json (text, sentence spans) for listening and for other tools."""
    out.mkdir(parents=True, exist_ok=True)
    refs = {}
    for clip in [*corpus.clips, corpus.long, corpus.medium, corpus.stream, corpus.short]:
        path = out / f"{clip.name}.wav"
        write_wav(path, clip.samples)
        refs[clip.name] = {"file": path.name, "text": clip.text, "spans": clip.spans, **clip.describe()}
    (out / "references.json").write_text(json.dumps(refs, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the smaller quick-mode corpus")
    p.add_argument(
        "--out", type=Path, default=CACHE_DIR / "corpus", help="directory for WAVs + references.json"
    )
    args = p.parse_args(argv)
    corpus = build_corpus(args.quick)
    out = export(corpus, args.out / ("quick" if args.quick else "full"))
    print(json.dumps(corpus.describe(), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
