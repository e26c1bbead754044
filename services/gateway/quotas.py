"""Per-tenant quotas and gateway-wide admission control, for every door (no grpc here).

Quotas (docs/quotas.md), each 0 for "no limit", with defaults for every tenant (STT_QUOTA_*) and
per-tenant overrides (STT_TENANT_QUOTAS, JSON):
- concurrent_streams, concurrent_recognize: calls of the tenant in progress on this gateway;
- requests_per_second: the tenant's call rate on this gateway (a token bucket, one second of burst);
- queued_jobs (QUEUED or RUNNING) and stored_audio_bytes: counted by the jobstore, so across every
  gateway;
- max_priority: the highest job priority the tenant may ask for.
Over a quota: RESOURCE_EXHAUSTED with QuotaFailure (subject "tenant:<name>") and RetryInfo.

Gateway-wide, `ByteBudget` bounds the request bytes held in memory at once (Recognize bodies and
their decoding): a call waits for room, then is refused with SERVER_BUSY.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from prometheus_client import Counter, Gauge

from services.gateway.auth import Caller
from services.shared.errors import QuotaExceeded
from services.shared.metrics import bounded_tenant
from stt.v1 import common_pb2, jobs_pb2

QUOTA_NAMES = (
    "concurrent_streams",
    "concurrent_recognize",
    "queued_jobs",
    "stored_audio_bytes",
    "requests_per_second",
)
PRIORITIES = {
    "low": jobs_pb2.PRIORITY_LOW,
    "normal": jobs_pb2.PRIORITY_NORMAL,
    "high": jobs_pb2.PRIORITY_HIGH,
}

# Tenants are the configured ones (API keys), so the label stays bounded.
QUOTA_USED = Gauge("stt_quota_used", "Use of a per-tenant quota on this gateway", ["tenant", "quota"])
QUOTA_REFUSED = Counter("stt_quota_refused_total", "Calls refused by a quota", ["tenant", "quota"])
INFLIGHT_BYTES = Gauge("stt_gateway_inflight_bytes", "Request bytes held in memory (Recognize)")
INFLIGHT_REFUSED = Counter("stt_gateway_inflight_refused_total", "Calls refused: in-flight bytes full")


@dataclass(frozen=True)
class TenantQuota:
    concurrent_streams: int = 0
    concurrent_recognize: int = 0
    queued_jobs: int = 0
    stored_audio_bytes: int = 0
    requests_per_second: float = 0.0
    max_priority: int = jobs_pb2.PRIORITY_HIGH

    def limit(self, name: str) -> float:
        return float(getattr(self, name))


def _override(base: TenantQuota, raw: Mapping[str, Any], where: str) -> TenantQuota:
    known = {f.name for f in fields(TenantQuota)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"{where}: unknown quota {key!r}; known: {', '.join(sorted(known))}")
        if key == "max_priority":
            if str(value).lower() not in PRIORITIES:
                raise ValueError(f"{where}: max_priority must be low, normal or high")
            changes[key] = PRIORITIES[str(value).lower()]
        else:
            number = float(value)
            if number < 0 or number != number:
                raise ValueError(f"{where}: {key} must be a number >= 0 (0: no limit)")
            changes[key] = number if key == "requests_per_second" else int(number)
    return replace(base, **changes)


def parse_tenant_quotas(raw: str, default: TenantQuota) -> dict[str, TenantQuota]:
    """STT_TENANT_QUOTAS: {"tenant": {"concurrent_streams": 2, "max_priority": "normal"}, ...};
    fields not given keep the defaults."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"STT_TENANT_QUOTAS is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError('STT_TENANT_QUOTAS must map tenants to objects: {"acme": {"queued_jobs": 10}}')
    return {t: _override(default, v, f"STT_TENANT_QUOTAS[{t!r}]") for t, v in data.items()}


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def recent_rate(self) -> float:
        return max(0.0, self.capacity - self.tokens)


