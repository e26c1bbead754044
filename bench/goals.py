"""The goals, evaluated from a results JSON: PASS, MISS, or N/A (not measured / skipped / failed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PASS, MISS, NA = "PASS", "MISS", "N/A"


@dataclass
class Goal:
    id: str
    measure: str
    text: str
    check: Callable[
        [dict[str, Any], dict[str, Any]], tuple[str, str]
    ]  # (measure result, all) -> (status, value)


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def _throughput(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    """Jobs API vs BatchedInferencePipeline on the same file, with word timings on both sides (and
    without), WER within 0.5 points."""
    s, b = _get(m, "x_real_time", "stack_job"), _get(m, "x_real_time", "batched")
    sw, bw = _get(m, "x_real_time", "stack_job_words"), _get(m, "x_real_time", "batched_words")
    if sw is None or bw is None:
        if s is None or b is None:
            return NA, "not measured"
        sw, bw = s, b
    ws, wb = _get(m, "best", "stack_job_words", "wer"), _get(m, "best", "batched_words", "wer")
    wer_ok = ws is None or wb is None or ws <= wb + 0.5
    value = f"with word times: stack {sw}x vs batched {bw}x (best of reps, ratio {sw / bw:.2f})"
    r = _paired(m, "stack_words_vs_batched_words")
    if r is not None:
        value += f"; {r[1]}"
    if s and b:
        value += f"; without: {s}x vs {b}x ({s / b:.2f})"
    if ws is not None and wb is not None:
        value += f"; WER {ws}% vs {wb}%"
    fast = r[0] >= 1.0 if r is not None else sw >= bw
    return (PASS if fast and wer_ok else MISS), value


def _paired(m: dict[str, Any], name: str) -> tuple[float, str] | None:
    """The median of a ratio paired within each rep, and its description."""
    med = _get(m, "paired_median", name)
    reps = _get(m, "paired_ratios", name)
    if med is None or not reps:
        return None
    return med, f"paired per rep {', '.join(f'{x:.2f}' for x in reps if x is not None)} (median {med:.2f})"


def _recognize(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    r, b = _get(m, "x_real_time", "stack_recognize"), _get(m, "x_real_time", "batched")
    if r is None or b is None:
        return NA, "not measured"
    value = f"Recognize {r}x vs batched {b}x real time (best of reps, ratio {r / b:.2f})"
    p = _paired(m, "recognize_vs_batched")
    if p is not None:
        value += f"; {p[1]}"
    return (PASS if (p[0] if p is not None else r / b) >= 1.0 else MISS), value


def cluster_bound(results: dict[str, Any]) -> dict[str, Any] | None:
    """How fast the cluster's job could have been with nothing but its busiest transcriber on the
    critical path: that transcriber's CPU seconds during the job (it runs the model on one thread)
    plus the lead-in before the first model call (reading, decoding, VAD and planning, measured on
    the embedded stack's job of the same run). A bound for this layout and this run's split of
    windows, from measurements, not a model of the machine."""
    m = _get(results, "measures", "cluster") or {}
    cpu = _get(m, "cluster_job", "cpu_seconds") or {}
    wall, x = _get(m, "cluster_job", "wall_seconds"), _get(m, "cluster_job", "x_real_time")
    busy = {k: v for k, v in cpu.items() if k.startswith("transcriber")}
    calls = _get(results, "measures", "throughput", "best", "stack_job", "timeline", "model_calls") or []
    if not busy or not calls or not wall or not x:
        return None
    lead = min(c["start"] for c in calls)
    busiest = max(busy.values())
    seconds = x * wall
    bound = seconds / (lead + busiest)
    # Against BatchedInferencePipeline run just after that job (with word times, as the job), else
    # against the throughput measure's run.
    b = _get(m, "cluster_job", "batched_words_x_real_time") or _get(
        results, "measures", "throughput", "x_real_time", "batched"
    )
    return {
        "busiest": busiest,
        "lead_in": lead,
        "x_real_time": round(bound, 1),
        "vs_batched": round(bound / b, 2) if b else None,
        "machine_cpu": cpu.get("machine"),
        "wall": wall,
    }


def _cluster(m: dict[str, Any], results: dict[str, Any]) -> tuple[str, str]:
    c = _get(m, "cluster_job", "x_real_time")
    b = _get(results, "measures", "throughput", "x_real_time", "batched")
    if c is None or b is None:
        return NA, "not measured"
    paired = _get(m, "paired_median")
    if paired is not None:
        reps = ", ".join(f"{x:.2f}" for x in _get(m, "paired_ratios") or [])
        value = (
            f"cluster vs BatchedInferencePipeline (word times) run just after it, per rep {reps} "
            f"(median {paired:.2f}); best cluster run {c}x"
        )
        ok = paired >= 1.2
    else:
        value = f"cluster {c}x vs batched {b}x real time (ratio {c / b:.2f})"
        ok = c >= 1.2 * b
    bound = cluster_bound(results)
    if bound and bound["vs_batched"]:
        value += (
            f"; at most ~{bound['vs_batched']:.2f} on this machine: busiest 1-thread transcriber "
            f"{bound['busiest']} CPU s + {bound['lead_in']} s lead-in (section 1)"
        )
    return (PASS if ok else MISS), value


def _concurrent_jobs(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    levels = [lv for lv in m.get("levels") or [] if lv.get("jobs") == 8]
    if not levels or levels[0].get("vs_batched") is None:
        return NA, "not measured"
    lv = levels[0]
    if lv.get("vs_batched_words") is not None:  # paired: batched with word times right after the 8 jobs
        return (PASS if lv["vs_batched_words"] >= 1.0 else MISS), (
            f"8 jobs (word times) {lv['x_real_time']}x vs BatchedInferencePipeline with word times run just "
            f"after {lv['batched_words_x_real_time']}x real time on one file (ratio {lv['vs_batched_words']})"
        )
    base = _get(m, "baseline", "batched_x_real_time")
    return (
        PASS if lv["vs_batched"] >= 1.0 else MISS
    ), f"8 jobs {lv['x_real_time']}x vs batched {base}x real time on one file (ratio {lv['vs_batched']})"


PEAK_MARGIN_MIB = 150.0


def _memory_peak(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    s, r = _get(m, "peak_mib", "service"), _get(m, "peak_mib", "raw")
    if s is None or r is None:
        return NA, "not measured"
    return (
        PASS if s - r <= PEAK_MARGIN_MIB else MISS
    ), f"stt up {s:.0f} MiB vs faster-whisper alone {r:.0f} MiB ({s - r:+.0f} MiB)"


def _unary(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    """Judged on the per-call overhead (wall minus that call's model time) when measured: the difference
    of the two medians carries the model's call-to-call variation."""
    per_call = _get(m, "per_call_overhead_ms", "p50")
    diff = _get(m, "added_ms", "p50")
    added = per_call if per_call is not None else diff
    if added is None:
        return NA, "not measured"
    value = f"{added} ms added at p50 per call (p95 {_get(m, 'per_call_overhead_ms', 'p95')} ms); difference of medians {diff} ms"
    return (PASS if added <= 15.0 else MISS), value


def _accuracy(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    svc, raw = _get(m, "corpus_wer", "service"), _get(m, "corpus_wer", "raw")
    if svc is None or raw is None:
        return NA, "not measured"
    diff = svc - raw
    better = " (service better)" if diff < -0.5 else ""
    return (
        PASS if diff <= 0.5 else MISS
    ), f"service {svc}% vs faster-whisper {raw}% ({diff:+.2f} points){better}"


def _startup(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    med = _get(m, "service_seconds", "median")
    if med is None:
        return NA, "not measured"
    return (
        PASS if med <= 5.0 else MISS
    ), f"median {med} s (raw model load + warm-up {_get(m, 'raw_seconds', 'median')} s)"


MEMORY_NOISE_MIB = 20.0


def _memory(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    g = _get(m, "growth_mib", "service")
    if g is None:
        return NA, "not measured"
    n = m.get("requests")
    return (
        PASS if g <= MEMORY_NOISE_MIB else MISS
    ), f"{g:+.1f} MiB from request 20 to {n} (raw faster-whisper {_get(m, 'growth_mib', 'raw'):+.1f} MiB)"


def _latency(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    mean, p95 = _get(m, "final_word_latency", "mean"), _get(m, "final_word_latency", "p95")
    if mean is None or p95 is None:
        return NA, "not measured"
    ok = mean <= 1.0 and p95 <= 1.5
    return (PASS if ok else MISS), f"mean {mean} s, p95 {p95} s"


def _first_interim(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    v = m.get("first_interim_latency")
    if v is None:
        return NA, "no interim result"
    return (PASS if v <= 0.5 else MISS), f"{v} s"


def _stream_wer(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    s, o = _get(m, "wer", "streaming"), _get(m, "wer", "offline_recognize")
    if s is None or o is None:
        return NA, "not measured"
    late = _get(m, "wer", "streaming_utterance_end")
    more = "" if late is None else f"; finals at utterance ends {late}% ({late - o:+.2f} points)"
    return (PASS if s <= o + 1.0 else MISS), f"streaming {s}% vs offline {o}% ({s - o:+.2f} points){more}"


def _streams(m: dict[str, Any], _: dict[str, Any]) -> tuple[str, str]:
    levels = m.get("levels") or []
    good = [
        lv["streams"]
        for lv in levels
        if lv.get("completed") == lv["streams"]
        and not lv.get("errors")
        and (_get(lv, "final_word_latency", "p95") or 99) <= 1.5
        and (_get(lv, "final_word_latency", "mean") or 99) <= 1.0
    ]
    best = max(good, default=0)
    tried = max((lv["streams"] for lv in levels), default=0)
    value = f"p95 <= 1.5 s and mean <= 1.0 s up to {best} streams (tried up to {tried})"
    value += "; " + ", ".join(
        f"{lv['streams']}: mean {_get(lv, 'final_word_latency', 'mean')} s p95 "
        f"{_get(lv, 'final_word_latency', 'p95')} s"
        for lv in levels
    )
    failed = [lv["streams"] for lv in levels if lv.get("failed") or lv.get("errors") or lv.get("timed_out")]
    if failed:
        value += f"; streams failed or timed out at {', '.join(map(str, failed))} streams"
    if best >= 8:
        return PASS, value
    if failed and min(failed) < 8:
        return MISS, value
    if tried < 8:
        return NA, value + "; quick mode stops at 4"
    return MISS, value


GOALS = [
    Goal(
        "throughput",
        "throughput",
        "Batch: the stack (Jobs API) at least as fast as BatchedInferencePipeline, word times both sides, WER within 0.5",
        _throughput,
    ),
    Goal(
        "recognize_throughput",
        "throughput",
        "Batch: one long Recognize at least as fast as BatchedInferencePipeline",
        _recognize,
    ),
    Goal("cluster", "cluster", "Batch: the local cluster >= 1.2x BatchedInferencePipeline", _cluster),
    Goal(
        "concurrent_jobs",
        "concurrent_jobs",
        "Batch: 8 concurrent jobs >= 1.0x BatchedInferencePipeline",
        _concurrent_jobs,
    ),
    Goal("unary", "unary", "Unary Recognize adds at most 15 ms at p50 over in-process transcription", _unary),
    Goal("accuracy", "accuracy", "Service WER equal to faster-whisper's within 0.5 points", _accuracy),
    Goal("startup", "startup", "Transcriber start to SERVING <= 5 s (median of 3)", _startup),
    Goal(
        "memory",
        "memory",
        f"No RSS growth beyond noise ({MEMORY_NOISE_MIB:g} MiB) over sequential Recognize calls",
        _memory,
    ),
    Goal(
        "memory_peak",
        "memory",
        f"Peak RSS of `stt up` on the long file within {PEAK_MARGIN_MIB:g} MiB of faster-whisper alone",
        _memory_peak,
    ),
    Goal(
        "stream_latency", "streaming", "Streaming final-word latency mean <= 1.0 s and p95 <= 1.5 s", _latency
    ),
    Goal("first_interim", "streaming", "First interim result <= 0.5 s after speech starts", _first_interim),
    Goal("stream_wer", "streaming", "Streaming WER <= offline WER + 1 point (real speech)", _stream_wer),
    Goal(
        "streams",
        "concurrent_streams",
        "At least 8 concurrent real-time streams (real speech) with final-word p95 <= 1.5 s, mean <= 1.0 s",
        _streams,
    ),
]


def evaluate(results: dict[str, Any]) -> list[dict[str, str]]:
    measures = results.get("measures", {})
    out = []
    for g in GOALS:
        m = measures.get(g.measure) or {}
        if m.get("status") != "ok":
            status, value = (
                NA,
                f"measure {m.get('status', 'not run')}" + (f": {m['error']}" if m.get("error") else ""),
            )
        else:
            try:
                status, value = g.check(m, results)
            except Exception as exc:  # a malformed result must not break the report
                status, value = NA, f"could not evaluate: {exc!r}"
        out.append({"id": g.id, "measure": g.measure, "goal": g.text, "status": status, "value": value})
    return out
