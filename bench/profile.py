"""python -m bench.profile [--calls N] [--out bench/results]

pyinstrument profiles (HTML + text) of the two service paths, on the embedded stack:

- recognize:            N Recognize calls of the 5 s clip, end to end, everything on the event loop thread
                        (client, gateway and transcriber servers share this process and loop);
- recognize-components: the same work done synchronously in one thread (decode, VAD, window plan,
                        Engine.transcribe_batch, merge), so the model and VAD show up by function
                        (pyinstrument samples one thread: in the end-to-end profile the model and VAD
                        run in worker threads and appear as time the loop waits);
- job:                  one job of the quick-mode long file (submit, wait, transcript), end to end.

Files: <out>/profile-<date>-<name>.html and .txt.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, StackHolder, configure_env, log, today

configure_env()


def _save(profiler: Any, out: Path, name: str) -> list[Path]:
    stem = out / f"profile-{today()}-{name}"
    html, txt = stem.with_suffix(".html"), stem.with_suffix(".txt")
    html.write_text(profiler.output_html())
    tree = profiler.output_text(unicode=True, color=False, processor_options={"filter_threshold": 0.002})
    flat = profiler.output_text(unicode=True, color=False, flat=True, flat_time="self")
    txt.write_text(f"{tree}\n\nBy self time (flat):\n{flat}")
    log(f"wrote {html.name} and {txt.name}")
    return [html, txt]


def components(wav: bytes, engine: Any, calls: int) -> None:
    """What one Recognize does, without gRPC, in this thread."""
    from services.gateway import audio as audio_mod
    from services.gateway.chunking import VadSettings, merge, plan_windows, speech_regions
    from services.shared.domain import DecodeOptions
    from services.transcriber.engine import WindowRequest

    limits = audio_mod.Limits(32 * 1024 * 1024, 900.0)
    opts = DecodeOptions(language="en", word_timestamps=True)
    for _ in range(calls):
        decoded = audio_mod.decode(wav, limits=limits)
        windows = plan_windows(decoded.samples, speech_regions(decoded.samples, VadSettings()))
        results = engine.transcribe_batch(
            [WindowRequest(decoded.samples[w.start : w.end], opts) for w in windows]
        )
        merge(windows, [r.segments for r in results if not isinstance(r, BaseException)])


async def main_async(args: argparse.Namespace) -> list[Path]:
    from pyinstrument import Profiler

    from bench.corpus import build_corpus
    from bench.m_batch import run_job
    from services.shared.logging import setup_logging
    from services.transcriber.config import TranscriberSettings
    from services.transcriber.engine import Engine

    setup_logging("WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(quick=True)
    tmp = tempfile.mkdtemp(prefix="stt-profile-")
    holder = StackHolder(tmp)
    files: list[Path] = []
    try:
        _, client = await holder.get()
        wav = corpus.short.wav()
        for _ in range(3):
            await client.recognize(wav, language="en", word_timestamps=True)
        log(f"profiling {args.calls} Recognize calls")
        p = Profiler(interval=0.001, async_mode="disabled")
        p.start()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            await client.recognize(wav, language="en", word_timestamps=True)
        p.stop()
        log(f"  {1000 * (time.perf_counter() - t0) / args.calls:.0f} ms per call")
        files += _save(p, args.out, "recognize")

        engine = Engine(TranscriberSettings(host="127.0.0.1"))
        engine.load()
        components(wav, engine, 2)
        log(f"profiling the same {args.calls} calls' work in one thread")
        p = Profiler(interval=0.001)
        p.start()
        components(wav, engine, args.calls)
        p.stop()
        files += _save(p, args.out, "recognize-components")

        log(f"profiling one job of {corpus.long.seconds:.0f}s")
        p = Profiler(interval=0.001, async_mode="disabled")
        p.start()
        job = await run_job(client, corpus.long.wav(), "profile.wav")
        p.stop()
        log(f"  job took {job['wall']:.1f}s")
        files += _save(p, args.out, "job")
    finally:
        await holder.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20, help="Recognize calls to profile (default 20)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
