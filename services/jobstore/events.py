"""Wake-ups for waiting claims and change notices for job watchers.

In-process notification always; with Redis, notices also cross replicas over pub/sub. Redis only
speeds things up: waiters re-check SQL every `reconcile_seconds`, so a lost message (Redis
restarted or flushed) costs at most that delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from services.shared.backoff import Backoff

log = logging.getLogger("jobstore.events")


class Notifier:
    """Futures that resolve at the next notice for a key. Waiters `release` their future when they
    stop waiting, so keys nobody waits for any more (a finished job) leave nothing behind."""

    def __init__(self) -> None:
        self._futures: dict[str, tuple[asyncio.Future[None], int]] = {}

    def future(self, key: str) -> asyncio.Future[None]:
        entry = self._futures.get(key)
        if entry is None or entry[0].done():
            entry = (asyncio.get_running_loop().create_future(), 0)
        self._futures[key] = (entry[0], entry[1] + 1)
        return entry[0]

    def release(self, key: str, fut: asyncio.Future[None]) -> None:
        entry = self._futures.get(key)
        if entry is None or entry[0] is not fut:
            return  # already notified (and replaced)
        if entry[1] <= 1:
            del self._futures[key]
            fut.cancel()
        else:
            self._futures[key] = (fut, entry[1] - 1)

    def notify(self, key: str) -> None:
        entry = self._futures.pop(key, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(None)

    def __len__(self) -> int:
        return len(self._futures)


async def wait(fut: asyncio.Future[None], timeout: float) -> bool:
    """True if notified within timeout."""
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout=max(timeout, 0.0))
        return True
    except TimeoutError:
        return False


WAKE = "__wake__"
CLOSE_SECONDS = 3.0  # bound on each step of closing the redis client


class EventBus:
    """publish_job / publish_wake; job_future / wake_future to wait for them."""

    def __init__(self, redis_url: str | None = None, prefix: str = "stt") -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self._local = Notifier()
        self._redis: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    @property
    def _events(self) -> str:
        return f"{self.prefix}:jobs:events"

    @property
    def _wake(self) -> str:
        return f"{self.prefix}:jobs:wake"

    async def start(self) -> None:
        if not self.redis_url:
            return
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(
            self.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
        )
        self._listener = asyncio.create_task(self._listen(), name="redis-listener")

    async def close(self) -> None:
        # Each step is bounded: redis-py's asyncio client can deadlock closing a connection that a
        # cancelled reader still holds (seen over TLS: shutdown hung for minutes; redis-py #3941).
        self._closing = True
        if self._listener:
            self._listener.cancel()
            await asyncio.wait([self._listener], timeout=CLOSE_SECONDS)
        if self._redis is not None:
            try:
                await asyncio.wait_for(self._redis.aclose(), CLOSE_SECONDS)
            except Exception as exc:  # TimeoutError included: the process is leaving anyway
                log.warning("closing the redis client failed (%s)", exc)

    def job_future(self, job_id: str) -> asyncio.Future[None]:
        return self._local.future(job_id)

    def wake_future(self) -> asyncio.Future[None]:
        return self._local.future(WAKE)

    def release_job(self, job_id: str, fut: asyncio.Future[None]) -> None:
        self._local.release(job_id, fut)

    def release_wake(self, fut: asyncio.Future[None]) -> None:
        self._local.release(WAKE, fut)

    @property
    def waiting_keys(self) -> int:
        """Keys with a registered waiter (for leak tests)."""
        return len(self._local)

    async def publish_job(self, job_id: str) -> None:
        self._local.notify(job_id)
        await self._publish(self._events, job_id)

    async def publish_wake(self) -> None:
        self._local.notify(WAKE)
        await self._publish(self._wake, "1")

    async def _publish(self, channel: str, message: str) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.publish(channel, message)
        except Exception as exc:  # Redis down: SQL is the truth, reconcile covers it
            log.warning("redis publish failed (%s); watchers fall back to polling", exc)

    async def _listen(self) -> None:
        backoff = Backoff(maximum=5.0)
        while not self._closing:
            pubsub = None
            try:
                assert self._redis is not None
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._events, self._wake)
                self.connected.set()
                backoff.reset()
                log.info("subscribed to redis job events")
                while not self._closing:
                    # Short reads, not pubsub.listen(): redis-py can swallow the cancellation of a
                    # blocked read (seen over TLS), so the loop also checks _closing every second.
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    data = msg.get("data")
                    channel = msg.get("channel")
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    if channel == self._wake:
                        self._local.notify(WAKE)
                    elif isinstance(data, bytes):
                        self._local.notify(data.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                if self._closing:
                    return  # redis-py can turn the cancellation of a read into ConnectionError
                delay = backoff.next()
                log.warning("redis subscription lost (%s); retrying in %.1fs", exc, delay)
                # Anything may have changed while we were deaf: wake every waiter to re-check SQL.
                self._local.notify(WAKE)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), CLOSE_SECONDS)
