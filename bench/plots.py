"""PNG plots from a results dict (matplotlib, Agg backend). Each plot is skipped if its data is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    m = results.get("measures", {}).get(name)
    return m if m and m.get("status") == "ok" and not m.get("skipped") else None


def _bar_labels(ax: Any, bars: Any, fmt: str = "{:.1f}") -> None:
    for b in bars:
        ax.annotate(
            fmt.format(b.get_height()),
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def throughput(results: dict[str, Any], path: Path) -> bool:
    m = _ok(results, "throughput")
    if not m:
        return False
    labels = {
        "stack_job": "stack\n(Jobs API)",
        "stack_job_words": "stack jobs\n+words",
        "stack_recognize": "stack\n(Recognize)",
        "sequential": "faster-whisper\nsequential",
        "sequential_words": "sequential\n+word times",
        "batched": "Batched\nPipeline",
        "batched_words": "Batched\n+words",
    }
    xrt = dict(m["x_real_time"])
    c = _ok(results, "cluster")
    if c and c.get("cluster_job"):
        xrt["cluster"] = c["cluster_job"]["x_real_time"]
        labels["cluster"] = "cluster\n(processes)"
    keys = [k for k in labels if k in xrt]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue" if k.startswith(("stack", "cluster")) else "tab:gray" for k in keys]
    bars = ax.bar([labels[k] for k in keys], [xrt[k] for k in keys], color=colors)
    _bar_labels(ax, bars)
    ax.set_ylabel("x real time (higher is better)")
    ax.set_title(f"Batch throughput, {m['audio_seconds']:.0f} s file")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def concurrent_jobs(results: dict[str, Any], path: Path) -> bool:
    m = _ok(results, "concurrent_jobs")
    if not m:
        return False
    levels = m["levels"]
    n = [lv["jobs"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = a1.bar([str(x) for x in n], [lv["x_real_time"] for lv in levels], color="tab:blue", label="stack")
    _bar_labels(a1, bars)
    a1.axhline(
        m["baseline"]["sequential_x_real_time"], color="tab:gray", ls="--", label="faster-whisper sequential"
    )
    a1.axhline(m["baseline"]["batched_x_real_time"], color="k", ls=":", label="BatchedInferencePipeline")
    top = max([lv["x_real_time"] for lv in levels] + [m["baseline"]["batched_x_real_time"]])
    a1.set_ylim(0, top * 1.4)
    a1.set_xlabel("jobs at once")
    a1.set_ylabel("total x real time")
    a1.legend(fontsize=8, loc="upper left")
    a1.set_title(f"Concurrent jobs ({m['audio_seconds_per_job']:.0f} s each)")
    a2.plot(n, [lv["wait"].get("p50", 0) for lv in levels], "o-", label="wait p50")
    a2.plot(n, [lv["wait"].get("max", 0) for lv in levels], "o--", label="wait max")
    a2.plot(n, [lv["turnaround"].get("p50", 0) for lv in levels], "s-", label="turnaround p50")
    a2.plot(n, [lv["turnaround"].get("max", 0) for lv in levels], "s--", label="turnaround max")
    a2.set_xscale("log", base=2)
    a2.set_xticks(n, [str(x) for x in n])
    a2.set_xlabel("jobs at once")
    a2.set_ylabel("seconds")
    a2.legend(fontsize=8)
    a2.set_title("Per-job wait and turnaround")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def unary(results: dict[str, Any], path: Path) -> bool:
    m = _ok(results, "unary")
    if not m or not m.get("samples"):
        return False
    svc = sorted(1000 * x for x in m["samples"]["service"])
    eng = sorted(1000 * x for x in m["samples"]["in_process"])
    overhead = m["samples"].get("overhead_ms") or []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for xs, label, color in (
        (eng, f"in-process Engine (p50 {1000 * m['in_process_seconds']['p50']:.0f} ms)", "tab:gray"),
        (svc, f"Recognize via gRPC (p50 {1000 * m['service_seconds']['p50']:.0f} ms)", "tab:blue"),
    ):
        a1.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, color=color)
    a1.set_xlabel("ms per call")
    a1.set_ylabel("fraction of calls")
    a1.set_title(f"Latency CDF, {m['clip_seconds']:.0f} s clip, {m['calls']} calls each")
    a1.legend(fontsize=8, loc="lower right")
    if overhead:
        a2.hist(overhead, bins=20, color="tab:blue")
        a2.axvline(15, color="tab:red", ls=":", label="goal 15 ms")
        p50 = (m.get("per_call_overhead_ms") or {}).get("p50")
        a2.set_title(f"Added per call (wall - model call): p50 {p50} ms")
        a2.set_xlabel("ms")
        a2.set_ylabel("calls")
        a2.legend(fontsize=8)
    else:
        a2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def streams(results: dict[str, Any], path: Path) -> bool:
    m = _ok(results, "concurrent_streams")
    if not m:
        return False
    levels = [lv for lv in m["levels"] if lv["final_word_latency"].get("n")]
    if not levels:
        return False
    n = [lv["streams"] for lv in levels]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, style in (("p50", "o-"), ("p95", "s-"), ("mean", "^--")):
        ax.plot(n, [lv["final_word_latency"][key] for lv in levels], style, label=f"final-word latency {key}")
    for lv in levels:
        if lv.get("failed"):
            ax.annotate(
                f"{lv['failed']}/{lv['streams']} failed",
                (lv["streams"], lv["final_word_latency"]["p95"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
                color="tab:red",
            )
    ax.axhline(1.5, color="tab:red", ls=":", label="goal p95 1.5 s")
    ax.axhline(1.0, color="tab:orange", ls=":", label="goal mean 1.0 s")
    ws = _ok(results, "whisper_streaming")
    if ws and ws.get("final_word_latency", {}).get("p95") is not None:
        ax.plot([1], [ws["final_word_latency"]["p95"]], "kx", ms=10, label="whisper_streaming p95 (1 stream)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("seconds")
    ax.set_title("Streaming latency vs concurrent streams")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def batching(results: dict[str, Any], path: Path) -> bool:
    m = _ok(results, "batching")
    if not m:
        return False
    u, b = m["max_batch_1"], m["max_batch_8"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    bars = a1.bar(
        ["max_batch_size=1", "max_batch_size=8"],
        [u["audio_seconds_per_second"], b["audio_seconds_per_second"]],
        color=["tab:gray", "tab:blue"],
    )
    _bar_labels(a1, bars)
    a1.set_ylabel("audio seconds per second")
    a1.set_title(f"{m['callers']} concurrent callers")
    bars = a2.bar(
        ["max_batch_size=1", "max_batch_size=8"],
        [u["windows_per_second"], b["windows_per_second"]],
        color=["tab:gray", "tab:blue"],
    )
    _bar_labels(a2, bars, "{:.2f}")
    a2.set_ylabel("windows per second")
    a2.set_title(f"ratio {m['ratio_batched_vs_unbatched']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLOTS = {
    "throughput": throughput,
    "concurrent_jobs": concurrent_jobs,
    "unary": unary,
    "streams": streams,
    "batching": batching,
}


def make_all(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """Write every plot that has data; returns {name: file name (relative to out_dir)}."""
    out: dict[str, str] = {}
    for name, fn in PLOTS.items():
        path = out_dir / f"{stem}-{name}.png"
        try:
            if fn(results, path):
                out[name] = path.name
        except Exception as exc:  # one broken plot must not lose the others
            print(f"[bench] plot {name} failed: {exc!r}", flush=True)
            plt.close("all")
    return out
