"""python -m bench [--quick] [--only NAME ...] [--out bench/results] [--no-report]

Runs each measure (service and faster-whisper side by side, in this one run), writes
<out>/<YYYY-MM-DD>[-quick].json after every measure, then the PNG plots, then docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BEAM_SIZE,
    DEFAULT_OUT,
    DOCS,
    ERRORS,
    THREADS,
    StackHolder,
    capture_errors,
    compute_type,
    configure_env,
    device,
    log,
    machine_info,
    model_label,
    model_path,
    ran_on,
    today,
)

configure_env()  # before any settings object exists

from bench import goals, m_batch, m_service, m_stream, plots, report  # noqa: E402
from bench.context import Context  # noqa: E402
from bench.corpus import build_corpus  # noqa: E402


@dataclass
class Measure:
    name: str
    fn: Callable[[Context], Awaitable[dict[str, Any]]]
    budget_quick: float  # seconds before the measure is abandoned
    budget_full: float
    uses_stack: bool = True
    extra_budget: Callable[[], float] | None = None  # seconds more, for what the environment asks


MEASURES = [
    Measure("throughput", m_batch.throughput, 300, 900),
    Measure("cluster", m_batch.cluster, 240, 600, uses_stack=False),
    Measure("concurrent_jobs", m_batch.concurrent_jobs, 300, 900),
    Measure("unary", m_service.unary, 150, 400),
    Measure("accuracy", m_service.accuracy, 200, 600),
    Measure("streaming", m_stream.streaming, 200, 400, extra_budget=m_stream.more_clips_budget),
    Measure("concurrent_streams", m_stream.concurrent_streams, 300, 1200),
    Measure("whisper_streaming", m_stream.whisper_streaming, 240, 600, uses_stack=False),
    Measure("batching", m_stream.batching, 300, 600, uses_stack=False),
    Measure("startup", m_service.startup, 150, 300, uses_stack=False),
    Measure("memory", m_service.memory, 400, 1200, uses_stack=False),
]
NAMES = [m.name for m in MEASURES]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the stt services against faster-whisper used directly, in one run.",
        epilog="measures: " + ", ".join(NAMES),
    )
    p.add_argument("--quick", action="store_true", help="small inputs, fewer repetitions (~5 minutes)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=NAMES,
        help="run only these measures (merged into an existing results file of the same day and mode)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    p.add_argument("--docs", type=Path, default=DOCS, help="report to write (default docs/benchmarks.md)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate the markdown report")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="run both sides (faster-whisper directly and the services) on this device (default cpu)",
    )
    p.add_argument(
        "--compute-type",
        help="CTranslate2 compute type for both sides (default int8 on cpu, float16 on cuda)",
    )
    p.add_argument(
        "--model",
        help="model for both sides: a faster-whisper name (large-v3, ...) or a CTranslate2 model directory "
        "(default: the bundled tiny.en; STT_MODEL)",
    )
    args = p.parse_args(argv)
    configure_env(args.device, args.compute_type, args.model)
    return args


def carry_forward(results: dict[str, Any], out: Path, stem: str, *, quick: bool) -> None:
    """A partial run (--only) starts today's file with the other measures of the latest earlier
    results file of the same mode, each marked `carried_from`, so the report keeps every section
    (the report says which numbers come from which run)."""
    earlier = sorted(
        p
        for p in out.glob("20*.json")
        if p.stem < stem and p.stem.endswith("-quick") == quick and (quick or "-" not in p.stem[10:])
    )
    if not earlier:
        return
    with contextlib.suppress(ValueError, OSError):
        previous = json.loads(earlier[-1].read_text())
        for name, entry in (previous.get("measures") or {}).items():
            entry.setdefault("carried_from", previous.get("date") or earlier[-1].stem)
            entry.setdefault("ran_on", ran_on(previous.get("machine", {})))
            results["measures"][name] = entry
        log(f"other measures carried from {earlier[-1].name}")


def write_json(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)


async def run_measure(m: Measure, ctx: Context) -> dict[str, Any]:
    budget = m.budget_quick if ctx.quick else m.budget_full
    if m.extra_budget is not None:
        budget += m.extra_budget()
    log(f"== {m.name} (budget {budget:.0f}s)")
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    err_mark = ERRORS.mark()
    entry: dict[str, Any]
    try:
        data = await asyncio.wait_for(m.fn(ctx), budget)
        entry = {"status": "skipped" if data.get("skipped") else "ok", **data}
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            msg = f"timed out after {budget:.0f}s"
        else:
            msg = f"{type(exc).__name__}: {exc}"
        log(f"!! {m.name} failed: {msg}")
        entry = {"status": "error", "error": msg[:2000], "traceback": traceback.format_exc()[-4000:]}
        if m.uses_stack:
            await ctx.stack.reset()  # the next measure gets a fresh stack
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if errors := ERRORS.since(err_mark):
        entry["server_errors_logged"] = errors
        log(f"   {m.name}: the in-process services logged {sum(errors.values())} error(s); see the JSON")
    entry["load_average_before"] = load_before
    entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    entry["ran_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    log(f"== {m.name}: {entry['status']} in {entry['seconds']:.0f}s")
    return entry


async def main_async(args: argparse.Namespace) -> Path:
    from services.shared.logging import setup_logging

    setup_logging("WARNING")
    capture_errors()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = today() + ("-quick" if args.quick else "")
    json_path = args.out / f"{stem}.json"
    selected = [m for m in MEASURES if not args.only or m.name in args.only]
    results: dict[str, Any] = {"measures": {}}
    if args.only and json_path.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(json_path.read_text())
            results.setdefault("measures", {})
            # The measures kept from the earlier run say where they ran (the header is this run's).
            for entry in results["measures"].values():
                entry.setdefault("ran_on", ran_on(results.get("machine", {})))
            log(f"merging into {json_path}")
    elif args.only:
        carry_forward(results, args.out, stem, quick=args.quick)
    started = time.time()
    results.update(
        {
            "schema": 1,
            "date": today(),
            "mode": "quick" if args.quick else "full",
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "machine": machine_info(),
            "config": {
                "model": model_label(),
                "model_path": model_path(),
                "compute_type": compute_type(),
                "device": device(),
                "cpu_threads": THREADS,
                "beam_size": BEAM_SIZE,
                "language": "en",
                "env": {
                    k: v
                    for k, v in sorted(os.environ.items())
                    if k.startswith(("STT_", "BENCH_")) or k == "WHISPER_STREAMING_DIR"
                },
            },
        }
    )
    log(f"{results['mode']} run: {', '.join(m.name for m in selected)}")
    log(
        f"machine: {results['machine']['cores']} cores, {results['machine']['cpu_model']}, "
        f"{results['machine']['ram_gib']} GiB; load {results['machine']['load_average']}"
    )
    t0 = time.perf_counter()
    corpus = build_corpus(args.quick)
    log(
        f"corpus ready in {time.perf_counter() - t0:.1f}s: {len(corpus.clips)} clips, "
        f"{sum(c.seconds for c in corpus.clips):.0f}s; long file {corpus.long.seconds:.0f}s"
    )
    results["corpus"] = corpus.describe()
    tmp = tempfile.mkdtemp(prefix="stt-bench-")
    stack = StackHolder(tmp)
    ctx = Context(args.quick, args.out, tmp, corpus, stack, results=results["measures"])
    try:
        for m in selected:
            if not m.uses_stack and stack.stack is not None and m.name in ("startup", "memory", "batching"):
                await stack.close()  # keep this process quiet while other processes are measured
            entry = await run_measure(m, ctx)
            entry["ran_on"] = ran_on(results["machine"])
            results["measures"][m.name] = entry
            results["goals"] = goals.evaluate(results)
            write_json(json_path, results)
    finally:
        await stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["wall_seconds"] = round(time.time() - started, 1)
    results["goals"] = goals.evaluate(results)
    results["plots"] = plots.make_all(results, args.out, stem)
    write_json(json_path, results)
    log(f"wrote {json_path} ({results['wall_seconds']:.0f}s)")
    for g in results["goals"]:
        log(f"  {g['status']:4s}  {g['goal']}: {g['value']}")
    return json_path


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    json_path = asyncio.run(main_async(args))
    if not args.no_report:
        doc = report.write(json_path, args.docs)
        log(f"wrote {doc}")
    return 0
