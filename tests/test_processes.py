"""System tests with real service processes on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import pytest

from services.gateway.server import create_server as create_gateway
from stt.client import AsyncClient
from tests.conftest import gateway_settings
from tests.support import audio
from tests.support.procs import ROOT, ServiceProcess, free_port
from tests.support.text import wer

pytestmark = pytest.mark.system

TRANSCRIBER_ENV = {"STT_CPU_THREADS": "1"}


async def test_two_transcriber_processes_behind_one_gateway_both_get_work(long_clip):
    procs = [ServiceProcess("transcriber", env=TRANSCRIBER_ENV) for _ in range(2)]
    gw = None
    try:
        for p in procs:
            await p.start()
        gw = await create_gateway(gateway_settings(",".join(p.address for p in procs)), port=0)
        while gw.pool.serving_count < 2:
            await asyncio.sleep(0.05)
        async with AsyncClient(f"127.0.0.1:{gw.port}") as client:
            resp = await client.recognize(audio.encode(long_clip.samples, "flac"), timeout=120)
        assert wer(long_clip.text, resp.transcript) <= 0.15
        served = gw.pool.stats.served_by
        assert len(served) == 2, served  # both processes transcribed windows
        assert sum(served.values()) == resp.metadata.window_count
        for p in procs:
            assert "/stt.internal.v1.Transcriber/Transcribe OK" in p.log()
    finally:
        if gw:
            await gw.stop(0)
        for p in procs:
            await p.stop()


async def _run(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stt.cli", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_transcribe_formats_and_health(gateway, short_clip, tmp_path):
    wav = tmp_path / "some.wav"
    wav.write_bytes(audio.encode(short_clip.samples, "wav"))
    server = f"127.0.0.1:{gateway.port}"
    code, out, err = await _run("--server", server, "transcribe", str(wav))
    assert code == 0, err
    assert wer(short_clip.text, out) <= 0.15
    code, out, _ = await _run("transcribe", str(wav), "--format", "srt", env={"STT_SERVER": server})
    assert code == 0 and out.startswith("1\n00:00:0") and " --> " in out
    code, out, _ = await _run(
        "--server", server, "transcribe", "-", "--format", "vtt", stdin=wav.read_bytes()
    )
    assert code == 0 and out.startswith("WEBVTT")
    code, out, _ = await _run("--server", server, "transcribe", str(wav), "--format", "json")
    assert code == 0 and '"words"' in out and '"language": "en"' in out
    code, out, _ = await _run("--server", server, "health")
    assert code == 0 and "stt.v1.Speech" in out and "dependency/transcribers" in out
    code, _, err = await _run("--server", server, "transcribe", str(ROOT / "pyproject.toml"))
    assert code == 2 and "INVALID_ARGUMENT" in err and "supported: WAV, FLAC" in err
    code, _, err = await _run("--server", server, "transcribe", str(tmp_path / "missing.wav"))
    assert code == 2 and "No such file" in err


async def test_stt_up_runs_the_stack_and_stops_cleanly_on_ctrl_c(short_clip, tmp_path):
    port, http_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stt.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
        "--http-port", str(http_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "STT_LOG_LEVEL": "INFO", "STT_CPU_THREADS": "2"},
    )  # fmt: skip
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            for _ in range(600):
                try:
                    if (await client.health(timeout=1)).get("dependency/transcribers") == "SERVING":
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.1)
            resp = await client.recognize(audio.encode(short_clip.samples, "mp3"), timeout=60)
        assert wer(short_clip.text, resp.transcript) <= 0.15
        # The HTTP front door is up on the same stack.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
            models = (await http.get("/v1/models")).json()
            assert "whisper-1" in [m["id"] for m in models["data"]]
            form = {"model": "whisper-1", "response_format": "text"}
            files = {"file": ("clip.wav", audio.encode(short_clip.samples, "wav"))}
            text = (await http.post("/v1/audio/transcriptions", data=form, files=files)).text
            assert wer(short_clip.text, text) <= 0.15
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b"stopped" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_jobs_and_stream(gateway, short_clip, tmp_path):
    import json

    wav = tmp_path / "call.wav"
    wav.write_bytes(audio.encode(short_clip.samples, "wav"))
    server = f"127.0.0.1:{gateway.port}"
    code, out, err = await _run(
        "--server", server, "submit", str(wav), "--wait", "--format", "vtt", "--priority", "high"
    )
    assert code == 0, err
    assert out.startswith("WEBVTT") and "chunks" in err  # transcript on stdout, progress on stderr
    cues = [ln for ln in out.splitlines()[1:] if ln and "-->" not in ln]
    assert len(cues) >= 2 and wer(short_clip.text, " ".join(cues)) <= 0.15
    code, job_id, _ = await _run("--server", server, "submit", str(wav), "--request-id", "cli-1")
    job_id = job_id.strip()
    code2, again, _ = await _run("--server", server, "submit", str(wav), "--request-id", "cli-1")
    assert code == code2 == 0 and again.strip() == job_id
    code, _, _ = await _run("--server", server, "jobs", "watch", job_id)
    assert code == 0
    code, out, _ = await _run("--server", server, "transcript", job_id, "--format", "json")
    assert code == 0 and json.loads(out)["segments"][0]["words"]
    code, out, _ = await _run("--server", server, "jobs", "list", "--status", "completed")
    assert code == 0 and job_id in out
    code, out, _ = await _run("--server", server, "jobs", "get", job_id)
    assert code == 0 and json.loads(out)["status"] == "JOB_STATUS_COMPLETED"
    code, out, _ = await _run("--server", server, "queue")
    assert code == 0 and "HIGH" in out and "workers" in out
    code, _, err = await _run("--server", server, "jobs", "cancel", job_id)
    assert code == 2 and "FAILED_PRECONDITION" in err
    code, _, err = await _run("--server", server, "jobs", "retry", job_id)
    assert code == 2 and "only FAILED or CANCELLED" in err  # COMPLETED: nothing to retry
    code, other, _ = await _run("--server", server, "submit", str(wav), "--priority", "low")
    other = other.strip()
    code, out, _ = await _run("--server", server, "jobs", "cancel", other)
    assert code == 0 and "CANCELLED" in out
    code, out, err = await _run("--server", server, "jobs", "retry", other)
    assert code == 0 and other in out and ("QUEUED" in out or "RUNNING" in out), err
    code, _, _ = await _run("--server", server, "jobs", "watch", other)
    code, out, _ = await _run("--server", server, "jobs", "get", other)
    assert code == 0 and json.loads(out)["status"] == "JOB_STATUS_COMPLETED"
    code, out, _ = await _run("--server", server, "stream", str(wav), "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    finals = [r["transcript"] for line in lines for r in line.get("results", []) if r.get("is_final")]
    assert code == 0 and wer(short_clip.text, " ".join(finals)) <= 0.3
    code, _, _ = await _run("--server", server, "jobs", "delete", job_id)
    assert code == 0
