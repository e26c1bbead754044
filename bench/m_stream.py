"""Live streaming: final-word and first-interim latency at real-time pacing, streaming vs offline WER,
concurrent streams, batched vs unbatched transcriber, and the whisper_streaming (LocalAgreement) baseline."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from bench.common import ERRORS, THREADS, log, pct, ratio, raw_transcribe, summary
from bench.context import Context
from bench.corpus import Clip
from services.shared.pcm import to_pcm16

CHUNK_SECONDS = 0.1


def send_time_of(t: float, send_times: list[float], chunk: float = CHUNK_SECONDS) -> float:
    """When the audio up to stream time t had been sent: the send time of the chunk holding t."""
    k = min(max(math.ceil(t / chunk - 1e-9) - 1, 0), len(send_times) - 1)
    return send_times[k]


def speech_onset(clip: Clip) -> float:
    """Stream seconds where speech starts: the first recording's start plus where Silero VAD, run on
    that recording alone, first finds speech (a recording may open with a breath of room noise: the
    Kennedy clip speaks 0.3 s after its start)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    start, end, _ = clip.spans[0]
    first = clip.samples[int(start * 16000) : int(end * 16000)]
    spans = get_speech_timestamps(first, VadOptions(speech_pad_ms=0, min_silence_duration_ms=300))
    return start + (spans[0]["start"] / 16000 if spans else 0.0)


async def stream_session(
    client: Any, clip: Clip, *, delay: float = 0.0, final_results: str | None = None
) -> dict[str, Any]:
    """One StreamingRecognize at real-time pacing with interim results; per-word latencies.
    final_results: the stream's final_result_timing (None: the server's default)."""
    from stt.streaming import PcmAudio, pcm_chunks
    from tests.support.text import wer

    if delay:
        await asyncio.sleep(delay)
    pcm = PcmAudio(clip.pcm16(), 16000, 1)
    send_times: list[float] = []

    async def paced() -> AsyncIterator[bytes]:
        async for chunk in pcm_chunks(pcm, chunk_seconds=CHUNK_SECONDS, realtime=True):
            send_times.append(time.perf_counter())
            yield chunk

    finals: list[tuple[float, list[tuple[str, float, float]], str]] = []
    closing: list[bool] = []  # per final: it closed its utterance (made final at a pause or the end)
    interims: list[tuple[float, str]] = []
    error = None
    try:
        async for resp in client.stream(paced(), interim=True, language="en", final_results=final_results):
            now = time.perf_counter()
            for r in resp.results:
                if r.is_final:
                    words = [(w.word, w.start_seconds, w.end_seconds) for w in r.words]
                    finals.append((now, words, r.transcript))
                    closing.append(r.utterance_end)
                elif r.transcript.strip():
                    interims.append((now, r.transcript))
    except Exception as exc:  # keep what arrived before the failure
        error = repr(exc)
    end = time.perf_counter()
    latencies = [arr - send_time_of(we, send_times) for arr, words, _ in finals for (_, _, we) in words]
    closes = [c for (_, words, _), c in zip(finals, closing, strict=True) for _ in words]
    onset = speech_onset(clip)
    speech_sent = send_times[min(int(onset / CHUNK_SECONDS), len(send_times) - 1)] if send_times else 0.0
    text = " ".join(t for _, _, t in finals)
    return {
        "latencies": latencies,
        "closes": closes,
        "first_interim": interims[0][0] - speech_sent if interims else None,
        "first_final": finals[0][0] - speech_sent if finals else None,
        "finals": len(finals),
        "interims": len(interims),
        "words": sum(len(w) for _, w, _ in finals),
        "text": text,
        "wer": pct(wer(clip.text, text)),
        "tail_seconds": round(end - send_times[-1], 3) if send_times else None,
        "error": error,
    }


