"""faster-whisper behind a small, blocking, batched API. No grpc here; callers run it off the event loop.

Every window (at most 30 s) is decoded in one pass without timestamp tokens, the way faster-whisper's
BatchedInferencePipeline decodes its chunks, but with a prompt per window, so windows from different
callers (streams with their own previous text, jobs with their own vocabulary) share one encoder call
and one `generate` call. Words are then aligned to the audio (cross-attention, `align`) and segments
are cut at sentence ends and pauses from the word times. A window whose result fails the quality
checks (too repetitive, too improbable) is decoded again at rising temperatures, as
`WhisperModel.transcribe` does (the batched pipeline does not). The same code serves a batch of one, so
results do not depend on how calls happened to be grouped (up to floating-point differences of batched
matrix products).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.shared import memory
from services.shared.domain import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    DecodeOptions,
    Segment,
    WindowResult,
    Word,
    last_words,
)
from services.shared.errors import InvalidInput, Unavailable
from services.transcriber.config import TranscriberSettings, model_label, resolve_model

log = logging.getLogger("transcriber.engine")

FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
BEST_OF = 5
# Previous-text tokens given to live windows: a short prompt (the decoder's cost grows with it:
# measured 8 x 4 s greedy, generate 0.38 s with 10 prompt tokens, 0.80 s with 48).
LIVE_PROMPT_TOKENS = 16
# Live prompts are cut to a multiple of this many tokens: CTranslate2 batches only prompts of one
# length, so streams with different histories share a model call (at most 3 lengths: 0, 8, 16).
LIVE_PROMPT_BUCKET = 8
LIVE_TOKENS_PER_SECOND = 7
TOKENS_PER_SECOND = 12  # generous for English: fast speech is ~4-5 text tokens per second
# Other languages take more of Whisper's tokens per second of speech (measured with its tokenizer at
# brisk rates: Japanese ~12, Hindi ~23, Korean ~24, Thai ~36, Tamil ~50): their caps scale by this.
OTHER_LANGUAGE_TOKEN_FACTOR = 4.5
FULL_CONTEXT = 3000  # 30 s of 10 ms feature frames: what Whisper was trained on
CONTEXT_STEP = 500  # dynamic context is rounded up to 5 s
CONTEXT_MARGIN = 100  # and keeps at least 1 s of padding after the audio
# A call with at least this much audio first hands the memory earlier work freed back to the OS
# (services.shared.memory.trim, ~10 ms after a big call, ~0.1 ms when there is nothing to return):
# its own peak then does not stack on top of it.
TRIM_BEFORE_SAMPLES = 60 * SAMPLE_RATE
# Whisper sometimes ends a window's text early (end of text after a sentence, with speech still to
# come: seen on real recordings, a whole 15 s of a 30 s window dropped). A window whose words stop at
# least TAIL_MIN_SECONDS before its audio does, where VAD finds at least TAIL_MIN_SPEECH_SECONDS of
# speech after the last word, has that rest decoded again (prompted with the window's text). It also
# sometimes starts late (its first timestamp jumps past speech: 14 s of a 23 s window of real
# recordings skipped): a window whose first word comes TAIL_MIN_SECONDS or more into it, after at
# least TAIL_MIN_SPEECH_SECONDS of speech, has the audio before that word decoded again.
TAIL_MIN_SECONDS = 2.0
TAIL_MIN_SPEECH_SECONDS = 1.0
TAIL_PROMPT_CHARS = 200
TAIL_PASSES = 3  # at most this many more passes per window (each over less audio)


def _context_frames(samples: int) -> int:
    frames = samples // 160 + CONTEXT_MARGIN
    return min(FULL_CONTEXT, -(-frames // CONTEXT_STEP) * CONTEXT_STEP)


PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # noqa: RUF001  (faster-whisper's defaults)


def limit_blas_threads(threads: int) -> None:
    """Caps the BLAS libraries loaded in this process (NumPy's OpenBLAS) at `threads` threads, from
    now on (threadpoolctl sets it through the library's own API: it works after NumPy's import, when
    OPENBLAS_NUM_THREADS no longer would)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def _never() -> bool:
    return False


@dataclass(slots=True)
class WindowRequest:
    audio: np.ndarray  # float32 mono 16 kHz, at most 30 s
    options: DecodeOptions
    # True once nobody waits for the result (the call was cancelled): the window is not decoded
    # again at a fallback temperature. Read from the model's thread.
    abandoned: Callable[[], bool] = _never


@dataclass(slots=True)
class _Decoded:
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float


class Engine:
    """Loads the model once; transcribes batches of windows of at most 30 s."""

    def __init__(self, settings: TranscriberSettings) -> None:
        self.settings = settings
        self.model_name = model_label(settings.model)
        self.served_by = f"{socket.gethostname()}:{os.getpid()}"
        # One model per call that may run at once (settings.workers()), loaded when first needed: a
        # second replica as CTranslate2's inter_threads cost ~100 MiB of peak memory and ~10 % of
        # batch throughput even with one call at a time; loaded on demand, only calls side by side
        # (live streams on a CPU, see Batcher) ever bring it.
        self._path = ""  # the model to load (resolved once, by load())
        self._replicas: list[Any] = []
        self._free: list[int] = []  # replicas not in a call (the first is taken first)
        self._loading = 0
        self._max_replicas = settings.workers()
        self._pool = threading.Condition()
        self._local = threading.local()  # the replica of the call running in this thread
        self._loaded = threading.Event()
        self.load_seconds = 0.0
        self._tokenizers: dict[str | None, Any] = {}
        self._suppress: dict[str | None, Any] = {}
        # Live windows of different lengths share a call padded to the longest one's context on a
        # GPU, where a batch costs little more than one window. On a CPU a call's cost grows with
        # its windows (8 live windows of 2.5 s: 0.40 s, one: 0.07 s), so padding is paid in full
        # (6 windows of 2.5 s with 2 of 9 s in one call: 0.72 s; apart: ~0.55 s): there each
        # context size is its own group.
        self.pad_live_contexts = settings.on_gpu()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    def load(self) -> None:
        start = time.perf_counter()
        s = self.settings
        path = self._path = resolve_model(s.model)
        log.info("loading model %s from %s (%s, %s)", self.model_name, path, s.device, s.compute_type)
        if s.blas_threads > 0:
            limit_blas_threads(s.blas_threads)
        # On a GPU every replica at once (the operator asked for calls side by side there, and
        # loading a large model in the middle of a call would stall it); on a CPU on demand.
        n = self._max_replicas if s.on_gpu() else 1
        self._replicas = [self._new_replica() for _ in range(n)]
        self._free = list(range(n))
        if s.warmup:
            t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
            tone = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            self.transcribe(WindowRequest(tone, DecodeOptions(word_timestamps=True)))
        memory.trim()  # what loading and the warm-up freed
        self.load_seconds = time.perf_counter() - start
        self._loaded.set()
        log.info("model ready in %.2fs", self.load_seconds)

    def _new_replica(self) -> Any:
        from faster_whisper import WhisperModel

        s = self.settings
        return WhisperModel(
            self._path,
            device=s.device,
            device_index=s.device_index,
            compute_type=s.compute_type,
            cpu_threads=s.threads(),
            num_workers=1,  # calls side by side run on replicas of their own (see _checkout)
            download_root=s.model_cache_dir,
            local_files_only=s.model_local_only,
        )

    @property
    def _model(self) -> Any:
        """The model of the call running in this thread (outside a call: the first replica)."""
        return getattr(self._local, "model", None) or (self._replicas[0] if self._replicas else None)

    def _checkout(self) -> int:
        """A replica for a call: a free one, else a new one while fewer than workers() exist, else
        the next one freed."""
        with self._pool:
            while not self._free:
                if len(self._replicas) + self._loading < self._max_replicas:
                    self._loading += 1
                    break
                self._pool.wait()
            else:
                index = min(self._free)
                self._free.remove(index)
                return index
        try:
            replica = self._new_replica()
        except Exception:
            log.exception("could not load another model replica; calls wait for the loaded ones")
            with self._pool:
                self._loading -= 1
                self._max_replicas = len(self._replicas) + self._loading
            return self._checkout()
        with self._pool:
            self._loading -= 1
            self._replicas.append(replica)
            log.info("loaded model replica %d for calls side by side", len(self._replicas))
            return len(self._replicas) - 1

    def _checkin(self, index: int) -> None:
        with self._pool:
            self._free.append(index)
            self._pool.notify()

    @property
    def multilingual(self) -> bool:
        return bool(getattr(getattr(self._model, "model", None), "is_multilingual", False))

    def languages(self) -> list[str]:
        """ISO-639-1 codes the model can transcribe."""
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        return sorted(_LANGUAGE_CODES) if self.multilingual else ["en"]

    def validate(self, opts: DecodeOptions) -> None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        lang = opts.language
        if lang:
            if lang not in _LANGUAGE_CODES:
                raise InvalidInput(
                    f"unknown language code {lang!r}; use an ISO-639-1 code such as 'en' or 'de'",
                    reason="UNKNOWN_LANGUAGE",
                    field="config.language_code",
                )
            if self._model is not None and not self.multilingual and lang != "en":
                raise InvalidInput(
                    f"model {self.model_name} is English-only; language {lang!r} needs a multilingual model",
                    reason="LANGUAGE_NOT_SUPPORTED",
                    field="config.language_code",
                )
        if opts.beam_size < 0 or opts.beam_size > 20:
            raise InvalidInput(
                "beam_size must be between 0 and 20", reason="BAD_CONFIG_VALUE", field="config.beam_size"
            )
        if not 0.0 <= opts.temperature <= 1.0:
            raise InvalidInput(
                "temperature must be between 0 and 1", reason="BAD_CONFIG_VALUE", field="config.temperature"
            )

    def transcribe(self, req: WindowRequest) -> WindowResult:
        """One window. Blocking."""
        res = self.transcribe_batch([req])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def transcribe_batch(
        self, reqs: list[WindowRequest], *, tails: int = TAIL_PASSES
    ) -> list[WindowResult | BaseException]:
        """Several windows; compatible ones share model calls. A failing window fails alone.
        `tails`: how many times audio a window's text skipped (it stopped early or started late) is
        decoded again (see TAIL_MIN_SECONDS)."""
        if not self._replicas:
            raise RuntimeError("model not loaded")
        if getattr(self._local, "model", None) is not None:  # a call's own tail passes
            return self._transcribe_batch(reqs, tails)
        index = self._checkout()
        self._local.model = self._replicas[index]
        try:
            return self._transcribe_batch(reqs, tails)
        finally:
            self._local.model = None
            self._checkin(index)

    def _transcribe_batch(self, reqs: list[WindowRequest], tails: int) -> list[WindowResult | BaseException]:
        if sum(r.audio.shape[0] for r in reqs) >= TRIM_BEFORE_SAMPLES:
            memory.trim()  # what earlier work left in malloc's arenas: this call's peak starts lower
        out: list[WindowResult | BaseException | None] = [None] * len(reqs)
        prompts: list[list[int]] = [[] for _ in reqs]
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        # Probability of a detected language (1.0 when the language was given or the model has one).
        probabilities: dict[int, float] = {}
        for i, req in enumerate(reqs):
            try:
                if req.audio.shape[0] > int((MAX_WINDOW_SECONDS + 0.5) * SAMPLE_RATE):
                    raise InvalidInput(
                        f"window is {req.audio.shape[0] / SAMPLE_RATE:.1f}s; the maximum is 30s",
                        reason="AUDIO_TOO_LONG",
                    )
                o = req.options
                language = o.language or (None if self.multilingual else "en")
                if language is None:
                    language, probabilities[i] = self._detect_language(req.audio)
                # Dynamic-context (live) windows of different lengths share a call on a GPU: the group
                # is encoded with the longest window's context (the others are padded, as Whisper was
                # trained). On a CPU they group by their own context (see pad_live_contexts).
                frames = FULL_CONTEXT
                if o.dynamic_context:
                    frames = 0 if self.pad_live_contexts else _context_frames(req.audio.shape[0])
                prompt = self._prompt(self._tokenizer(language), o)
                # CTranslate2 batches prompts only when <|startoftranscript|> sits at the same position,
                # so windows group by prompt length too. Word timings are always aligned (they place
                # the segments); options only decide whether they are returned.
                key = (
                    language,
                    o.beam_size or self.settings.beam_size,
                    o.temperature,
                    o.temperature_fallback,
                    frames,
                    len(prompt),
                    o.dynamic_context,
                )
                groups[key].append(i)
                prompts[i] = prompt
            except Exception as exc:
                out[i] = exc
        for key, idxs in groups.items():
            results: list[WindowResult | BaseException]
            try:
                results = list(self._decode_group(key, [reqs[i] for i in idxs], [prompts[i] for i in idxs]))
            except Exception:
                if len(idxs) == 1:
                    log.exception("model call failed")
                    results = [
                        Unavailable(
                            "the model failed on this window; retry",
                            reason="MODEL_ERROR",
                            retry_after_seconds=1.0,
                        )
                    ]
                else:
                    # One bad window must not fail its companions: decode them one by one.
                    log.warning("batched model call failed; decoding its %d windows one by one", len(idxs))
                    results = [self.transcribe_batch([reqs[i]])[0] for i in idxs]
            for i, res in zip(idxs, results, strict=True):
                if isinstance(res, WindowResult):
                    res.batch_size = len(idxs)
                    res.language_probability = probabilities.get(i, 1.0)
                out[i] = res
        if tails > 0:
            self._decode_tails(reqs, out, tails)
        return [r if r is not None else RuntimeError("window was not decoded") for r in out]

    def _decode_tails(
        self, reqs: list[WindowRequest], out: list[WindowResult | BaseException | None], passes: int
    ) -> None:
        """Where a window's text stopped early (Whisper wrote end-of-text with speech still to come),
        decode the rest of its audio again, prompted with the window's text, and append its words;
        where it started late (its first words come after seconds of speech, which it skipped),
        decode the audio before them again and put those words first. Live (dynamic-context)
        windows are left alone: a stream re-decodes its window anyway."""
        todo: list[tuple[int, float, float]] = []  # (window, start, end) of audio to decode again
        for i, (req, res) in enumerate(zip(reqs, out, strict=True)):
            if not isinstance(res, WindowResult) or req.options.dynamic_context or req.abandoned():
                continue
            words = [w for seg in res.segments for w in seg.words] if req.options.word_timestamps else []
            first = words[0].start if words else (res.segments[0].start if res.segments else None)
            last = words[-1].end if words else (res.segments[-1].end if res.segments else 0.0)
            seconds = req.audio.shape[0] / SAMPLE_RATE
            # (Never a window given a prefix: its text starts with those words, wherever they landed.)
            late = first is not None and first >= TAIL_MIN_SECONDS and not req.options.prefix
            if late and self._speech_in(req.audio, 0.0, first or 0.0):
                todo.append((i, 0.0, first or 0.0))
            if seconds - last >= TAIL_MIN_SECONDS and self._speech_in(req.audio, last, seconds):
                todo.append((i, last, seconds))
        if not todo:
            return
        again = []
        for i, start, end in todo:
            res = out[i]
            assert isinstance(res, WindowResult)
            opts = reqs[i].options
            prompt = opts.initial_prompt
            if start > 0:  # the rest of the window: prompted with what it said so far
                text = " ".join(seg.text for seg in res.segments)
                prompt = " ".join(last_words(f"{prompt or ''} {text}".split(), TAIL_PROMPT_CHARS))
            again.append(
                WindowRequest(
                    reqs[i].audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)],
                    # In the window's language (when it was detected, not detected again on a part).
                    replace(
                        opts,
                        initial_prompt=prompt,
                        prefix=None,  # a part after the window's start (a window given one is never late)
                        language=opts.language or res.language or None,
                    ),
                    abandoned=reqs[i].abandoned,
                )
            )
        log.info("%d part(s) of windows skipped by the model: decoding them again", len(todo))
        for (i, start, _end), part in zip(todo, self.transcribe_batch(again, tails=passes - 1), strict=True):
            res = out[i]
            if not isinstance(part, WindowResult) or not isinstance(res, WindowResult):
                continue
            found = [seg.shifted(start) for seg in part.segments]
            res.segments = [*res.segments, *found] if start > 0 else [*found, *res.segments]

    def _speech_in(self, audio: np.ndarray, start: float, end: float) -> bool:
        """VAD finds at least TAIL_MIN_SPEECH_SECONDS of speech in `audio` between the two times."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        part = audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        spans = get_speech_timestamps(part, VadOptions(min_silence_duration_ms=300, speech_pad_ms=0))
        return sum(s["end"] - s["start"] for s in spans) / SAMPLE_RATE >= TAIL_MIN_SPEECH_SECONDS

    # -- internals ----------------------------------------------------------------------------------

    def _tokenizer(self, language: str | None) -> Any:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if language not in self._tokenizers:
            tok = Tokenizer(self._model.hf_tokenizer, self.multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tok
            self._suppress[language] = get_suppressed_tokens(tok, [-1])
        return self._tokenizers[language]

    def _detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        language, probability, _all = self._model.detect_language(audio)
        return str(language), float(probability)

    def _decode_group(
        self, key: tuple[Any, ...], reqs: list[WindowRequest], prompts: list[list[int]]
    ) -> list[WindowResult]:
        """Decode windows together in one pass each (text without timestamp tokens, as faster-whisper's
        BatchedInferencePipeline does), align the words to the audio, then cut segments at sentence
        ends and pauses using the word times."""
        from faster_whisper.audio import pad_or_trim

        language, beam_size, temperature, fallback, context, _prompt_length, _live = key
        if not context:
            context = max(_context_frames(req.audio.shape[0]) for req in reqs)
        m = self._model
        tok = self._tokenizer(language)
        fe = m.feature_extractor
        # The audio is padded with silence to the context before the log-mel (as Whisper was trained:
        # 30 s of zero samples), not the features with zeros: zero features are not silence to the
        # model, and after the speech it hallucinates into them (repeating the window's text).
        feats = [fe(req.audio, padding=max(context * 160 - req.audio.shape[0], 0) + 160) for req in reqs]
        sizes = [min(context, max(req.audio.shape[0] // 160, 1)) for req in reqs]
        batch = np.stack([pad_or_trim(f, context) for f in feats])
        batch = batch.astype(np.float32)
        encoder_output = self._encode(batch)
        temps = (
            (temperature, *[t for t in FALLBACK_TEMPERATURES if t > temperature])
            if fallback
            else (temperature,)
        )
        # A window cannot need more tokens than its audio holds words: cap them, so a model caught in a
        # repetition loop (noise, a tone, music: then every fallback temperature loops too) costs
        # what the audio's length allows, not the model's 448 tokens six times over (3 s of a square
        # wave took 13 s of model time uncapped, with full context; a 30 s window's cap is 384).
        factor = 1.0 if language in (None, "en") else OTHER_LANGUAGE_TOKEN_FACTOR
        cap = int(max(sizes) / 100 * TOKENS_PER_SECOND * factor) + 24
        if reqs[0].options.dynamic_context:
            # Live windows are re-made every step: a tight cap (fast speech is ~5 tokens a second)
            # keeps a hypothesis that loops at the window's edge cheap; the loop is cut off anyway.
            cap = int(max(sizes) * LIVE_TOKENS_PER_SECOND * factor / 100) + 8
        decoded = self._generate(
            encoder_output, prompts, tok, language, beam_size, temps, batch, cap, [r.abandoned for r in reqs]
        )
        raw: list[list[dict[str, Any]]] = []
        for d, n in zip(decoded, sizes, strict=True):
            silent = d.no_speech_prob > NO_SPEECH_THRESHOLD and d.avg_logprob < LOG_PROB_THRESHOLD
            tokens = [] if silent else [t for t in d.tokens if t < tok.eot]
            raw.append([{"seek": 0, "start": 0.0, "end": n * fe.time_per_frame, "tokens": tokens}])
        self._align(raw, tok, encoder_output, sizes)
        return [
            self._result(item[0].get("words") or [], d, req, language)
            for item, d, req in zip(raw, decoded, reqs, strict=True)
        ]

    def _encode(self, features: np.ndarray) -> Any:
        """The encoder over a batch, a few windows at a time on a CPU: its attention over 1500
        frames costs ~50 MiB per window while it runs, and batching the encoder gains little there
        (measured: a call of 7 windows peaks 190 MiB lower encoding 2 at a time, in the same time,
        and ~75 MiB lower again encoding 30 s windows one at a time, again in the same time); the
        decoder, where batching pays, still runs the whole batch."""
        step = self.settings.encode_batch(full_context=features.shape[-1] >= FULL_CONTEXT)
        if features.shape[0] <= step:
            return self._model.encode(features)
        import ctranslate2

        parts = [
            np.asarray(self._model.encode(features[i : i + step])) for i in range(0, features.shape[0], step)
        ]
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(parts)))

    def _align(
        self, raw: list[list[dict[str, Any]]], tok: Any, encoder_output: Any, sizes: list[int]
    ) -> None:
        """Word timings (into `raw`), one window at a time on a CPU: CTranslate2's `align` of a whole
        call of 7 windows at once was the call's memory peak (~150 MiB above `generate`; measured
        with the long bench file on 2 cores) and took as long. Aligned alone, a window's word times
        do not depend on the windows it shared the call with (faster-whisper carries the last
        speech time from one item of a batch to the next)."""
        step = self.settings.align_batch()
        n = len(raw)
        if n <= step or getattr(encoder_output, "device", "cpu") != "cpu":
            parts = [(0, n, encoder_output)]
        else:
            import ctranslate2

            enc = np.asarray(encoder_output)
            parts = [
                (lo, lo + step, ctranslate2.StorageView.from_array(np.ascontiguousarray(enc[lo : lo + step])))
                for lo in range(0, n, step)
            ]
        for lo, hi, enc_part in parts:
            self._model.add_word_timestamps(
                raw[lo:hi],
                tok,
                enc_part,
                sizes[lo:hi],
                PREPEND_PUNCTUATIONS,
                APPEND_PUNCTUATIONS,
                last_speech_timestamp=0.0,
            )

    def _prompt(self, tok: Any, opts: DecodeOptions) -> list[int]:
        previous = tok.encode(" " + opts.initial_prompt.strip()) if opts.initial_prompt else []
        if opts.dynamic_context:
            # Live windows carry the stream's recent text: a few fixed lengths let streams share calls.
            keep = min(len(previous), LIVE_PROMPT_TOKENS) // LIVE_PROMPT_BUCKET * LIVE_PROMPT_BUCKET
            previous = previous[len(previous) - keep :] if keep else []
        return list(
            self._model.get_prompt(tok, previous, without_timestamps=True, prefix=opts.prefix or None)
        )

    def _generate(
        self,
        encoder_output: Any,
        prompts: list[list[int]],
        tok: Any,
        language: str | None,
        beam_size: int,
        temperatures: tuple[float, ...],
        features: np.ndarray,
        max_new_tokens: int | None = None,
        abandoned: list[Callable[[], bool]] | None = None,
    ) -> list[_Decoded]:
        from faster_whisper.transcribe import get_compression_ratio

        m = self._model
        n = len(prompts)
        best: list[_Decoded | None] = [None] * n
        todo = list(range(n))
        enc = encoder_output
        for step, temp in enumerate(temperatures):
            if step > 0:
                # Only the windows that failed the checks are decoded again (re-encoded as a batch).
                enc = self._encode(features[todo])
            kwargs: dict[str, Any] = (
                {"beam_size": 1, "num_hypotheses": BEST_OF, "sampling_topk": 0, "sampling_temperature": temp}
                if temp > 0
                else {"beam_size": beam_size, "patience": 1.0}
            )
            results = m.model.generate(
                enc,
                [prompts[i] for i in todo],
                length_penalty=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                max_length=min(m.max_length, max(len(p) for p in prompts) + max_new_tokens)
                if max_new_tokens
                else m.max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=self._suppress[language],
                max_initial_timestamp_index=round(1.0 / m.time_precision),
                **kwargs,
            )
            again = []
            for i, res in zip(todo, results, strict=True):
                tokens = list(res.sequences_ids[0])
                avg_logprob = res.scores[0] * len(tokens) / (len(tokens) + 1)
                ratio = get_compression_ratio(tok.decode(tokens).strip())
                cand = _Decoded(tokens, float(avg_logprob), float(res.no_speech_prob), float(ratio))
                prev = best[i]
                if prev is None or _better(cand, prev):
                    best[i] = cand
                needs = ratio > COMPRESSION_RATIO_THRESHOLD or avg_logprob < LOG_PROB_THRESHOLD
                if needs and res.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOG_PROB_THRESHOLD:
                    needs = False  # silence: no point in sampling
                if needs:
                    again.append(i)
                else:
                    best[i] = cand
            # A window nobody waits for any more is not sampled again (noise or a tone loops at every
            # temperature: a Recognize whose VAD found no speech cancels its call).
            todo = [i for i in again if abandoned is None or not abandoned[i]()]
            if not todo:
                break
        return [b for b in best if b is not None]

    def _result(
        self, raw_words: list[dict[str, Any]], d: _Decoded, req: WindowRequest, language: str | None
    ) -> WindowResult:
        from faster_whisper.transcribe import get_compression_ratio

        words = [
            Word(
                w["word"].strip(),
                round(float(w["start"]), 3),
                round(float(w["end"]), 3),
                float(w["probability"]),
            )
            for w in raw_words
            if w["word"].strip()
        ]
        segments = []
        for group in split_sentences(words, req.audio):
            text = " ".join(w.word for w in group)
            segments.append(
                Segment(
                    start=group[0].start,
                    end=group[-1].end,
                    text=text,
                    words=group if req.options.word_timestamps else [],
                    avg_logprob=d.avg_logprob,
                    no_speech_prob=d.no_speech_prob,
                    compression_ratio=float(get_compression_ratio(text)),
                )
            )
        return WindowResult(
            segments=segments,
            language=language or "",
            language_probability=1.0,
            duration=round(req.audio.shape[0] / SAMPLE_RATE, 3),
            served_by=self.served_by,
        )


def silent_frames(audio: np.ndarray, frame: int = 320) -> np.ndarray:
    """Per 20 ms frame: True where the audio is much quieter than its speech (pauses)."""
    n = audio.shape[0] // frame
    if n == 0:
        return np.zeros(0, dtype=bool)
    rms = np.sqrt(np.square(audio[: n * frame].reshape(n, frame)).mean(axis=1))
    loud = rms[rms > 1e-4]
    level = float(np.percentile(loud, 90)) if loud.size else 0.0
    return np.asarray(rms < max(0.05 * level, 1e-4))


def split_sentences(
    words: list[Word],
    audio: np.ndarray | None = None,
    *,
    min_pause: float = 0.3,
    max_seconds: float = 12.0,
) -> list[list[Word]]:
    """Group words into segments: a segment ends after a sentence mark, at a pause of at least
    min_pause between two words (silence in the audio; word times alone absorb pauses), or (at a
    comma, or anywhere past 1.5 x max) once it is longer than max_seconds."""
    silent = silent_frames(audio) if audio is not None else np.zeros(0, dtype=bool)
    need = int(min_pause / 0.02)

    def pause_between(a: Word, b: Word) -> bool:
        if b.start - a.end >= min_pause:
            return True
        # Between the words' middles: an aligned word often absorbs the pause next to it.
        lo, hi = int((a.start + a.end) / 0.04), int((b.start + b.end) / 0.04) + 1
        run = 0
        for quiet in silent[lo:hi]:
            run = run + 1 if quiet else 0
            if run >= need:
                return True
        return False

    out: list[list[Word]] = []
    current: list[Word] = []
    for i, w in enumerate(words):
        current.append(w)
        nxt = words[i + 1] if i + 1 < len(words) else None
        length = w.end - current[0].start
        end_mark = w.word.rstrip("\"')]}”").endswith((".", "?", "!", "。", "？", "！"))  # noqa: RUF001
        if (
            nxt is None
            or end_mark
            or pause_between(w, nxt)
            or (length > max_seconds and w.word.endswith((",", ";", ":")))
            or length > 1.5 * max_seconds
        ):
            out.append(current)
            current = []
    return out


def _better(cand: _Decoded, prev: _Decoded) -> bool:
    """Among fallback attempts keep one under the compression threshold with the best log prob."""
    cand_ok = cand.compression_ratio <= COMPRESSION_RATIO_THRESHOLD
    prev_ok = prev.compression_ratio <= COMPRESSION_RATIO_THRESHOLD
    if cand_ok != prev_ok:
        return cand_ok
    return cand.avg_logprob > prev.avg_logprob
