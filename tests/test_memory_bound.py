"""Gateway memory under concurrent large Recognize calls (real processes).

20 callers each send a 32 MiB recording (174 s of 48 kHz stereo WAV, the default size limit) at
once. Without a bound on in-flight request bytes the gateway holds every body, its copy and its
decoded samples together; with STT_MAX_INFLIGHT_BYTES (default 256 MiB) calls beyond the budget
wait before their bodies are read, so the gateway's peak RSS stays near its idle size plus the
budget. Run alone: `flock /tmp/stt-heavy.lock pytest tests/test_memory_bound.py -s`.
"""

from __future__ import annotations

import asyncio
import tempfile

import numpy as np
import pytest

from services.cluster import ServiceProcess
from stt.client import AsyncClient
from stt.errors import SttError
from tests.support import audio

pytestmark = [pytest.mark.system, pytest.mark.slow]
CALLERS = 20
BODY = 32 * 1024 * 1024 - 64 * 1024


def body() -> bytes:
    """A WAV of quiet noise (no speech: VAD sends nothing to the model) just under 32 MiB."""
    frames = (BODY - 44) // 4
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal(frames) * 0.002).astype(np.float32)
    return audio.encode(audio.resample(noise, 48000, 16000), "wav", rate=48000, channels=2)[:BODY]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def run(inflight: int, **env: str) -> tuple[float, float, dict[str, int]]:
    """(idle RSS, peak RSS) of a gateway under 20 concurrent 32 MiB Recognize calls."""
    d = tempfile.mkdtemp(prefix="stt-mem-")
    tr = await ServiceProcess("transcriber", env={"STT_CPU_THREADS": "1"}, log_dir=d).start()
    js = await ServiceProcess("jobstore", env={"STT_DATA_DIR": d}, log_dir=d).start()
    gw = await ServiceProcess(
        "gateway",
        env={
            "STT_TRANSCRIBER_ADDRESS": tr.address,
            "STT_JOBSTORE_ADDRESS": js.address,
            "STT_MAX_INFLIGHT_BYTES": str(inflight),
            "STT_INFLIGHT_WAIT_SECONDS": "120",
            "STT_DISPATCH_CONCURRENCY": "0",
            **env,
        },
        log_dir=d,
    ).start()
    try:
        data = body()
        clients = [AsyncClient(gw.address, timeout=300) for _ in range(CALLERS)]
        async with clients[0] as c:
            for _ in range(600):
                if (await c.health()).get("dependency/transcribers") == "SERVING":
                    break
                await asyncio.sleep(0.1)
            await c.recognize(audio.encode(audio.silence(1.0), "wav"))
        idle = peak_rss_mb(gw.pid)
        outcomes: dict[str, int] = {}

        async def one(c: AsyncClient) -> None:
            try:
                await c.recognize(data)
                key = "OK"
            except SttError as exc:
                key = f"{exc.code.name}/{exc.reason}"
            outcomes[key] = outcomes.get(key, 0) + 1

        await asyncio.gather(*(one(c) for c in clients[1:]), one(AsyncClient(gw.address, timeout=300)))
        for c in clients[1:]:
            await c.close()
        return idle, peak_rss_mb(gw.pid), outcomes
    finally:
        for p in (gw, js, tr):
            await p.stop()


@pytest.mark.xfail(
    reason="not met yet: the byte budget serialises the calls (measured), but the gateway's peak RSS "
    "still grows ~1.1-1.6 GB (unbounded: ~1.9 GB; MALLOC_ARENA_MAX=2: ~0.9 GB): allocator arenas and "
    "gRPC receive buffers, not the bodies the handler holds, dominate. Kept as the target.",
    strict=False,
)
async def test_concurrent_large_recognize_calls_stay_within_the_budget():
    budget = 256 * 1024 * 1024
    idle, peak, outcomes = await run(budget)
    print(f"\nbounded (256 MiB): idle {idle:.0f} MB, peak {peak:.0f} MB, outcomes {outcomes}")
    assert outcomes.get("OK") == CALLERS, outcomes
    # The budget, plus decoding estimates of at most STT_MAX_CONCURRENT_DECODES calls, plus slack.
    assert peak - idle < 256 + 4 * 60 + 150, f"gateway grew by {peak - idle:.0f} MB"
    unbounded_idle, unbounded_peak, _ = await run(0)
    print(f"unbounded: idle {unbounded_idle:.0f} MB, peak {unbounded_peak:.0f} MB")
    assert peak - idle < unbounded_peak - unbounded_idle