async def streaming(ctx: Context) -> dict[str, Any]:
    """7a-c. One real-time stream: final-word latency, first interim latency, streaming vs offline WER.
    BENCH_STREAM_MORE_CLIPS=1,2,3: WER of both final-result timings on more streams too (pooled)."""
    from tests.support.text import wer

    clip = ctx.corpus.stream
    _, client = await ctx.stack.get()
    log(f"streaming: one real-time stream of {clip.seconds:.0f}s")
    mark = ctx.stack.calls.mark()
    t0 = time.perf_counter()
    s = await _whole_stream(client, clip, "stable")
    model = ctx.stack.calls.since(mark, time.perf_counter() - t0)
    # The same stream with finals only at utterance ends (final_result_timing UTTERANCE_END).
    log("streaming: the same stream, final_result_timing UTTERANCE_END")
    late = await _whole_stream(client, clip, "utterance_end")
    resp = await client.recognize(clip.wav(), language="en")
    raw = await ctx.raw()
    raw_text, _, _ = await asyncio.to_thread(raw_transcribe, raw, clip.samples)
    lat = summary(s["latencies"], 3)
    out = {
        "audio_seconds": round(clip.seconds, 2),
        "final_word_latency": lat,
        "first_interim_latency": round(s["first_interim"], 3) if s["first_interim"] is not None else None,
        "first_final_latency": round(s["first_final"], 3) if s["first_final"] is not None else None,
        "wer": {
            "streaming": s["wer"],
            "streaming_utterance_end": late["wer"],
            "offline_recognize": pct(wer(clip.text, resp.transcript)),
            "raw_faster_whisper": pct(wer(clip.text, raw_text)),
        },
        "finals": s["finals"],
        "interims": s["interims"],
        "final_words": s["words"],
        "tail_seconds": s["tail_seconds"],
        "model": model,
        "streaming_text": s["text"],
        "utterance_end": {
            "final_word_latency": summary(late["latencies"], 3),
            "wer": late["wer"],
            "finals": late["finals"],
            "interims": late["interims"],
            "final_words": late["words"],
            "first_final_latency": round(late["first_final"], 3) if late["first_final"] is not None else None,
            "text": late["text"],
        },
        "latencies": [round(x, 3) for x in s["latencies"]],
        "note": f"Audio sent in {CHUNK_SECONDS:g} s LINEAR16 chunks at real-time pace (stt.streaming.pcm_chunks). "
        "Final-word latency = arrival of the final result holding the word - send time of the chunk holding the "
        "word's end (the word end time the server reports). First interim latency = first non-empty interim "
        "result - send time of the chunk where speech starts (the first recording's start plus where Silero VAD, "
        "run on that recording alone, first finds speech; no padding).",
    }
    log(
        f"  final-word latency mean {lat.get('mean')}s p50 {lat.get('p50')}s p95 {lat.get('p95')}s; first interim "
        f"{out['first_interim_latency']}s; WER streaming {s['wer']}% offline {out['wer']['offline_recognize']}%"
    )
    ue = out["utterance_end"]["final_word_latency"]
    log(f"  utterance-end finals: latency mean {ue.get('mean')}s p95 {ue.get('p95')}s; WER {late['wer']}%")
    more = _more_clip_indexes()
    if more:
        rows = [_clip_row(clip, {k: out["wer"][k] for k in _WER_KEYS})]
        rows += await _more_clips(client, [ctx.corpus.stream_variant(i) for i in more])
        out["more_clips"] = {"clips": rows, "pooled_wer": _pooled(rows)}
        log(f"  pooled over {len(rows)} streams: WER {out['more_clips']['pooled_wer']}")
    return out


_WER_KEYS = ("streaming", "streaming_utterance_end", "offline_recognize")


async def _whole_stream(client: Any, clip: Clip, final_results: str) -> dict[str, Any]:
    """stream_session that must get to the end of the clip (a measure of a broken stream is void)."""
    s = await asyncio.wait_for(stream_session(client, clip, final_results=final_results), clip.seconds + 120)
    if s["error"]:
        raise RuntimeError(
            f"{clip.name} ({final_results}): the stream failed after {s['words']} final words: {s['error']}"
        )
    return s


def _more_clip_indexes() -> list[int]:
    """BENCH_STREAM_MORE_CLIPS, e.g. "1,2,3": other streams of the real recordings."""
    value = os.environ.get("BENCH_STREAM_MORE_CLIPS", "")
    return [int(x) for x in value.split(",")] if value else []


def more_clips_budget() -> float:
    """The streaming measure's extra seconds: two real-time streams (~100 s each) per more clip."""
    return 400.0 * len(_more_clip_indexes())


