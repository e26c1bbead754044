"""A live recognition session: audio in as it arrives, interim and final results out. No grpc here.

Policy (LocalAgreement-2, as in whisper_streaming, plus VAD endpointing):
- the session keeps a window of recent audio, from the end of the last finalised text to now, and
  re-transcribes it whenever at least `step` seconds of new audio have arrived (immediately after the
  previous call returns, so a busy transcriber pool just means longer steps, not a growing queue);
- words that `agreement` consecutive hypotheses agree on (same words, in order, after what is already
  final), and that are followed by at least `hold` seconds of audio, become final at once, as do words
  two hypotheses agree on once `settle` seconds of audio follow them; the rest of the newest hypothesis
  is sent as an interim result (whisper_streaming's LocalAgreement-2 is agreement=2, hold=0; in our
  measurements 3 and 0.2 s cut word errors by a third for ~0.2 s, and settle=1.2 s trims the p95);
  `agreement_for` may change the agreement per hypothesis (the gateway asks for one hypothesis
  under heavy load, when every stream's hypotheses come late);
- Silero VAD follows the audio: after `endpoint_silence` of silence following speech, everything up to
  the pause is transcribed one last time and made final (speech ended), and the window restarts there;
- the window never grows past `max_window`: the agreed words are finalised and the window trimmed;
- with `finals="utterance_end"` nothing is agreed: the hypotheses are interims only and every word is
  made final by its utterance's final pass (or, at `max_window` with nothing final, the first half
  of the newest hypothesis), which decodes the whole utterance with left context: later finals,
  fewer word errors (a word decided on a partial window and 0.2 s of audio after it is wrong more
  often);
- the text already finalised before the window is passed to the model as its prompt;
- hypotheses are greedy (`interim_beam`) and hear only their window, or what `hypothesis` says:
  the gateway widens the beam while it has few streams and gives them `hypothesis_context` seconds
  of the audio before the window, its final words as the model's prefix (as `final_prefix` does for
  final passes), so an utterance's first words and the words after a commit are not decided at the
  edge of the audio; the final of an utterance (at a pause, at the end) uses
  the request's beam and also hears `final_context` seconds of audio before the window (left
  context: an utterance decoded alone loses words at its start; with `final_prefix` the pass starts
  just before the first final word there, with the final words from there on as the model's prefix,
  so it goes on after them, and the encoder's full context, as for a file's window; final words are
  dropped from what it returns),
  or what `final_pass` says (the gateway makes it cheaper while the transcribers are loaded);
  a final pass that would decode what the last hypothesis did (same window start, prompt and beam,
  no left context, all of the speech heard: the same audio up to the pause) takes that hypothesis's
  words before the pause instead of a model call; a final pass with left context that gives nothing
  of the window's own is made once more without it;
  `trim` restarts the window after final words too ("commit": shortest windows,
  cheapest ticks, "sentence", "none");
- VAD stops at the first endpoint of a block of audio, so a pause followed by more speech in the
  same block (a client ahead of the session) still ends its utterance;
- a hypothesis is cut where the model wrote on past the audio (words squeezed into one instant) and
  where it loops, and never starts with words already final;
- audio in which VAD finds no speech is never sent to the model, so silence yields no words;
- until the window holds `commit_window` seconds, agreement makes final only words of at least
  `commit_probability` (the rest wait for longer windows or the utterance's final pass);
- no hypothesis counts towards agreement before `min_window` seconds of window, but the first interim
  of an utterance comes from `preview_window` seconds holding `preview_speech` seconds of speech (a
  preview: shown, never made final), tried every `preview_step` of new audio until it has words.
All times are seconds from the start of the stream.

Utterances: every result carries the index of the utterance (speech between pauses) it belongs to;
the last final of an utterance is marked `utterance_end` (an empty final when all of its words were
already final), then the index moves on.

Resumption: everything before the window start is final (or silence), and so is everything up to
the end of the last final word, so (an offset just before that end, the end itself, the recent
final text, the utterance index) is all a new session needs to carry on where this one stopped:
`resume_state()` gives it, and a session built with `resume=` starts there with the final text as
its prompt and, exactly as it does within a session, drops words that are already final (by time
and by the final text). No session state is kept anywhere else.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from services.shared.domain import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    DecodeOptions,
    WindowResult,
    Word,
    WorkClass,
    last_words,
)
from services.shared.errors import InvalidInput, LimitExceeded

log = logging.getLogger("gateway.streaming")

TranscribeFn = Callable[[np.ndarray, DecodeOptions, WorkClass], Awaitable[WindowResult]]
VAD_FRAME = 512  # Silero's frame: 32 ms at 16 kHz
RECENT_WORDS = 40  # final words a new hypothesis is checked against for repeats
MIN_TAIL_SECONDS = 0.15  # speech after the last final word worth another final pass (a short word)
PREFIX_LEAD = 0.1  # a final pass with left context starts this long before the first final word in it
# A prefix is forced decoder input, and counts against the decoder's 224 tokens: at most this many
# UTF-8 bytes of it (English: ~90 tokens, 15-20 s of speech; other scripts take up to a token a
# byte: Tamil ~0.9, Russian ~0.5), so that the utterance after it always has room.
PREFIX_BYTES = 400
PREFIX_BYTES_NON_ASCII = 100
# Languages faster-whisper splits into words at characters (no spaces between words).
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
RESUME_LEFT = 2.0  # after a pause, a resumed part starts at most this long before the window
RESUME_MARGIN = 1.0  # a resumed stream restarts this long before the end of the last final word (left
# context for the words after the seam: with 0.25 s the first words after it were often garbled)


@dataclass(frozen=True)
class StreamPolicy:
    step: float = 0.3  # seconds of new audio before the next hypothesis
    max_window: float = 15.0  # longest audio window sent to the model
    endpoint_silence: float = 0.5  # silence after speech that ends an utterance
    vad_on: float = 0.5  # speech probability that starts speech
    vad_off: float = 0.35  # below this, silence
    speech_pad: float = 0.2  # audio kept around speech
    prompt_chars: int = 200
    hold: float = 0.2  # a word is only agreed once this much audio follows it (right context)
    catch_up: float = 2.0  # seconds per hypothesis when audio arrives faster than real time
    agreement: int = 2  # consecutive hypotheses that must agree on a word (LocalAgreement-n)
    settle: float = 1.2  # or: two agreeing hypotheses and this much audio after the word
    max_buffer: float = 60.0  # audio received but not yet transcribed; beyond it: RESOURCE_EXHAUSTED
    interim_beam: int = 1  # beam for hypotheses (greedy: cheap, and they are re-made every step)
    final_beam: int = 0  # beam where an utterance's final is decided (0: the request's beam)
    # Where the window restarts after words are committed: "commit" (after the last final word:
    # the window holds only audio not yet final; shortest and cheapest), "sentence" (after a
    # committed sentence end), "none" (only at pauses and at max_window).
    trim: str = "none"
    trim_overlap: float = 1.0  # with trim="commit": audio of final words kept as left context
    tail_passes: int = 0  # extra passes when a final stops >= 1 s before the speech does
    min_window: float = 1.0  # no hypothesis of less audio (sub-second snippets make Whisper guess)
    # Until the window holds `commit_window` seconds (an utterance's first second or two), agreement
    # makes final only words the model gave at least `commit_probability` (greedy hypotheses of a
    # short window agree on guesses: "S not" for "ask not", three times over).
    commit_window: float = 0.0
    commit_probability: float = 0.0
    preview_window: float = 0.5  # but the first interim of an utterance may come from this much
    preview_speech: float = 0.3  # once VAD has heard this much speech in it
    preview_step: float = 0.1  # new audio before the next try while an utterance has no interim yet
    final_context: float = 0.0  # seconds of audio before the window heard by an utterance's final
    # With final_context: the final words said in it are the start of the final pass's text (a
    # decoder prefix; the pass starts just before the first of them), instead of the context being
    # decoded again, and the pass has the encoder's full context (also with no final words in the
    # context: a short utterance alone, at a live window's shorter context, is often said twice).
    final_prefix: bool = False
    # Seconds of audio before a live hypothesis's window that it hears as well, its final words given
    # as a decoder prefix (as final_prefix does for final passes; without full context): the first
    # words of an utterance and words after a commit are decided with the speech before them heard,
    # not at the edge of the audio. 0: the window alone.
    hypothesis_context: float = 0.0
    # When words become final: "agreement" (as soon as hypotheses agree on them, within the
    # utterance: lowest latency) or "utterance_end" (only by the utterance's final pass, at a pause,
    # at the end of the audio or when the window reaches max_window: later, fewer word errors).
    finals: str = "agreement"


@dataclass(frozen=True)
class _Pass:
    """A hypothesis: its window [start, end) in samples, beam, prompt, and its words not made final."""

    start: int
    end: int
    beam: int
    prompt: str | None
    words: list[Word]


@dataclass(frozen=True)
class ResumeState:
    """Where a stream can be continued (the wire form is stt.v1.StreamResumePoint)."""

    offset: float = 0.0  # stream seconds: everything before is final; a resumed part starts here
    final_end: float = 0.0  # end of the last final word
    context: str = ""  # recent final text, space-separated words
    window_words: int = 0  # how many trailing context words lie after `offset` (not the prompt)
    utterance: int = 0  # index of the next result's utterance
    utterance_open: bool = False  # finals of `utterance` were sent, its end was not


class EventType(Enum):
    RESULT = 1
    SPEECH_BEGIN = 2
    SPEECH_END = 3
    END_OF_SINGLE_UTTERANCE = 4
    PROGRESS = 5  # nothing to say, but the resume point may have moved (silence)


@dataclass
class Event:
    type: EventType
    offset: float = 0.0  # stream seconds (speech events)
    words: list[Word] = field(default_factory=list)
    text: str = ""
    is_final: bool = False
    stability: float = 0.0
    start: float = 0.0
    end: float = 0.0
    language: str = ""
    utterance: int = 0
    utterance_end: bool = False


def _norm(word: str) -> str:
    return re.sub(r"[^\w']+", "", word.lower())


def collapse_repeats(words: list[Word], max_n: int = 8) -> list[Word]:
    """Cut a hypothesis where the model starts looping: a phrase of 2..max_n words said twice in a
    row, or one word three times, is kept once (a common Whisper hallucination on cut-off audio)."""
    norms = [_norm(w.word) for w in words]
    for i in range(len(words)):
        for n in range(1, max_n + 1):
            times = 3 if n == 1 else 2
            if i + times * n > len(words) or not any(norms[i : i + n]):
                continue
            if all(norms[i : i + n] == norms[i + k * n : i + (k + 1) * n] for k in range(1, times)):
                return words[: i + n]
    return words


def cut_squeezed(words: list[Word], run: int = 3, span: float = 0.1) -> list[Word]:
    """Cut a hypothesis where `run` words in a row are squeezed into less than `span` seconds: the
    model went on writing after the audio (often its earlier words again), and the aligner piles
    those words up at one instant."""
    for i in range(len(words) - run + 1):
        if words[i + run - 1].end - words[i].start < span:
            return words[:i]
    return words


def _alike(a: str, b: str) -> bool:
    """The same word, perhaps heard a little differently ("antecedents" / "antecedence"); short words
    only when equal ("is" / "this" are different words)."""
    return a == b or (min(len(a), len(b)) >= 4 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.6)


def after_final(words: list[Word], last: list[Word], final_end: float) -> list[Word]:
    """The words of a pass that are not the final words heard again: those that start after the
    final words' end (within 0.1 s), and a word that starts before it but goes on past it when it is
    new speech (`_new_at_seam`). Word times move between passes over the same audio (a boundary heard
    with more audio after it often comes out earlier: "the" 4.86-5.40 s, then "circumstances" from
    5.28 s), so a start-time cut alone drops new words for good. `last`: the last final words."""
    return [
        w
        for i, w in enumerate(words)
        if w.start >= final_end - 0.1
        or (w.end > final_end + 0.02 and _new_at_seam(words[i - 1] if i else None, w, last))
    ]


def _fits(prefix: str) -> bool:
    return len(prefix.encode()) <= (PREFIX_BYTES if prefix.isascii() else PREFIX_BYTES_NON_ASCII)


def after_text(words: list[Word], text: str) -> list[Word]:
    """The words after those that spell `text` (a decoder prefix: the model's text starts with it,
    whatever times the aligner gives those words)."""
    want, got = len(_norm(text.replace(" ", ""))), 0
    for i, w in enumerate(words):
        if got >= want:
            return words[i:]
        got += len(_norm(w.word))
    return []


def _new_at_seam(before: Word | None, word: Word, last: list[Word]) -> bool:
    """Whether `word`, which starts before the end of the final words and goes on past it, is new
    speech rather than the last final word heard again (perhaps as another word, "line" -> "lawn", in
    two words, "can not" for "cannot", or as its end, "ances"). By the pass's word before it: after
    the last final word (heard again), it is new; in that word's place (after the one before it), it
    is that word again. Then by its text: a piece of the last final word, or a word like one of the
    last final words, is heard again; punctuation alone is not new speech. The same text heard again
    is also dropped by drop_repeated_prefix."""
    text = _norm(word.word)
    if not text or not last:
        return bool(text)
    final = _norm(last[-1].word)
    if before is not None and (prev := _norm(before.word)):
        if _alike(prev, final):
            return True
        if len(last) > 1 and _alike(prev, _norm(last[-2].word)):
            return False
        if _alike(prev + text, final):
            return False  # "can" + "not" = "cannot"
    if final.endswith(text):
        return False  # its end heard again ("ances", "less")
    return not any(_alike(text, _norm(w.word)) for w in last)


def drop_repeated_prefix(words: list[Word], final: list[Word]) -> list[Word]:
    """Drop the start of a hypothesis that repeats text already final: the last final words again
    at the window's start (an overlap), or a run of 4+ words echoing the recent final text (Whisper
    sometimes repeats its prompt as if it were new speech)."""
    recent = [_norm(w.word) for w in final]
    hyp = [_norm(w.word) for w in words]
    for k in range(min(len(recent), len(hyp)), 0, -1):
        head = hyp[:k]
        if recent[-k:] == head:
            return words[k:]
        if k >= 4 and any(recent[i : i + k] == head for i in range(len(recent) - k + 1)):
            return words[k:]
    return words


def drop_repeated_block(words: list[Word], final: list[Word]) -> list[Word]:
    """The last line of defence against finalising text twice: if the final text followed by these
    words would end in a block of 4+ words said twice in a row, the words of the second copy go."""
    old = [_norm(w.word) for w in final]
    new = [_norm(w.word) for w in words]
    seq = old + new
    for size in range(len(seq) // 2, 3, -1):
        if seq[-size:] == seq[-2 * size : -size]:
            return words[: max(0, len(words) - size)]
    return words


def _ends_sentence(word: str) -> bool:
    return word.rstrip("\"')]}”").endswith((".", "?", "!"))


def _text(words: list[Word], sep: str = " ") -> str:
    return sep.join(w.word for w in words).strip()


class StreamingSession:
    def __init__(
        self,
        transcribe: TranscribeFn,
        options: DecodeOptions,
        policy: StreamPolicy,
        *,
        interim: bool = True,
        single_utterance: bool = False,
        vad_model: Callable[[np.ndarray], np.ndarray] | None = None,
        resume: ResumeState | None = None,
        hypothesis: Callable[[], tuple[int, float]] | None = None,
        final_pass: Callable[[], tuple[int, float]] | None = None,
        agreement_for: Callable[[], int] | None = None,
    ) -> None:
        self.transcribe = transcribe
        # (beam, left context seconds) of the next hypothesis (e.g. a wider beam and left context
        # while the transcribers are lightly loaded); default: policy.interim_beam and
        # policy.hypothesis_context. The context is at most policy.hypothesis_context.
        self._hypothesis_pass = hypothesis or (lambda: (policy.interim_beam, policy.hypothesis_context))
        # (beam, left context seconds) of the next utterance's final pass (e.g. cheaper while the
        # transcribers are loaded); default: policy.final_beam (or the request's beam), final_context.
        # The context is at most policy.final_context (the audio kept before the window).
        self._final_pass = final_pass or (
            lambda: (policy.final_beam or options.beam_size, policy.final_context)
        )
        # The agreement the next hypothesis's words need, at most policy.agreement (e.g. one hypothesis
        # suffices while the transcribers are heavily loaded); default: policy.agreement.
        self._agreement = agreement_for or (lambda: policy.agreement)
        # Live hypotheses are re-made every step: no temperature fallback (a bad one is replaced soon).
        self.options = replace(
            options, word_timestamps=True, dynamic_context=True, temperature_fallback=False
        )
        self.policy = policy
        self.interim = interim
        self.single_utterance = single_utterance
        self._vad = vad_model or _silero()
        # Audio: samples[i] is stream sample base + i.
        self._audio = np.zeros(0, dtype=np.float32)
        self._base = 0
        self._received = 0  # samples received
        self._covered = 0  # samples some hypothesis has seen
        self._ended = False
        self._error: BaseException | None = None
        self._arrived = asyncio.Event()
        # Window start (absolute samples) and what has been finalised.
        self._win = 0
        self._final_words: list[Word] = []
        self._final_end = 0.0
        self._history: list[list[Word]] = []  # the last hypotheses (after the final words)
        self._last_pass: _Pass | None = None  # the newest hypothesis, while its window is current
        self._last_interim = ""
        # VAD state.
        self._vad_pos = 0
        self._in_speech = False
        self._speech_end = 0  # absolute sample where speech last stopped
        self._speech_begin = 0  # absolute sample where speech last started
        self._last_speech = -1  # absolute sample of the last speech frame
        self._utterance_done = False
        self._endpoint_at: int | None = None  # where _run_vad stopped at an endpoint
        self.language = options.language or ""
        # Utterances: the index of the current one, and whether finals of it were sent.
        self._utterance = 0
        self._utterance_open = False
        self._resume_floor = 0.0  # the latest resume offset given (offsets never go back)
        self._timed_after = -1.0  # final words after this time have real times (see _resume)
        if resume is not None:
            self._resume(resume)

    def _resume(self, r: ResumeState) -> None:
        """Start where a previous part of the stream stopped (see ResumeState)."""
        start = round(r.offset * SAMPLE_RATE)
        self._resume_floor = r.offset
        self._base = self._received = self._covered = self._win = self._vad_pos = start
        self._speech_end = start
        self._final_end = r.final_end
        # The context as final words: the prompt part before the window, the rest after its start
        # (so they are not the prompt, but new hypotheses are checked against them for repeats).
        words = r.context.split()
        split = max(0, len(words) - max(0, r.window_words))
        inside = max(r.final_end, r.offset + 0.1)
        self._final_words = [Word(w, r.offset, r.offset, 1.0) for w in words[:split]] + [
            Word(w, inside, inside, 1.0) for w in words[split:]
        ]
        self._timed_after = inside  # those words stand in no audio of this part
        self._utterance = r.utterance
        self._utterance_open = r.utterance_open
        if r.utterance_open:
            # Speech was going on: no second SPEECH_BEGIN for it.
            self._in_speech = True
            self._last_speech = start

    def resume_state(self) -> ResumeState:
        """Where a new session would continue this stream if it broke now: just before the end of
        the last final word (RESUME_MARGIN before it, so a word whose time came out early is not
        cut; the part of it heard again is dropped as already final), or the window start when
        nothing in the window is final. As when the window reaches max_window, the new session's
        window starts after the final words rather than re-transcribing them: a fresh model pass
        over finalised speech places words differently and is the most likely source of repeats."""
        win = self._win / SAMPLE_RATE
        if self._final_end - RESUME_MARGIN > win:
            win = self._final_end - RESUME_MARGIN
        elif 0 < self._final_end < win:
            # The window starts after the final words (a pause ended the utterance): the words after
            # the seam are heard with the audio before them (the end of the last final word and the
            # pause), as the unbroken session's final pass hears them; decoded from their first
            # sample they lose their first word ("ask not" -> "S NOT"). At most RESUME_LEFT before
            # the window, so the offset moves on through a long silence.
            win = max(self._final_end - RESUME_MARGIN, win - RESUME_LEFT)
        # On the VAD frame grid of the stream (frames of VAD_FRAME samples from its first sample), so a
        # resumed session's VAD frames are the unbroken session's, and speech events it sends again
        # carry the same offsets (clients drop events not after the last they had).
        win = int(win * SAMPLE_RATE) // VAD_FRAME * VAD_FRAME / SAMPLE_RATE
        win = max(win, self._resume_floor)  # never behind an offset already given (the client
        self._resume_floor = win  # keeps only the audio after the latest one)
        before = [w for w in self._final_words if w.end <= win + 0.05]
        inside = self._final_words[len(before) :]
        prompt = last_words([w.word.strip() for w in before], self.policy.prompt_chars)
        return ResumeState(
            offset=round(win, 6),
            final_end=self._final_end,
            context=" ".join([*prompt, *(w.word.strip() for w in inside)]),
            window_words=len(inside),
            utterance=self._utterance,
            utterance_open=self._utterance_open,
        )

    # -- input ---------------------------------------------------------------------------------------

    @property
    def received_seconds(self) -> float:
        return self._received / SAMPLE_RATE

    @property
    def backlog_seconds(self) -> float:
        """Audio received but not yet covered by a hypothesis."""
        return (self._received - max(self._win, self._covered)) / SAMPLE_RATE

    def fail(self, exc: BaseException) -> None:
        """Stop the session with this error (raised from events())."""
        if self._error is None:
            self._error = exc
        self._arrived.set()

    async def progressed(self) -> None:
        """Wait until the next hypothesis or input event (for back-pressure)."""
        self._arrived.clear()
        await self._arrived.wait()

    def add_audio(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            return
        seconds = samples.shape[0] / SAMPLE_RATE
        if seconds > self.policy.max_buffer:
            # Never accepted, however long the client waits: not "retry later" but a request to fix.
            raise InvalidInput(
                f"one message holds {seconds:.1f}s of audio; a stream takes at most "
                f"{self.policy.max_buffer:.0f}s ahead of transcription: send the audio in smaller "
                "messages (e.g. 100 ms each), or send a recording with Recognize or as a job",
                reason="BAD_FIELD_VALUE",
                field="audio_content",
            )
        pending = self.backlog_seconds + seconds
        if pending > self.policy.max_buffer:
            raise LimitExceeded(
                f"more than {self.policy.max_buffer:.0f}s of audio is waiting to be transcribed: the "
                "stream is sent faster than the transcribers can keep up",
                reason="STREAM_BACKLOG",
            )
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        self._received += samples.shape[0]
        self._arrived.set()

    def end_audio(self) -> None:
        self._ended = True
        self._arrived.set()

    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._audio[max(start - self._base, 0) : max(end - self._base, 0)]

    def _drop_before(self, sample: int) -> None:
        """Forget audio before `sample` (keeps memory bounded)."""
        # VAD and the left context of finals and hypotheses
        keep = int(max(1.0, self.policy.final_context, self.policy.hypothesis_context) * SAMPLE_RATE)
        cut = min(sample, self._vad_pos) - self._base - keep
        if cut > 0:
            self._audio = self._audio[cut:]
            self._base += cut

    # -- processing ----------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Run the session until the audio ends (or the single utterance does)."""
        step = int(self.policy.step * SAMPLE_RATE)
        catch_up = int(max(self.policy.step, self.policy.catch_up) * SAMPLE_RATE)
        preview_step = int(min(self.policy.step, self.policy.preview_step) * SAMPLE_RATE)
        while True:
            need = preview_step if self._awaiting_preview() else step
            while not self._ended and self._error is None and self._received - self._covered < need:
                self._arrived.clear()
                await self._arrived.wait()
            if self._error is not None:
                raise self._error
            # A client sending faster than real time is served in steps of a few seconds.
            end = min(
                self._received,
                self._covered + catch_up,
                self._win + int(self.policy.max_window * SAMPLE_RATE),
            )
            self._arrived.set()  # wake a reader waiting for the backlog to shrink
            for ev in self._run_vad(end):
                yield ev
            if self._endpoint_at is not None:
                end = max(min(end, self._endpoint_at), self._win)  # VAD stopped at an endpoint
                self._endpoint_at = None
            pause = not self._in_speech and self._last_speech >= self._win and self._speech_end > self._win
            ended = self._ended and end >= self._received
            if self._utterance_done or ended or pause:
                async for ev in self._finalise(self._speech_end if pause and not ended else end):
                    yield ev
                if self.single_utterance and self._utterance_done:
                    yield Event(EventType.END_OF_SINGLE_UTTERANCE, offset=self._speech_end / SAMPLE_RATE)
                    return
                if ended:
                    return
                continue
            if self._last_speech < self._win:
                # No speech in the window: never send it to the model; keep a little context.
                self._win = max(self._win, end - int(self.policy.speech_pad * SAMPLE_RATE))
                self._covered = end
                self._history = []
                self._drop_before(self._win)
                yield Event(EventType.PROGRESS)
                continue
            if end - self._win < int(self.policy.min_window * SAMPLE_RATE):
                # Too little audio yet for a hypothesis that counts towards agreement; a first
                # interim of the utterance still comes early (a preview: shown, never made final).
                heard = end - max(self._win, self._speech_begin)
                if (
                    self._awaiting_preview()
                    and end - self._win >= int(self.policy.preview_window * SAMPLE_RATE)
                    and heard >= int(self.policy.preview_speech * SAMPLE_RATE)
                ):
                    async for ev in self._preview(end):
                        yield ev
                self._covered = end
                continue
            async for ev in self._hypothesis(end):
                yield ev

    def _run_vad(self, end: int) -> list[Event]:
        out: list[Event] = []
        n = (end - self._vad_pos) // VAD_FRAME
        if n <= 0:
            return out
        block = self._slice(self._vad_pos, self._vad_pos + n * VAD_FRAME)
        probs = self._vad(block)
        silence_frames = int(self.policy.endpoint_silence * SAMPLE_RATE / VAD_FRAME)
        for i, p in enumerate(probs):
            pos = self._vad_pos + i * VAD_FRAME
            if p >= self.policy.vad_on or (self._in_speech and p >= self.policy.vad_off):
                if not self._in_speech:
                    self._in_speech = True
                    self._speech_begin = pos
                    out.append(Event(EventType.SPEECH_BEGIN, offset=round(pos / SAMPLE_RATE, 3)))
                self._last_speech = pos + VAD_FRAME
            elif self._in_speech and pos + VAD_FRAME - self._last_speech >= silence_frames * VAD_FRAME:
                self._in_speech = False
                self._speech_end = self._last_speech + int(self.policy.speech_pad * SAMPLE_RATE)
                out.append(Event(EventType.SPEECH_END, offset=round(self._last_speech / SAMPLE_RATE, 3)))
                if self.single_utterance:
                    self._utterance_done = True
                # Stop at the endpoint: the utterance is finalised before the audio after it is
                # looked at (a block holding the pause and the next onset must not hide the pause).
                self._vad_pos = pos + VAD_FRAME
                self._endpoint_at = self._vad_pos
                return out
        self._vad_pos += n * VAD_FRAME
        return out

    def _prompt(self, start: int) -> str | None:
        text = _text([w for w in self._final_words if w.end <= start / SAMPLE_RATE + 0.05])
        return text[-self.policy.prompt_chars :] or self.options.initial_prompt

    def _said_since(self, sample: int) -> list[Word]:
        """The final words from `sample` on, where their times are real (not a resumed context's)."""
        t = sample / SAMPLE_RATE
        return [w for w in self._final_words if w.start >= t and w.start > self._timed_after]

    def _prefix_text(self, words: list[Word]) -> str:
        return _text(words, "" if self.language in UNSPACED_LANGUAGES else " ")

    async def _words(
        self,
        start: int,
        end: int,
        beam: int,
        *,
        context: float = 0.0,
        prefix: bool = False,
        full: bool = False,
    ) -> list[Word]:
        """Transcribe [start, end) with `beam` and return the words after what is already final.
        `context`: seconds of audio before `start` heard too, decoded again, or with `prefix` the pass
        starts just before the first final word in those seconds, the final words from there on are
        the start of the model's text (a decoder prefix: it goes on after them instead of
        transcribing them again, which it sometimes stopped doing halfway, or did differently; the
        newest words, as many as PREFIX_BYTES allows). `full`: the window is decoded with the
        encoder's full 30 s context, as a file's window is (live windows have a shorter, cheaper
        one). The final words heard again are dropped below (the prefix by its text; the rest by
        time and by text)."""
        opts = replace(self.options, beam_size=beam)
        # Left context: only audio still kept, and no more than fits in the model's window.
        floor = max(self._base, 0, end - int(MAX_WINDOW_SECONDS * SAMPLE_RATE))
        heard_from = max(start - int(context * SAMPLE_RATE), floor)
        if context > 0 and not prefix:
            start = heard_from
        elif context > 0:
            said = self._said_since(heard_from)
            while said and not _fits(self._prefix_text(said)):
                said = said[1:]  # the oldest words go: the prefix must leave the decoder room
            if said:
                start = max(round((said[0].start - PREFIX_LEAD) * SAMPLE_RATE), floor)
                said = self._said_since(start)
                opts = replace(opts, prefix=self._prefix_text(said) or None)
        if full:
            opts = replace(opts, dynamic_context=False)
        audio = self._slice(start, end)
        opts = replace(opts, initial_prompt=self._prompt(start))
        result = await self.transcribe(audio, opts, WorkClass.LIVE)
        if result.language:
            self.language = result.language
        offset = start / SAMPLE_RATE
        words = [w.shifted(offset) for seg in result.segments for w in seg.words]
        if opts.prefix:
            words = after_text(words, opts.prefix)
        words = after_final(cut_squeezed(words), self._final_words[-2:], self._final_end)
        return drop_repeated_prefix(collapse_repeats(words), self._final_words[-RECENT_WORDS:])

    def _agreed(self, words: list[Word], end: float) -> int:
        """How many leading words are settled: the last `agreement - 1` hypotheses also had them and
        `hold` seconds of audio follow them, or the previous hypothesis had them and `settle` seconds
        follow (so a word is not held back long when early hypotheses were unstable). 0 while
        finals wait for the utterance's end (policy.finals "utterance_end")."""
        if self.policy.finals == "utterance_end":
            return 0

        def run(others: list[list[Word]], horizon: float) -> int:
            n = 0
            while (
                n < len(words)
                and words[n].end <= horizon
                and all(n < len(h) and _norm(h[n].word) == _norm(words[n].word) for h in others)
            ):
                n += 1
            return n

        need = min(self._agreement(), self.policy.agreement) - 1
        if need <= 0:
            return run([], end - self.policy.hold)
        strict = run(self._history[-need:], end - self.policy.hold) if len(self._history) >= need else 0
        settled = run(self._history[-1:], end - self.policy.settle) if self._history else 0
        return max(strict, settled)

    def _awaiting_preview(self) -> bool:
        """Speech is going on in a window too short for hypotheses and nothing of it was shown yet."""
        return self.interim and self._in_speech and not self._history and not self._last_interim

    def _beam(self, beam: int) -> int:
        return beam or self.options.beam_size

    async def _preview(self, end: int) -> AsyncIterator[Event]:
        words = await self._words(self._win, end, self._beam(self._hypothesis_pass()[0]))
        if words:
            yield self._interim(words, end)

    def _interim(self, tail: list[Word], end: int) -> Event:
        self._last_interim = _text(tail)
        return Event(
            EventType.RESULT,
            words=tail,
            text=self._last_interim,
            is_final=False,
            stability=0.1,
            start=tail[0].start,
            end=round(end / SAMPLE_RATE, 3),
            language=self.language,
            utterance=self._utterance,
        )

    async def _hypothesis(self, end: int) -> AsyncIterator[Event]:
        win, prompt = self._win, self._prompt(self._win)
        beam, context = self._hypothesis_pass()
        beam, context = self._beam(beam), min(context, self.policy.hypothesis_context)
        words = await self._words(win, end, beam, context=context, prefix=True)
        self._covered = end
        agreed = self._agreed(words, end / SAMPLE_RATE)
        if end - self._win < int(self.policy.commit_window * SAMPLE_RATE):
            # A short window (an utterance's first second or two): only confident words are agreed.
            n = 0
            while n < agreed and words[n].probability >= self.policy.commit_probability:
                n += 1
            agreed = n
        if agreed:
            ev = self._commit(words[:agreed])
            if ev:
                yield ev
        tail = words[agreed:]
        keep = max(self.policy.agreement - 2, 0)  # the largest agreement agreement_for asks for
        self._history = [h[agreed:] for h in self._history[len(self._history) - keep :]] if keep else []
        self._history.append(tail)
        trim = self.policy.trim
        if agreed and (trim == "commit" or (trim == "sentence" and _ends_sentence(words[agreed - 1].word))):
            # The window restarts after the final words (shorter windows cost less, and audio of
            # final words is not transcribed again); their text goes on as the prompt.
            overlap = self.policy.trim_overlap if trim == "commit" else 0.0
            cut = int(max(self._final_end - overlap, 0.0) * SAMPLE_RATE)
            if cut > self._win:
                self._win = cut
                self._drop_before(self._win)
        if (end - self._win) / SAMPLE_RATE >= self.policy.max_window:
            # The window is at its cap: restart it after the final words. Compared in whole samples:
            # a final end of 8.008 s is 128127.99999999999 samples, above a window start of 128127
            # that int() gives back unchanged, and the window would never move again.
            final_end = round(self._final_end * SAMPLE_RATE)
            new_win = final_end if final_end > self._win else None
            if new_win is None and tail:
                # Nothing agreed for a whole window: finalise the first half of the hypothesis.
                half = tail[: max(1, len(tail) // 2)]
                ev = self._commit(half)
                if ev:
                    yield ev
                tail = tail[len(half) :]
                self._history = [tail]
                new_win = int(self._final_end * SAMPLE_RATE)
            self._win = max(self._win, new_win or end - int(self.policy.speech_pad * SAMPLE_RATE))
            self._drop_before(self._win)
        # What the utterance's final pass may take as its own when it would decode the same audio the
        # same way (see _finalise).
        self._last_pass = _Pass(win, end, beam, prompt, tail) if self._win == win and not context else None
        if self.interim and tail and _text(tail) != self._last_interim:
            yield self._interim(tail, end)

    async def _finalise(self, until: int) -> AsyncIterator[Event]:
        """Transcribe the window up to `until` one last time and make all of it final. If the words
        stop well before the speech does (Whisper sometimes ends a long window early), the rest is
        transcribed again from the last final word, so no speech is dropped. The last final of the
        utterance carries utterance_end (an empty final if every word was already final)."""
        ev: Event | None = None
        start = self._win
        # The first pass also hears `final_context` of the audio before the window. With that left
        # context Whisper sometimes stops at the end of the speech it already knows from the prompt:
        # then one more pass, without context, takes the rest (as for a window that ended early).
        beam, context = self._final_pass()
        beam, context = self._beam(beam), min(context, self.policy.final_context)
        # With final_prefix, a final given left context (light load) has the full encoder context in
        # every pass (also one made again without the context).
        full = self.policy.final_prefix and context > 0
        # The last hypothesis may already be this pass: the same window and prompt, the same beam, no
        # left context, and all of the utterance's speech heard (it ended in the pause, or after the
        # last speech of a stream that ended). Then its words are the final, a model call sooner
        # (under load the final pass is a greedy one like the hypotheses, and every stream's next tick
        # waits for the finals in it: 8 real-time streams, final-word mean 1.28-1.39 -> 1.13-1.17 s).
        last, self._last_pass = self._last_pass, None
        speech_end = self._last_speech + int(self.policy.speech_pad * SAMPLE_RATE)
        reuse = (
            last is not None
            and context == 0
            and (last.start, last.beam, last.prompt) == (start, beam, self._prompt(start))
            and last.end >= min(until, speech_end)
        )
        for _ in range(1 + self.policy.tail_passes + (1 if context > 0 else 0)):
            if not (until > start and self._last_speech >= start):
                break
            if reuse and last is not None:
                words = [w for w in last.words if w.start < until / SAMPLE_RATE]
                reuse = False
            else:
                words = await self._words(
                    start, until, beam, context=context, prefix=self.policy.final_prefix, full=full
                )
            got = self._commit(words)
            if got is None and context == 0:
                break
            if got is not None:
                if ev is not None:
                    yield ev  # an earlier pass's words; the last final is held back for utterance_end
                ev = got
            speech = min(self._last_speech, until)
            if got is None and context > 0:
                # The pass with left context gave nothing of the window's own (it stopped at the pause
                # inside the context): the window once more without it, if speech after the last
                # final word is left ("planks" of "...on the smooth planks", 0.24 s, was lost so).
                context = 0.0
                if speech / SAMPLE_RATE - self._final_end >= MIN_TAIL_SECONDS:
                    continue
                break
            context = 0.0
            rest = max(int(self._final_end * SAMPLE_RATE), start)
            if (speech - rest) / SAMPLE_RATE < 1.0:
                break
            start = rest
        if self._utterance_open:
            # The utterance is over (a pause, the end of the audio, or the single utterance).
            if ev is None:
                ev = Event(
                    EventType.RESULT,
                    is_final=True,
                    stability=1.0,
                    start=self._final_end,
                    end=self._final_end,
                    language=self.language,
                    utterance=self._utterance,
                )
            ev.utterance_end = True
            self._utterance += 1
            self._utterance_open = False
        self._covered = max(self._covered, until)
        self._win = max(self._win, until)
        self._history = []
        self._last_interim = ""
        self._drop_before(self._win)
        if ev:  # after the window moved on, so the resume point is past this audio
            yield ev

    def _commit(self, words: list[Word]) -> Event | None:
        words = drop_repeated_block([w for w in words if w.word.strip()], self._final_words[-RECENT_WORDS:])
        if not words:
            return None
        # Final times never go backwards.
        fixed = []
        last = self._final_end
        for w in words:
            start = max(w.start, last)
            end = max(w.end, start)
            fixed.append(Word(w.word, round(start, 3), round(end, 3), w.probability))
            last = start
        self._final_words.extend(fixed)
        self._final_words = self._final_words[-200:]
        self._final_end = max(self._final_end, fixed[-1].end)
        self._last_interim = ""
        self._utterance_open = True
        return Event(
            EventType.RESULT,
            words=fixed,
            text=_text(fixed),
            is_final=True,
            stability=1.0,
            start=fixed[0].start,
            end=fixed[-1].end,
            language=self.language,
            utterance=self._utterance,
        )


def _silero() -> Callable[[np.ndarray], np.ndarray]:
    from faster_whisper.vad import get_vad_model

    model = get_vad_model()
    return lambda audio: model(audio)
