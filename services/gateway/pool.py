"""Client side of the transcriber pool: readiness-aware, least-loaded, per-call balancing.

`STT_TRANSCRIBER_ADDRESS` is a comma-separated list of entries:
- `host:port` with an IP or a DNS name; names are re-resolved every few seconds and every address
  becomes an endpoint (a Kubernetes headless Service gives one per pod), so new replicas get work
  within seconds and removed ones stop getting it;
- `file:/path` a file listing one `host:port` per line, re-read on the same schedule.
Each endpoint's grpc.health.v1 status is watched: windows only go to SERVING replicas (never to
one still loading its model), to the one with the fewest calls in flight. A call that fails with
UNAVAILABLE moves to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.requests import ModelCaps
from services.shared import convert, tracing
from services.shared.backoff import Backoff
from services.shared.channel import InternalCredentials, internal_channel
from services.shared.context import REQUEST_ID_HEADER, request_id_var
from services.shared.domain import SAMPLE_RATE, DecodeOptions, WindowResult, WorkClass
from services.shared.errors import Unavailable
from services.shared.internal.v1 import transcriber_pb2, transcriber_pb2_grpc
from services.shared.pcm import to_pcm16
from services.shared.status import error_from_rpc

log = logging.getLogger("gateway.pool")

TRANSCRIBER_SERVICE = "stt.internal.v1.Transcriber"
TRANSCRIBE_METHOD = f"{TRANSCRIBER_SERVICE}/Transcribe"
SERVING = health_pb2.HealthCheckResponse.SERVING
MAX_WINDOW_BYTES = 30 * 16000 * 2 + 64 * 1024


@dataclass
class Endpoint:
    address: str
    channel: grpc.aio.Channel
    stub: transcriber_pb2_grpc.TranscriberStub
    serving: bool = False
    outstanding: int = 0
    cooldown_until: float = 0.0
    watch: asyncio.Task[None] | None = None
    info: transcriber_pb2.TranscriberInfo | None = None
    # The name the replica's certificate carries (the DNS name it was found under), for TLS.
    tls_name: str | None = None

    def available(self, now: float) -> bool:
        return self.serving and now >= self.cooldown_until


@dataclass
class PoolStats:
    served_by: Counter[str] = field(default_factory=Counter)


class TranscriberPool:
    def __init__(
        self,
        spec: str,
        *,
        refresh_seconds: float = 5.0,
        call_timeout: float = 120.0,
        ready_wait: float = 5.0,
        creds: InternalCredentials | None = None,
    ) -> None:
        self.spec = spec
        self.creds = creds or InternalCredentials()
        self._closing: set[asyncio.Task[None]] = set()
        self.ready_wait = ready_wait
        self.refresh_seconds = refresh_seconds
        self.call_timeout = call_timeout
        self.endpoints: dict[str, Endpoint] = {}
        self.stats = PoolStats()
        self._change: asyncio.Future[None] | None = None
        self._rr = itertools.count()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="pool-refresh")

    async def close(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for address in list(self.endpoints):
            await self._remove(address)

    def changed(self) -> asyncio.Future[None]:
        """A future that resolves at the next change of any endpoint's readiness."""
        if self._change is None or self._change.done():
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    def _notify(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)

    def serving_replicas(self) -> list[str]:
        """Replica ids (host:pid, as results name them) of the SERVING transcribers."""
        return [e.info.served_by if e.info else e.address for e in self.endpoints.values() if e.serving]

    @property
    def serving_count(self) -> int:
        return sum(1 for e in self.endpoints.values() if e.serving)

    # -- membership ---------------------------------------------------------------------------

    async def _resolve(self) -> dict[str, str | None]:
        """address -> the DNS name it was found under (None: the address is its own name)."""
        out: dict[str, str | None] = {}
        for entry in (e.strip() for e in self.spec.split(",")):
            if not entry:
                continue
            if entry.startswith("file:"):
                out.update(dict.fromkeys(_read_address_file(entry[5:])))
                continue
            out.update(await _resolve_entry(entry))
        return out

    async def _refresh(self) -> None:
        try:
            wanted = await self._resolve()
        except Exception as exc:  # keep what we have if DNS hiccups
            log.warning("could not resolve transcribers %r: %s", self.spec, exc)
            return
        for address in set(wanted) - set(self.endpoints):
            self._add(address, wanted[address])
        for address in set(self.endpoints) - set(wanted):
            await self._remove(address)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self._refresh()

    def _channel(self, address: str, tls_name: str | None) -> grpc.aio.Channel:
        return internal_channel(
            address,
            [TRANSCRIBER_SERVICE],
            load_balancing=None,
            max_message_bytes=MAX_WINDOW_BYTES,
            max_attempts=1,
            creds=self.creds,
            server_name=tls_name,
        )

    def _add(self, address: str, tls_name: str | None = None) -> None:
        channel = self._channel(address, tls_name)
        ep = Endpoint(address, channel, transcriber_pb2_grpc.TranscriberStub(channel), tls_name=tls_name)
        ep.watch = asyncio.create_task(self._watch(ep), name=f"watch-{address}")
        self.endpoints[address] = ep
        log.info("transcriber endpoint added: %s", address)

    def rotate_if_changed(self) -> bool:
        """New channels (with the renewed client certificate) once its files change; calls in flight
        on the old channels finish first."""
        if self.creds.tls is None or not self.creds.tls.changed():
            return False
        for ep in self.endpoints.values():
            old = ep.channel
            ep.channel = self._channel(ep.address, ep.tls_name)
            ep.stub = transcriber_pb2_grpc.TranscriberStub(ep.channel)
            if ep.watch:
                ep.watch.cancel()
            ep.watch = asyncio.create_task(self._watch(ep), name=f"watch-{ep.address}")
            task = asyncio.create_task(old.close(grace=self.call_timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        log.info("client certificate changed: reconnected to %d transcribers", len(self.endpoints))
        return True

    async def _remove(self, address: str) -> None:
        ep = self.endpoints.pop(address, None)
        if ep is None:
            return
        self._notify()
        if ep.watch:
            ep.watch.cancel()
            await asyncio.gather(ep.watch, return_exceptions=True)
        await ep.channel.close(grace=None)
        log.info("transcriber endpoint removed: %s", address)

    async def _watch(self, ep: Endpoint) -> None:
        """Follow the endpoint's health; reconnect with backoff when the stream breaks."""
        stub = health_pb2_grpc.HealthStub(ep.channel)
        backoff = Backoff(maximum=2.0)
        while True:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=TRANSCRIBER_SERVICE))
                async for resp in call:
                    if resp.status == SERVING and ep.info is None:
                        ep.info = await self._info(ep)
                    self._set_serving(ep, resp.status == SERVING)
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                pass
            self._set_serving(ep, False)
            await asyncio.sleep(backoff.next())

    async def _info(self, ep: Endpoint) -> transcriber_pb2.TranscriberInfo | None:
        try:
            return await ep.stub.GetInfo(
                transcriber_pb2.GetInfoRequest(), timeout=5.0, metadata=self.creds.metadata
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("transcriber %s: GetInfo failed: %s", ep.address, exc.details())
            return None

    def caps(self) -> ModelCaps | None:
        """The model of the serving transcribers (None until one has answered)."""
        for ep in self.endpoints.values():
            if ep.serving and ep.info is not None:
                return ModelCaps(
                    name=ep.info.model,
                    multilingual=ep.info.multilingual,
                    languages=frozenset(ep.info.language_codes),
                )
        return None

    def batch_capacity(self) -> int:
        """Windows the serving transcribers take in one model call each, together (8 per replica
        until they have said): how many planned windows to send at once so calls stay full."""
        serving = [e for e in self.endpoints.values() if e.serving]
        return max(
            1, sum((e.info.max_batch_size if e.info and e.info.max_batch_size else 8) for e in serving)
        )

    def _set_serving(self, ep: Endpoint, serving: bool) -> None:
        if ep.serving != serving:
            log.info("transcriber %s is %s", ep.address, "SERVING" if serving else "NOT_SERVING")
        ep.serving = serving
        if serving:
            ep.cooldown_until = 0.0
        self._notify()

    # -- calls --------------------------------------------------------------------------------

    def _pick(self, exclude: set[str]) -> Endpoint | None:
        now = time.monotonic()
        candidates = [e for e in self.endpoints.values() if e.available(now) and e.address not in exclude]
        if not candidates:
            candidates = [e for e in self.endpoints.values() if e.available(now)]
        if not candidates:
            return None
        low = min(e.outstanding for e in candidates)
        best = [e for e in candidates if e.outstanding == low]
        return best[next(self._rr) % len(best)]

    async def _wait_for_endpoint(self, exclude: set[str], deadline: float) -> Endpoint:
        while True:
            ep = self._pick(exclude)
            if ep is not None:
                return ep
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"no transcriber is ready ({len(self.endpoints)} known, {self.serving_count} serving); "
                    "retry shortly",
                    reason="NO_TRANSCRIBER",
                    retry_after_seconds=1.0,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.changed()), timeout=min(remaining, 0.25))

    async def transcribe(
        self,
        audio: np.ndarray,
        options: DecodeOptions,
        work_class: WorkClass,
        *,
        timeout: float | None = None,
    ) -> WindowResult:
        request = transcriber_pb2.TranscribeRequest(
            pcm=to_pcm16(audio),
            options=convert.options_to_proto(options),
            work_class=convert.work_class_to_proto(work_class),
        )
        metadata = ((REQUEST_ID_HEADER, request_id_var.get() or "-"), *self.creds.metadata)
        seconds = round(audio.shape[0] / SAMPLE_RATE, 3)
        del audio  # the request has the samples: a 30 s window's float32 copy is not held for the call
        tried: set[str] = set()
        attempts = max(3, len(self.endpoints) + 1)
        last: grpc.aio.AioRpcError | None = None
        for _ in range(attempts):
            ep = await self._wait_for_endpoint(tried, time.monotonic() + self.ready_wait)
            tried.add(ep.address)
            ep.outstanding += 1
            try:
                with tracing.span(
                    TRANSCRIBE_METHOD,
                    {
                        "server.address": ep.address,
                        "stt.work_class": work_class.name,
                        "stt.audio_seconds": seconds,
                    },
                    kind=tracing.CLIENT,
                    child_only=True,
                ):
                    resp = await ep.stub.Transcribe(
                        request, timeout=timeout or self.call_timeout, metadata=tracing.inject(metadata)
                    )
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    ep.cooldown_until = time.monotonic() + 1.0
                    continue
                raise error_from_rpc(exc, prefix="transcriber: ") from None
            finally:
                ep.outstanding -= 1
            result = convert.window_result_from_proto(resp)
            self.stats.served_by[result.served_by] += 1
            return result
        if last is not None:  # keep the transcriber's reason (e.g. MODEL_ERROR)
            raise error_from_rpc(last, prefix=f"transcriber (after {attempts} attempts): ") from None
        raise Unavailable(
            f"transcribers unavailable after {attempts} attempts",
            reason="TRANSCRIBER_UNAVAILABLE",
            retry_after_seconds=1.0,
        )


def _read_address_file(path: str) -> set[str]:
    try:
        with open(path) as fh:
            return {ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")}
    except FileNotFoundError:
        return set()


async def _resolve_entry(entry: str) -> dict[str, str | None]:
    host, _, port = entry.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"transcriber address {entry!r} is not host:port")
    try:
        ipaddress.ip_address(host)
        return {entry: None}
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    ips = {str(info[4][0]) for info in infos}
    if all(ipaddress.ip_address(ip).is_loopback for ip in ips):
        return {entry: None}  # localhost: one server, whatever families it resolves to
    # Each pod is dialled by IP; its certificate names the Service, so TLS checks that name.
    return {(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"): host for ip in ips}