def _clip_row(clip: Clip, wers: dict[str, float]) -> dict[str, Any]:
    from tests.support.text import normalize

    words = len(normalize(clip.text).split())
    return {"name": clip.name, "seconds": round(clip.seconds, 2), "words": words, "wer": wers}


def _pooled(clips: list[dict[str, Any]]) -> dict[str, float]:
    """WER over all the clips' words (each clip's WER weighted by its reference words)."""
    words = sum(c["words"] for c in clips)
    return {k: round(sum(c["wer"][k] * c["words"] for c in clips) / words, 2) for k in _WER_KEYS}


async def _more_clips(client: Any, clips: list[Clip]) -> list[dict[str, Any]]:
    """Both final-result timings and offline Recognize on more real-time streams (one at a time)."""
    from tests.support.text import wer

    out = []
    for clip in clips:
        log(f"streaming: {clip.name} ({clip.seconds:.0f}s), both final-result timings")
        got = {}
        for key, timing in (("streaming", "stable"), ("streaming_utterance_end", "utterance_end")):
            got[key] = (await _whole_stream(client, clip, timing))["wer"]
        resp = await client.recognize(clip.wav(), language="en")
        got["offline_recognize"] = pct(wer(clip.text, resp.transcript))
        out.append(_clip_row(clip, got))
        log(f"  {clip.name}: WER {got}")
    return out


async def concurrent_streams(ctx: Context) -> dict[str, Any]:
    """7d. N real-time streams at once (each its own clip): final-word latency per level."""
    _, client = await ctx.stack.get()
    levels_n = ctx.pick([1, 2, 4], [1, 2, 4, 8, 16])
    if os.environ.get("BENCH_STREAM_LEVELS"):  # e.g. "8" or "2,4,8" while tuning
        levels_n = [int(x) for x in os.environ["BENCH_STREAM_LEVELS"].split(",")]
    t0 = time.perf_counter()
    clips = [ctx.corpus.stream_variant(i) for i in range(max(levels_n))]
    log(f"concurrent streams: {len(clips)} clips ready in {time.perf_counter() - t0:.1f}s")
    rng = random.Random(7)
    single = ctx.results.get("streaming") or {}
    levels = []
    for n in levels_n:
        if n == 1 and single.get("status") == "ok" and single.get("latencies"):
            # One stream on clip 0 is exactly the `streaming` measure: reuse it rather than wait again.
            levels.append(
                {
                    "streams": 1,
                    "completed": 1,
                    "timed_out": 0,
                    "errors": [],
                    "final_word_latency": single["final_word_latency"],
                    "first_interim_latency": summary([single["first_interim_latency"]], 3)
                    if single.get("first_interim_latency") is not None
                    else {"n": 0},
                    "wer_mean": single["wer"]["streaming"],
                    "tail_seconds_max": single.get("tail_seconds"),
                    "model": single.get("model", {}),
                    "reused_from": "streaming",
                }
            )
            log("  1 stream: taken from the streaming measure")
            continue
        log(f"concurrent streams: {n} at real time")
        mark, err_mark = ctx.stack.calls.mark(), ERRORS.mark()
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(stream_session(client, clips[i], delay=rng.uniform(0, 0.3))) for i in range(n)
        ]
        done, pending = await asyncio.wait(tasks, timeout=max(c.seconds for c in clips[:n]) * 2 + 60)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        # Per stream (stream i plays clip i): its result, or None when it raised, timed out or was cancelled.
        outcome = [
            t.result() if t in done and not t.cancelled() and t.exception() is None else None for t in tasks
        ]
        finished = [s for s in outcome if s is not None]
        ok = [s for s in finished if not s["error"]]
        errors = [s["error"] for s in finished if s["error"]]
        errors += [repr(t.exception()) for t in done if not t.cancelled() and t.exception() is not None]
        lat = [x for s in finished for x in s["latencies"]]  # failed streams count up to their failure
        closes = [c for s in finished for c in s["closes"]]
        first = [s["first_interim"] for s in finished if s["first_interim"] is not None]
        level = {
            "streams": n,
            "completed": len(ok),
            "timed_out": len(pending),
            "errors": sorted(set(errors)),
            "failed": len(errors),
            "final_word_latency": summary(lat, 3),
            # Words made final inside an utterance (by agreement of hypotheses) and by the final
            # result that closed it (a pause, or the end of the stream). When an utterance's last pass
            # gave two finals (left context, then a tail pass), the first one counts as agreement.
            "final_word_latency_by_path": {
                "agreement": summary([x for x, c in zip(lat, closes, strict=True) if not c], 3),
                "utterance_end": summary([x for x, c in zip(lat, closes, strict=True) if c], 3),
            },
            "first_interim_latency": summary(first, 3),
            "wer_mean": round(float(np.mean([s["wer"] for s in ok])), 2) if ok else None,
            # (None: the stream failed or timed out, as wer_mean leaves it out)
            "wer_per_stream": [s["wer"] if s is not None and not s["error"] else None for s in outcome],
            "tail_seconds_max": max((s["tail_seconds"] or 0.0) for s in ok) if ok else None,
            "wall_seconds": round(wall, 2),
            "model": ctx.stack.calls.since(mark, wall),
            "server_errors": ERRORS.since(err_mark),
        }
        levels.append(level)
        fl = level["final_word_latency"]
        log(
            f"  {n} streams: p50 {fl.get('p50')}s p95 {fl.get('p95')}s, WER {level['wer_mean']}%, "
            f"mean batch {level['model'].get('mean_batch')}, {len(errors)} failed, {len(pending)} timed out"
        )
    return {
        "audio_seconds": [round(c.seconds, 2) for c in clips],
        "levels": levels,
        "note": "Stream i plays clip i (different sentences, voices and rates; clip 0 is the streaming "
        "measure's clip); streams start within 0.3 s of each other. Latencies of all streams of a level are "
        "pooled. A level counts for the goal only if every stream completed without error. Clips are real "
        "speech (tests/data/speech). Admission control refuses streams past the estimated capacity "
        "(CAPACITY_EXHAUSTED); to measure latency past it, run with STT_STREAM_CAPACITY=32 "
        f"(this run: STT_STREAM_CAPACITY={os.environ.get('STT_STREAM_CAPACITY', 'unset')}). All streams share "
        "one client connection: until connection ageing spares running streams (issue 11 item 1), run with "
        "STT_MAX_CONNECTION_AGE_SECONDS=3600 (this run: "
        f"{os.environ.get('STT_MAX_CONNECTION_AGE_SECONDS', 'unset')}).",
    }


