"""Streaming WER and final-word latency of the live policy, without the services: a StreamingSession
over the real engine in-process, on the bench's real-speech stream clips. Audio arrives as model time
passes (a virtual clock: the model is never idle, like a loaded stream), or with RT=1 on the wall
clock (real time). Used to compare policies on the mean of several clips (one clip varies by +-3
points from run to run).

    CLIPS=0,1,2,3 python -m bench.stream_sim                      # the default policy, greedy
    CLIPS=0,1,2,3 P_interim_beam=3 python -m bench.stream_sim     # hypotheses with beam 3
    RT=1 CLIPS=0,1,2,3 P_interim_beam=3 python -m bench.stream_sim

env: CLIPS, SECS (clip length, 60), RUNS (per clip, 1), V=1 (print the text), P_<StreamPolicy field>,
SLOW (virtual clock: each model call counts this many times its time, as if the call were shared
with other streams; ~5 for 8 streams on 2 cores).
"""

import asyncio
import dataclasses
import os
import statistics
import time

import numpy as np

from bench.corpus import real_stream
from services.gateway.streaming import EventType, StreamingSession, StreamPolicy
from services.shared.domain import SAMPLE_RATE, DecodeOptions
from services.transcriber.config import TranscriberSettings
from services.transcriber.engine import Engine, WindowRequest
from tests.support.text import wer

engine = Engine(TranscriberSettings())
engine.load()


def policy() -> StreamPolicy:
    base = dict(
        step=0.3,
        max_window=15.0,
        endpoint_silence=0.5,
        agreement=2,
        hold=0.2,
        settle=1.2,
        interim_beam=1,
        trim="none",
        final_context=6.0,
    )
    for f in dataclasses.fields(StreamPolicy):
        v = os.environ.get("P_" + f.name)
        if v is not None:
            default = getattr(StreamPolicy(), f.name)
            base[f.name] = v if isinstance(default, str) else type(default)(v)
    return StreamPolicy(**base)


T0 = [0.0]
SLOW = float(os.environ.get("SLOW", "1"))  # model time counts this many times (a loaded transcriber)


async def run(clip, pol):
    clock = 0.0
    fed = 0
    audio = clip.samples
    piece = SAMPLE_RATE // 10
    busy = asyncio.Event()
    busy.set()  # set: not in a call
    model = 0.0

    async def transcribe(a, opts, wc):
        nonlocal clock, model
        busy.clear()
        t0 = time.perf_counter()
        res = await asyncio.to_thread(engine.transcribe, WindowRequest(a, opts))
        dt = time.perf_counter() - t0
        model += dt
        if os.environ.get("RT"):
            return res
        clock += dt * SLOW
        feed_to(clock)
        busy.set()
        return res

    def feed_to(t):
        nonlocal fed
        while fed < len(audio) and (fed + piece) / SAMPLE_RATE <= t + 1e-9:
            s.add_audio(audio[fed : fed + piece])
            fed += piece
        if fed >= len(audio):
            s.end_audio()

    T0[0] = time.perf_counter()
    opts = DecodeOptions(language="en", beam_size=5)
    s = StreamingSession(transcribe, opts, pol, interim=True)

    async def feeder():
        nonlocal clock
        while fed < len(audio):
            await busy.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            if busy.is_set():
                clock = max(clock, (fed + piece) / SAMPLE_RATE)
                feed_to(clock)

    async def rt_feeder():
        nonlocal clock
        t0 = time.perf_counter()
        while fed < len(audio):
            clock = time.perf_counter() - t0
            feed_to(clock)
            await asyncio.sleep(max(0.0, (fed + piece) / SAMPLE_RATE - (time.perf_counter() - t0)))

    rt = bool(os.environ.get("RT"))
    task = asyncio.create_task(rt_feeder() if rt else feeder())
    finals, lat = [], []
    async for ev in s.events():
        if ev.type == EventType.RESULT and ev.is_final:
            finals.append(ev.text)
            now = (time.perf_counter() - T0[0]) if os.environ.get("RT") else clock
            for w in ev.words:
                lat.append(max(0.0, now - w.end))
    task.cancel()
    text = " ".join(t for t in finals if t)
    return text, lat, model


async def main():
    clips = [int(x) for x in os.environ.get("CLIPS", "0").split(",")]
    runs = int(os.environ.get("RUNS", "1"))
    pol = policy()
    print(
        "policy",
        {
            f.name: getattr(pol, f.name)
            for f in dataclasses.fields(pol)
            if getattr(pol, f.name) != getattr(StreamPolicy(), f.name)
        },
    )
    allw, alllat = [], []
    for c in clips:
        clip = real_stream(c, float(os.environ.get("SECS", "60")))
        for r in range(runs):
            text, lat, model = await run(clip, pol)
            w = wer(clip.text, text) * 100
            allw.append(w)
            alllat += lat
            print(
                f"clip {c} run {r}: WER {w:.2f} words {len(lat)} lat mean {statistics.mean(lat):.2f} p95 {np.percentile(lat, 95):.2f} model {model:.1f}s/{clip.seconds:.0f}s",
                flush=True,
            )
            if os.environ.get("V"):
                print("  ", text)
    print(
        f"WERS mean {statistics.mean(allw):.2f}  lat mean {statistics.mean(alllat):.2f} p95 {np.percentile(alllat, 95):.2f}"
    )


asyncio.run(main())
