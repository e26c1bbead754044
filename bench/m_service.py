"""Unary overhead, accuracy, start-up time and memory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    child_env,
    corpus_wer,
    free_port,
    log,
    pct,
    proc_status,
    python,
    raw_transcribe,
    stop_process,
    summary,
    wait_health,
)
from bench.context import Context
from bench.m_batch import run_job


async def unary(ctx: Context) -> dict[str, Any]:
    """3. Recognize of a 5 s clip vs the same engine code in-process (p50/p95)."""
    from services.shared.domain import DecodeOptions
    from services.transcriber.engine import WindowRequest
    from tests.support.text import wer

    clip = ctx.corpus.short
    wav = clip.wav()
    _, client = await ctx.stack.get()
    engine = await ctx.engine()
    n = ctx.pick(20, 60)
    opts = DecodeOptions(language="en", word_timestamps=True)
    svc: list[float] = []
    processing: list[float] = []
    model_ms: list[float] = []
    eng: list[float] = []
    svc_text = eng_text = ""
    windows = 0
    for i in range(n + 3):  # 3 warm-up calls each, then alternate service / in-process
        mark = ctx.stack.calls.mark()
        t0 = time.perf_counter()
        resp = await client.recognize(wav, language="en", word_timestamps=True)
        wall = time.perf_counter() - t0
        calls = ctx.stack.calls.calls[mark:]
        t0 = time.perf_counter()
        res = engine.transcribe(WindowRequest(clip.samples, opts))
        ewall = time.perf_counter() - t0
        if i < 3:
            continue
        svc.append(wall)
        processing.append(resp.metadata.processing_seconds)
        model_ms.append(sum(c.end - c.start for c in calls))
        eng.append(ewall)
        svc_text, windows = resp.transcript, resp.metadata.window_count
        eng_text = " ".join(s.text for s in res.segments)
    s_svc, s_eng = summary(svc), summary(eng)
    added_p50 = round(1000 * (s_svc["p50"] - s_eng["p50"]), 1)
    added_p95 = round(1000 * (s_svc["p95"] - s_eng["p95"]), 1)
    transport = [w - p for w, p in zip(svc, processing, strict=True)]
    overhead = summary([1000 * (w - m) for w, m in zip(svc, model_ms, strict=True)], 2)
    gateway = [p - m for p, m in zip(processing, model_ms, strict=True)]
    log(
        f"unary: service p50 {1000 * s_svc['p50']:.0f} ms, in-process p50 {1000 * s_eng['p50']:.0f} ms, "
        f"difference {added_p50} ms; per-call overhead p50 {overhead.get('p50')} ms"
    )
    return {
        "clip_seconds": round(clip.seconds, 2),
        "calls": n,
        "service_seconds": s_svc,
        "in_process_seconds": s_eng,
        "added_ms": {"p50": added_p50, "p95": added_p95},
        # Per call: wall time minus the stack's own model call for that request. The model time varies
        # by tens of ms from call to call, so this is a tighter estimate of the added time than the
        # difference of two medians.
        "per_call_overhead_ms": overhead,
        "breakdown_ms": {
            "client_and_transport (wall - server processing_seconds)": summary(
                [1000 * x for x in transport], 2
            ),
            "gateway_and_hop (processing_seconds - model call)": summary([1000 * x for x in gateway], 2),
            "model_call (stack's transcriber)": summary([1000 * x for x in model_ms], 2),
        },
        "windows": windows,
        "wer": {"service": pct(wer(clip.text, svc_text)), "in_process": pct(wer(clip.text, eng_text))},
        "samples": {
            "service": [round(x, 5) for x in svc],
            "in_process": [round(x, 5) for x in eng],
            "overhead_ms": [round(1000 * (w - m), 2) for w, m in zip(svc, model_ms, strict=True)],
        },
        "note": "client.recognize(WAV, language='en', word_timestamps=True) vs Engine.transcribe(WindowRequest("
        "samples, DecodeOptions(language='en', word_timestamps=True))), alternating, after 3 warm-up calls each.",
    }


async def accuracy(ctx: Context) -> dict[str, Any]:
    """4. WER of Recognize vs faster-whisper WhisperModel.transcribe on every corpus clip."""
    from tests.support.text import wer

    _, client = await ctx.stack.get()
    model = await ctx.raw()
    clips = []
    pairs: dict[str, list[tuple[str, str]]] = {"service": [], "raw": [], "raw_vad": []}
    for clip in ctx.corpus.clips:
        resp = await client.recognize(clip.wav(), language="en")
        plain, _, _ = await asyncio.to_thread(raw_transcribe, model, clip.samples)
        vad, _, _ = await asyncio.to_thread(raw_transcribe, model, clip.samples, vad_filter=True)
        row = {
            "clip": clip.name,
            "seconds": round(clip.seconds, 1),
            "words": clip.words,
            "service": pct(wer(clip.text, resp.transcript)),
            "raw": pct(wer(clip.text, plain)),
            "raw_vad": pct(wer(clip.text, vad)),
            "service_text": resp.transcript,
            "raw_text": plain,
        }
        for k, text in (("service", resp.transcript), ("raw", plain), ("raw_vad", vad)):
            pairs[k].append((clip.text, text))
        clips.append(row)
        log(
            f"accuracy: {clip.name:22s} service {row['service']:5.1f}%  raw {row['raw']:5.1f}%  raw+vad {row['raw_vad']:5.1f}%"
        )
    corpus = {k: pct(corpus_wer(v)) for k, v in pairs.items()}
    return {
        "corpus_wer": corpus,
        "difference_points": round(corpus["service"] - corpus["raw"], 2),
        "clips": clips,
        "note": "WER in percent, tests.support.text normalisation on both sides. raw = WhisperModel.transcribe("
        "language='en', beam_size=5) with its defaults (no VAD); raw_vad adds vad_filter=True.",
    }


def spawn(cmd: list[str], log_path: str) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, output to log_path (Popen keeps its own copy of the fd)."""
    with open(log_path, "wb") as fh:
        return subprocess.Popen(
            cmd, env=child_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def spawn_pipe(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )


def read_port(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text else None


def tail(path: str, chars: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def startup(ctx: Context) -> dict[str, Any]:
    """5. Process start to SERVING for `python -m services.transcriber`, vs raw model load + warm-up."""
    runs = 3
    service: list[float] = []
    listening: list[float] = []
    raw: list[float] = []
    for i in range(runs):
        d = tempfile.mkdtemp(prefix="startup-", dir=ctx.tmp)
        port_file, log_path = os.path.join(d, "port"), os.path.join(d, "log")
        t0 = time.perf_counter()
        proc = spawn(
            [python(), "-m", "services.transcriber", "--port", "0", "--port-file", port_file], log_path
        )
        try:
            deadline = time.perf_counter() + 120
            while (port := read_port(port_file)) is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"transcriber exited with {proc.returncode}: {tail(log_path)}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"transcriber did not write its port file in 120 s: {tail(log_path)}")
                await asyncio.sleep(0.01)
            t_listen = time.perf_counter()
            t_serving = await wait_health(f"127.0.0.1:{port}", "stt.internal.v1.Transcriber", 120, proc)
        finally:
            await asyncio.to_thread(stop_process, proc)
            shutil.rmtree(d, ignore_errors=True)
        service.append(t_serving - t0)
        listening.append(t_listen - t0)
        t0 = time.perf_counter()
        rp = spawn_pipe([python(), "-m", "bench._rawproc", "startup"])
        try:
            assert rp.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(rp.stdout.readline), 120)
            if line.strip() != "READY":
                raise RuntimeError(f"raw start-up helper failed: {line!r}")
            raw.append(time.perf_counter() - t0)
        finally:
            await asyncio.to_thread(stop_process, rp)
        log(
            f"startup run {i + 1}: transcriber SERVING after {service[-1]:.2f}s (listening {listening[-1]:.2f}s), raw load+warm-up {raw[-1]:.2f}s"
        )
    return {
        "runs": runs,
        "service_seconds": {
            "median": round(statistics.median(service), 3),
            "all": [round(x, 3) for x in service],
        },
        "listening_seconds": {
            "median": round(statistics.median(listening), 3),
            "all": [round(x, 3) for x in listening],
        },
        "raw_seconds": {"median": round(statistics.median(raw), 3), "all": [round(x, 3) for x in raw]},
        "note": "service: Popen -> grpc health Check('stt.internal.v1.Transcriber') == SERVING (model loaded and warmed up). "
        "raw: Popen -> a python process that imported faster-whisper, loaded the model and transcribed a 1 s tone.",
    }


async def memory(ctx: Context) -> dict[str, Any]:
    """6. `stt up` as a subprocess: RSS when ready, peak over the long job, growth over sequential
    Recognize calls; the same for raw faster-whisper in its own process."""
    from stt.client import AsyncClient

    n = ctx.pick(40, 200)
    clip, long = ctx.corpus.short, ctx.corpus.long
    port = free_port()
    d = tempfile.mkdtemp(prefix="memory-", dir=ctx.tmp)
    log_path = os.path.join(d, "stt-up.log")
    t0 = time.perf_counter()
    proc = spawn(
        [python(), "-m", "stt.cli", "up", "--port", str(port), "--data-dir", os.path.join(d, "data")],
        log_path,
    )
    out: dict[str, Any] = {"requests": n}
    try:
        target = f"127.0.0.1:{port}"
        try:
            await wait_health(target, "stt.v1.Speech", 180, proc)
            await wait_health(target, "dependency/transcribers", 180, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"stt up did not become ready: {exc}\n{tail(log_path)}") from None
        out["stt_up_ready_seconds"] = round(time.perf_counter() - t0, 3)
        out["ready"] = proc_status(proc.pid)
        from bench.common import RssSampler

        async with AsyncClient(target, timeout=900) as client:
            with RssSampler(proc.pid) as sampler:
                job = await run_job(client, long.wav(), "memory-long.wav")
            out["after_long_job"] = proc_status(proc.pid)
            out["long_job_peak_rss_sampled"] = sampler.peak
            out["long_job_seconds"] = round(job["wall"], 3)
            wav = clip.wav()
            for i in range(n):
                await client.recognize(wav, language="en")
                if i + 1 == min(20, n):
                    out["after_20"] = proc_status(proc.pid)
            out["after_n"] = proc_status(proc.pid)
        log(
            f"memory: stt up RSS ready {out['ready'].get('VmRSS')} MiB, peak {out['after_long_job'].get('VmHWM')} MiB, "
            f"after 20 {out['after_20'].get('VmRSS')} -> after {n} {out['after_n'].get('VmRSS')} MiB"
        )
    finally:
        await asyncio.to_thread(stop_process, proc)
        shutil.rmtree(d, ignore_errors=True)
    rp = await asyncio.create_subprocess_exec(
        python(),
        "-m",
        "bench._rawproc",
        "memory",
        ctx.npy("long", long.samples),
        ctx.npy("short", clip.samples),
        str(n),
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(rp.communicate(), 900)
    raw = json.loads(stdout.decode().strip().splitlines()[-1])
    out["raw"] = raw
    growth = out["after_n"]["VmRSS"] - out["after_20"]["VmRSS"]
    raw_growth = raw["after_n"]["VmRSS"] - raw["after_20"]["VmRSS"]
    out["growth_mib"] = {"service": round(growth, 1), "raw": round(raw_growth, 1)}
    out["peak_mib"] = {"service": out["after_long_job"].get("VmHWM"), "raw": raw["after_long"].get("VmHWM")}
    log(
        f"memory: raw faster-whisper peak {out['peak_mib']['raw']} MiB, growth {raw_growth:.1f} MiB; service growth {growth:.1f} MiB"
    )
    out["note"] = (
        "`python -m stt.cli up` (gateway + transcriber + jobstore in one process, STT_CPU_THREADS=2). "
        "VmHWM = peak RSS since start (includes model load). growth = RSS after all Recognize calls - "
        "RSS after the first 20. raw: WhisperModel in its own process, same long file then the same "
        "number of 5 s clip transcriptions."
    )
    return out