def _windows(clip: Clip, lo: float = 10.0, hi: float = 25.0) -> list[np.ndarray]:
    """Windows of 10-25 s cut between sentences."""
    out = []
    start = None
    last_end = 0.0
    for s, e, _ in clip.spans:
        if start is None:
            start = max(0.0, s - 0.3)
        if e + 0.3 - start > hi and last_end - start >= lo:
            out.append(clip.samples[int(start * 16000) : int((last_end + 0.3) * 16000)])
            start = max(0.0, s - 0.3)
        last_end = e
    if start is not None and last_end - start >= lo:
        out.append(clip.samples[int(start * 16000) : int(min(last_end + 0.3, hi + start) * 16000)])
    return out


def _request(w: np.ndarray) -> Any:
    from services.shared.internal.v1 import transcriber_pb2

    return transcriber_pb2.TranscribeRequest(
        pcm=to_pcm16(w),
        options=transcriber_pb2.DecodeOptions(word_timestamps=True, language_code="en"),
        work_class=transcriber_pb2.WORK_CLASS_BATCH,
    )


async def _drive(
    port: int, plan: list[list[np.ndarray]], warm: np.ndarray
) -> tuple[float, list[int], list[float]]:
    """One caller per plan entry, each sending its windows one after another; (wall, batch sizes, latencies)."""
    import grpc

    from services.shared.internal.v1 import transcriber_pb2_grpc

    sizes: list[int] = []
    lat: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = transcriber_pb2_grpc.TranscriberStub(channel)
        await stub.Transcribe(_request(warm), timeout=600)  # warm-up

        async def caller(ws: list[np.ndarray]) -> None:
            for w in ws:
                t = time.perf_counter()
                r = await stub.Transcribe(_request(w), timeout=600)
                lat.append(time.perf_counter() - t)
                sizes.append(r.batch_size)

        t0 = time.perf_counter()
        await asyncio.gather(*[caller(ws) for ws in plan])
        return time.perf_counter() - t0, sizes, lat


