"""A 4-hour upload (mostly silence, a sentence every ~15 minutes) goes through a job in bounded
memory: `stt up` as a real process, its peak RSS after the 4-hour job within 200 MiB of its peak
after a 5-minute one. The audio is decoded once, in a stream: windows are planned and transcribed
while later audio is still being decoded, and no more than about a block of it is held in memory.
Run alone: `flock /tmp/stt-heavy.lock pytest tests/test_long_upload.py -s` (~1 min)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from stt.client import AsyncClient
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.procs import ROOT, free_port

pytestmark = [pytest.mark.system, pytest.mark.slow]
SR = 16000
SENTENCE = "The weather today is sunny with a light breeze from the west."
MARGIN_MIB = 200.0


def _wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def recording(d: Path, name: str, clips: int, gap_seconds: float) -> Path:
    """FLAC: `clips` times (a spoken sentence, then `gap_seconds` of silence), built by sox from two
    small WAV files (nothing long is ever in memory)."""
    speech, gap = d / "speech.wav", d / f"gap-{gap_seconds:g}.wav"
    if not speech.exists():
        _wav(speech, np.concatenate([audio.silence(1.0), audio.speak(SENTENCE), audio.silence(1.0)]))
    if not gap.exists():
        _wav(gap, audio.silence(gap_seconds))
    out = d / f"{name}.flac"
    subprocess.run(["sox", *[str(p) for _ in range(clips) for p in (speech, gap)], str(out)], check=True)
    return out


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def transcribe(client: AsyncClient, path: Path) -> str:
    job = await client.submit(path.read_bytes(), language="en", filename=path.name)
    done = await asyncio.wait_for(client.wait(job.job_id), timeout=150)
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done.error_message
    return (await client.transcript(job.job_id)).text


@pytest.mark.skipif(
    not os.path.exists("/usr/bin/sox") and not os.path.exists("/usr/local/bin/sox"), reason="sox"
)
async def test_four_hour_upload_in_the_memory_of_a_five_minute_one(tmp_path: Path) -> None:
    # ~5 min with a sentence every ~30 s: as many windows as a call takes (a model call's memory
    # depends on how many windows share it, not on the length of the recording)
    short = recording(tmp_path, "five-minutes", 10, 25.0)
    long = recording(tmp_path, "four-hours", 16, 890.0)  # ~3 h 59 min (the limit is 4 h)
    port = free_port()
    env = {**os.environ, "STT_CPU_THREADS": "2", "STT_LOG_LEVEL": "INFO"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115, ASYNC230
    proc = subprocess.Popen(
        [sys.executable, "-m", "stt.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=log, stderr=log, cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=300) as c:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    if (await c.health(timeout=1)).get("dependency/transcribers") == "SERVING":
                        break
                assert proc.poll() is None, "stt up exited"
                assert time.monotonic() < deadline, "stt up did not become ready"
                await asyncio.sleep(0.1)
            text = await transcribe(c, short)
            assert text.lower().count("weather") >= 8, text
            after_short = peak_rss_mib(proc.pid)
            t0 = time.monotonic()
            text = await transcribe(c, long)
            took = time.monotonic() - t0
            after_long = peak_rss_mib(proc.pid)
        print(f"peak RSS: {after_short:.0f} MiB after 5 min, {after_long:.0f} MiB after 4 h ({took:.0f} s)")
        assert text.lower().count("weather") >= 14, text
        assert after_long - after_short <= MARGIN_MIB, (after_short, after_long)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