class Quotas:
    def __init__(self, default: TenantQuota, tenants: dict[str, TenantQuota] | None = None) -> None:
        self.default = default
        self.tenants = tenants or {}
        self.in_use: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, _Bucket] = {}

    def of(self, tenant: str) -> TenantQuota:
        return self.tenants.get(tenant, self.default)

    def _refuse(
        self, caller: Caller, quota: str, message: str, *, reason: str, retry: float
    ) -> QuotaExceeded:
        QUOTA_REFUSED.labels(bounded_tenant(caller.tenant), quota).inc()
        return QuotaExceeded(
            message,
            reason=reason,
            subject=f"tenant:{caller.tenant}",
            quota=quota,
            retry_after_seconds=retry,
            metadata={"quota": quota, "limit": f"{self.of(caller.tenant).limit(quota):g}"},
        )

    def admit(self, caller: Caller) -> None:
        """Count one call against the tenant's request rate (RATE_LIMITED when over)."""
        rate = self.of(caller.tenant).requests_per_second
        if not rate:
            return
        bucket = self.buckets.get(caller.tenant)
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[caller.tenant] = _Bucket(rate)
        wait = bucket.take()
        if wait:
            raise self._refuse(
                caller,
                "requests_per_second",
                f"tenant {caller.tenant} is over its rate of {rate:g} requests per second",
                reason="RATE_LIMITED",
                retry=round(wait, 3),
            )

    @contextlib.asynccontextmanager
    async def slot(self, caller: Caller, quota: str) -> AsyncIterator[None]:
        """Hold one of the tenant's `quota` (concurrent_streams or concurrent_recognize) while the
        block runs; refused at once when all are in use."""
        limit = int(self.of(caller.tenant).limit(quota))
        key = (caller.tenant, quota)
        used = self.in_use.get(key, 0)
        if limit and used >= limit:
            what = "live streams" if quota == "concurrent_streams" else "Recognize calls"
            raise self._refuse(
                caller,
                quota,
                f"tenant {caller.tenant} already has {used} {what} in progress; its quota is {limit}",
                reason="QUOTA_EXCEEDED",
                retry=1.0,
            )
        self.in_use[key] = used + 1
        QUOTA_USED.labels(bounded_tenant(caller.tenant), quota).set(used + 1)
        try:
            yield
        finally:
            left = self.in_use[key] - 1
            if left:
                self.in_use[key] = left
            else:
                del self.in_use[key]
            QUOTA_USED.labels(bounded_tenant(caller.tenant), quota).set(left)

    def check_priority(self, caller: Caller, priority: int, field: str = "metadata.priority") -> None:
        top = self.of(caller.tenant).max_priority
        if priority > top:
            name = jobs_pb2.Priority.Name(top).removeprefix("PRIORITY_")  # type: ignore[arg-type]
            err = self._refuse(
                caller,
                "max_priority",
                f"tenant {caller.tenant} may submit jobs up to priority {name}",
                reason="PRIORITY_NOT_ALLOWED",
                retry=0.0,
            )
            err.retry_after_seconds = None
            err.field = field
            err.metadata = {"max_priority": name}
            raise err

    def check_jobs(self, caller: Caller, queued: int, stored: int) -> None:
        """The jobstore's counts against the tenant's job quotas (before an upload is read)."""
        q = self.of(caller.tenant)
        if q.queued_jobs and queued >= q.queued_jobs:
            raise self._refuse(
                caller,
                "queued_jobs",
                f"tenant {caller.tenant} has {queued} jobs queued or running; its quota is {q.queued_jobs}",
                reason="QUOTA_EXCEEDED",
                retry=30.0,
            )
        if q.stored_audio_bytes and stored >= q.stored_audio_bytes:
            raise self._refuse(
                caller,
                "stored_audio_bytes",
                f"tenant {caller.tenant} stores {stored} bytes of audio; its quota is {q.stored_audio_bytes}",
                reason="QUOTA_EXCEEDED",
                retry=60.0,
            )

    def usage(self, tenant: str, *, queued: float = 0, stored: float = 0) -> list[common_pb2.QuotaUsage]:
        q = self.of(tenant)
        bucket = self.buckets.get(tenant)
        used = {
            "concurrent_streams": self.in_use.get((tenant, "concurrent_streams"), 0),
            "concurrent_recognize": self.in_use.get((tenant, "concurrent_recognize"), 0),
            "queued_jobs": queued,
            "stored_audio_bytes": stored,
            "requests_per_second": bucket.recent_rate() if bucket else 0.0,
        }
        return [common_pb2.QuotaUsage(name=n, limit=q.limit(n), used=float(used[n])) for n in QUOTA_NAMES]

    def describe(self) -> dict[str, Any]:
        return {"default": asdict(self.default), **{t: asdict(q) for t, q in self.tenants.items()}}


class Reservation:
    """Bytes held against a ByteBudget; resize as the real need becomes known, release at the end."""

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def resize(self, size: int) -> None:
        """Take or give back bytes without waiting (a call already admitted may go over)."""
        self.budget._add(size - self.size)
        self.size = size

    def release(self) -> None:
        self.resize(0)


# A reservation a door made for the current call before its body was read (see server.py).
inflight_var: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("inflight", default=None)


class ByteBudget:
    """Bytes of request data the gateway holds at once (0: no limit). A call that does not fit
    waits for room up to `wait` seconds, then is refused (SERVER_BUSY, RetryInfo). A call larger
    than the whole budget is admitted when nothing else holds bytes."""

    def __init__(self, limit: int, wait: float = 10.0) -> None:
        self.limit = limit
        self.wait = wait
        self.used = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _fits(self, size: int) -> bool:
        return not self.limit or self.used + size <= self.limit or self.used == 0

    def _add(self, delta: int) -> None:
        self.used += delta
        INFLIGHT_BYTES.set(self.used)
        if delta < 0 and self._cond is not None:
            cond = self._cond

            async def wake() -> None:
                async with cond:
                    cond.notify_all()

            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(wake())

    async def reserve(self, size: int) -> Reservation:
        if not self._fits(size):
            cond = self._condition()
            try:
                async with cond, asyncio.timeout(self.wait):  # (not wait_for: see SpeechAPI.stream)
                    await cond.wait_for(lambda: self._fits(size))
            except TimeoutError:
                INFLIGHT_REFUSED.inc()
                raise QuotaExceeded(
                    f"the server holds {self.used} bytes of requests in memory (limit {self.limit}); "
                    "retry shortly",
                    reason="SERVER_BUSY",
                    retry_after_seconds=1.0,
                    metadata={"limit_bytes": str(self.limit)},
                ) from None
        self._add(size)
        return Reservation(self, size)