async def batching(ctx: Context) -> dict[str, Any]:
    """7e. Two in-process transcribers (max_batch_size 8 and 1), 8 concurrent callers each sending
    several 10-25 s windows: windows/s and audio-seconds/s."""
    from services.transcriber.config import TranscriberSettings
    from services.transcriber.server import create_server

    windows = _windows(ctx.corpus.long)
    if not windows:
        raise RuntimeError("no 10-25 s windows in the long clip")
    callers, per_caller = 8, ctx.pick(2, 4)
    plan = [[windows[(c * per_caller + k) % len(windows)] for k in range(per_caller)] for c in range(callers)]
    apps = {}
    try:
        for size in (8, 1):
            app = await create_server(
                TranscriberSettings(host="127.0.0.1", cpu_threads=THREADS, max_batch_size=size),
                port=0,
                load=False,
            )
            apps[size] = app
            await app.load()
        results: dict[str, Any] = {}
        for size in (1, 8):
            wall, sizes, lat = await _drive(apps[size].port, plan, windows[0])
            n = callers * per_caller
            audio_s = sum(w.shape[0] for ws in plan for w in ws) / 16000
            results[f"max_batch_{size}"] = {
                "windows": n,
                "audio_seconds": round(audio_s, 1),
                "wall_seconds": round(wall, 3),
                "windows_per_second": round(n / wall, 3),
                "audio_seconds_per_second": round(audio_s / wall, 2),
                "mean_batch_size": round(float(np.mean(sizes)), 2),
                "call_latency": summary(lat, 3),
            }
            log(
                f"batching: max_batch_size={size}: {n / wall:.2f} windows/s, {audio_s / wall:.1f} audio s/s, "
                f"mean batch {np.mean(sizes):.1f}"
            )
    finally:
        for app in apps.values():
            await app.stop(0)
    b, u = results["max_batch_8"], results["max_batch_1"]
    return {
        "callers": callers,
        "windows_per_caller": per_caller,
        "window_seconds": summary([w.shape[0] / 16000 for w in windows], 2),
        **results,
        "ratio_batched_vs_unbatched": ratio(b["audio_seconds_per_second"], u["audio_seconds_per_second"]),
        "note": "TranscribeRequest(pcm, DecodeOptions(word_timestamps=True, language_code='en'), work_class=BATCH); "
        "full 30 s context, no temperature fallback (proto defaults). Unbatched runs first, then batched.",
    }


async def whisper_streaming(ctx: Context) -> dict[str, Any]:
    """7f. ufal/whisper_streaming's OnlineASRProcessor (LocalAgreement-2) with its faster-whisper backend,
    the same model and threads, same clip at real-time pacing."""
    from bench import ws_baseline

    where = ws_baseline.checkout()
    if where is None:
        msg = (
            "skipped: set WHISPER_STREAMING_DIR to a checkout of https://github.com/ufal/whisper_streaming "
            "(git clone https://github.com/ufal/whisper_streaming /tmp/whisper_streaming; "
            "WHISPER_STREAMING_DIR=/tmp/whisper_streaming)"
        )
        log(msg)
        return {"skipped": msg}
    clip = ctx.corpus.stream
    model = await ctx.raw()
    log(f"whisper_streaming: {where}, {clip.seconds:.0f}s at real time, min chunk {ws_baseline.MIN_CHUNK}s")
    res = await asyncio.to_thread(ws_baseline.run, where, model, clip, clip.seconds * 3 + 60)
    lat = summary(res.pop("latencies"), 3)
    svc = ctx.results.get("streaming", {})
    out = {
        "checkout": where,
        **res,
        "final_word_latency": lat,
        "service_final_word_latency": svc.get("final_word_latency"),
        "service_wer": (svc.get("wer") or {}).get("streaming"),
        "note": "OnlineASRProcessor(FasterWhisperASR on CPU int8 with the bundled model, buffer_trimming=('segment', 15)); "
        "audio inserted as it 'arrives' (every min_chunk seconds of wall time, like whisper_online.py's simulation); "
        "latency = time the committed word is returned - time the end of the word's audio arrived.",
    }
    log(
        f"  whisper_streaming final-word latency mean {lat.get('mean')}s p95 {lat.get('p95')}s, WER {res.get('wer')}%"
    )
    return out
