"""Admission control for live streams: a new stream is admitted only while the transcribers can
serve one more in real time; past that it is refused (RESOURCE_EXHAUSTED, CAPACITY_EXHAUSTED, with
RetryInfo) so the latency of the admitted streams never runs away. No grpc here.

Live streams move in ticks: every stream's next hypothesis goes into a batched model call of its
transcriber (one per worker: a tick's live windows are shared out among the idle workers). A
stream stays real-time (final words within ~1 s) while a tick lasts at most `target_tick` seconds.
The cost of a live call is measured, per transcriber, from the live calls it served (each response
carries its call's live windows, seconds and the transcriber's workers; the gateway reports only
windows shaped as under load, greedy and without left context: capacity is what fits in a loaded
tick, and light-load windows, several times dearer, made the fit swing) and fitted as
`fixed + per_window * windows` (least squares over its recent calls); a transcriber serves the
streams that fit in `target_tick`, times its workers (the calls measured ran beside each other).
So the capacity follows the model, the hardware (a GPU replica measures cheaper) and the number
of replicas. While the recent calls all had the same size, the amortised cost (seconds / windows)
stands in for the marginal one (conservative). Until a transcriber has been measured it counts for
`initial` streams. `fixed` (STT_STREAM_CAPACITY) replaces the estimate by a fixed number per
transcriber.

The count is this gateway's: several gateways sharing the transcribers each see the whole capacity
(set `share`, e.g. 1 / the number of gateways, to split it).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from services.shared.domain import WindowResult
from services.shared.errors import QuotaExceeded

CAPACITY = Gauge(
    "stt_gateway_stream_capacity", "Live streams this gateway admits (estimated from model cost)"
)
REFUSED = Counter(
    "stt_gateway_streams_refused_total", "Live streams refused for lack of transcriber capacity"
)

MIN_CALLS = 8  # live calls a transcriber must have served before its cost is trusted
MAX_PER_TRANSCRIBER = 256
STALE_SECONDS = 600.0  # forget the cost of a transcriber not heard from in this long


RECENT_CALLS = 128


@dataclass
class _Cost:
    calls: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))
    seen: float = field(default_factory=time.monotonic)
    workers: int = 1  # calls the transcriber runs side by side: each holds its share of the streams

    def streams(self, target: float) -> float:
        """Windows one call can hold within `target` seconds, by the fitted cost."""
        n = len(self.calls)
        mb = sum(b for b, _ in self.calls) / n
        mt = sum(t for _, t in self.calls) / n
        var = sum((b - mb) ** 2 for b, _ in self.calls)
        amortised = sum(t / b for b, t in self.calls) / n
        if var < 1.0:
            return target / amortised
        slope = sum((b - mb) * (t - mt) for b, t in self.calls) / var
        slope = max(slope, 0.1 * amortised)  # noise must not make a window look free
        intercept = max(mt - slope * mb, 0.0)
        return (target - intercept) / slope


class StreamAdmission:
    def __init__(
        self,
        serving: Callable[[], list[str]],
        *,
        target_tick: float = 0.6,
        initial: int = 4,
        fixed: int = 0,
        share: float = 1.0,
        retry_after: float = 5.0,
    ) -> None:
        self._serving = serving  # replica ids (served_by) of the SERVING transcribers
        self.target_tick = target_tick
        self.initial = initial
        self.fixed = fixed
        self.share = share
        self.retry_after = retry_after
        self._costs: dict[str, _Cost] = {}
        self.active = 0

    def observe(self, result: WindowResult) -> None:
        """A live window came back: learn its transcriber's cost per window."""
        if result.batch_size < 1 or result.model_seconds <= 0 or not result.served_by:
            return
        cost = self._costs.setdefault(result.served_by, _Cost())
        # Every window of a call reports the same call: keep one sample per call.
        sample = (result.batch_size, result.model_seconds)
        if not cost.calls or cost.calls[-1] != sample:
            cost.calls.append(sample)
        cost.seen = time.monotonic()
        cost.workers = max(result.model_workers, 1)

    def per_transcriber(self, replica: str) -> int:
        if self.fixed > 0:
            return self.fixed
        cost = self._costs.get(replica)
        if cost is None or len(cost.calls) < MIN_CALLS or time.monotonic() - cost.seen > STALE_SECONDS:
            return self.initial
        streams = math.floor(cost.streams(self.target_tick) * cost.workers + 1e-6)
        return min(max(1, streams), MAX_PER_TRANSCRIBER)

    def capacity(self) -> int:
        replicas = self._serving()
        total = sum(self.per_transcriber(r) for r in replicas)
        cap = max(1, math.floor(total * self.share)) if replicas else 0
        CAPACITY.set(cap)
        return cap

    def admit(self) -> Ticket:
        """A ticket for one more live stream, or QuotaExceeded (CAPACITY_EXHAUSTED) with RetryInfo."""
        cap = self.capacity()
        if self.active >= cap:
            REFUSED.inc()
            raise QuotaExceeded(
                f"no capacity for another real-time stream: {self.active} streams are live and the "
                f"transcribers can serve {cap} in real time; retry later or add transcribers",
                reason="CAPACITY_EXHAUSTED",
                subject="gateway",
                quota="live_streams",
                retry_after_seconds=self.retry_after,
            )
        self.active += 1
        return Ticket(self)


class Ticket:
    def __init__(self, admission: StreamAdmission) -> None:
        self._admission: StreamAdmission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.active -= 1
            self._admission = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
