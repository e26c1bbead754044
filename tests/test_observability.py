"""Operations: the metrics table in docs/operations.md against what the services export, the alert
rules under promtool, the dashboard and rules against the metrics, and traces across real processes
collected by an OTLP receiver (services/otlp.py), also when a job changes gateways."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import services.gateway.server
import services.jobstore.server
import services.transcriber.server  # noqa: F401  (every service's metrics registered)
from services.otlp import RunningReceiver, SpanRecord, by_trace, start_receiver
from stt.client import AsyncClient
from stt.streaming import PcmAudio, pcm_chunks
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.procs import ROOT, ServiceProcess, free_port
from tests.support.speech import by_name, load_16k

DOCS = ROOT / "docs" / "operations.md"
MONITORING = ROOT / "deploy" / "k8s" / "components" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
DASHBOARD = MONITORING / "dashboards" / "stt-overview.json"
PROMTOOL_TESTS = ROOT / "tests" / "data" / "promtool" / "alerts.test.yaml"
SERVICES = ("gateway", "transcriber", "jobstore")
# Label names that would make a series per request, job or caller. (`tenant` is bounded: its values
# are the tenants of STT_API_KEYS and "other", through services.shared.metrics.bounded_tenant.)
UNBOUNDED_LABELS = {"job_id", "request_id", "trace_id", "key_id", "peer", "worker_id", "filename"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass
class Documented:
    name: str
    type: str
    labels: tuple[str, ...]
    services: tuple[str, ...]


def documented() -> dict[str, Documented]:
    """The metrics table of docs/operations.md."""
    text = DOCS.read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`stt_"):
            continue
        name = cells[0].strip("`")
        labels = tuple(sorted(x.strip().strip("`") for x in cells[2].split(",") if x.strip()))
        services = SERVICES if cells[3] == "all" else tuple(s.strip() for s in cells[3].split(","))
        out[name] = Documented(name, cells[1], labels, services)
    return out


def exported(text: str) -> dict[str, str]:
    """Metric name as exposed (counters with _total) -> type, from a /metrics text."""
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = family.type
    return {k: v for k, v in out.items() if k.startswith("stt_")}


def label_names(name: str) -> tuple[str, ...]:
    collector = REGISTRY._names_to_collectors[name]  # type: ignore[attr-defined]
    return tuple(sorted(getattr(collector, "_labelnames", ())))


def referenced(expr: str) -> set[str]:
    """Metric names in a PromQL expression (stt_* only), with histogram suffixes removed."""
    names = set()
    for m in re.findall(r"\bstt_[a-z0-9_]+", expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if m.endswith(suffix) and not m.endswith("_total"):
                m = m[: -len(suffix)]
                break
        names.add(m)
    return names


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]


def recording_rules() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def used_metrics() -> set[str]:
    """Every stt_* metric the dashboard and the rules read (histograms by their base name)."""
    return set().union(*(referenced(e) for e in [*dashboard_exprs(), *rule_exprs()]))


# -- static: docs, dashboard and rules against the code --------------------------------------------


def test_the_metrics_table_is_what_the_services_export() -> None:
    """Every stt_* metric the services register is in the table, with its type and labels, and
    nothing in the table is missing from the exposition."""
    table = documented()
    assert len(table) >= 25
    exposed = exported(generate_latest(REGISTRY).decode())
    assert sorted(set(exposed) - set(table)) == [], "exported but not documented in docs/operations.md"
    assert sorted(set(table) - set(exposed)) == [], "documented but not exported"
    for name, doc in table.items():
        assert exposed[name] == doc.type, f"{name}: documented as {doc.type}, exported as {exposed[name]}"
        assert label_names(name) == doc.labels, f"{name}: labels {label_names(name)} != {doc.labels}"
        assert not set(doc.labels) & UNBOUNDED_LABELS, f"{name}: unbounded label"


def test_dashboard_and_rules_use_only_documented_metrics_and_recording_rules() -> None:
    table = documented()
    used = used_metrics()
    assert {"stt_gateway_transcribers", "stt_jobs_oldest_wait_seconds", "stt_rpc_total"} <= used
    assert sorted(used - set(table)) == []
    for expr in [*dashboard_exprs(), *rule_exprs()]:
        for rule in re.findall(r"\bstt:[a-z0-9_:]+", expr):
            assert rule in recording_rules(), f"{rule} is not a recording rule"


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "stt-overview" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for slo in ("availability", "final words within 2 s", "recognize", "jobs completed within"):
        assert slo in titles, f"no SLO panel for {slo}"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in t["expr"] or "stt:" in t["expr"], (p["title"], t["expr"])


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus: scripts/install-system-deps.sh)")
    return path


@pytest.fixture
def rules_dir() -> Iterator[Path]:
    """The PrometheusRule's groups as a plain rules file, next to the promtool unit tests."""
    tmp = Path(tempfile.mkdtemp(prefix="stt-rules-"))
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    shutil.copy(PROMTOOL_TESTS, tmp / PROMTOOL_TESTS.name)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_rules_pass_promtool_check(rules_dir: Path) -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(rules_dir / "rules.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in proc.stdout


def test_alerts_pass_their_promtool_unit_tests(rules_dir: Path) -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", PROMTOOL_TESTS.name],
        capture_output=True,
        text=True,
        cwd=rules_dir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", PROMTOOL_TESTS.read_text()))
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


def test_promtool_unit_tests_catch_a_broken_rule(rules_dir: Path) -> None:
    """The unit tests fail when the error ratio counts the callers' mistakes as server errors."""
    rules = (rules_dir / "rules.yaml").read_text()
    (rules_dir / "rules.yaml").write_text(rules.replace("UNKNOWN|INTERNAL|UNAVAILABLE", ".+|UNKNOWN"))
    proc = subprocess.run(
        [_promtool(), "test", "rules", PROMTOOL_TESTS.name], capture_output=True, text=True, cwd=rules_dir
    )
    assert proc.returncode != 0 and "STTHighErrorRatio" in proc.stdout + proc.stderr


# -- system: real processes, their /metrics, their traces ----------------------------------------------


def scrape(p: ServiceProcess) -> str:
    assert p.metrics_url
    with urllib.request.urlopen(p.metrics_url, timeout=10) as resp:
        return resp.read().decode()


def _trace_env(receiver: RunningReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "STT_LOG_FORMAT": "json",
    }


@dataclass
class Deployment:
    receiver: RunningReceiver
    transcriber: ServiceProcess
    jobstore: ServiceProcess
    gateway: ServiceProcess
    data_dir: str


async def _jobstore(receiver: RunningReceiver, data_dir: str) -> ServiceProcess:
    return await ServiceProcess(
        "jobstore",
        env={
            **_trace_env(receiver),
            "STT_DATA_DIR": data_dir,
            "STT_METRICS_PORT": str(free_port()),
            "STT_REAP_INTERVAL_SECONDS": "0.3",
            "STT_RECONCILE_SECONDS": "0.5",
        },
    ).start()


async def _gateway(
    receiver: RunningReceiver, transcriber: ServiceProcess, jobstore: ServiceProcess, worker: str, **env: str
) -> ServiceProcess:
    return await ServiceProcess(
        "gateway",
        env={
            **_trace_env(receiver),
            "STT_TRANSCRIBER_ADDRESS": transcriber.address,
            "STT_JOBSTORE_ADDRESS": jobstore.address,
            "STT_WORKER_ID": worker,
            "STT_METRICS_PORT": str(free_port()),
            "STT_JOB_LEASE_SECONDS": "3",
            "STT_JOB_HEARTBEAT_SECONDS": "0.5",
            **env,
        },
    ).start()


@pytest.fixture(scope="module")
async def deployment() -> AsyncIterator[Deployment]:
    receiver = await start_receiver()
    data_dir = tempfile.mkdtemp(prefix="stt-observability-")
    procs: list[ServiceProcess] = []
    try:
        transcriber = await ServiceProcess(
            "transcriber",
            env={**_trace_env(receiver), "STT_CPU_THREADS": "1", "STT_METRICS_PORT": str(free_port())},
        ).start()
        procs.append(transcriber)
        jobstore = await _jobstore(receiver, data_dir)
        procs.append(jobstore)
        gateway = await _gateway(receiver, transcriber, jobstore, "gateway-1")
        procs.append(gateway)
        yield Deployment(receiver, transcriber, jobstore, gateway, data_dir)
    finally:
        for p in reversed(procs):
            await p.stop()
        await receiver.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _services(spans: list[SpanRecord]) -> set[str]:
    return {s.service for s in spans}


def _trace_with(spans: list[SpanRecord], name: str, **attributes: Any) -> list[SpanRecord]:
    """The trace holding a span of that name (and attributes)."""
    for trace in by_trace(spans).values():
        if any(
            s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items()) for s in trace
        ):
            return trace
    return []


async def _stream(client: AsyncClient, samples: np.ndarray) -> int:
    finals = 0
    pcm = PcmAudio(audio.encode(samples, "raw"), 16000, 1)
    async for resp in client.stream(pcm_chunks(pcm), interim=True):
        finals += sum(1 for r in resp.results if r.is_final)
    return finals


async def _ready(gateway: ServiceProcess, client: AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while (await client.server_info()).model.serving_replicas < 1:
        assert loop.time() < deadline, "no transcriber became ready"
        await asyncio.sleep(0.2)


@pytest.mark.system
async def test_a_job_and_a_stream_are_each_one_trace_across_the_processes(deployment: Deployment):
    d = deployment
    async with AsyncClient(d.gateway.address, timeout=120) as client:
        await _ready(d.gateway, client)
        job = await client.submit(
            audio.encode(load_16k(by_name("harvard_osr_0030_8k")), "flac"), language="en"
        )
        done = await asyncio.wait_for(client.wait(job.job_id), 180)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED
        finals = await _stream(client, load_16k(by_name("librispeech_2412-153948-0000")))
        assert finals >= 1

    def job_complete(spans: list[SpanRecord]) -> bool:
        trace = _trace_with(spans, "job.run", **{"stt.job_id": job.job_id})
        return any(s.name == "stt.internal.v1.JobStore/CompleteJob" and s.kind == "server" for s in trace)

    def stream_complete(spans: list[SpanRecord]) -> bool:
        return bool(_trace_with(spans, "stt.v1.Speech/StreamingRecognize"))

    spans = await d.receiver.receiver.wait_for(lambda ss: job_complete(ss) and stream_complete(ss), 60)
    job_trace = _trace_with(spans, "job.run", **{"stt.job_id": job.job_id})
    assert _services(job_trace) == {"stt-gateway", "stt-transcriber", "stt-jobstore"}
    names = {s.name for s in job_trace}
    assert {
        "stt.v1.Jobs/CreateJob",
        "stt.internal.v1.JobStore/CreateJob",
        "job.queued",
        "job.run",
        "job.chunk",
        "stt.internal.v1.Transcriber/Transcribe",
        "transcriber.model",
        "stt.internal.v1.JobStore/CompleteChunk",
        "stt.internal.v1.JobStore/CompleteJob",
    } <= names
    assert sum(s.name == "job.chunk" for s in job_trace) == done.chunks_total
    batch = [s for s in job_trace if s.name == "transcriber.model"]
    assert {s.attributes["stt.work_class"] for s in batch} == {"BATCH"}
    assert all(s.attributes["stt.batch_size"] >= 1 and s.attributes["stt.model_seconds"] > 0 for s in batch)

    stream_trace = _trace_with(spans, "stt.v1.Speech/StreamingRecognize")
    assert _services(stream_trace) == {"stt-gateway", "stt-transcriber"}
    assert sum(s.name == "stream.final" for s in stream_trace) == finals
    assert sum(s.name == "stream.hypothesis" for s in stream_trace) >= 2
    assert {s.attributes["stt.work_class"] for s in stream_trace if s.name == "transcriber.model"} == {"LIVE"}

    # The services' JSON log lines carry the trace id (e.g. the jobstore's "job created").
    trace_id = job_trace[0].trace_id
    for proc in (d.gateway, d.jobstore):
        lines = [json.loads(x) for x in proc.log().splitlines() if x.startswith("{")]
        assert any(x.get("trace_id") == trace_id for x in lines), f"{proc.label}: no log line in the trace"


@pytest.mark.system
async def test_metrics_documented_served_and_read_by_the_dashboard_and_rules(deployment: Deployment):
    """Scrape each process after real traffic (the test above or this one's Recognize call)."""
    d = deployment
    async with AsyncClient(d.gateway.address, timeout=120) as client:
        await _ready(d.gateway, client)
        await client.recognize(audio.encode(load_16k(by_name("jfk_inaugural_16k")), "flac"), language="en")
    table = documented()
    served: dict[str, dict[str, str]] = {}
    for name, proc in (("gateway", d.gateway), ("transcriber", d.transcriber), ("jobstore", d.jobstore)):
        served[name] = exported(scrape(proc))
    everywhere = set().union(*(set(v) for v in served.values()))
    assert sorted(everywhere - set(table)) == [], "served but not documented"
    for metric, doc in table.items():
        for service in doc.services:
            assert metric in served[service], f"{metric} is not served by the {service}"
    assert sorted(used_metrics() - everywhere) == [], "the dashboard or rules read metrics nobody serves"
    # Series carry only bounded labels.
    for name, text in ((n, scrape(p)) for n, p in (("gateway", d.gateway), ("jobstore", d.jobstore))):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert not set(sample.labels) & UNBOUNDED_LABELS, f"{name}: {sample.name}{sample.labels}"


@pytest.mark.system
async def test_a_job_taken_over_by_another_gateway_continues_its_trace(deployment: Deployment):
    """Gateway A runs a job and stalls (SIGSTOP) after its first chunks; its lease expires and gateway
    B takes the job over and completes it. One trace holds both gateways' work."""
    d = deployment
    data_dir = tempfile.mkdtemp(prefix="stt-takeover-")
    jobstore = await _jobstore(d.receiver, data_dir)
    a = await _gateway(d.receiver, d.transcriber, jobstore, "gateway-a", STT_MAX_PARALLEL_WINDOWS="1")
    b: ServiceProcess | None = None
    try:
        clips = ["harvard_osr_0030_8k", "harvard_osr_0031_8k", "harvard_osr_0034_8k"]
        recording = np.concatenate([load_16k(by_name(c)) for c in clips])
        async with AsyncClient(a.address, timeout=120) as client:
            await _ready(a, client)
            job = await client.submit(audio.encode(recording, "flac"), language="en")

            def a_worked(spans: list[SpanRecord]) -> bool:
                trace = _trace_with(spans, "stt.internal.v1.JobStore/CreateJob", **{"stt.job_id": job.job_id})
                return any(s.name == "job.chunk" for s in trace)

            await d.receiver.receiver.wait_for(a_worked, 120)
            state = await client.get_job(job.job_id)
            a.signal(signal.SIGSTOP)  # stalled: no heartbeats, no writes
        assert state.chunks_completed + 1 < state.chunks_total, "gateway A was about to finish the job"
        b = await _gateway(d.receiver, d.transcriber, jobstore, "gateway-b")
        async with AsyncClient(b.address, timeout=120) as client:
            done = await asyncio.wait_for(client.wait(job.job_id), 240)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED

        def b_finished(spans: list[SpanRecord]) -> bool:
            return bool(
                _trace_with(spans, "job.run", **{"stt.worker_id": "gateway-b", "stt.outcome": "completed"})
            )

        spans = await d.receiver.receiver.wait_for(b_finished, 60)
        trace = _trace_with(spans, "job.run", **{"stt.worker_id": "gateway-b"})
        # B's run that completed the job. Its attempt (the lease epoch) is past A's; under load B's own
        # lease may have lapsed once too and been taken again, so it is not always exactly 2.
        run_b = next(
            s
            for s in trace
            if s.name == "job.run"
            and s.attributes.get("stt.worker_id") == "gateway-b"
            and s.attributes.get("stt.outcome") == "completed"
        )
        assert run_b.attributes["stt.job_id"] == job.job_id and run_b.attributes["stt.attempt"] >= 2
        assert any(s.name == "stt.v1.Jobs/CreateJob" for s in trace)
        gateways = {s.resource["service.instance.id"] for s in trace if s.service == "stt-gateway"}
        assert len(gateways) == 2, f"spans from {gateways}"
        chunks_b = [s for s in trace if s.name == "job.chunk" and s.parent_span_id == run_b.span_id]
        chunks_a = [s for s in trace if s.name == "job.chunk" and s.parent_span_id != run_b.span_id]
        assert chunks_a and chunks_b
        assert len(chunks_b) <= done.chunks_total - state.chunks_completed
    finally:
        a.signal(signal.SIGCONT)
        await a.kill()
        if b is not None:
            await b.stop()
        await jobstore.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
